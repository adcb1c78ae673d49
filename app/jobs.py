"""Adaptation jobs from the API side: create (and enqueue), read, list, cancel."""
from __future__ import annotations

import logging

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import ApiError, LimitExceeded
from app.models import Job, JobEvent, JobStep, ModelRow, Tenant, utcnow
from app.schemas import FINAL_STATUSES, AdaptationIn
from app.serving import resolve_model
from restoration.settings import get_settings

log = logging.getLogger("faceadapt.api")


def validate_params(params: dict) -> dict:
    """Engine parameters: every field typed and bounded (app.params), then accepted by AdaptConfig itself."""
    from app.params import check_params, engine_params
    from restoration.adaptation.config import AdaptConfig

    settings = get_settings()
    check_params(params, settings)
    try:
        AdaptConfig.from_dict(engine_params(params, settings))
    except (TypeError, ValueError) as exc:
        raise ApiError(422, "bad_params", f"invalid engine parameters: {exc}") from None
    return params


def check_active_jobs(session: Session, tenant_id: str) -> None:
    """Quota: at most `max_active_jobs_per_tenant` queued or running jobs. The tenant row is locked first, so
    concurrent requests of one tenant are counted one after the other."""
    settings = get_settings()
    session.scalar(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())
    active = session.scalar(select(func.count(Job.id)).where(Job.tenant_id == tenant_id,
                                                             Job.status.not_in(FINAL_STATUSES)))
    if active >= settings.max_active_jobs_per_tenant:
        raise LimitExceeded("max_active_jobs_per_tenant", settings.max_active_jobs_per_tenant,
                            f"{active} jobs are queued or running, the most max_active_jobs_per_tenant allows "
                            f"({settings.max_active_jobs_per_tenant}); wait for one to finish or cancel one", status=429)


def create_job(session: Session, tenant_id: str, body: AdaptationIn) -> Job:
    from app.datasets import get_dataset
    from restoration.models.zoo import ZooError, check_name

    settings = get_settings()
    ds = get_dataset(session, tenant_id, body.dataset_id)
    if ds.image_count == 0:
        raise ApiError(400, "empty_dataset", "the dataset has no accepted image")
    base = resolve_model(session, tenant_id, body.base_model, kind="restorer")
    try:
        check_name(body.name)
    except ZooError as exc:
        raise ApiError(422, "bad_name", str(exc)) from None
    taken = session.scalar(select(ModelRow.id).where(ModelRow.name == body.name,
                                                      (ModelRow.tenant_id == tenant_id) | ModelRow.builtin))
    busy = session.scalar(select(Job.id).where(Job.tenant_id == tenant_id, Job.name == body.name,
                                               Job.status.not_in(FINAL_STATUSES)))
    if taken or busy:
        raise ApiError(409, "name_taken", f"a model (or a running job) already uses the name {body.name!r}")
    params = validate_params(dict(body.params))
    check_active_jobs(session, tenant_id)
    job = Job(tenant_id=tenant_id, dataset_id=ds.id, base_model=base.id, name=body.name, params=params,
              num_shards=min(body.shards or settings.target_shards, ds.image_count))
    session.add(job)
    try:
        session.flush()
    except IntegrityError:  # a concurrent request with the same name won (uq_jobs_tenant_name_active)
        session.rollback()
        raise ApiError(409, "name_taken", f"a model (or a running job) already uses the name {body.name!r}") from None
    from worker.steps import create_steps

    create_steps(session, job)  # in the same transaction as the job: a job never exists without its steps
    session.add(JobEvent(job_id=job.id, stage=None, kind="info", message="queued",
                         data={"base_model": base.name, "base_model_id": base.id, "images": ds.image_count,
                               "shards": job.num_shards}))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise ApiError(409, "name_taken", f"a model (or a running job) already uses the name {body.name!r}") from None
    from worker.tasks import start_job

    try:
        start_job(job.id)
    except Exception as exc:  # broker unreachable: the job must not stay 'queued' without a message
        log.error("job %s: could not be queued: %s", job.id, exc)
        session.rollback()
        j = session.scalar(select(Job).where(Job.id == job.id).with_for_update())
        if j is not None and j.status == "queued":
            prepare = session.scalar(select(JobStep).where(JobStep.job_id == job.id, JobStep.stage == "prepare"))
            if prepare is None or prepare.status == "pending":  # the message surely did not go out
                j.status, j.finished_at = "failed", utcnow()
                j.error = f"could not queue the job: {type(exc).__name__}: {exc}"[:2000]
                session.add(JobEvent(job_id=j.id, stage=None, kind="error", message=f"failed: {j.error}"))
        session.commit()
        raise ApiError(503, "queue_unavailable", "the job could not be queued (the task broker is unreachable); it "
                       "was marked failed, try again later", job_id=job.id) from None
    return job


def get_job(session: Session, tenant_id: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise ApiError(404, "job_not_found", f"no adaptation job {job_id!r}")
    return job


def cancel_job(session: Session, tenant_id: str, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id).with_for_update())
    if job is None or job.tenant_id != tenant_id:
        raise ApiError(404, "job_not_found", f"no adaptation job {job_id!r}")
    if job.status in FINAL_STATUSES:
        raise ApiError(409, "job_finished", f"job is already {job.status}")
    if not job.cancel_requested:
        job.cancel_requested = True
        session.add(JobEvent(job_id=job.id, stage=job.stage, kind="info", message="cancel requested"))
    if job.status == "queued":  # nothing runs yet: stop it here; a worker that picks it up later does nothing
        job.status, job.finished_at = "cancelled", utcnow()
        session.add(JobEvent(job_id=job.id, stage=None, kind="info", message="cancelled before it started"))
    session.commit()
    return job


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


GRID_KEY = "grid_png_b64"  # the evaluation grid, kept in the job's metrics (the job's blobs are collected at its end)


def evaluation_grid(job: Job) -> bytes | None:
    import base64

    b64 = (job.metrics or {}).get(GRID_KEY)
    return base64.b64decode(b64) if b64 else None


def _evaluation_out(job: Job) -> dict:
    ev = {k: v for k, v in (job.metrics or {}).items() if k != GRID_KEY}
    if (job.metrics or {}).get(GRID_KEY):
        ev["grid_url"] = f"/v1/adaptations/{job.id}/grid"
    return ev


def job_out(job: Job, with_events: bool = True) -> dict:
    return {
        "id": job.id, "status": job.status, "dataset_id": job.dataset_id, "base_model": job.base_model,
        "name": job.name, "params": job.params,
        "progress": progress_out(job, timing=with_events),
        "events": [{"ts": e.ts, "stage": e.stage, "kind": e.kind, "message": e.message, "data": e.data or {}}
                   for e in job.events] if with_events else None,
        "evaluation": _evaluation_out(job), "model_id": job.model_id, "error": job.error,
        "cancel_requested": job.cancel_requested, "created_at": job.created_at, "started_at": job.started_at,
        "finished_at": job.finished_at,
    }
