"""Adaptation jobs and their steps, as bookkeeping: the stage order, creating a job with its steps (and queueing
it), reading, listing and cancelling one, events, failing, progress and its ETA.

A job's steps: prepare -> targets[0..n-1] (in parallel) -> finetune -> evaluate -> register. Who runs a step, its
lease and heartbeat, and moving on to the next stage are in `service/leases.py`; the reaper's passes in
`service/reaper.py`. No ML here: the stage bodies are the worker's (worker/stages.py).
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import threading
from pathlib import Path
from typing import Iterator

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from restoration.adaptation import AdaptConfig, STAGES, check_cards, check_min_images
from restoration.models import ModelCard, ZooError, check_name
from service.db import for_update
from service.datasets import get_dataset
from service.errors import LimitExceeded, ServiceError
from service.params import engine_params, validate_params
from service.queue import start_job
from service.registry import name_taken, resolve_model
from service.rows import FINAL_STATUSES, Job, JobEvent, JobStep, ModelRow, Tenant, owned, utcnow
from service.settings import get_settings
from service.webhooks import DEFAULT_EVENTS  # importing it installs the webhook outbox hook on every Session

log = logging.getLogger("faceadapt.api")

ORDER = [st.name for st in STAGES]  # the engine's stage list, in order
STATUS = {st.name: st.status for st in STAGES}
SHARDED = {st.name for st in STAGES if st.shardable}
GRID_KEY = "grid_png_b64"  # the evaluation grid, kept in the job's metrics (the job's blobs are collected at its end)


def workdir(job_id: str) -> Path:
    return get_settings().work_path / job_id


def event(s: Session, job_id: str, message: str, stage: str | None = None, kind: str = "info", **data) -> None:
    s.add(JobEvent(job_id=job_id, stage=stage, kind=kind, message=message, data=data))


def fail(s: Session, job: Job, stage: str | None, message: str, **data) -> None:
    job.status, job.error, job.finished_at = "failed", message, utcnow()
    event(s, job.id, f"failed: {message}", stage, "error", **data)


def finish_cancelled(s: Session, job: Job, stage: str | None, message: str) -> None:
    if job.status not in FINAL_STATUSES:
        job.status, job.finished_at = "cancelled", utcnow()
        event(s, job.id, message, stage)


def stage_of(job: Job) -> str:
    """The job's current stage (prepare before any started)."""
    return job.stage if job.stage in ORDER else "prepare"


def shard_label(job: Job, stage: str, shard: int) -> str:
    return f" shard {shard + 1}/{job.num_shards}" if stage in SHARDED else ""


def create_steps(s: Session, job: Job) -> None:
    """Every step of a new job, all 'pending': `prepare` becomes 'queued' once its message is sent
    (service.queue.start_job); a job whose first message was never sent is found by the reaper (`requeue_unsent`)."""
    for stage in ORDER:
        for shard in range(job.num_shards if stage in SHARDED else 1):
            s.add(JobStep(job_id=job.id, stage=stage, shard=shard, status="pending"))


# ------------------------------------------------------------------------------------------ the API's side
_quota_lock = threading.Lock()


