from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.deps import DB, CurrentPrincipal, Principal
from app.errors import ApiError
from app.models import ModelRow
from app.schemas import ModelDetail, ModelOut
from app.serving import resolve_model, visible

router = APIRouter(tags=["models"])


def model_out(row: ModelRow, card: bool = False) -> dict:
    d = {"id": row.id, "name": row.name, "kind": row.kind, "arch": row.arch, "public": row.tenant_id is None,
         "builtin": row.builtin, "job_id": row.job_id, "sha256": row.sha256, "created_at": row.created_at}
    if card:
        d["card"] = row.card
    return d


@router.get("/v1/models", response_model=list[ModelOut])
def list_models(principal: Principal = CurrentPrincipal, session: Session = DB):
    rows = session.scalars(select(ModelRow).where(visible(principal.tenant_id)).order_by(ModelRow.created_at)).all()
    return [model_out(r) for r in rows]


@router.get("/v1/models/{model_id}", response_model=ModelDetail)
def read_model(model_id: str, principal: Principal = CurrentPrincipal, session: Session = DB):
    """The model card (by id or name)."""
    return model_out(resolve_model(session, principal.tenant_id, model_id, kind=None), card=True)


@router.delete("/v1/models/{model_id}", status_code=204)
def delete_model(model_id: str, principal: Principal = CurrentPrincipal, session: Session = DB):
    row = resolve_model(session, principal.tenant_id, model_id, kind=None)
    if row.tenant_id is None:
        raise ApiError(403, "model_public", f"{row.name!r} is a shared public model and cannot be deleted")
    from app import blobs

    keys = set(row.files.values()) | blobs.drop_refs(session, f"model:{row.id}")
    session.delete(row)
    session.commit()
    blobs.collect(keys)  # only blobs nothing else references (content-addressed: siblings share config.json)
