"""Who runs a job's step: claiming it under a lease, the heartbeat and progress writer, and what happens when the
step ends (finished, failed, cancelled, handed over), including queueing the next stage exactly once.

A step is claimed under a row lock: a step already done, or held by a live worker (fresh heartbeat), is left alone,
so duplicate deliveries are harmless; a step whose worker stopped sending heartbeats is taken over and the engine
resumes it (finished images are skipped, fine-tuning continues from its last checkpoint). `attempts` bounds
redelivery. Every writer locks the job row first, then the step row (no deadlocks).
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from datetime import datetime, timedelta, timezone

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from service.blobs import collect_job
from service.db import for_update, session
from service.jobs import ORDER, SHARDED, STATUS, event, fail, finish_cancelled, shard_label, stage_of, workdir
from service.queue import enqueue, ping_broker
from service.rows import FINAL_STATUSES, Job, JobStep, WorkerBeat, utcnow
from service.settings import get_settings

log = logging.getLogger("faceadapt.worker")

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
STOPPING = threading.Event()  # set when this worker starts a warm shutdown (SIGTERM, Ctrl-C)


class LeaseLost(Exception):
    """Another worker took this step over (our heartbeats were late): stop without touching it."""


def aware(dt: datetime | None) -> datetime | None:
    return dt.replace(tzinfo=timezone.utc) if dt is not None and dt.tzinfo is None else dt


# ------------------------------------------------------------------------------------------------- claiming
def locked(s: Session, job_id: str, stage: str, shard: int) -> tuple[Job | None, JobStep | None]:
    """Lock the job row, then the step row: every writer takes them in this order (no deadlocks)."""
    job = for_update(s, Job, Job.id == job_id)
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
        if job.status in FINAL_STATUSES:
            return "final"
        if job.cancel_requested:
            finish_cancelled(s, job, stage, "cancelled before the stage started")
            s.commit()
            return "final"
        if step.status == "done":
            return "done"
        hb = aware(step.heartbeat_at)
        if step.status == "running" and hb is not None and utcnow() - hb < timedelta(seconds=settings.lease_ttl_s) \
                and step.lease_owner != WORKER_ID:
            return "busy"
        previous = step.lease_owner  # it ran before (a takeover): resume from what that worker left
        if step.attempts >= settings.task_max_attempts:
            fail(s, job, stage, f"stage {stage}{shard_label(job, stage, shard)} did not finish after "
                                f"{step.attempts} attempts (task_max_attempts); last holder {step.lease_owner}")
            s.commit()
            return "final"
        step.attempts += 1
        step.status, step.lease_owner, step.heartbeat_at = "running", WORKER_ID, utcnow()
        if job.started_at is None:
            job.started_at = utcnow()
        if ORDER.index(stage) >= ORDER.index(stage_of(job)):
            if job.stage != stage:  # a new stage: its progress starts at 0 of an unknown total, not the last stage's
                job.progress_done, job.progress_total = 0, 0
            job.status, job.stage = STATUS[stage], stage
        label = shard_label(job, stage, shard)
        if previous == WORKER_ID:  # this worker's own earlier try (a database or broker error at a step boundary)
            event(s, job_id, f"{stage}{label}: retried on {WORKER_ID} after an error outside the stage (attempt "
                             f"{step.attempts})", stage, "warning", attempt=step.attempts, shard=shard, worker=WORKER_ID)
        elif previous is not None:
            event(s, job_id, f"{stage}{label}: resumed by {WORKER_ID} (attempt {step.attempts}); previous worker "
                             f"{previous} stopped", stage, "warning", attempt=step.attempts, shard=shard,
                  previous_worker=previous, worker=WORKER_ID)
        else:
            event(s, job_id, f"{stage}{label}: started on {WORKER_ID}", stage, attempt=step.attempts, shard=shard)
        s.commit()
        return "run"


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
        db_down = broker_down = None  # since when (monotonic) the database / the broker did not answer
        while not self._stop.wait(period):
            try:
                if time.monotonic() - last_hb >= self.settings.heartbeat_s or self._progress != self._written:
                    self.flush()
                    last_hb = time.monotonic()
                    if db_down is not None:
                        self.note(f"the database was unreachable for {time.monotonic() - db_down:.0f}s; heartbeats "
                                  "resumed and the stage went on")
                        db_down = None
                    broker_down = self._check_broker(broker_down)
            except Exception as exc:  # a database hiccup must not kill the stage; the next beat retries
                log.warning("heartbeat failed: %s", exc)
                db_down = db_down if db_down is not None else time.monotonic()

    def _check_broker(self, down_since: float | None) -> float | None:
        """Ping the broker once a heartbeat; after an outage the job gets an event saying so."""
        try:
            ping_broker()
        except Exception as exc:
            if down_since is None:
                log.warning("broker unreachable: %s", exc)
            return down_since if down_since is not None else time.monotonic()
        if down_since is not None:
            self.note(f"the broker was unreachable for {time.monotonic() - down_since:.0f}s (restarted?); "
                      "reconnected, the stage went on")
        return None

    def note(self, message: str) -> None:
        """A warning event on the job about this running step."""
        with session() as s:
            event(s, self.job_id, f"{self.stage}: {message}", self.stage, "warning", worker=WORKER_ID)
            s.commit()

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
            step.heartbeat_at = utcnow()
            if prog is not None:
                step.done_count, step.total_count = prog
                if job.stage == self.stage:
                    if self.stage in SHARDED:  # the shards' progress adds up
                        s.flush()
                        done, total = s.execute(select(func.sum(JobStep.done_count), func.sum(JobStep.total_count))
                                                .where(JobStep.job_id == self.job_id, JobStep.stage == self.stage)).one()
                        job.progress_done, job.progress_total = int(done or 0), int(total or 0)
                    else:
                        job.progress_done, job.progress_total = prog
            self.cancel = bool(job.cancel_requested) or job.status in FINAL_STATUSES
            s.commit()
            self._written = prog

    def progress(self, _stage: str, done: int, total: int) -> None:
        with self._lock:
            self._progress = (int(done), int(total))

    def should_cancel(self) -> bool:
        return self.cancel or self.lost or STOPPING.is_set()


# ------------------------------------------------------------------------------------------------- a step ends
def finish_step(job_id: str, stage: str, shard: int, result: dict, seconds: float) -> bool:
    """Record a finished step and its result; False when this worker no longer holds it (nothing is recorded)."""
    with session() as s:
        job, step = locked(s, job_id, stage, shard)
        if step is None or step.lease_owner != WORKER_ID or step.status != "running":
            return False
        step.status, step.finished_at, step.result = "done", utcnow(), result
        event(s, job_id, f"{stage}{shard_label(job, stage, shard)}: finished in {seconds:.1f}s",
              stage, summary={k: v for k, v in result.items() if k != "blobs"})
        s.commit()
    return True


def fail_step(job_id: str, stage: str, shard: int, message: str) -> None:
    """The stage raised: the job fails with `message` (unless it already ended)."""
    with session() as s:
        job = for_update(s, Job, Job.id == job_id)
        if job is not None and job.status not in FINAL_STATUSES:
            fail(s, job, stage, message)
            release(s, job_id, stage, shard, "failed")
        s.commit()


def stop_cancelled(job_id: str, stage: str, shard: int) -> str:
    """The stage stopped at a batch boundary: the job was cancelled ('cancelled'), this worker is shutting down (the
    step is handed over: `hand_over`), or another worker took the lease ('cancelled', the new holder goes on)."""
    with session() as s:
        job = for_update(s, Job, Job.id == job_id)
        if job is not None and job.cancel_requested:
            finish_cancelled(s, job, stage, f"cancelled during {stage}")
            release(s, job_id, stage, shard, "cancelled")
        elif STOPPING.is_set():
            return hand_over(s, job_id, stage, shard)
        else:  # our lease was taken over: the new holder goes on
            log.warning("job %s %s/%s: lease lost, stopping", job_id, stage, shard)
        s.commit()
    return "cancelled"


def hand_over(s: Session, job_id: str, stage: str, shard: int) -> str:
    """This worker is shutting down: the stage stopped at a batch boundary (its partial work is kept); queue it again
    for another worker (or this one after a restart). A graceful stop does not count as an attempt."""
    _, step = locked(s, job_id, stage, shard)
    if step is None or step.lease_owner != WORKER_ID or step.status != "running":
        s.commit()
        return "lease_lost"
    enqueue(job_id, [(stage, shard)])
    step.status, step.heartbeat_at, step.attempts = "queued", utcnow(), max(0, step.attempts - 1)
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
    Steps left 'pending' behind a finished stage are found by the reaper (`service.reaper.reap`), which calls this
    again.
    """
    with session() as s:
        job = for_update(s, Job, Job.id == job_id)
        if job is None or job.status in FINAL_STATUSES:
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
                    st.status, st.heartbeat_at = "queued", utcnow()
        s.commit()