@contextlib.contextmanager
def quota_lock(session: Session) -> Iterator[None]:
    """Held from counting a tenant's active jobs until the new job is committed. PostgreSQL: the tenant row lock of
    `check_active_jobs` does it. SQLite ignores FOR UPDATE, so there the count and the insert run under a process
    lock and a file lock (HOME/jobs.lock: the CLI or a second process on the same database) instead."""
    if session.get_bind().dialect.name != "sqlite":
        yield
        return
    path = get_settings().home_dir / "jobs.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with _quota_lock, open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_active_jobs(session: Session, tenant_id: str) -> None:
    """Quota: at most `max_active_jobs_per_tenant` queued or running jobs. The tenant row is locked first, so
    concurrent requests of one tenant are counted one after the other (SQLite: `quota_lock`)."""
    settings = get_settings()
    session.scalar(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
    active = session.scalar(select(func.count(Job.id)).where(Job.tenant_id == tenant_id,
                                                             Job.status.not_in(FINAL_STATUSES)))
    if active >= settings.max_active_jobs_per_tenant:
        raise LimitExceeded("max_active_jobs_per_tenant", settings.max_active_jobs_per_tenant,
                            f"{active} jobs are queued or running, the most max_active_jobs_per_tenant allows "
                            f"({settings.max_active_jobs_per_tenant}); wait for one to finish or cancel one", status=429)


def check_models(session: Session, base: ModelRow, params: dict) -> None:
    """The engine's own checks before any work (`restoration.adaptation.checks.check_cards`: the kinds of the base and
    the prior, the fixed input size of GFPGAN/CodeFormer bases) on the registry's cards, so the API refuses what the
    CLI refuses. Raises ServiceError 422."""
    settings = get_settings()
    config = AdaptConfig.from_dict(engine_params(params, settings))
    prior = session.scalar(select(ModelRow).where(ModelRow.name == settings.default_prior, ModelRow.tenant_id.is_(None)))
    if config.use_prior and prior is None:
        raise ServiceError(503, "prior_unavailable", f"the diffusion prior {settings.default_prior!r} is not in the "
                           "model registry; set use_prior=false or ask the operator to install it")
    try:
        check_cards(ModelCard.from_json(base.card), ModelCard.from_json(prior.card) if prior is not None else None,
                    config)
    except ValueError as exc:
        raise ServiceError(422, "bad_params", f"invalid engine parameters: {exc}") from None


def create_job(session: Session, tenant_id: str, dataset_id: str, base_model: str, name: str, params: dict,
               shards: int | None = None, webhook: str | None = None, webhook_events: list[str] | None = None) -> Job:
    """Create a job adapting `base_model` to a dataset under the model name `name`, with its steps, and queue it.
    Raises ServiceError (404 dataset or model, 409 name taken, 422 parameters, 429 quota, 503 broker down)."""
    settings = get_settings()
    ds = get_dataset(session, tenant_id, dataset_id)
    if ds.image_count == 0:
        raise ServiceError(400, "empty_dataset", "the dataset has no accepted image")
    base = resolve_model(session, tenant_id, base_model, kind="restorer")
    try:
        check_name(name)
    except ZooError as exc:
        raise ServiceError(422, "bad_name", str(exc)) from None
    busy = session.scalar(select(Job.id).where(Job.tenant_id == tenant_id, Job.name == name,
                                               Job.status.not_in(FINAL_STATUSES)))
    if name_taken(session, tenant_id, name) or busy:
        raise ServiceError(409, "name_taken", f"a model (or a running job) already uses the name {name!r}")
    params = validate_params(dict(params))
    check_models(session, base, params)
    try:  # the request's own values first, then the data: the engine's minimum (restoration.adaptation.checks), as the CLI applies it
        check_min_images(ds.image_count)
    except ValueError as exc:
        raise ServiceError(422, "too_few_images", str(exc)) from None
    with quota_lock(session):  # the count and the insert, one request at a time (SQLite too)
        check_active_jobs(session, tenant_id)
        job = Job(tenant_id=tenant_id, dataset_id=ds.id, base_model=base.id, name=name, params=params,
                  num_shards=min(shards or settings.target_shards, ds.image_count),
                  webhook_url=webhook,
                  webhook_events=(webhook_events or list(DEFAULT_EVENTS)) if webhook else None)
        session.add(job)
        try:
            session.flush()
        except IntegrityError:  # a concurrent request with the same name won (uq_jobs_tenant_name_active)
            session.rollback()
            raise ServiceError(409, "name_taken", f"a model (or a running job) already uses the name {name!r}") from None
        create_steps(session, job)  # in the same transaction as the job: a job never exists without its steps
        session.add(JobEvent(job_id=job.id, stage=None, kind="info", message="queued",
                             data={"base_model": base.name, "base_model_id": base.id, "images": ds.image_count,
                                   "shards": job.num_shards}))
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            raise ServiceError(409, "name_taken", f"a model (or a running job) already uses the name {name!r}") from None
    try:
        start_job(job.id)
    except Exception as exc:  # broker unreachable: the job must not stay 'queued' without a message
        log.error("job %s: could not be queued: %s", job.id, exc)
        session.rollback()
        j = for_update(session, Job, Job.id == job.id)
        if j is not None and j.status == "queued":
            prepare = session.scalar(select(JobStep).where(JobStep.job_id == job.id, JobStep.stage == "prepare"))
            if prepare is None or prepare.status == "pending":  # the message surely did not go out
                j.status, j.finished_at = "failed", utcnow()
                j.error = f"could not queue the job: {type(exc).__name__}: {exc}"[:2000]
                session.add(JobEvent(job_id=j.id, stage=None, kind="error", message=f"failed: {j.error}"))
        session.commit()
        raise ServiceError(503, "queue_unavailable", "the job could not be queued (the task broker is unreachable); "
                           "it was marked failed, try again later", job_id=job.id) from None
    return job


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    job = owned(session, Job, job_id, tenant_id)
    if job is None:
        raise ServiceError(404, "job_not_found", f"no adaptation job {job_id!r}")
    return job


def list_jobs(session: Session, tenant_id: str, limit: int) -> list[Job]:
    """A tenant's jobs, newest first."""
    return list(session.scalars(select(Job).where(Job.tenant_id == tenant_id)
                                .order_by(Job.created_at.desc()).limit(limit)).all())


def cancel_job(session: Session, tenant_id: str, job_id: str) -> Job:
    job = for_update(session, Job, Job.id == job_id)
    if job is None or job.tenant_id != tenant_id:
        raise ServiceError(404, "job_not_found", f"no adaptation job {job_id!r}")
    if job.status in FINAL_STATUSES:
        raise ServiceError(409, "job_finished", f"job is already {job.status}")
    if job.stage == ORDER[-1] and not job.cancel_requested:
        # registering has begun: the model is (being) published; a cancel now would be accepted and then ignored
        raise ServiceError(409, "job_registering", "the job is registering its model and can no longer be cancelled; "
                           "delete the model (DELETE /v1/models/{id}) once the job has succeeded")
    if not job.cancel_requested:
        job.cancel_requested = True
        session.add(JobEvent(job_id=job.id, stage=job.stage, kind="info", message="cancel requested"))
    if job.status == "queued":  # nothing runs yet: stop it here; a worker that picks it up later does nothing
        job.status, job.finished_at = "cancelled", utcnow()
        session.add(JobEvent(job_id=job.id, stage=None, kind="info", message="cancelled before it started"))
    session.commit()
    return job


def events_after(session: Session, job_id: str, after: int, limit: int) -> list[JobEvent]:
    """A page of a job's events, oldest first: the first `limit` with an id above `after` (the cursor). Every writer
    of a job's events holds the job's row lock, so ids grow in commit order and a cursor never skips a late event."""
    return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
                                .order_by(JobEvent.id).limit(limit)).all())


