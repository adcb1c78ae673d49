"""The task queue from the sending side: the Celery configuration, sending job steps by task name, starting a job,
pinging the broker and reading queue depths. It never imports the worker: tasks are addressed by name (`RUN_STEP`).

Production: Redis broker (`FACEADAPT_BROKER_URL=redis://...`); the ML stages go to the GPU queue
(`settings.queue_gpu`), orchestration to `settings.queue_default`. Embedded mode (no broker URL): kombu's filesystem
transport under HOME/broker, which needs no server.

Long jobs are safe: `acks_late` (a message is acknowledged only when its stage finished), prefetch 1, a visibility
timeout longer than the longest job, `reject_on_worker_lost`; redelivery is bounded by the per-step attempt count kept
in the database (service/leases.py), and stages of dead workers are taken over through database leases
(service/reaper.py) long before the broker's visibility timeout would redeliver them.
"""
from __future__ import annotations

from datetime import datetime, timezone

from celery import Celery, group
from sqlalchemy import update

from service.db import session_factory
from service.rows import JobStep
from service.settings import ServiceSettings, get_settings, per_settings

RUN_STEP = "faceadapt.run_step"  # the worker's task (worker/tasks.py): run one step of a job


def broker_options(settings: ServiceSettings) -> dict:
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


def make_celery(settings: ServiceSettings | None = None, include: tuple[str, ...] = ()) -> Celery:
    """A Celery app configured for FaceAdapt: the worker's (which `include`s its task module) and the senders'."""
    settings = settings or get_settings()
    app = Celery("faceadapt", broker=settings.broker, include=list(include))
    app.conf.update(
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_store_errors_even_if_ignored=False,
        task_default_queue=settings.queue_default,
        task_routes={RUN_STEP: {"queue": settings.queue_gpu}},
        task_serializer="json",
        accept_content=["json"],
        worker_send_task_events=False,
        worker_hijack_root_logger=False,
    )
    return app


client = per_settings(make_celery)  # the Celery app this process sends with


def enqueue(job_id: str, steps: list[tuple[str, int]]) -> None:
    """Send steps to the GPU queue; several (the target shards) go out as one group and run in parallel."""
    app = client()
    sigs = [app.signature(RUN_STEP, args=(job_id, stage, shard), immutable=True, ignore_result=True)
            for stage, shard in steps]
    if len(sigs) == 1:
        sigs[0].apply_async()
    else:
        group(sigs).apply_async()


def start_job(job_id: str) -> None:
    """Queue the first stage of a job whose steps are committed (called by the API). The message goes out first,
    then `prepare` is marked 'queued'; if sending fails the exception reaches the caller (the API fails the job), and
    if the process dies in between the reaper sends it (`service.reaper.requeue_unsent`)."""
    enqueue(job_id, [("prepare", 0)])
    with session_factory()() as s:
        s.execute(update(JobStep).where(JobStep.job_id == job_id, JobStep.stage == "prepare",
                                        JobStep.status == "pending")
                  .values(status="queued", heartbeat_at=datetime.now(timezone.utc)))
        s.commit()


def queue_depths() -> dict[str, int]:
    settings = get_settings()
    out = {}
    with client().connection_for_read() as conn:
        channel = conn.default_channel
        size = getattr(channel, "_size", None)  # kombu's virtual transports (redis, filesystem, sqlalchemy)
        for q in (settings.queue_default, settings.queue_gpu):
            try:
                out[q] = int(size(q)) if size else int(channel.queue_declare(queue=q, passive=True).message_count)
            except Exception:  # a queue nobody declared yet holds nothing
                out[q] = 0
    return out


def ping_broker() -> None:
    with client().connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=3)
        if conn.transport_cls in ("redis", "rediss") or str(get_settings().broker).startswith("redis"):
            conn.default_channel.client.ping()
