"""A job's steps: claim (lease), run a `restoration.adaptation.stages` stage, record progress and events, advance.

Steps: prepare -> targets[0..n-1] (in parallel: a Celery group, joined here in the database) -> finetune -> evaluate
-> register. A step is claimed under a row lock: a step already done, or held by a live worker (fresh heartbeat), is
left alone, so duplicate deliveries are harmless; a step whose worker stopped sending heartbeats is taken over and
the engine resumes it (finished images are skipped, fine-tuning continues from its last checkpoint). `attempts`
bounds redelivery. Finished steps upload their outputs to the blob storage (content keys recorded in the step), so a
worker with an empty work dir can rebuild what it needs. No ML here: the stages come from restoration.adaptation.stages.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from sqlalchemy import select, func
from sqlalchemy.orm import Session

from app.db import session_factory
from app.models import Job, JobEvent, JobStep, utcnow
from restoration.adaptation.stages import STAGES
from restoration.runtime import Cancelled
from restoration.settings import get_settings

log = logging.getLogger("faceadapt.worker")

ORDER = [st.name for st in STAGES]  # the engine's stage list, in order
STATUS = {st.name: st.status for st in STAGES}
FINAL = ("succeeded", "failed", "cancelled")
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


STOPPING = threading.Event()  # set when this worker starts a warm shutdown (SIGTERM, Ctrl-C)


class LeaseLost(Exception):
    """Another worker took this step over (our heartbeats were late): stop without touching it."""


def now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(dt: datetime | None) -> datetime | None:
    return dt.replace(tzinfo=timezone.utc) if dt is not None and dt.tzinfo is None else dt


def session() -> Session:
    return session_factory()()


def event(s: Session, job_id: str, message: str, stage: str | None = None, kind: str = "info", **data) -> None:
    s.add(JobEvent(job_id=job_id, stage=stage, kind=kind, message=message, data=data))


def workdir(job_id: str) -> Path:
    return get_settings().work_path / job_id


def create_steps(s: Session, job: Job) -> None:
    """Every step of a new job, all 'pending': `prepare` becomes 'queued' once its message is sent
    (worker.tasks.start_job); a job whose first message was never sent is found by the reaper (`requeue_unsent`)."""
    for stage in ORDER:
        for shard in range(job.num_shards if stage == "targets" else 1):
            s.add(JobStep(job_id=job.id, stage=stage, shard=shard, status="pending"))


# ------------------------------------------------------------------------------------------------- claiming
def locked(s: Session, job_id: str, stage: str, shard: int) -> tuple[Job | None, JobStep | None]:
    """Lock the job row, then the step row: every writer takes them in this order (no deadlocks)."""
    job = s.scalar(select(Job).where(Job.id == job_id).with_for_update())
    if job is None:
        return None, None
    step = s.scalar(select(JobStep).where(JobStep.job_id == job_id, JobStep.stage == stage, JobStep.shard == shard)
                    .with_for_update())
    return job, step


def claim(job_id: str, stage: str, shard: int) -> str:
    """'run' when this worker now holds the step; otherwise why not ('done', 'busy', 'final')."""
    settings = get_settings()
    with session() as s:
        job, step = locked(s, job_id, stage, shard)
        if job is None or step is None:
            return "final"
        if job.status in FINAL:
            return "final"
        if job.cancel_requested:
            finish_cancelled(s, job, stage, "cancelled before the stage started")
            s.commit()
            return "final"
        if step.status == "done":
            return "done"
        hb = _aware(step.heartbeat_at)
        if step.status == "running" and hb is not None and now() - hb < timedelta(seconds=settings.lease_ttl_s) \
                and step.lease_owner != WORKER_ID:
            return "busy"
        takeover = step.lease_owner is not None  # it ran before: resume from what that worker left
        if step.attempts >= settings.task_max_attempts:
            fail(s, job, stage, f"stage {stage}{_shard_label(job, stage, shard)} did not finish after "
                                f"{step.attempts} attempts (task_max_attempts); last holder {step.lease_owner}")
            s.commit()
            return "final"
        step.attempts += 1
        step.status, step.lease_owner, step.heartbeat_at = "running", WORKER_ID, now()
        if job.started_at is None:
            job.started_at = utcnow()
        if ORDER.index(stage) >= ORDER.index(_stage_of(job)):
            if job.stage != stage:  # a new stage: its progress starts at 0 of an unknown total, not the last stage's
                job.progress_done, job.progress_total = 0, 0
            job.status, job.stage = STATUS[stage], stage
        label = _shard_label(job, stage, shard)
        if takeover:
            event(s, job_id, f"{stage}{label}: resumed by {WORKER_ID} (attempt {step.attempts}); previous worker "
                             f"{step.lease_owner} stopped", stage, "warning", attempt=step.attempts, shard=shard)
        else:
            event(s, job_id, f"{stage}{label}: started on {WORKER_ID}", stage, attempt=step.attempts, shard=shard)
        s.commit()
        return "run"


def _stage_of(job: Job) -> str:
    return job.stage if job.stage in ORDER else "prepare"


def _shard_label(job: Job, stage: str, shard: int) -> str:
    return f" shard {shard + 1}/{job.num_shards}" if stage == "targets" else ""


def fail(s: Session, job: Job, stage: str | None, message: str, **data) -> None:
    job.status, job.error, job.finished_at = "failed", message, utcnow()
    event(s, job.id, f"failed: {message}", stage, "error", **data)


def finish_cancelled(s: Session, job: Job, stage: str | None, message: str) -> None:
    if job.status not in FINAL:
        job.status, job.finished_at = "cancelled", utcnow()
        event(s, job.id, message, stage)


# ------------------------------------------------------------------------------------------------- the lease
class Lease:
    """Heartbeat thread + throttled progress writer + cancellation check for one running step."""

    def __init__(self, job_id: str, stage: str, shard: int):
        self.job_id, self.stage, self.shard = job_id, stage, shard
        self.settings = get_settings()
        self.lost = False
        self.cancel = False
        self._stop = threading.Event()
        self._progress: tuple[int, int] | None = None
        self._written: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
        try:
            self.flush()  # the final progress figures
        except Exception as e:  # never mask the stage's own outcome
            log.warning("final progress write failed: %s", e)

    def _beat(self) -> None:
        period = max(0.2, min(self.settings.heartbeat_s, 1.0))  # progress is written at most this often
        last_hb = 0.0
        while not self._stop.wait(period):
            try:
                if time.monotonic() - last_hb >= self.settings.heartbeat_s or self._progress != self._written:
                    self.flush()
                    last_hb = time.monotonic()
            except Exception as exc:  # a database hiccup must not kill the stage; the next beat retries
                log.warning("heartbeat failed: %s", exc)

    def flush(self) -> None:
        with self._lock:
            prog = self._progress
        with session() as s:
            job, step = locked(s, self.job_id, self.stage, self.shard)
            if step is None or job is None:
                self.lost = True
                return
            if step.lease_owner != WORKER_ID or step.status != "running":
                self.lost = True
                return
            step.heartbeat_at = now()
            if prog is not None:
                step.done_count, step.total_count = prog
                if job.stage == self.stage:
                    if self.stage == "targets":
                        s.flush()
                        done, total = s.execute(select(func.sum(JobStep.done_count), func.sum(JobStep.total_count))
                                                .where(JobStep.job_id == self.job_id, JobStep.stage == "targets")).one()
                        job.progress_done, job.progress_total = int(done or 0), int(total or 0)
                    else:
                        job.progress_done, job.progress_total = prog
            self.cancel = bool(job.cancel_requested) or job.status in FINAL
            s.commit()
            self._written = prog

    def progress(self, _stage: str, done: int, total: int) -> None:
        with self._lock:
            self._progress = (int(done), int(total))

    def should_cancel(self) -> bool:
        return self.cancel or self.lost or STOPPING.is_set()


# ------------------------------------------------------------------------------------------------- running
def run(job_id: str, stage: str, shard: int = 0) -> str:
    """Run one step of a job (the body of the Celery task). Returns what happened, for logs and tests."""
    try:
        return _run(job_id, stage, shard)
    finally:
        collect_if_final(job_id)


def collect_if_final(job_id: str) -> None:
    """A job that ended (succeeded, failed, cancelled): its work dir goes, and its step outputs leave the blob store
    at once (app.blobs); the reaper's periodic pass catches whatever this misses."""
    try:
        with session() as s:
            row = s.execute(select(Job.status, Job.blobs_collected_at).where(Job.id == job_id)).first()
        if row is not None and row[0] in FINAL:
            shutil.rmtree(workdir(job_id), ignore_errors=True)  # this worker's partial state of the job
            if row[1] is None:
                from app.blobs import collect_job

                collect_job(job_id)
    except Exception as exc:  # never fail a step over its clean-up
        log.warning("job %s: blob collection failed: %s", job_id, exc)


