"""Stage 5, register: the adapted weights into the zoo, with a model card that records how they were made.

The card's `extra` holds the base and prior (with their sha256), the data fingerprint, the face counts, the whole
configuration, the fine-tuning losses and the held-out evaluation with the quality gate's verdict.
"""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file

from restoration.adaptation.config import AdaptConfig
from restoration.adaptation.files import read_json, write_json
from restoration.adaptation.gate import QualityGateFailed
from restoration.adaptation.loaders import zoo_or_default
from restoration.adaptation.workdir import (FINETUNE_RESULT, GRID, METRICS, MODEL, REGISTERED, read_job,
                                            read_prepare_manifest)
from restoration.faces.alignment import template_for_card
from restoration.models.zoo import ModelCard

__all__ = ["register", "adapted_serve_size"]


def adapted_serve_size(base_card: ModelCard, size: int) -> int | None:
    """The `serve_size` of a model adapted from `base_card` at crop side `size`: the base's, when the adaptation ran
    at the base's input size (a base trained at two sizes, such as the bundled restorer: adapted at 64 px, its weights
    restore better at 128 px as well; bench/adaptation.py prints both, docs/MODELS.md), else None (restored at
    `size`, the size it was fine-tuned at)."""
    if base_card.serve_size and int(size) == int(base_card.input_size):
        return int(base_card.serve_size)
    return None


def register(workdir: str | Path, zoo=None, name: str | None = None, overwrite: bool = False,
             force: bool = False) -> ModelCard:
    """Register the adapted EMA weights under `name` (default: job.json's name). Returns the ModelCard.

    Raises `QualityGateFailed` when `evaluate` judged the adapted model worse than the base
    (`restoration.adaptation.gate.GATE`), unless the job's `quality_gate` is off or `force`."""
    workdir = Path(workdir)
    job = read_job(workdir)
    zoo = zoo_or_default(zoo)
    name = name or job.get("name")
    if not name:
        raise ValueError("no model name given")
    cfg: AdaptConfig = job["config"]
    base_card = zoo.get(job["base"])
    base_cfg = zoo.config(job["base"])
    man = read_prepare_manifest(workdir)
    ft_res = read_json(workdir / FINETUNE_RESULT)
    ev_path = workdir / METRICS
    ev = read_json(ev_path) if ev_path.is_file() else None
    verdict = ((ev or {}).get("gate") or {}).get("verdict")
    if verdict == "worse" and cfg.quality_gate and not force:
        raise QualityGateFailed(
            "not registered: the adapted model is worse than the base on the held-out images ("
            + "; ".join(ev["gate"]["reasons"]) + f"); see the grid {GRID}; "
            "set quality_gate=false (CLI: --no-quality-gate) to register it anyway")
    prior_card = None
    if cfg.use_prior and job.get("prior"):
        try:
            prior_card = zoo.get(job["prior"])
        except Exception:
            prior_card = None
    extra = {
        "adapted": True,
        "method": "Kuai et al., WACV 2025: diffusion-prior pseudo targets + fine-tuning",
        "base": job["base"], "base_sha256": base_card.sha256,
        "prior": job.get("prior") if cfg.use_prior else None,
        "prior_sha256": prior_card.sha256 if prior_card is not None else None,
        "data_sha256": man["data_sha256"], "data_count": man["data_count"],
        "faces": man["counts"], "aligned": man["aligned"], "detector": man.get("detector"),
        "face_template": man.get("face_template") or template_for_card(base_card),
        "config": cfg.to_dict(),
        "losses": ft_res.get("losses"), "hq_source": ft_res.get("hq_source"), "finetune_steps": ft_res.get("steps"),
        "evaluation": ev,
    }
    card = zoo.register(
        name, base_cfg["arch"], base_cfg["config"], load_file(str(workdir / MODEL)),
        kind="restorer", input_size=man["size"], value_range=base_card.value_range, overwrite=overwrite,
        serve_size=adapted_serve_size(base_card, man["size"]),
        license=base_card.license,
        provenance=f"FaceAdapt adaptation of {job['base']} on {man['data_count']} customer images "
                   f"(data sha256 {man['data_sha256'][:12]}), pseudo targets from "
                   f"{job.get('prior') if cfg.use_prior else 'the base model itself (no prior)'}",
        description=f"{job['base']} adapted to a new image domain ({man['counts']['train']} training faces)",
        extra=extra,
    )
    write_json(workdir / REGISTERED, card.to_json())
    return card
