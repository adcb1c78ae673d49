"""The Celery application of the FaceAdapt workers.

Production: Redis broker (`FACEADAPT_BROKER_URL=redis://...`); the ML stages go to the GPU queue
(`settings.queue_gpu`), orchestration to `settings.queue_default`. Embedded mode (no broker URL): kombu's filesystem
transport under HOME/broker, which needs no server.

Long jobs are safe: `acks_late` (a message is acknowledged only when its stage finished), prefetch 1, a visibility
timeout longer than the longest job, `reject_on_worker_lost`; redelivery is bounded by the per-step attempt count kept
in the database (worker/steps.py), and stages of dead workers are taken over through database leases (worker/reaper.py)
long before the broker's visibility timeout would redeliver them.

Run: `celery -A worker.celery_app worker -Q faceadapt,faceadapt-gpu --pool solo --prefetch-multiplier 1`.
"""
from __future__ import annotations


from celery import Celery

from restoration.settings import get_settings


def broker_options(settings) -> dict:
    url = settings.broker
    if url.startswith("filesystem"):
        folder = settings.home_dir / "broker"
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {"data_folder_in": str(folder / "queue"), "data_folder_out": str(folder / "queue"),
                "processed_folder": str(folder / "processed"), "control_folder": str(folder / "control"),
                "store_processed": False}
    opts = {"visibility_timeout": settings.visibility_timeout_s}
    if url.startswith(("redis", "rediss")) and settings.broker_key_prefix:
        opts["global_keyprefix"] = settings.broker_key_prefix
    return opts


def make_celery() -> Celery:
    settings = get_settings()
    app = Celery("faceadapt", broker=settings.broker, include=["worker.tasks"])
    app.conf.update(
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_default_queue=settings.queue_default,
        task_routes={"faceadapt.run_step": {"queue": settings.queue_gpu}},
        task_serializer="json",
        accept_content=["json"],
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
    )
    return app


app = make_celery()


def queue_depths() -> dict[str, int]:
    settings = get_settings()
    out = {}
    with app.connection_for_read() as conn:
        channel = conn.default_channel
        size = getattr(channel, "_size", None)  # kombu's virtual transports (redis, filesystem, sqlalchemy)
        for q in (settings.queue_default, settings.queue_gpu):
            try:
                out[q] = int(size(q)) if size else int(channel.queue_declare(queue=q, passive=True).message_count)
            except Exception:  # a queue nobody declared yet holds nothing
                out[q] = 0
    return out


def ping_broker() -> None:
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=3)
        if conn.transport_cls in ("redis", "rediss") or str(get_settings().broker).startswith("redis"):
            conn.default_channel.client.ping()
