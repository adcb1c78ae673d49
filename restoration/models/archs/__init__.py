"""Architectures that load public checkpoints strictly; see docs/ARCHITECTURE.md and shared/compat."""
from __future__ import annotations

import inspect

from torch import nn

from .gfpgan import GFPGANv1Clean
from .codeformer import CodeFormer
from .iddpm_unet import IDDPMUNet
from .swinir_face import SwinIRFace

ARCHS: dict[str, type[nn.Module]] = {
    "swinir_face": SwinIRFace,
    "iddpm_unet": IDDPMUNet,
    "codeformer": CodeFormer,
    "gfpgan_v1_4": GFPGANv1Clean,
}


def build(arch_name: str, config: dict) -> nn.Module:
    """Instantiate ``ARCHS[arch_name](**config)``; ``config`` holds the reference constructor keywords."""
    try:
        cls = ARCHS[arch_name]
    except KeyError:
        raise ValueError(f"unknown architecture {arch_name!r}; known: {', '.join(sorted(ARCHS))}") from None
    try:
        inspect.signature(cls).bind(**config)
    except TypeError as exc:
        raise TypeError(f"bad config for architecture {arch_name!r}: {exc}") from None
    return cls(**config)
