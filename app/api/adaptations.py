"""Thin v1 routes of adaptation jobs: parse, check access, call service.jobs, shape the answer (`job_out`)."""
from __future__ import annotations

from fastapi import APIRouter, Query, Response
from sqlalchemy.orm import Session

from app.api.deps import DB, CurrentPrincipal, Principal
from app.schemas import AdaptationIn, AdaptationOut
from service.errors import ServiceError
from service.jobs import GRID_KEY, cancel_job, create_job, evaluation_grid, get_job, list_jobs, progress_out
from service.rows import Job

router = APIRouter(tags=["adaptations"])


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


@router.post("/v1/adaptations", status_code=202, response_model=AdaptationOut)
def start_adaptation(body: AdaptationIn, principal: Principal = CurrentPrincipal, session: Session = DB):
    """Start adapting `base_model` to a dataset; the job runs on the workers. Poll GET /v1/adaptations/{id}."""
    return job_out(create_job(session, principal.tenant_id, body.dataset_id, body.base_model, body.name,
                              body.params, body.shards))


@router.get("/v1/adaptations", response_model=list[AdaptationOut])
def list_adaptations(principal: Principal = CurrentPrincipal, session: Session = DB,
                     limit: int = Query(100, ge=1, le=1000)):
    return [job_out(j, with_events=False) for j in list_jobs(session, principal.tenant_id, limit)]


@router.get("/v1/adaptations/{job_id}", response_model=AdaptationOut)
def read_adaptation(job_id: str, principal: Principal = CurrentPrincipal, session: Session = DB):
    return job_out(get_job(session, principal.tenant_id, job_id))


@router.get("/v1/adaptations/{job_id}/grid", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "the before/after grid"}})
def adaptation_grid(job_id: str, principal: Principal = CurrentPrincipal, session: Session = DB):
    """The held-out before/after grid of the evaluation (PNG; columns: input, base, adapted, pseudo target), once the
    job has been evaluated; 404 before."""
    png = evaluation_grid(get_job(session, principal.tenant_id, job_id))
    if png is None:
        raise ServiceError(404, "grid_not_ready", "the job has not been evaluated yet (no before/after grid)")
    return Response(png, media_type="image/png")


@router.post("/v1/adaptations/{job_id}/cancel", status_code=202, response_model=AdaptationOut)
def cancel_adaptation(job_id: str, principal: Principal = CurrentPrincipal, session: Session = DB):
    """Ask the job to stop; a running stage stops at its next batch."""
    job = cancel_job(session, principal.tenant_id, job_id)
    return job_out(job)
