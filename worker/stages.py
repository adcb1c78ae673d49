"""The stage bodies: materialise what a stage needs in the job's work dir, call `restoration.adaptation.engine`, upload results.

The work dir (`settings.work_path/<job id>`) is a cache: everything a finished step produced is also in the blob
storage (content keys in `job_steps.result["blobs"]`), so a worker on another host rebuilds the inputs of its stage
from storage. With a work dir shared by the workers (the compose volume), an interrupted stage also resumes from its
partial state (finished pseudo targets, the last fine-tuning checkpoint).
"""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path, PurePosixPath

from restoration.adaptation import engine as adapt
from restoration.runtime import Cancelled
from service.blobs import restore_blobs, upload
from service.db import session
from service.jobs import workdir
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
    wd = workdir(job_id)
    wd.mkdir(parents=True, exist_ok=True)
    with session() as s:
        job = s.get(Job, job_id)
        s.expunge(job)
    restore_blobs(job_id, wd)
    zoo, base_name, prior_name = job_zoo(job, wd)
    kw = dict(progress=lease.progress, should_cancel=lease.should_cancel)

    if stage == "prepare":
        paths = fetch_inputs(job, wd / "inputs")
        # the CLI's configuration: defaults, prior card, base card, then the job's own parameters (hq_set -> hq_dir)
        cfg = adapt.default_config(zoo, base_name, prior_name, engine_params(job.params, get_settings()))
        size = int(cfg.size or zoo.get(base_name).input_size)
        man = adapt.prepare(wd, paths, aligned=cfg.aligned, size=size, config=cfg, base=base_name, prior=prior_name,
                            name=job.name, zoo=zoo, **kw)
        files = [wd / "job.json", wd / "prepare" / "manifest.json", *sorted((wd / "prepare").glob("crops/*.png")),
                 *sorted((wd / "prepare").glob("gt/*.png"))]
        return {"faces": man["counts"], "skipped": man["skipped"][:50], "size": size, "blobs": upload(wd, files, job_id)}

    if stage == "targets":
        res = adapt.generate_targets(wd, shard, job.num_shards, zoo=zoo, **kw)
        tdir = wd / "targets"
        mf = tdir / f"manifest.shard-{shard}-of-{job.num_shards}.jsonl"
        files = [mf, tdir / f"shard-{shard}-of-{job.num_shards}.json", tdir / adapt.COLOR]  # colour: same in every shard
        for line in mf.read_text().splitlines() if mf.is_file() else []:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            files += [tdir / rec[k] for k in ("target", "x0") if k in rec]
        return {**res, "blobs": upload(wd, files, job_id)}

    if stage == "finetune":
        res = adapt.finetune(wd, zoo=zoo, **kw)
        summary = {k: res.get(k) for k in ("steps", "losses", "hq_source", "pairs", "resumed_from", "seconds")}
        return {**summary, "blobs": upload(wd, [wd / "finetune" / "model.safetensors", wd / "finetune" / "result.json"], job_id)}

    if stage == "evaluate":
        res = adapt.evaluate(wd, zoo=zoo, **kw)
        grid = wd / "eval" / "grid.png"
        with session() as s:
            # the grid travels with the figures (a few dozen KB): the job's blobs are collected when it ends
            s.get(Job, job_id).metrics = {**res, **({"grid_png_b64": base64.b64encode(grid.read_bytes()).decode()}
                                                    if grid.is_file() else {})}
            s.commit()
        return {"count": res.get("count"), "blobs": upload(wd, [wd / "eval" / "metrics.json", wd / "eval" / "grid.png"], job_id)}

    if stage == "register":
        return register(job, wd, zoo, lease)
    raise ValueError(f"unknown stage {stage!r}")


def fetch_inputs(job: Job, folder: Path) -> list[Path]:
    storage = get_storage()
    with session() as s:
        ds = s.get(Dataset, job.dataset_id) if job.dataset_id else None
        if ds is None:
            raise ValueError("the job's dataset was deleted")
        images = [(im.position, im.filename, im.blob_key) for im in ds.images]
    paths = []
    for pos, fname, key in images:
        p = folder / f"{pos:05d}-{_safe_name(fname)}"
        storage.fetch_to(key, p)
        paths.append(p)
    return paths


def register(job: Job, wd: Path, zoo, lease: Lease) -> dict:
    """Register the adapted model exactly once (service.registry: the models.job_id unique constraint decides between
    racing workers)."""
    existing = registered_model(job.id)
    if existing is not None:
        return existing
    if lease.should_cancel():
        raise Cancelled("cancelled before registering")
    card = adapt.register(wd, zoo=zoo, name=job.name, overwrite=True)
    folder = Path(zoo.path(job.name))
    files = upload(folder.parent, [folder / "model.safetensors", folder / "config.json", folder / "card.json"], job.id)
    files = {Path(k).name: v for k, v in files.items()}
    return add_job_model(job, card, files)
