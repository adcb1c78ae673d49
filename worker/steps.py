"""Run one step of a job on this worker: claim it (service.leases), run its stage body (worker.stages) under a lease
with heartbeats, record how it ended, and queue what comes next. Returns what happened, for logs and tests.

The bookkeeping (claim, lease, finish, fail, cancel, hand over, advance) is the service's (`service/leases.py`); the
stage bodies are `worker/stages.py`."""
from __future__ import annotations

import logging
import time

from restoration.runtime import Cancelled
from service.leases import (Lease, LeaseLost, advance, claim, collect_if_final, fail_step, finish_step,
                            stop_cancelled)
from worker.stages import run_stage

log = logging.getLogger("faceadapt.worker")


def run(job_id: str, stage: str, shard: int = 0) -> str:
    """Run one step of a job (the body of the Celery task)."""
    try:
        return _run(job_id, stage, shard)
    finally:
        collect_if_final(job_id)


def _run(job_id: str, stage: str, shard: int = 0) -> str:
    verdict = claim(job_id, stage, shard)
    if verdict == "done":
        advance(job_id, stage, shard)  # a duplicate delivery after the step finished: make sure the job moves on
        return "done"
    if verdict != "run":
        return verdict
    t0 = time.monotonic()
    try:
        with Lease(job_id, stage, shard) as lease:
            result = run_stage(job_id, stage, shard, lease)
            if lease.lost:
                raise LeaseLost()
    except LeaseLost:
        log.warning("job %s %s/%s: lease lost, stopping", job_id, stage, shard)
        return "lease_lost"
    except Cancelled:
        return stop_cancelled(job_id, stage, shard)
    except Exception as exc:
        log.exception("job %s stage %s shard %s failed", job_id, stage, shard)
        fail_step(job_id, stage, shard, f"{stage}: {type(exc).__name__}: {exc}")  # the traceback is in the worker log
        return "failed"
    if not finish_step(job_id, stage, shard, result, time.monotonic() - t0):
        return "lease_lost"
    advance(job_id, stage, shard)
    return "ok"
