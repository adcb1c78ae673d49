"""Celery tasks: `faceadapt.run_step` (one step of a job: worker.steps.run), and each worker's reaper and heartbeat
threads (its `worker_heartbeats` row: /readyz needs a live worker)."""
from __future__ import annotations

import logging
import threading
import time

from celery.signals import worker_process_init, worker_ready, worker_shutdown, worker_shutting_down
from sqlalchemy.exc import InterfaceError, OperationalError

from restoration.runtime import set_torch_threads
from service.blobs import collect_finished_jobs, sweep
from service.leases import STOPPING, beat_worker, drop_worker
from service.queue import RUN_STEP
from service.reaper import reap
from service.settings import get_settings
from worker import steps
from worker.celery_app import app
from worker.supervised import tie_to_parent

log = logging.getLogger("faceadapt.worker")


@app.task(name=RUN_STEP, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
          autoretry_for=(OperationalError, InterfaceError), retry_backoff=2, retry_backoff_max=120, max_retries=20)
def run_step(job_id: str, stage: str, shard: int = 0) -> str:
    """One step of a job. Database outages (while claiming or advancing) retry the message with backoff; a stage's own
    errors fail the job (worker.steps.run)."""
    return steps.run(job_id, stage, shard)


# ------------------------------------------------------------------------------------------------ reaper thread
_stop = threading.Event()


def _reaper_loop() -> None:
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


def _beat_loop() -> None:
    period = get_settings().heartbeat_s
    while True:
        try:
            beat_worker()
        except Exception as exc:  # a database outage: the next beat retries
            log.warning("worker heartbeat: %s", exc)
        if _stop.wait(period):
            return


def _set_threads() -> None:
    """torch's CPU threads in this worker (FACEADAPT_TORCH_THREADS; unset: every core): several workers on one
    machine share its cores instead of each using all of them."""
    set_torch_threads(get_settings().torch_threads)


@worker_process_init.connect
def _process_init(**_):
    _set_threads()  # a prefork child


@worker_ready.connect
def _start_reaper(**_):
    _set_threads()  # the solo pool runs the stages in this process
    tie_to_parent(_stop)  # a worker of `faceadapt serve` dies with it
    threading.Thread(target=_beat_loop, name="faceadapt-worker-beat", daemon=True).start()
    threading.Thread(target=_reaper_loop, name="faceadapt-reaper", daemon=True).start()


@worker_shutting_down.connect
def _shutting_down(**_):
    """Warm shutdown (SIGTERM, Ctrl-C): the running stage stops at its next batch and is handed over."""
    STOPPING.set()


@worker_shutdown.connect
def _stop_reaper(**_):
    _stop.set()
    try:
        drop_worker()
    except Exception as exc:
        log.warning("could not remove this worker's heartbeat row: %s", exc)
