"""Stage 2, pseudo targets: the training crops' targets in `targets/`, in shards that several workers run at once.

`targets_status` tells whether every shard is done (the fine-tuning stage needs them all).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from restoration.adaptation.color import color_correction
from restoration.adaptation.config import AdaptConfig
from restoration.adaptation.files import write_json
from restoration.adaptation.loaders import job_device, load_prior, zoo_or_default
from restoration.adaptation.pseudo import generate_pseudo_targets, params_fingerprint, read_manifest
from restoration.adaptation.workdir import TARGETS, items, prepared_file, read_job, shard_summary
from restoration.runtime import CancelFn, ProgressFn

__all__ = ["generate_targets", "targets_status"]


def _targets_fingerprint(job: dict, gains=None) -> str:
    cfg: AdaptConfig = job["config"]
    extra = f"base={job.get('base')}|prior={job.get('prior')}" + ("" if cfg.use_prior else "|prior=none")
    if gains is not None:
        extra += f"|color={[round(float(v), 4) for v in gains]}"
    return params_fingerprint(cfg.pseudo, extra)


def generate_targets(
    workdir: str | Path,
    shard: int = 0,
    num_shards: int = 1,
    *,
    restorer=None,
    prior=None,
    zoo=None,
    device: str | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    hq_images: Sequence | None = None,
) -> dict:
    """Pseudo targets for shard `shard` of `num_shards` of the training crops, into `workdir/targets`.

    `restorer` / `prior` (loaded modules) default to the zoo models named in job.json; `hq_images`: the clean
    reference faces of `color_correction`. Returns {"shard", "num_shards", "total", "generated", "skipped",
    "seconds", "color_gains"}, also written to `targets/shard-<i>-of-<n>.json`.
    """
    workdir = Path(workdir)
    job = read_job(workdir)
    cfg: AdaptConfig = job["config"]
    dev = job_device(device, cfg)
    if restorer is None:
        restorer = zoo_or_default(zoo).load(job["base"], device=dev)
    if prior is None and cfg.use_prior:
        prior = load_prior(zoo_or_default(zoo), job["prior"], dev, respacing=cfg.pseudo.respacing)
    if not cfg.use_prior:
        prior = None
    inputs = [(it["id"], prepared_file(workdir, it)) for it in items(workdir, "train")]
    extra = f"base={job.get('base')}|prior={job.get('prior')}"
    gains = color_correction(workdir, hq_images, zoo)["gains"]
    res = generate_pseudo_targets(inputs, restorer, prior, workdir / TARGETS, cfg.pseudo, shard=(shard, num_shards),
                                  progress=progress, should_cancel=should_cancel, fingerprint_extra=extra,
                                  color_gains=gains)
    out = {"shard": shard, "num_shards": num_shards, "total": res.total, "generated": res.generated,
           "skipped": res.skipped, "seconds": round(res.seconds, 3), "color_gains": gains}
    write_json(workdir / shard_summary(shard, num_shards), out)
    return out


def targets_status(workdir: str | Path, zoo=None) -> dict:
    """{"done", "total", "complete", "missing": [ids]} over all shards (for the worker's fan-in)."""
    workdir = Path(workdir)
    job = read_job(workdir)
    ids = [it["id"] for it in items(workdir, "train")]
    gains = color_correction(workdir, zoo=zoo)["gains"]
    tdir = workdir / TARGETS
    done = read_manifest(tdir, fingerprint=_targets_fingerprint(job, gains)) if tdir.is_dir() else {}
    missing = [i for i in ids if i not in done]
    return {"done": len(ids) - len(missing), "total": len(ids), "complete": not missing, "missing": missing}
