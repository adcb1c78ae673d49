from __future__ import annotations

from fastapi import APIRouter, Query, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.deps import DB, CurrentPrincipal, Principal
from app.errors import ApiError
from app.jobs import cancel_job, create_job, evaluation_grid, get_job, job_out
from app.models import Job
from app.schemas import AdaptationIn, AdaptationOut

router = APIRouter(tags=["adaptations"])


@router.post("/v1/adaptations", status_code=202, response_model=AdaptationOut)
def start_adaptation(body: AdaptationIn, principal: Principal = CurrentPrincipal, session: Session = DB):
    """Start adapting `base_model` to a dataset; the job runs on the workers. Poll GET /v1/adaptations/{id}."""
    return job_out(create_job(session, principal.tenant_id, body))


@router.get("/v1/adaptations", response_model=list[AdaptationOut])
def list_adaptations(principal: Principal = CurrentPrincipal, session: Session = DB,
                     limit: int = Query(100, ge=1, le=1000)):
    jobs = session.scalars(select(Job).where(Job.tenant_id == principal.tenant_id)
                           .order_by(Job.created_at.desc()).limit(limit)).all()
    return [job_out(j, with_events=False) for j in jobs]


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
        raise ApiError(404, "grid_not_ready", "the job has not been evaluated yet (no before/after grid)")
    return Response(png, media_type="image/png")


@router.post("/v1/adaptations/{job_id}/cancel", status_code=202, response_model=AdaptationOut)
def cancel_adaptation(job_id: str, principal: Principal = CurrentPrincipal, session: Session = DB):
    """Ask the job to stop; a running stage stops at its next batch."""
    job = cancel_job(session, principal.tenant_id, job_id)
    return job_out(job)
