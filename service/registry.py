"""The model registry: the `models` rows every API process, worker and the CLI read.

* visibility by tenant: a tenant sees its own models and the public ones (`tenant_id` NULL: the bundled models, the
  configured defaults and `settings.public_models`), never another tenant's; its own shadow a public one of the
  same name (`resolve_model`);
* `sync_zoo_models` publishes the public zoo models as registry rows (`builtin`: loaded from the zoo, not storage);
* a job's adapted model is registered with its files in the blob store (`add_job_model`, once per job);
* a registry model is made loadable from a local zoo: `materialise` (a process's cache, for serving and the CLI),
  `place_model` / `job_zoo` (a job's work dir); `delete_model` removes a tenant's model and collects its blobs;
* `service_models` lists every model registered by the service with its tenant (`faceadapt models list`).
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from restoration.adaptation import ZOO
from restoration.models import ModelCard, Zoo
from service import blobs
from service.db import session_factory
from service.errors import ServiceError
from service.rows import FINAL_STATUSES, Job, ModelRow, Tenant
from service.settings import ServiceSettings, get_settings
from service.storage import get_storage
from service.tenants import find_tenant

log = logging.getLogger(__name__)


def visible(tenant_id: str):
    """SQL filter: the tenant's own models and the public ones."""
    return or_(ModelRow.tenant_id == tenant_id, ModelRow.tenant_id.is_(None))


def resolve_model(session: Session, tenant_id: str, name_or_id: str, kind: str | None = "restorer") -> ModelRow:
    """The model a tenant asked for by name or id ('' / 'default': the configured default of `kind`); 404 when the
    tenant cannot see one, 400 when it is not a `kind`."""
    if name_or_id in ("", "default"):
        name_or_id = get_settings().default_restorer if kind != "prior" else get_settings().default_prior
    rows = session.scalars(
        select(ModelRow).where(visible(tenant_id), or_(ModelRow.name == name_or_id, ModelRow.id == name_or_id))
    ).all()
    if not rows:
        raise ServiceError(404, "model_not_found", f"no model {name_or_id!r}; GET /v1/models lists the models you can use")
    # the tenant's own model shadows a public one of the same name; newest first
    row = sorted(rows, key=lambda r: (r.tenant_id is not None, r.created_at), reverse=True)[0]
    if kind and row.kind != kind:
        raise ServiceError(400, "wrong_model_kind", f"model {name_or_id!r} is a {row.kind}, not a {kind}")
    return row


def list_models(session: Session, tenant_id: str) -> list[ModelRow]:
    """The models a tenant can use, oldest first."""
    return list(session.scalars(select(ModelRow).where(visible(tenant_id)).order_by(ModelRow.created_at)).all())


def name_taken(session: Session, tenant_id: str, name: str) -> bool:
    """A model of the tenant, or a public zoo model, already has this name."""
    return session.scalar(select(ModelRow.id).where(ModelRow.name == name,
                                                    (ModelRow.tenant_id == tenant_id) | ModelRow.builtin)) is not None


def public_zoo_names(settings: ServiceSettings, cards) -> set[str]:
    """Zoo models every tenant may use: the bundled ones, the configured defaults and `settings.public_models`.
    A model imported with the CLI into FACEADAPT_MODELS_DIR is not shared unless named there."""
    listed = {n.strip() for n in settings.public_models.split(",") if n.strip()}
    return {c.name for c in cards if c.builtin} | {settings.default_restorer, settings.default_prior} | listed


def sync_zoo_models(session: Session) -> None:
    """Make the public zoo models (`public_zoo_names`) public registry entries; zoo models that are no longer public
    leave the registry (unless a running job still uses one as its base)."""
    try:
        cards = Zoo().list()
    except Exception as exc:
        log.warning("cannot list the model zoo: %s", exc)
        return
    allowed = public_zoo_names(get_settings(), cards)
    existing = {r.name: r for r in session.scalars(select(ModelRow).where(ModelRow.builtin.is_(True)))}
    for name, row in existing.items():
        if name not in allowed and row.tenant_id is None:
            busy = session.scalar(select(Job.id).where(Job.base_model == row.id,
                                                       Job.status.not_in(FINAL_STATUSES)).limit(1))
            if busy is None:
                log.warning("zoo model %s is not public (FACEADAPT_PUBLIC_MODELS): removed from the registry", name)
                session.delete(row)
    cards = [c for c in cards if c.name in allowed]
    for card in cards:
        row = existing.get(card.name)
        data = card.to_json()
        if row is None:
            session.add(ModelRow(tenant_id=None, name=card.name, kind=card.kind, arch=card.arch, builtin=True,
                                 sha256=card.sha256, card=data, files={}))
        elif row.sha256 != card.sha256 or row.card != data:
            row.sha256, row.card, row.kind, row.arch = card.sha256, data, card.kind, card.arch
    session.flush()


def delete_model(session: Session, row: ModelRow) -> None:
    """Delete a tenant's model (a public one is a 403) and collect its blobs that nothing else references
    (content-addressed: siblings share config.json)."""
    if row.tenant_id is None:
        raise ServiceError(403, "model_public", f"{row.name!r} is a shared public model and cannot be deleted")
    keys = set(row.files.values()) | blobs.drop_refs(session, f"model:{row.id}")
    session.delete(row)
    session.commit()
    blobs.collect(keys)
    drop_cached(row.id)


def drop_cached(model_id: str) -> None:
    """Remove this process's local copy of a deleted model (`materialise`: HOME/cache/models/<id>)."""
    root = (get_settings().cache_path / "models").resolve()
    folder = (root / model_id).resolve()
    if folder.parent == root and folder.is_dir():
        shutil.rmtree(folder, ignore_errors=True)