def _run(job_id: str, stage: str, shard: int = 0) -> str:
    verdict = claim(job_id, stage, shard)
    if verdict == "done":
        advance(job_id, stage, shard)  # a duplicate delivery after the step finished: make sure the job moves on
        return "done"
    if verdict != "run":
        return verdict
    from worker import stages

    t0 = time.monotonic()
    try:
        with Lease(job_id, stage, shard) as lease:
            result = stages.run_stage(job_id, stage, shard, lease)
            if lease.lost:
                raise LeaseLost()
    except LeaseLost:
        log.warning("job %s %s/%s: lease lost, stopping", job_id, stage, shard)
        return "lease_lost"
    except Cancelled:
        with session() as s:
            job = s.scalar(select(Job).where(Job.id == job_id).with_for_update())
            if job is not None and job.cancel_requested:
                finish_cancelled(s, job, stage, f"cancelled during {stage}")
                release(s, job_id, stage, shard, "cancelled")
            elif STOPPING.is_set():
                return hand_over(s, job_id, stage, shard)
            else:  # our lease was taken over: the new holder goes on
                log.warning("job %s %s/%s: lease lost, stopping", job_id, stage, shard)
            s.commit()
        return "cancelled"
    except Exception as exc:
        log.exception("job %s stage %s shard %s failed", job_id, stage, shard)
        with session() as s:
            job = s.scalar(select(Job).where(Job.id == job_id).with_for_update())
            if job is not None and job.status not in FINAL:
                fail(s, job, stage, f"{stage}: {type(exc).__name__}: {exc}")  # the traceback is in the worker log
                release(s, job_id, stage, shard, "failed")
            s.commit()
        return "failed"
    with session() as s:
        job, step = locked(s, job_id, stage, shard)
        if step is None or step.lease_owner != WORKER_ID or step.status != "running":
            return "lease_lost"
        step.status, step.finished_at, step.result = "done", utcnow(), result
        event(s, job_id, f"{stage}{_shard_label(job, stage, shard)}: finished in {time.monotonic() - t0:.1f}s",
              stage, summary={k: v for k, v in result.items() if k != "blobs"})
        s.commit()
    advance(job_id, stage, shard)
    return "ok"


