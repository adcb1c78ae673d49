"""Adaptation jobs from the API side: create (and enqueue), read, list, cancel."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import ApiError
from app.models import Job, JobEvent, ModelRow, utcnow
from app.schemas import FINAL_STATUSES, AdaptationIn
from app.serving import resolve_model
from restoration.settings import get_settings


def validate_params(params: dict) -> dict:
    """Engine parameters must be AdaptConfig fields with values it accepts (checked by building one)."""
    from restoration.adapt import AdaptConfig

    try:
        AdaptConfig.from_dict(params)
    except (TypeError, ValueError) as exc:
        raise ApiError(422, "bad_params", f"invalid engine parameters: {exc}") from None
    return params


def create_job(session: Session, tenant_id: str, body: AdaptationIn) -> Job:
    from app.datasets import get_dataset
    from restoration.zoo import ZooError, check_name

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
    job = Job(tenant_id=tenant_id, dataset_id=ds.id, base_model=base.id, name=body.name, params=params,
              num_shards=min(body.shards or settings.target_shards, ds.image_count))
    session.add(job)
    session.flush()
    session.add(JobEvent(job_id=job.id, stage=None, kind="info", message="queued",
                         data={"base_model": base.name, "base_model_id": base.id, "images": ds.image_count,
                               "shards": job.num_shards}))
    session.commit()
    from worker.tasks import start_job

    start_job(job.id)
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


def job_out(job: Job, with_events: bool = True) -> dict:
    return {
        "id": job.id, "status": job.status, "dataset_id": job.dataset_id, "base_model": job.base_model,
        "name": job.name, "params": job.params,
        "progress": {"stage": job.stage, "done": job.progress_done, "total": job.progress_total},
        "events": [{"ts": e.ts, "stage": e.stage, "kind": e.kind, "message": e.message, "data": e.data or {}}
                   for e in job.events] if with_events else None,
        "evaluation": job.metrics or {}, "model_id": job.model_id, "error": job.error,
        "cancel_requested": job.cancel_requested, "created_at": job.created_at, "started_at": job.started_at,
        "finished_at": job.finished_at,
    }
