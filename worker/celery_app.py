"""The Celery application of the FaceAdapt workers (`celery -A worker.celery_app worker`).

Its configuration (broker, queues, routes, late acknowledgement, prefetch 1) is the service's
(`service.queue.make_celery`); the worker's own part is its task module, `worker.tasks`.

Run: `celery -A worker.celery_app worker -Q faceadapt,faceadapt-gpu --pool solo --prefetch-multiplier 1`.
"""
from __future__ import annotations

from service.queue import make_celery

app = make_celery(include=("worker.tasks", "worker.webhooks"))  # the task; the webhook loop