def hand_over(s: Session, job_id: str, stage: str, shard: int) -> str:
    """This worker is shutting down: the stage stopped at a batch boundary (its partial work is kept); queue it again
    for another worker (or this one after a restart). A graceful stop does not count as an attempt."""
    from worker.tasks import enqueue

    _, step = locked(s, job_id, stage, shard)
    if step is None or step.lease_owner != WORKER_ID or step.status != "running":
        s.commit()
        return "lease_lost"
    enqueue(job_id, [(stage, shard)])
    step.status, step.heartbeat_at, step.attempts = "queued", now(), max(0, step.attempts - 1)
    event(s, job_id, f"{stage} shard {shard}: worker {WORKER_ID} is shutting down; stage paused and re-queued", stage)
    s.commit()
    return "handed_over"


def release(s: Session, job_id: str, stage: str, shard: int, status: str) -> None:
    step = s.scalar(select(JobStep).where(JobStep.job_id == job_id, JobStep.stage == stage, JobStep.shard == shard))
    if step is not None and step.lease_owner == WORKER_ID:
        step.status = status


def advance(job_id: str, stage: str, shard: int) -> None:
    """After a step is done: queue the next step(s) exactly once (the job row lock serialises finishing shards).

    Messages go out before the 'queued' mark is committed: a worker dying in between leaves the next steps 'pending'
    with their messages sent (they run; a later re-send is a harmless duplicate), never 'queued' without a message.
    Steps left 'pending' behind a finished stage are found by the reaper (`reap`), which calls this again.
    """
    from worker.tasks import enqueue

    with session() as s:
        job = s.scalar(select(Job).where(Job.id == job_id).with_for_update())
        if job is None or job.status in FINAL:
            return
        steps = s.scalars(select(JobStep).where(JobStep.job_id == job_id)).all()
        by_stage: dict[str, list[JobStep]] = {}
        for st in steps:
            by_stage.setdefault(st.stage, []).append(st)
        if stage == "register":
            job.status, job.finished_at, job.progress_done, job.progress_total = "succeeded", utcnow(), 1, 1
            event(s, job_id, f"succeeded: model {job.name!r} ({job.model_id}) is registered", "register",
                  model_id=job.model_id)
            s.commit()
            shutil.rmtree(workdir(job_id), ignore_errors=True)  # everything worth keeping is in the storage
            return
        elif all(st.status == "done" for st in by_stage[stage]):  # the last target shard to finish moves on
            nxt = [st for st in by_stage[ORDER[ORDER.index(stage) + 1]] if st.status == "pending"]
            if nxt:
                enqueue(job_id, [(st.stage, st.shard) for st in nxt])
                for st in nxt:
                    st.status, st.heartbeat_at = "queued", now()
        s.commit()


