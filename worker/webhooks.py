"""The webhook delivery loop of each worker: a thread that sends the due deliveries of the outbox
(`service.webhooks.deliver_due`), so a slow or dead receiver never holds up a job's stage."""
from __future__ import annotations

import logging
import threading

from celery.signals import worker_ready, worker_shutdown

from service.settings import get_settings
from service.webhooks import deliver_due

log = logging.getLogger("faceadapt.worker")

_stop = threading.Event()


def delivery_loop(stop: threading.Event = _stop) -> None:
    """Deliver until `stop` is set: right away while deliveries are due, else every `webhook_poll_s`."""
    interval = get_settings().webhook_poll_s
    while not stop.is_set():
        try:
            if deliver_due():
                continue
        except Exception as exc:  # a database hiccup: try again at the next tick
            log.warning("webhook delivery: %s", exc)
        stop.wait(interval)


@worker_ready.connect
def _start(**_):
    threading.Thread(target=delivery_loop, name="faceadapt-webhooks", daemon=True).start()


@worker_shutdown.connect
def _stop_loop(**_):
    _stop.set()