def check_files(row: ModelRow) -> None:
    """Raise when the model cannot be loaded here: a zoo model missing from the zoo, or files missing from storage."""
    if row.builtin:
        Zoo().path(row.name)
        return
    storage = get_storage()
    missing = [f for f, k in row.files.items() if not storage.exists(k)]
    if missing:
        raise RuntimeError(f"files {missing} of {row.name} are missing from storage")


# ------------------------------------------------------------------------------------------ loadable copies
def _fetch_files(row: ModelRow, folder: Path) -> None:
    storage = get_storage()
    for fname, key in row.files.items():
        storage.fetch_to(key, folder / fname)


def materialise(row: ModelRow) -> Zoo:
    """Fetch a registry model's files from storage into this process's cache; returns a Zoo holding it as `row.id`."""
    root = get_settings().cache_path / "models"
    _fetch_files(row, root / row.id)
    return Zoo(root=root, builtin_dir=None)


def open_zoo(row: ModelRow) -> tuple[Zoo, str]:
    """A zoo holding the model of `row` and its name there: the zoo itself for a zoo model, else the local cache
    (`materialise`)."""
    if row.builtin:
        return Zoo(), row.name
    return materialise(row), row.id


def place_model(row: ModelRow, zoo_root: Path) -> str:
    """Make model `row` loadable from a job's zoo at `zoo_root` (under its own name); returns its name there."""
    dest = zoo_root / row.name
    if (dest / "card.json").is_file():
        return row.name
    if row.builtin:
        card = Zoo().get(row.name)
        if card.builtin:
            return row.name  # the job zoo searches the bundled models itself
        tmp = Path(tempfile.mkdtemp(prefix=f".{row.name}.", dir=zoo_root))  # parallel shards may race here
        shutil.copytree(card.path, tmp, dirs_exist_ok=True)
        try:
            tmp.rename(dest)
        except OSError:  # another worker placed it first
            shutil.rmtree(tmp, ignore_errors=True)
        return row.name
    _fetch_files(row, dest)
    return row.name


def job_zoo(job: Job, wd: Path) -> tuple[Zoo, str, str]:
    """A zoo rooted in the work dir, holding the job's base restorer and prior (the adapted model lands there too);
    returns it with the base's and the prior's names there."""
    root = wd / ZOO
    root.mkdir(parents=True, exist_ok=True)
    settings = get_settings()
    with session_factory()() as s:
        base = s.get(ModelRow, job.base_model)
        if base is None:
            raise ValueError(f"base model {job.base_model} was deleted")
        prior = s.scalar(select(ModelRow).where(ModelRow.name == settings.default_prior, ModelRow.tenant_id.is_(None)))
        base_name = place_model(base, root)
        prior_name = place_model(prior, root) if prior is not None else settings.default_prior
    return Zoo(root=root), base_name, prior_name


# ------------------------------------------------------------------------------------------ a job's model
def registered_model(job_id: str) -> dict | None:
    """The model a job already registered (an earlier attempt), recorded on the job again; None when there is none."""
    with session_factory()() as s:
        existing = s.scalar(select(ModelRow).where(ModelRow.job_id == job_id))
        if existing is None:
            return None
        s.get(Job, job_id).model_id = existing.id
        s.commit()
        return {"model_id": existing.id, "name": existing.name, "already_registered": True}


def add_job_model(job: Job, card: ModelCard, files: dict[str, str]) -> dict:
    """Register the adapted model of `job` (its `files`: zoo file name -> blob key) exactly once: the models.job_id
    unique constraint decides between racing workers. The model's blob references commit with its row."""
    with session_factory()() as s:
        row = ModelRow(tenant_id=job.tenant_id, name=job.name, kind=card.kind, arch=card.arch, builtin=False,
                       job_id=job.id, sha256=card.sha256, card=card.to_json(), files=files)
        s.add(row)
        try:
            s.flush()
            for key in files.values():  # the model's own references, committed with its row
                blobs.add_ref(s, key, f"model:{row.id}")
        except IntegrityError:
            s.rollback()
            row = s.scalar(select(ModelRow).where(ModelRow.job_id == job.id))
            if row is None:  # not our own earlier registration: the name is taken (uq_models_tenant_name)
                raise ValueError(f"a model named {job.name!r} already exists for this tenant") from None
        j = s.get(Job, job.id)
        j.model_id = row.id
        s.commit()
        return {"model_id": row.id, "name": row.name, "sha256": row.sha256}


# ------------------------------------------------------------------------------------------ the CLI's view
def service_models(session: Session) -> list[tuple[ModelRow, str | None]]:
    """Every model registered by the service itself (not a zoo model), with its tenant's name (None: public),
    by tenant, then name."""
    rows = session.execute(select(ModelRow, Tenant.name).outerjoin(Tenant, Tenant.id == ModelRow.tenant_id)
                           .where(ModelRow.builtin.is_(False))).all()
    return sorted(((r, t) for r, t in rows), key=lambda rt: (rt[1] or "", rt[0].name, rt[0].created_at))


def resolve_for_tenant(session: Session, tenant_name: str, name_or_id: str, kind: str | None = "restorer") -> ModelRow:
    """`resolve_model` for a tenant given by name (the CLI's `--tenant`); 404 `tenant_not_found` for an unknown one."""
    tenant = find_tenant(session, tenant_name)
    if tenant is None:
        raise ServiceError(404, "tenant_not_found", f"no tenant {tenant_name!r} in the service database")
    return resolve_model(session, tenant.id, name_or_id, kind=kind)
