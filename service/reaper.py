"""The reaper's passes (each worker runs them every `reaper_interval_s`): stages of dead workers, jobs stalled
between two stages, jobs whose first message was never sent, and jobs past `max_job_runtime_s`."""
from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select

from service.db import for_update, session
from service.jobs import ORDER, event, fail, finish_cancelled
from service.leases import advance, aware, locked, prune_workers
from service.queue import enqueue
from service.rows import FINAL_STATUSES, Job, JobStep, utcnow
from service.settings import get_settings

log = logging.getLogger("faceadapt.worker")


def reap() -> int:
    """Re-queue steps whose worker died (no heartbeat for lease_ttl_s). Returns how many were re-queued.

    The step goes back to 'queued' (its lease owner kept, for the 'resumed' event), so every worker's reaper sends
    it once, and a slow-but-alive former holder sees it lost its lease at its next heartbeat.
    """
    settings = get_settings()
    cutoff = utcnow() - timedelta(seconds=settings.lease_ttl_s)
    with session() as s:
        candidates = s.execute(
            select(JobStep.job_id, JobStep.stage, JobStep.shard, JobStep.heartbeat_at).join(Job, Job.id == JobStep.job_id)
            .where(JobStep.status == "running", Job.status.not_in(FINAL_STATUSES))
        ).all()
    stale = []
    for job_id, stage, shard, hb in candidates:
        if hb is not None and aware(hb) >= cutoff:
            continue
        with session() as s:
            job, step = locked(s, job_id, stage, shard)
            hb = aware(step.heartbeat_at) if step is not None else None
            if job is None or job.status in FINAL_STATUSES or step.status != "running" or (hb is not None and hb >= cutoff):
                continue  # another reaper, or the holder itself, got there first
            log.warning("job %s %s/%s: worker %s stopped sending heartbeats; re-queueing", job_id, stage, shard,
                        step.lease_owner)
            enqueue(job_id, [(stage, shard)])
            step.status = "queued"
            event(s, job_id, f"{stage} shard {shard}: no heartbeat from {step.lease_owner} for "
                             f"{settings.lease_ttl_s:.0f}s; re-queued", stage, "warning")
            s.commit()
            stale.append((job_id, stage, shard))
    prune_workers()  # heartbeat rows of workers long gone
    return len(stale) + resume_stalled(cutoff) + requeue_unsent(cutoff) + expire_jobs()


def requeue_unsent(cutoff: datetime) -> int:
    """Jobs still 'queued' whose first step was never sent (the API process died, or the broker failed, between
    committing the job and sending its message): `prepare` is still 'pending' after the lease TTL. Send it."""
    n = 0
    with session() as s:
        ids = s.scalars(select(Job.id).join(JobStep, JobStep.job_id == Job.id)
                        .where(Job.status == "queued", Job.created_at < cutoff, JobStep.stage == "prepare",
                               JobStep.status == "pending")).all()
    for job_id in ids:
        with session() as s:
            job, step = locked(s, job_id, "prepare", 0)
            if job is None or step is None or job.status != "queued" or step.status != "pending":
                continue
            if job.cancel_requested:
                finish_cancelled(s, job, None, "cancelled before it started")
                s.commit()
                continue
            log.warning("job %s: its first step was never queued; queueing it", job_id)
            enqueue(job_id, [("prepare", 0)])
            step.status, step.heartbeat_at = "queued", utcnow()
            event(s, job_id, "the first step was never queued (enqueue failed or the API stopped); re-queued by the "
                             "reaper", None, "warning")
            s.commit()
            n += 1
    return n


def expire_jobs() -> int:
    """Fail jobs running longer than `max_job_runtime_s` (counted from creation); a running stage sees the final
    status at its next heartbeat and stops at its next batch."""
    settings = get_settings()
    limit = utcnow() - timedelta(seconds=settings.max_job_runtime_s)
    n = 0
    with session() as s:
        ids = s.scalars(select(Job.id).where(Job.status.not_in(FINAL_STATUSES), Job.created_at < limit)).all()
    for job_id in ids:
        with session() as s:
            job = for_update(s, Job, Job.id == job_id)
            if job is None or job.status in FINAL_STATUSES:
                continue
            fail(s, job, job.stage, f"the job ran longer than max_job_runtime_s ({settings.max_job_runtime_s:g} s)",
                 limit="max_job_runtime_s", limit_value=settings.max_job_runtime_s)
            job.cancel_requested = True
            s.commit()
            n += 1
    return n


def resume_stalled(cutoff: datetime) -> int:
    """Jobs whose worker died between finishing a stage and queueing the next: a finished stage (older than the
    lease TTL) followed by a stage still 'pending'. Calls `advance` for them again."""
    n = 0
    with session() as s:
        rows = s.execute(
            select(JobStep.job_id, JobStep.stage, JobStep.status, JobStep.finished_at)
            .join(Job, Job.id == JobStep.job_id).where(Job.status.not_in(FINAL_STATUSES))
        ).all()
    jobs: dict[str, dict[str, list]] = {}
    for job_id, stage, status, finished in rows:
        jobs.setdefault(job_id, {}).setdefault(stage, []).append((status, aware(finished)))
    for job_id, stages in jobs.items():
        last = stages.get(ORDER[-1], [])
        if last and all(st == "done" and f is not None and f < cutoff for st, f in last):
            advance(job_id, ORDER[-1], 0)  # registered, but the job was never marked succeeded
            n += 1
            continue
        for prev, nxt in zip(ORDER, ORDER[1:]):
            done = stages.get(prev, [])
            if done and all(st == "done" and f is not None and f < cutoff for st, f in done) \
                    and any(st == "pending" for st, _ in stages.get(nxt, [])):
                log.warning("job %s: %s finished but %s was never queued; queueing it", job_id, prev, nxt)
                advance(job_id, prev, 0)
                with session() as s:
                    event(s, job_id, f"{prev} finished but {nxt} was never queued (the broker or the worker failed "
                                     "in between); re-queued by the reaper", nxt, "warning")
                    s.commit()
                n += 1
    return n
