"""Celery tasks: thin wrappers over worker.steps (claim, run a restoration.adaptation.stages stage, advance)."""
from __future__ import annotations

import logging
import threading

from celery import group
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down
from sqlalchemy.exc import InterfaceError, OperationalError

from restoration.settings import get_settings
from worker.celery_app import app

log = logging.getLogger("faceadapt.worker")


@app.task(name="faceadapt.run_step", acks_late=True, reject_on_worker_lost=True, ignore_result=True,
          autoretry_for=(OperationalError, InterfaceError), retry_backoff=2, retry_backoff_max=120, max_retries=20)
def run_step(job_id: str, stage: str, shard: int = 0) -> str:
    """One step of a job. Database outages (while claiming or advancing) retry the message with backoff; a stage's own
    errors fail the job (worker.steps.run)."""
    from worker import steps

    return steps.run(job_id, stage, shard)


def enqueue(job_id: str, steps: list[tuple[str, int]]) -> None:
    """Send steps to the GPU queue; several (the target shards) go out as one group and run in parallel."""
    sigs = [run_step.si(job_id, stage, shard) for stage, shard in steps]
    if len(sigs) == 1:
        sigs[0].apply_async()
    else:
        group(sigs).apply_async()


def start_job(job_id: str) -> None:
    """Queue the first stage of a job whose steps are committed (called by the API). The message goes out first,
    then `prepare` is marked 'queued'; if sending fails the exception reaches the caller (the API fails the job), and
    if the process dies in between the reaper sends it (`worker.steps.requeue_unsent`)."""
    from sqlalchemy import update

    from app.db import session_factory
    from app.models import JobStep
    from worker.steps import now

    enqueue(job_id, [("prepare", 0)])
    with session_factory()() as s:
        s.execute(update(JobStep).where(JobStep.job_id == job_id, JobStep.stage == "prepare",
                                        JobStep.status == "pending").values(status="queued", heartbeat_at=now()))
        s.commit()


# ------------------------------------------------------------------------------------------------ reaper thread
_stop = threading.Event()


def _reaper_loop() -> None:
    import time

    from app.blobs import collect_finished_jobs, sweep
    from worker.steps import reap

    settings = get_settings()
    interval = settings.reaper_interval_s
    last_sweep = time.monotonic()  # the first sweep one interval after start (not every worker at once at boot)
    while not _stop.wait(interval):
        try:
            reap()
        except Exception as exc:  # keep reaping after a database hiccup
            log.warning("reaper: %s", exc)
        try:
            collect_finished_jobs()  # step outputs of jobs that ended (normally done at once by the worker itself)
            if time.monotonic() - last_sweep >= settings.blob_gc_interval_s:
                last_sweep = time.monotonic()
                n = sweep()
                log.info("blob sweep: %d unreferenced blobs deleted", n)
        except Exception as exc:
            log.warning("blob collection: %s", exc)


@worker_ready.connect
def _start_reaper(**_):
    threading.Thread(target=_reaper_loop, name="faceadapt-reaper", daemon=True).start()


@worker_shutting_down.connect
def _shutting_down(**_):
    """Warm shutdown (SIGTERM, Ctrl-C): the running stage stops at its next batch and is handed over."""
    from worker.steps import STOPPING

    STOPPING.set()


@worker_shutdown.connect
def _stop_reaper(**_):
    _stop.set()