def collect_if_final(job_id: str) -> None:
    """A job that ended (succeeded, failed, cancelled): its work dir goes, and its step outputs leave the blob store
    at once (service.blobs); the reaper's periodic pass catches whatever this misses."""
    try:
        with session() as s:
            row = s.execute(select(Job.status, Job.blobs_collected_at).where(Job.id == job_id)).first()
        if row is not None and row[0] in FINAL_STATUSES:
            shutil.rmtree(workdir(job_id), ignore_errors=True)  # this worker's partial state of the job
            if row[1] is None:
                collect_job(job_id)
    except Exception as exc:  # never fail a step over its clean-up
        log.warning("job %s: blob collection failed: %s", job_id, exc)


# ------------------------------------------------------------------------------------------------- live workers
def beat_worker(worker_id: str = WORKER_ID) -> None:
    """This worker is alive (its `worker_heartbeats` row, written every `heartbeat_s`)."""
    with session() as s:
        row = s.get(WorkerBeat, worker_id)
        if row is None:
            s.add(WorkerBeat(id=worker_id, started_at=utcnow(), heartbeat_at=utcnow()))
        else:
            row.heartbeat_at = utcnow()
        s.commit()


def drop_worker(worker_id: str = WORKER_ID) -> None:
    """A clean stop: the worker's row goes."""
    with session() as s:
        s.execute(delete(WorkerBeat).where(WorkerBeat.id == worker_id))
        s.commit()


