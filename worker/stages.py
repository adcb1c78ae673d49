"""The stage bodies: materialise what a stage needs in the job's work dir, run the engine's stage
(`restoration.adaptation.STAGES`), upload exactly the files it names.

The work dir (`settings.work_path/<job id>`) is a cache: everything a finished step produced is also in the blob
storage (content keys in `job_steps.result["blobs"]`), so a worker on another host rebuilds the inputs of its stage
from storage. With a work dir shared by the workers (the compose volume), an interrupted stage also resumes from its
partial state (finished pseudo targets, the last fine-tuning checkpoint).
"""
from __future__ import annotations

import base64
import re
from pathlib import Path, PurePosixPath

from restoration.adaptation import (INPUTS, PREPARE_STAGE, REGISTER_STAGE, EvaluateResult, PrepareInputs, StageContext,
                                    crop_size, default_config, get_stage)
from restoration.adaptation import register as register_card
from restoration.runtime import Cancelled
from service.blobs import restore_blobs, upload
from service.db import session
from service.jobs import GRID_KEY, workdir
from service.leases import Lease
from service.params import engine_params
from service.registry import add_job_model, job_zoo, registered_model
from service.rows import Dataset, Job
from service.settings import get_settings
from service.storage import get_storage


def _safe_name(name: str) -> str:
    p = PurePosixPath(name)
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", p.stem).strip("_")[:60] or "img"
    suffix = p.suffix.lower() if re.fullmatch(r"\.[a-z0-9]{1,5}", p.suffix.lower()) else ".img"
    return stem + suffix


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
            grid_b64 = {GRID_KEY: base64.b64encode(grid.read_bytes()).decode()} if grid.is_file() else {}
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
    """Register the adapted model exactly once (service.registry: the models.job_id unique constraint decides between
    racing workers)."""
    existing = registered_model(job.id)
    if existing is not None:
        return existing
    if lease.should_cancel():
        raise Cancelled("cancelled before registering")
    card = register_card(wd, zoo=zoo, name=job.name, overwrite=True)
    folder = Path(zoo.path(job.name))
    files = upload(folder.parent, [folder / "model.safetensors", folder / "config.json", folder / "card.json"], job.id)
    files = {Path(k).name: v for k, v in files.items()}
    return add_job_model(job, card, files)
