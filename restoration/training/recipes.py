"""The recipes of the small default models: their architectures' constructor configs, the diffusion they are
trained with, and the training configurations of `train_prior` / `train_restorer` (`faceadapt train prior|restorer`)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

from restoration.diffusion.gaussian import create_gaussian_diffusion

__all__ = ["PRIOR_ARCH", "RESTORER_ARCH", "PRIOR_MODEL_SMALL", "RESTORER_MODEL_SMALL", "DIFFUSION_DEFAULT",
           "PSEUDO_TARGET_DEFAULTS_REFERENCE", "PIXEL_LOSSES", "DAMAGE_MODELS", "TrainConfig", "PriorTrainConfig",
           "RestorerTrainConfig", "make_diffusion"]

PRIOR_ARCH = "iddpm_unet"
RESTORER_ARCH = "swinir_face"

# 3.95M parameters; measured 16.7 img/s (batch 16, 1 thread) for a training step at 64 px on this CPU.
PRIOR_MODEL_SMALL: dict = dict(
    image_size=64, in_channels=3, model_channels=32, out_channels=6, attention_resolutions=[16, 8], dropout=0.0,
    channel_mult=[1, 2, 3, 4], num_res_blocks=[1, 1, 1, 1], conv_resample=True, dims=2, use_fp16=False,
    num_heads=1, num_head_channels=32, use_scale_shift_norm=True, resblock_updown=False, use_new_attention_order=False,
)
# 0.67M parameters; 4x PixelUnshuffle -> 16x16 tokens at 64 px (two 8x8 windows per side).
RESTORER_MODEL_SMALL: dict = dict(
    img_size=16, patch_size=1, in_chans=3, embed_dim=60, depths=[4, 4, 4], num_heads=[6, 6, 6], window_size=8,
    mlp_ratio=2, drop_path_rate=0.0, sf=4, img_range=1.0, upsampler="nearest+conv", resi_connection="1conv",
    unshuffle=True, unshuffle_scale=4,
)
DIFFUSION_DEFAULT: dict = dict(steps=1000, noise_schedule="linear", learn_sigma=True, respacing="250")
# the DT-BFR defaults (respaced indices out of 250; down_N for 512 px); the tuned values for the small prior are
# written into its card by whoever exports it (see docs/MODELS.md)
PSEUDO_TARGET_DEFAULTS_REFERENCE: dict = dict(start=150, constrain_until=90, down_N=16)

#: the restorer's pixel losses: 'l1' (default) or 'mse' (optimises PSNR directly)
PIXEL_LOSSES = ("l1", "mse")
#: the restorer trainer's damage models (`RestorerTrainConfig.damage`)
DAMAGE_MODELS = ("standard", "broad")


@dataclass
class TrainConfig:
    """What both default-model trainers share: the run folder, data, optimisation, EMA, checkpoints and logs."""

    out_dir: str = "runs/model"
    seed: int = 0
    size: int = 64
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200
    lr_schedule: str = "constant"  # "constant" | "cosine" (to 10% of lr at `steps`)
    grad_clip: float = 1.0
    steps: int = 10000
    ema_rate: float = 0.999
    ckpt_every: int = 500  # steps
    ckpt_minutes: float = 5.0  # also checkpoint when this much wall time passed since the last one
    keep_ckpts: int = 2
    sample_every: int = 1000  # sample grid PNG every N steps (0: never)
    log_every: int = 50
    threads: int = 1
    device: str = "cpu"
    data_root: str | None = None  # default: restoration.data.faces.default_faces_root()
    split: str = "train"
    cache_dir: str | None = "runs/cache"
    limit: int | None = None  # only the first N images of the split (tests)
    until: float | None = None  # unix time; stop (after a checkpoint) when passed
    init_from: str | None = None  # warm start: a zoo model name or folder with the same arch and model config
    model: dict = field(default_factory=dict)


@dataclass
class PriorTrainConfig(TrainConfig):
    out_dir: str = "runs/prior"
    model: dict = field(default_factory=lambda: copy.deepcopy(PRIOR_MODEL_SMALL))
    diffusion: dict = field(default_factory=lambda: dict(DIFFUSION_DEFAULT))
    sample_respacing: str = "50"  # short schedule for the sample grids
    n_samples: int = 16


@dataclass
class RestorerTrainConfig(TrainConfig):
    out_dir: str = "runs/restorer"
    model: dict = field(default_factory=lambda: copy.deepcopy(RESTORER_MODEL_SMALL))
    steps: int = 4000
    lr_schedule: str = "cosine"
    gan_weight: float = 0.005
    gan_start: int = 500  # steps of pure L1 before the GAN term is switched on
    # Pixel loss, one of PIXEL_LOSSES: 'l1' (default) or 'mse' (optimises PSNR directly; for a last PSNR-oriented
    # stage of a warm start).
    pixel_loss: str = "l1"
    disc_lr: float = 2e-4
    disc_channels: int = 32
    # The damage model: 'standard' (`restoration.degrade.damage`, `degradation` overrides its DegradationParams) or
    # 'broad' (`restoration.degrade.broad`: two shuffled rounds, colour noise, ringing; `damage_holdout` names the
    # damage types never drawn, e.g. HELD_OUT, so that a benchmark can test them alone).
    damage: str = "standard"
    degradation: dict = field(default_factory=dict)  # overrides of DegradationParams (empty: standard)
    damage_holdout: list = field(default_factory=list)
    # With `native_sizes`: the pixel loss is taken where the product shows the face, at its native size, through the
    # same paste as `restoration.faces.fidelity.blend_aligned` (bicubic upsampling of the output up to DETAIL_RATIO x
    # `size`, the detail-preserving correction above), instead of on the output against the clean face at `size`.
    # The model learns what survives the upsampling (the optimal pre-filter), not a blur of it. The GAN term's critic
    # then also judges the face as shown against clean faces of that size.
    native_loss: bool = False
    # weight of an L1 between the finite differences of the output (as shown, with native_loss) and of the clean face
    # (`losses.gradient_l1`): edges where the clean face has them, against the pixel loss's average of guesses
    gradient_weight: float = 0.0
    n_grid: int = 8
    # Train on what the product feeds the model: each face is damaged at a native size drawn from this list (the
    # damage scaled for that size, as `degrade` does), then resized to `size` the way the pipeline resizes a crop
    # (`restoration.faces.restore.resize_for_model`); its target is the clean face resized to `size`. Empty: damaged
    # at `size`.
    native_sizes: list = field(default_factory=list)
    # A second model input size: every `mix_every`-th step trains at `mix_size` instead of `size` (0: never), so that
    # a model trained to run at 128 px keeps its 64 px behaviour (the size adaptation fine-tunes it at).
    mix_size: int = 0
    mix_every: int = 4


def make_diffusion(respacing: str | None = "250", diffusion: dict | None = None):
    """The Gaussian diffusion of a prior recipe (`DIFFUSION_DEFAULT` updated with `diffusion`), respaced to
    `respacing` steps (None: the full schedule, as trained)."""
    d = dict(DIFFUSION_DEFAULT, **(diffusion or {}))
    return create_gaussian_diffusion(steps=d["steps"], learn_sigma=d["learn_sigma"], noise_schedule=d["noise_schedule"],
                                     timestep_respacing=respacing)