def status_counts(session: Session) -> dict[str, int]:
    """Jobs by status."""
    return dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())


def progress_out(job: Job, timing: bool = True) -> dict:
    """The current stage's progress, its elapsed time and an ETA from its rate so far (None until there is one;
    `timing=False` skips them, for listings that do not load each job's events)."""
    out = {"stage": job.stage, "done": job.progress_done, "total": job.progress_total, "stage_elapsed_s": None,
           "eta_s": None}
    if not timing or job.status in FINAL_STATUSES or not job.stage:
        return out
    started = [e.ts for e in job.events
               if e.stage == job.stage and ("started" in e.message or "resumed" in e.message)]
    if not started:
        return out
    t0 = min(started)
    now = utcnow()
    if t0.tzinfo is None and now.tzinfo is not None:
        now = now.replace(tzinfo=None)
    elapsed = max(0.0, (now - t0).total_seconds())
    out["stage_elapsed_s"] = round(elapsed, 1)
    done, total = int(job.progress_done or 0), int(job.progress_total or 0)
    if 0 < done < total:
        out["eta_s"] = round(elapsed / done * (total - done), 1)
    elif total and done >= total:
        out["eta_s"] = 0.0
    return out


def evaluation_grid(job: Job) -> bytes | None:
    """The held-out before/after grid (PNG) once the job has been evaluated."""
    b64 = (job.metrics or {}).get(GRID_KEY)
    return base64.b64decode(b64) if b64 else None

