"""Reading public PyTorch checkpoints safely, and the catalogue of the public checkpoints we know.

Public `.pth` files are only ever read with `torch.load(weights_only=True)`: a pickle that holds anything
but tensors and plain containers is refused. The containers and key prefixes below come from the
reference loading code (see `../shared/compat/*/checkpoint.json`).
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

# Wrapper keys the reference trainers use, in the order the reference loaders look for them.
CONTAINER_KEYS = ("params_ema", "params", "state_dict")
MODULE_PREFIX = "module."


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or does not fit the architecture."""


def read_pth(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .pth checkpoint as a flat state_dict, without unpickling arbitrary objects.

    Unwraps `params_ema` / `params` / `state_dict` containers and strips a `module.` prefix
    (DDP) when every key carries it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path.name}: not a valid safetensors file ({exc})") from None
    if not zipfile.is_zipfile(path):
        # torch.save has written zip archives since torch 1.6; the legacy format is not accepted.
        raise CheckpointError(
            f"{path.name}: not a PyTorch checkpoint (expected a torch.save zip archive or a .safetensors file)"
        )
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"{path.name}: cannot be read safely with weights_only=True; only tensors and plain containers "
            f"are accepted ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"
        ) from None
    return unwrap_state_dict(obj, name=path.name)


def unwrap_state_dict(obj: object, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in CONTAINER_KEYS:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{name}: does not hold a state_dict (a mapping of names to tensors)")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{name}: entries that are not tensors: {bad[:5]}")
    if all(k.startswith(MODULE_PREFIX) for k in obj):
        obj = {k[len(MODULE_PREFIX):]: v for k, v in obj.items()}
    return dict(obj)


