"""Adapting a restorer to a domain without ground truth (Kuai et al., WACV 2025): config, stages, gate, card.

`stages` holds the stage contract (`STAGES`, `run_adaptation`); each stage lives in its own module (`prepare`,
`targets` with the pseudo-target generator of `pseudo`, `tune`, `evaluate`, `card`); the work-dir layout is in
`workdir`, the checks a job must pass before any work in `checks`, the domain colour correction in `color`, the
quality gate in `gate`.

The public surface of the subpackage: code outside `restoration` imports these names from here.
"""
from __future__ import annotations

from restoration.adaptation.config import (AdaptConfig, default_config, crop_size, nest_overrides, SMALL_SET,
                                           scale_for_faces)
from restoration.adaptation.checks import (FIXED_SIZE_ARCHS, MIN_IMAGES, check_cards, check_min_images, check_job,
                                           min_images)
from restoration.adaptation.sources import (IMAGE_EXTS, list_images)
from restoration.adaptation.workdir import (INPUTS, ZOO, MANIFEST, read_job)
from restoration.adaptation.pseudo import PseudoTargetParams
from restoration.adaptation.color import (COLOR_DEAD_ZONE, COLOR_REFERENCE_COUNT, color_stats, domain_color_gains,
                                          color_correction)
from restoration.adaptation.prepare import (prepare, face_record, describe_faces, image_usage, usage_label,
                                            ALIGNED_CROP, PHOTO)
from restoration.adaptation.targets import (generate_targets, targets_status)
from restoration.adaptation.tune import finetune
from restoration.adaptation.evaluate import evaluate
from restoration.adaptation.gate import GATE, QualityGateFailed
from restoration.adaptation.card import adapted_serve_size, register
from restoration.adaptation.loaders import (load_adapted, load_prior)
from restoration.adaptation.stages import (PREPARE_STAGE, TARGETS_STAGE, FINETUNE_STAGE, EVALUATE_STAGE,
                                           REGISTER_STAGE, PrepareInputs, StageContext, StageResult, PrepareResult,
                                           FinetuneResult, EvaluateResult, RegisterResult, Stage, STAGES, get_stage,
                                           run_adaptation)

__all__ = [
    "AdaptConfig", "default_config", "crop_size", "nest_overrides", "SMALL_SET", "scale_for_faces",
    "adapted_serve_size", "FIXED_SIZE_ARCHS", "MIN_IMAGES", "check_cards", "check_min_images", "check_job",
    "min_images",
    "IMAGE_EXTS", "list_images", "INPUTS", "ZOO", "MANIFEST", "read_job", "PseudoTargetParams", "COLOR_DEAD_ZONE",
    "COLOR_REFERENCE_COUNT", "color_stats", "domain_color_gains", "color_correction", "prepare", "face_record", "describe_faces", "image_usage",
    "usage_label", "ALIGNED_CROP", "PHOTO",
    "generate_targets", "targets_status", "finetune", "evaluate", "GATE", "QualityGateFailed",
    "register", "load_adapted", "load_prior", "PREPARE_STAGE", "TARGETS_STAGE", "FINETUNE_STAGE", "EVALUATE_STAGE",
    "REGISTER_STAGE", "PrepareInputs", "StageContext", "StageResult", "PrepareResult", "FinetuneResult",
    "EvaluateResult", "RegisterResult", "Stage", "STAGES", "get_stage", "run_adaptation",
]