# ------------------------------------------------------------------------------------------------- reaper
def reap() -> int:
    """Re-queue steps whose worker died (no heartbeat for lease_ttl_s). Returns how many were re-queued.

    The step goes back to 'queued' (its lease owner kept, for the 'resumed' event), so every worker's reaper sends
    it once, and a slow-but-alive former holder sees it lost its lease at its next heartbeat.
    """
    from worker.tasks import enqueue

    settings = get_settings()
    cutoff = now() - timedelta(seconds=settings.lease_ttl_s)
    with session() as s:
        candidates = s.execute(
            select(JobStep.job_id, JobStep.stage, JobStep.shard, JobStep.heartbeat_at).join(Job, Job.id == JobStep.job_id)
            .where(JobStep.status == "running", Job.status.not_in(FINAL))
        ).all()
    stale = []
    for job_id, stage, shard, hb in candidates:
        if hb is not None and _aware(hb) >= cutoff:
            continue
        with session() as s:
            job, step = locked(s, job_id, stage, shard)
            hb = _aware(step.heartbeat_at) if step is not None else None
            if job is None or job.status in FINAL or step.status != "running" or (hb is not None and hb >= cutoff):
                continue  # another reaper, or the holder itself, got there first
            log.warning("job %s %s/%s: worker %s stopped sending heartbeats; re-queueing", job_id, stage, shard,
                        step.lease_owner)
            enqueue(job_id, [(stage, shard)])
            step.status = "queued"
            event(s, job_id, f"{stage} shard {shard}: no heartbeat from {step.lease_owner} for "
                             f"{settings.lease_ttl_s:.0f}s; re-queued", stage, "warning")
            s.commit()
            stale.append((job_id, stage, shard))
    return len(stale) + resume_stalled(cutoff) + requeue_unsent(cutoff) + expire_jobs()


def requeue_unsent(cutoff: datetime) -> int:
    """Jobs still 'queued' whose first step was never sent (the API process died, or the broker failed, between
    committing the job and sending its message): `prepare` is still 'pending' after the lease TTL. Send it."""
    from worker.tasks import enqueue

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
            step.status, step.heartbeat_at = "queued", now()
            event(s, job_id, "the first step was never queued (enqueue failed or the API stopped); re-queued by the "
                             "reaper", None, "warning")
            s.commit()
            n += 1
    return n


def expire_jobs() -> int:
    """Fail jobs running longer than `max_job_runtime_s` (counted from creation); a running stage sees the final
    status at its next heartbeat and stops at its next batch."""
    settings = get_settings()
    limit = now() - timedelta(seconds=settings.max_job_runtime_s)
    n = 0
    with session() as s:
        ids = s.scalars(select(Job.id).where(Job.status.not_in(FINAL), Job.created_at < limit)).all()
    for job_id in ids:
        with session() as s:
            job = s.scalar(select(Job).where(Job.id == job_id).with_for_update())
            if job is None or job.status in FINAL:
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
            .join(Job, Job.id == JobStep.job_id).where(Job.status.not_in(FINAL))
        ).all()
    jobs: dict[str, dict[str, list]] = {}
    for job_id, stage, status, finished in rows:
        jobs.setdefault(job_id, {}).setdefault(stage, []).append((status, _aware(finished)))
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
                n += 1
    return n
