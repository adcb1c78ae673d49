"""v1 routes of the model registry: list the models a tenant can use, read one's card, delete one."""
from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy.orm import Session

from app.api.deps import DB, CurrentPrincipal, Principal
from app.schemas import ModelDetail, ModelOut
from service import registry
from service.rows import ModelRow

router = APIRouter(tags=["models"])


def model_out(row: ModelRow, card: bool = False) -> dict:
    d = {"id": row.id, "name": row.name, "kind": row.kind, "arch": row.arch, "public": row.tenant_id is None,
         "builtin": row.builtin, "job_id": row.job_id, "sha256": row.sha256, "created_at": row.created_at}
    if card:
        d["card"] = row.card
    return d


@router.get("/v1/models", response_model=list[ModelOut])
def list_models(principal: Principal = CurrentPrincipal, session: Session = DB):
    return [model_out(r) for r in registry.list_models(session, principal.tenant_id)]


@router.get("/v1/models/{model_id}", response_model=ModelDetail)
def read_model(model_id: str, principal: Principal = CurrentPrincipal, session: Session = DB):
    """The model card (by id or name)."""
    return model_out(registry.resolve_model(session, principal.tenant_id, model_id, kind=None), card=True)


@router.delete("/v1/models/{model_id}", status_code=204)
def delete_model(model_id: str, principal: Principal = CurrentPrincipal, session: Session = DB):
    registry.delete_model(session, registry.resolve_model(session, principal.tenant_id, model_id, kind=None))
