"""FaceAdapt's ML core: restore faces in one network pass, and adapt a restorer to a domain of unlabeled images with a
face diffusion prior (Kuai et al., WACV 2025). Importable without any web, database or queue package.

The stable public surface is the names below (`from restoration import Zoo, Restorer, load_image, adapt`) and the
subpackages' own `__init__` names (`from restoration.adaptation import prepare`, `from restoration import degrade`);
README, docs, benches and the service layers use only these. The modules inside the subpackages are internal.

    models      architectures (`build`), the model zoo (`Zoo`, `ModelCard`), public checkpoints, restorer I/O
    faces       image I/O, face detection, alignment and paste-back, fidelity modes, `Restorer` (the one
                whole-photo restore)
    diffusion   the Gaussian diffusion math, the constrained samplers, the low-pass resampler, priors
    adaptation  the adaptation engine: config and checks, the stage contract (`STAGES`), pseudo targets, colour
                correction, the quality gate, the model card (`run_adaptation`, exported here as `adapt`)
    training    one training toolkit, the default models' trainers and the adaptation fine-tunes
    metrics     PSNR, SSIM, sharpness, low-pass consistency, LPIPS
    degrade     synthetic degradations and the benchmark domains (`PRESETS`)
    data        the UTKFace training faces and their splits
    settings    the ML settings (`FACEADAPT_*` variables); runtime: device, progress, cancellation
"""
from __future__ import annotations

from restoration import adaptation, data, degrade, diffusion, faces, metrics, models, training
from restoration.adaptation import AdaptConfig, QualityGateFailed, STAGES, default_config
from restoration.adaptation import run_adaptation as adapt
from restoration.degrade import PRESETS, DegradationParams
from restoration.faces import (FaceHelper, ImageError, RestoreResult, Restorer, UnsupportedFormat, encode_image,
                               load_image, save_image)
from restoration.metrics import lowpass_psnr, psnr, sharpness, ssim
from restoration.models import ModelCard, ModelNotFound, Zoo, ZooError, build
from restoration.runtime import Cancelled, resolve_device
from restoration.settings import Settings, get_settings

__version__ = "0.1.0"

__all__ = [
    "adaptation", "data", "degrade", "diffusion", "faces", "metrics", "models", "training",
    "build", "Zoo", "ModelCard", "ModelNotFound", "ZooError",
    "Restorer", "RestoreResult", "FaceHelper", "load_image", "encode_image", "save_image", "ImageError",
    "UnsupportedFormat",
    "adapt", "AdaptConfig", "default_config", "STAGES", "QualityGateFailed",
    "psnr", "ssim", "sharpness", "lowpass_psnr", "PRESETS", "DegradationParams",
    "Cancelled", "resolve_device", "Settings", "get_settings", "__version__",
]
