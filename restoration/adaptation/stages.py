"""The stage contract: one list of stages (`STAGES`) that the CLI (`run_adaptation`) and the service's worker run.

    prepare   detect + align faces (or take aligned crops), hold out an eval part        -> prepare/
    targets   restorer x0 + diffusion pseudo targets for the training crops (sharded)    -> targets/
    finetune  fine-tune the restorer on (crop, pseudo target) pairs, D real = HQ faces    -> finetune/
    evaluate  held-out crops: consistency, naturalness, (PSNR/SSIM with GT), grid, gate  -> eval/
    register  write the adapted model into the zoo with a full model card               -> registered.json

Each stage is a function `run(ctx: StageContext, shard: int) -> StageResult`: the context names the work dir, the zoo
and the callbacks (and, for prepare, its `PrepareInputs`); the result names the files the stage wrote (relative to
the work dir: what the worker stores) and a JSON-able summary (what the worker records as the step's result). Every
stage reads what it needs from the work dir, is safe to re-run and resumes where it stopped (prepare is skipped when
its manifest matches, pseudo targets skip finished images, fine-tuning resumes from its last checkpoint). Progress
callbacks are `progress(label, done, total)`; `should_cancel()` is checked between batches and raises
`restoration.runtime.Cancelled`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

from restoration.adaptation.card import register
from restoration.adaptation.checks import check_min_images, check_job
from restoration.adaptation.config import AdaptConfig
from restoration.adaptation.evaluate import evaluate
from restoration.adaptation.gate import QualityGateFailed
from restoration.adaptation.loaders import zoo_or_default
from restoration.adaptation.prepare import prepare
from restoration.adaptation.pseudo import recorded_files
from restoration.adaptation.sources import list_images
from restoration.adaptation.targets import generate_targets
from restoration.adaptation.tune import finetune
from restoration.adaptation.workdir import (COLOR, CROPS, FINETUNE_RESULT, GRID, GT, JOB, MANIFEST, METRICS, MODEL,
                                            REGISTERED, TARGETS, shard_manifest, shard_summary)
from restoration.faces.helper import FaceHelper
from restoration.models.zoo import ModelCard, Zoo
from restoration.runtime import CancelFn, ProgressFn, check_cancel
from restoration.settings import get_settings

__all__ = ["PREPARE_STAGE", "TARGETS_STAGE", "FINETUNE_STAGE", "EVALUATE_STAGE", "REGISTER_STAGE", "PrepareInputs",
           "StageContext", "StageResult", "PrepareResult", "FinetuneResult", "EvaluateResult", "RegisterResult",
           "Stage", "STAGES", "get_stage", "run_adaptation"]

#: stage names (the worker's steps, the database's job_steps.stage, the API's events)
PREPARE_STAGE, TARGETS_STAGE, FINETUNE_STAGE, EVALUATE_STAGE, REGISTER_STAGE = (
    "prepare", "targets", "finetune", "evaluate", "register")


@dataclass
class PrepareInputs:
    """What `prepare` reads besides the work dir: the source images and the job's settings.

    detections: per image (parallel to `images`), the faces found earlier (`restoration.adaptation.prepare.face_record`
    records, largest first): aligned from, not detected again; None (or None for an image): detect.
    gt_paths: aligned inputs only, source path -> ground truth (evaluation only). helper: a FaceHelper to detect and
    align with (None: one for `size` with the base card's alignment template)."""

    images: list[Path]
    config: AdaptConfig
    base: str
    prior: str | None
    name: str | None
    size: int
    detections: Sequence | None = None
    gt_paths: dict | None = None
    helper: FaceHelper | None = None


@dataclass
class StageContext:
    """What every stage gets. hq_images: clean reference faces (paths or arrays) for the colour correction and the
    discriminator (None: the job config's). name / overwrite: what register registers."""

    workdir: Path
    zoo: Zoo
    num_shards: int = 1
    progress: ProgressFn | None = None
    should_cancel: CancelFn | None = None
    hq_images: Sequence | None = None
    inputs: PrepareInputs | None = None
    name: str | None = None
    overwrite: bool = False


@dataclass
class StageResult:
    """files: what the stage wrote, relative to the work dir (the files that exist); summary: JSON-able figures."""

    files: list[str]
    summary: dict


@dataclass
class PrepareResult(StageResult):
    manifest: dict = field(default_factory=dict)  # prepare/manifest.json


@dataclass
class FinetuneResult(StageResult):
    result: dict = field(default_factory=dict)  # finetune/result.json


@dataclass
class EvaluateResult(StageResult):
    metrics: dict = field(default_factory=dict)  # eval/metrics.json
    grid: str = GRID  # the before/after grid (written when there are held-out crops)


@dataclass
class RegisterResult(StageResult):
    card: ModelCard | None = None


def _written(workdir: Path, names: Sequence[str]) -> list[str]:
    return [n for n in names if (workdir / n).is_file()]


def _globbed(workdir: Path, folder: str) -> list[str]:
    return sorted(p.relative_to(workdir).as_posix() for p in (workdir / folder).glob("*.png"))


def run_prepare(ctx: StageContext, shard: int = 0) -> PrepareResult:
    inp = ctx.inputs
    if inp is None:
        raise ValueError("the prepare stage needs its inputs (StageContext.inputs)")
    man = prepare(ctx.workdir, inp.images, aligned=inp.config.aligned, size=inp.size, helper=inp.helper,
                  config=inp.config, base=inp.base, prior=inp.prior, name=inp.name, gt_paths=inp.gt_paths,
                  detections=inp.detections, progress=ctx.progress, should_cancel=ctx.should_cancel, zoo=ctx.zoo)
    wd = Path(ctx.workdir)
    files = _written(wd, [JOB, MANIFEST]) + _globbed(wd, CROPS) + _globbed(wd, GT)
    return PrepareResult(files, {"faces": man["counts"], "usage": man.get("usage"), "skipped": man["skipped"][:50],
                                 "size": inp.size},
                         manifest=man)


def run_targets(ctx: StageContext, shard: int = 0) -> StageResult:
    res = generate_targets(ctx.workdir, shard, ctx.num_shards, zoo=ctx.zoo, progress=ctx.progress,
                           should_cancel=ctx.should_cancel, hq_images=ctx.hq_images)
    wd = Path(ctx.workdir)
    images = [f"{TARGETS}/{n}" for n in recorded_files(wd / TARGETS, (shard, ctx.num_shards))]
    # the colour correction is the same in every shard
    return StageResult(_written(wd, [shard_manifest(shard, ctx.num_shards), shard_summary(shard, ctx.num_shards),
                                     COLOR, *images]), res)


def run_finetune(ctx: StageContext, shard: int = 0) -> FinetuneResult:
    res = finetune(ctx.workdir, zoo=ctx.zoo, hq_images=ctx.hq_images, progress=ctx.progress,
                   should_cancel=ctx.should_cancel)
    summary = {k: res.get(k) for k in ("steps", "losses", "hq_source", "pairs", "resumed_from", "seconds",
                                        "early_stopping")}
    return FinetuneResult(_written(Path(ctx.workdir), [MODEL, FINETUNE_RESULT]), summary, result=res)


def run_evaluate(ctx: StageContext, shard: int = 0) -> EvaluateResult:
    res = evaluate(ctx.workdir, zoo=ctx.zoo, progress=ctx.progress, should_cancel=ctx.should_cancel)
    return EvaluateResult(_written(Path(ctx.workdir), [METRICS, GRID]), {"count": res.get("count")}, metrics=res)


def run_register(ctx: StageContext, shard: int = 0) -> RegisterResult:
    """Raises `restoration.adaptation.gate.QualityGateFailed` when the gate refuses the adapted model."""
    check_cancel(ctx.should_cancel, "cancelled before registering")
    card = register(ctx.workdir, zoo=ctx.zoo, name=ctx.name, overwrite=ctx.overwrite)
    return RegisterResult(_written(Path(ctx.workdir), [REGISTERED]), {"name": card.name, "sha256": card.sha256},
                          card=card)


@dataclass(frozen=True)
class Stage:
    """name: the step name; run: the stage function; shardable: it runs once per shard (`StageContext.num_shards`),
    the shards independently; status: the job's status while it runs; label: the name of its progress callbacks and
    of the CLI's timings."""

    name: str
    run: Callable[[StageContext, int], StageResult]
    shardable: bool
    status: str
    label: str

    def shards(self, num_shards: int) -> range:
        return range(num_shards if self.shardable else 1)


STAGES: tuple[Stage, ...] = (
    Stage(PREPARE_STAGE, run_prepare, False, "preparing", "prepare"),
    Stage(TARGETS_STAGE, run_targets, True, "generating_targets", "pseudo_targets"),
    Stage(FINETUNE_STAGE, run_finetune, False, "finetuning", "finetune"),
    Stage(EVALUATE_STAGE, run_evaluate, False, "evaluating", "evaluate"),
    Stage(REGISTER_STAGE, run_register, False, "evaluating", "register"),
)


def get_stage(name: str) -> Stage:
    for st in STAGES:
        if st.name == name:
            return st
    raise ValueError(f"unknown stage {name!r}")


def run_adaptation(
    data_dir: str | Path,
    base: str | None = None,
    prior: str | None = None,
    name: str | None = None,
    config: AdaptConfig | dict | None = None,
    workdir: str | Path | None = None,
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    *,
    zoo=None,
    helper=None,
    gt_dir: str | Path | None = None,
    hq_images: Sequence | None = None,
    register_model: bool = True,
    overwrite: bool = False,
) -> dict:
    """All stages, one shard: prepare -> targets -> finetune -> evaluate -> register. Resumable (same workdir).

    `base` / `prior` default to the settings' default restorer / prior. The job is checked first (`check_job`).
    A folder of fewer images than `check_min_images` takes is refused (ValueError) before any work.
    `gt_dir`: ground truth with the same file names as `data_dir` (aligned inputs only; evaluation only). Returns a
    summary dict with the stage results; a model the quality gate refuses is not registered ("refused" says why).
    """
    t0 = time.perf_counter()
    settings = get_settings()
    zoo = zoo_or_default(zoo)
    cfg = AdaptConfig.from_dict(config) if isinstance(config, dict) else (config or AdaptConfig())
    base = base or settings.default_restorer
    prior = prior or settings.default_prior
    if name is None:
        name = f"{base}-adapted-{datetime.now(timezone.utc).strftime('%Y%m%d%H%M%S')}"
    workdir = Path(workdir) if workdir is not None else settings.home_dir / "adapt" / name
    size = check_job(zoo, base, prior, cfg, name=name if register_model else None, overwrite=overwrite)
    images = list_images(data_dir)
    check_min_images(len(images))
    gt = None
    if gt_dir is not None:
        gt = {str(p): Path(gt_dir) / p.name for p in images if (Path(gt_dir) / p.name).is_file()}
    ctx = StageContext(workdir, zoo, progress=progress, should_cancel=should_cancel, hq_images=hq_images,
                       inputs=PrepareInputs(images, cfg, base, prior, name, size, gt_paths=gt, helper=helper),
                       name=name, overwrite=overwrite)
    timings: dict[str, float] = {}
    results: dict[str, StageResult] = {}
    refused = None
    for st in STAGES:
        if st.name == REGISTER_STAGE and not register_model:
            continue
        for shard in st.shards(ctx.num_shards):
            t = time.perf_counter()
            try:
                results[st.name] = st.run(ctx, shard)
            except QualityGateFailed as exc:
                refused = str(exc)
            else:
                timings[st.label] = round(time.perf_counter() - t, 2)
        if st.name == REGISTER_STAGE and progress is not None:
            progress(st.label, 1, 1)
    man = results[PREPARE_STAGE].manifest
    ft_res = results[FINETUNE_STAGE].result
    ev = results[EVALUATE_STAGE].metrics
    card = results[REGISTER_STAGE].card if REGISTER_STAGE in results else None
    return {
        "name": name if card is not None else None, "refused": refused, "gate": ev.get("gate"),
        "workdir": str(workdir), "base": base,
        "prior": prior if cfg.use_prior else None, "faces": man["counts"], "skipped_images": len(man["skipped"]),
        "usage": man.get("usage"),
        "pseudo_targets": results[TARGETS_STAGE].summary,
        "finetune": {k: ft_res.get(k) for k in ("steps", "losses", "hq_source", "seconds", "resumed_from",
                                                "early_stopping")},
        "evaluation": ev, "card": card.to_json() if card is not None else None, "timings": timings,
        "seconds": round(time.perf_counter() - t0, 2),
    }
