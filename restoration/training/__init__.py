"""Training: one toolkit and the loops built on it.

Toolkit: `state` (atomic, fsynced checkpoint save; the one load; RNG states), `ema`, `schedules` (learning rates),
`discriminators`, `losses`, `batches` (faces and pairs in memory, batch sampling, the restorer's damage).
Default models (`faceadapt train prior|restorer|export`): `recipes` (model configs and training configs), `runs`
(run folders: checkpoints, resume, warm start, logs), the loops `prior.train_prior` and `restorer.train_restorer`,
`evaluate` (metrics, samples and grids of trained models) and `export` (a run to the zoo).
Adaptation fine-tunes: `finetune.finetune` (SwinIR, GFPGAN and other restorers) and
`finetune_codeformer.finetune_codeformer`.

The public surface of the subpackage: code outside `restoration` imports these names from here.
"""
from __future__ import annotations

from restoration.training.recipes import (PRIOR_MODEL_SMALL, RESTORER_MODEL_SMALL, DIFFUSION_DEFAULT, PIXEL_LOSSES,
                                          DAMAGE_MODELS, PriorTrainConfig, RestorerTrainConfig, make_diffusion)
from restoration.training.runs import (TrainSetupError, last_checkpoint, list_checkpoints, load_run_model,
                                       param_count)
from restoration.training.prior import train_prior
from restoration.training.restorer import train_restorer
from restoration.training.batches import (degradation_params, degrade_native_batch)
from restoration.training.evaluate import (psnr_ssim, save_grid, sample_prior, denoise_psnr, evaluate_restorer,
                                           degrade_pair)
from restoration.training.export import (LICENSE_TEXT, export, average_state_dicts)
from restoration.training.finetune import (FinetuneConfig, FinetuneResult, finetune)
from restoration.training.finetune_codeformer import (CodeFormerFinetuneConfig, HQCodes, code_losses,
                                                      trainable_parameters, finetune_codeformer)

__all__ = [
    "PRIOR_MODEL_SMALL", "RESTORER_MODEL_SMALL", "DIFFUSION_DEFAULT", "PIXEL_LOSSES", "DAMAGE_MODELS", "PriorTrainConfig",
    "RestorerTrainConfig", "make_diffusion", "TrainSetupError", "last_checkpoint", "list_checkpoints",
    "load_run_model", "param_count", "train_prior", "train_restorer", "degradation_params", "degrade_native_batch",
    "psnr_ssim", "save_grid", "sample_prior", "denoise_psnr", "evaluate_restorer", "degrade_pair", "LICENSE_TEXT",
    "export", "average_state_dicts", "FinetuneConfig", "FinetuneResult", "finetune", "CodeFormerFinetuneConfig",
    "HQCodes", "code_losses",
    "trainable_parameters", "finetune_codeformer",
]