def load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], name: str = "checkpoint") -> None:
    """`load_state_dict(strict=True)` with a readable error on missing, unexpected or mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:2]})")
        raise CheckpointError(f"{name} does not fit the architecture: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=True)


@dataclass(frozen=True)
class KnownCheckpoint:
    """A public checkpoint that `faceadapt models pull NAME` can fetch."""

    name: str
    arch: str
    kind: str
    file_name: str
    url: str
    config: dict
    input_size: int
    value_range: tuple[float, float]
    license: str
    provenance: str
    sha256: str | None = None  # none of the reference repos publishes one
    size: int | None = None  # nor a size: the server's Content-Length is checked instead
    extra: dict = field(default_factory=dict)


SWINIR_FACE_CONFIG = dict(
    img_size=64, patch_size=1, in_chans=3, embed_dim=180, depths=[6] * 8, num_heads=[6] * 8, window_size=8,
    mlp_ratio=2, sf=8, img_range=1.0, upsampler="nearest+conv", resi_connection="1conv", unshuffle=True,
    unshuffle_scale=8,
)
IDDPM_FFHQ512_CONFIG = dict(
    image_size=512, in_channels=3, model_channels=32, out_channels=6, attention_resolutions=[32, 16, 8], dropout=0,
    channel_mult=[1, 2, 4, 8, 8, 16, 16], num_res_blocks=[1, 2, 2, 2, 2, 3, 4], conv_resample=True, dims=2,
    use_fp16=False, num_head_channels=64, use_scale_shift_norm=True, resblock_updown=False,
    use_new_attention_order=False,
)

# GFPGANer(arch='clean', channel_multiplier=2) for --version 1.4 (GFPGAN inference_gfpgan.py / gfpgan/utils.py).
GFPGAN_V1_4_CONFIG = dict(
    out_size=512, num_style_feat=512, channel_multiplier=2, decoder_load_path=None, fix_decoder=False, num_mlp=8,
    input_is_latent=True, different_w=True, narrow=1, sft_half=True,
)

# CodeFormer inference_codeformer.py: ARCH_REGISTRY.get('CodeFormer')(dim_embd=512, codebook_size=1024, n_head=8,
# n_layers=9, connect_list=['32','64','128','256']); the VQGAN sizes are fixed (512 px input).
CODEFORMER_CONFIG = dict(dim_embd=512, codebook_size=1024, n_head=8, n_layers=9, connect_list=["32", "64", "128", "256"])

KNOWN_CHECKPOINTS: dict[str, KnownCheckpoint] = {
    c.name: c
    for c in [
        KnownCheckpoint(
            name="swinir-face-dtbfr",
            arch="swinir_face",
            kind="restorer",
            file_name="swinir_gan_v1.pth",
            url="https://github.com/SamsungLabs/DT-BFR/releases/download/v1.0.0/swinir_gan_v1.pth",
            config=SWINIR_FACE_CONFIG,
            input_size=512,
            value_range=(0.0, 1.0),
            license="see SamsungLabs/DT-BFR (research)",
            provenance="DT-BFR (Kuai et al., WACV 2025) pre-trained face SwinIR, GAN fine-tuned; plain state_dict",
        ),
        KnownCheckpoint(
            name="swinir-face-difface",
            arch="swinir_face",
            kind="restorer",
            file_name="swinir_restoration512_L1.pth",
            url="https://github.com/zsyOAOA/DifFace/releases/download/V1.0/swinir_restoration512_L1.pth",
            config=SWINIR_FACE_CONFIG,
            input_size=512,
            value_range=(0.0, 1.0),
            license="see zsyOAOA/DifFace (S-Lab License 1.0)",
            provenance="DifFace face SwinIR trained with L1; {'state_dict': ...} container",
        ),
        KnownCheckpoint(
            name="difface-iddpm-ffhq512",
            arch="iddpm_unet",
            kind="prior",
            file_name="iddpm_ffhq512_ema500000.pth",
            url="https://github.com/zsyOAOA/DifFace/releases/download/V1.0/iddpm_ffhq512_ema500000.pth",
            config=IDDPM_FFHQ512_CONFIG,
            input_size=512,
            value_range=(-1.0, 1.0),
            license="see zsyOAOA/DifFace (S-Lab License 1.0)",
            provenance="DifFace iDDPM FFHQ-512 prior, EMA weights at 500k iterations; 'module.' prefixed keys",
            extra={
                "diffusion": {"steps": 1000, "noise_schedule": "linear", "learn_sigma": True, "respacing": "250"},
                "pseudo_target_defaults": {"start": 150, "constrain_until": 90, "down_N": 16},
            },
        ),
        KnownCheckpoint(
            name="gfpgan-v1.4",
            arch="gfpgan_v1_4",
            kind="restorer",
            file_name="GFPGANv1.4.pth",
            url="https://github.com/TencentARC/GFPGAN/releases/download/v1.3.0/GFPGANv1.4.pth",
            config=GFPGAN_V1_4_CONFIG,
            input_size=512,
            value_range=(-1.0, 1.0),
            license="GFPGAN: Apache-2.0 except third-party components (License_GFPGAN.txt lists StyleGAN2 code from "
            "stylegan2-pytorch, MIT, and NVlabs/stylegan2, NVIDIA licence: non-commercial); no separate weights licence",
            provenance="TencentARC GFPGAN v1.4 (clean arch) release weights; {'params_ema'|'params': ...} container, "
            "'params_ema' preferred; no sha256 published (the download's sha256 is recorded in the card)",
        ),
        KnownCheckpoint(
            name="codeformer",
            arch="codeformer",
            kind="restorer",
            file_name="codeformer.pth",
            url="https://github.com/sczhou/CodeFormer/releases/download/v0.1.0/codeformer.pth",
            config=CODEFORMER_CONFIG,
            input_size=512,
            value_range=(-1.0, 1.0),
            license="S-Lab License 1.0 (sczhou/CodeFormer LICENSE): redistribution and use for non-commercial purposes; "
            "for commercial use contact the contributors",
            provenance="CodeFormer (Zhou et al., NeurIPS 2022) release v0.1.0 weights; {'params_ema': ...} container "
            "(basicsr save format), no prefix; no sha256 published (the download's sha256 is recorded in the card)",
        ),
    ]
}
