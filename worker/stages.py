"""The stage bodies: fetch what a stage needs, run it (`restoration.adaptation.stages`), store the files it names.

The work dir (`settings.work_path/<job id>`) is a cache: everything a finished step produced is also in the blob
storage (content keys in `job_steps.result["blobs"]`), so a worker on another host rebuilds the inputs of its stage
from storage. With a work dir shared by the workers (the compose volume), an interrupted stage also resumes from its
partial state (finished pseudo targets, the last fine-tuning checkpoint).
"""
from __future__ import annotations

import base64
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from app.models import Dataset, Job, JobStep, ModelRow
from app.params import engine_params
from app.storage import get_storage
from restoration.adaptation.card import register as register_card
from restoration.adaptation.config import crop_size, default_config
from restoration.adaptation.stages import (PREPARE_STAGE, REGISTER_STAGE, EvaluateResult, PrepareInputs, StageContext,
                                           get_stage)
from restoration.adaptation.workdir import INPUTS, ZOO
from restoration.runtime import Cancelled
from restoration.settings import get_settings
from worker.steps import Lease, session, workdir


def _safe_name(name: str) -> str:
    p = PurePosixPath(name)
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", p.stem).strip("_")[:60] or "img"
    suffix = p.suffix.lower() if re.fullmatch(r"\.[a-z0-9]{1,5}", p.suffix.lower()) else ".img"
    return stem + suffix


def upload(wd: Path, files: list[Path], job_id: str) -> dict[str, str]:
    """Store a step's outputs, referenced by the job until it ends (app.blobs: blob, reference, one transaction)."""
    from app import blobs

    files = [f for f in files if f.is_file()]
    with session() as s:
        keys = blobs.store_many(s, [f.read_bytes for f in files], f"job:{job_id}")
        s.commit()
    return {str(f.relative_to(wd)): k for f, k in zip(files, keys)}


def restore_blobs(job_id: str, wd: Path) -> int:
    """Fetch the outputs of the job's finished steps that this work dir lacks."""
    storage, n = get_storage(), 0
    with session() as s:
        results = s.scalars(select(JobStep.result).where(JobStep.job_id == job_id, JobStep.status == "done")).all()
    for res in results:
        for rel, key in (res or {}).get("blobs", {}).items():
            target = wd / rel
            if not target.is_file():
                storage.fetch_to(key, target)
                n += 1
    return n


def _place_model(row: ModelRow, zoo_root: Path) -> str:
    """Make model `row` loadable from the job zoo; returns its name there."""
    from restoration.models.zoo import Zoo

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
    storage = get_storage()
    for fname, key in row.files.items():
        storage.fetch_to(key, dest / fname)
    return row.name


def job_zoo(job: Job, wd: Path):
    """A zoo rooted in the work dir, holding the job's base restorer and prior (the adapted model lands there too)."""
    from restoration.models.zoo import Zoo

    root = wd / ZOO
    root.mkdir(parents=True, exist_ok=True)
    settings = get_settings()
    with session() as s:
        base = s.get(ModelRow, job.base_model)
        if base is None:
            raise ValueError(f"base model {job.base_model} was deleted")
        prior = s.scalar(select(ModelRow).where(ModelRow.name == settings.default_prior, ModelRow.tenant_id.is_(None)))
        base_name = _place_model(base, root)
        prior_name = _place_model(prior, root) if prior is not None else settings.default_prior
    return Zoo(root=root), base_name, prior_name


def run_stage(job_id: str, stage: str, shard: int, lease: Lease) -> dict:
    """Run one step through the engine's stage contract (`restoration.adaptation.stages`); its result is the stage's
    summary and the storage keys of exactly the files the stage names."""
    step = get_stage(stage)
    wd = workdir(job_id)
    wd.mkdir(parents=True, exist_ok=True)
    with session() as s:
        job = s.get(Job, job_id)
        s.expunge(job)
    restore_blobs(job_id, wd)
    zoo, base_name, prior_name = job_zoo(job, wd)
    if step.name == REGISTER_STAGE:
        return register(job, wd, zoo, lease)
    ctx = StageContext(wd, zoo, num_shards=job.num_shards, progress=lease.progress, should_cancel=lease.should_cancel)
    if step.name == PREPARE_STAGE:
        images, faces = fetch_inputs(job, wd / INPUTS)
        # the CLI's configuration: defaults, prior card, base card, then the job's own parameters (hq_set -> hq_dir)
        cfg = default_config(zoo, base_name, prior_name, engine_params(job.params, get_settings()))
        ctx.inputs = PrepareInputs(images, cfg, base_name, prior_name, job.name, crop_size(cfg, zoo.get(base_name)),
                                   detections=faces)
    res = step.run(ctx, shard)
    if isinstance(res, EvaluateResult):
        grid = wd / res.grid
        with session() as s:
            # the grid travels with the figures (a few dozen KB): the job's blobs are collected when it ends
            grid_b64 = {"grid_png_b64": base64.b64encode(grid.read_bytes()).decode()} if grid.is_file() else {}
            s.get(Job, job_id).metrics = {**res.metrics, **grid_b64}
            s.commit()
    return {**res.summary, "blobs": upload(wd, [wd / f for f in res.files], job_id)}


def fetch_inputs(job: Job, folder: Path) -> tuple[list[Path], list[list[dict]]]:
    """The dataset's images, fetched into `folder`, and the faces detected in each at upload (`ImageRow.faces`)."""
    storage = get_storage()
    with session() as s:
        ds = s.get(Dataset, job.dataset_id) if job.dataset_id else None
        if ds is None:
            raise ValueError("the job's dataset was deleted")
        images = [(im.position, im.filename, im.blob_key, im.faces) for im in ds.images]
    paths, faces = [], []
    for pos, fname, key, found in images:
        p = folder / f"{pos:05d}-{_safe_name(fname)}"
        storage.fetch_to(key, p)
        paths.append(p)
        faces.append(found)
    return paths, faces


def register(job: Job, wd: Path, zoo, lease: Lease) -> dict:
    """Register the adapted model exactly once: the models.job_id unique constraint decides between racing workers."""
    with session() as s:
        existing = s.scalar(select(ModelRow).where(ModelRow.job_id == job.id))
        if existing is not None:
            s.get(Job, job.id).model_id = existing.id
            s.commit()
            return {"model_id": existing.id, "name": existing.name, "already_registered": True}
    if lease.should_cancel():
        raise Cancelled("cancelled before registering")
    card = register_card(wd, zoo=zoo, name=job.name, overwrite=True)
    folder = Path(zoo.path(job.name))
    files = upload(folder.parent, [folder / "model.safetensors", folder / "config.json", folder / "card.json"], job.id)
    files = {Path(k).name: v for k, v in files.items()}
    with session() as s:
        row = ModelRow(tenant_id=job.tenant_id, name=job.name, kind=card.kind, arch=card.arch, builtin=False,
                       job_id=job.id, sha256=card.sha256, card=card.to_json(), files=files)
        s.add(row)
        try:
            s.flush()
            from app import blobs

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