def live_workers() -> int:
    """Workers whose last heartbeat is younger than `worker_ttl_s`."""
    cutoff = utcnow() - timedelta(seconds=get_settings().worker_ttl_s)
    with session() as s:
        return int(s.scalar(select(func.count()).select_from(WorkerBeat).where(WorkerBeat.heartbeat_at >= cutoff)))


def prune_workers() -> int:
    """Forget workers silent for 10x `worker_ttl_s` (killed without a supervisor to tell); returns how many."""
    cutoff = utcnow() - timedelta(seconds=10 * get_settings().worker_ttl_s)
    with session() as s:
        n = s.execute(delete(WorkerBeat).where(WorkerBeat.heartbeat_at < cutoff)).rowcount
        s.commit()
    return int(n or 0)


def worker_died(worker_id: str, how: str) -> int:
    """A supervisor saw worker `worker_id` die (`how`: e.g. 'killed by signal 9'): its row goes, and the steps it held
    lose their lease at once (no heartbeat), so the next reaper pass hands them to a live worker instead of waiting
    for `lease_ttl_s`. Each job concerned gets an event. Returns how many steps were released."""
    with session() as s:
        s.execute(delete(WorkerBeat).where(WorkerBeat.id == worker_id))
        held = s.execute(select(JobStep.job_id, JobStep.stage, JobStep.shard).join(Job, Job.id == JobStep.job_id)
                         .where(JobStep.lease_owner == worker_id, JobStep.status == "running",
                                Job.status.not_in(FINAL_STATUSES))).all()
        s.commit()
    for job_id, stage, shard in held:
        with session() as s:
            job, step = locked(s, job_id, stage, shard)
            if job is None or step is None or step.lease_owner != worker_id or step.status != "running":
                continue
            s.execute(update(JobStep).where(JobStep.id == step.id).values(heartbeat_at=None))
            event(s, job_id, f"{stage}{shard_label(job, stage, shard)}: worker {worker_id} died ({how}); the stage "
                             "goes to the next live worker, which resumes it", stage, "warning", worker=worker_id)
            s.commit()
    return len(held)

