"""Restorer input and output: uint8 crops to [0, 1] model-size tensors and back, and calling a restorer in its own
value range (the one place where each of these conversions lives).

* `resize_for_model`, `to_tensor`, `to_uint8`: what the network is fed and what comes out of it. Serving
  (`restoration.faces.restore.Restorer`), training (`restoration.training.batches.degrade_native_batch`) and adaptation
  resize with these, so that a model learns on what it is served.
* `run_restorer`: the archs keep the reference forward exactly (for checkpoint numerics): the face SwinIR takes and
  returns [0, 1], GFPGAN takes and returns [-1, 1] and returns a tuple ``(image, extras)``. Callers
  (`restoration.faces.restore.Restorer`, `restoration.adaptation.pseudo.restore_batch`) work in [0, 1] and go through
  `run_restorer`, which maps the input to the model's range (the zoo card's ``value_range``; without a card, the arch
  class's ``value_range`` attribute, else [0, 1]), keeps element 0 of a tuple output and maps it back to [0, 1].
  Nothing is clamped there; callers clamp. An arch whose reference inference call differs from its bare forward says
  so in an ``inference_kwargs`` class attribute (CodeFormer: ``w=0.5, adain=True``); those keywords are passed unless
  the caller gives its own.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["UNIT_RANGE", "model_value_range", "run_restorer", "resize_for_model", "to_tensor", "to_uint8"]

UNIT_RANGE = (0.0, 1.0)


def resize_for_model(x: torch.Tensor, size: int) -> torch.Tensor:
    """NCHW [0, 1] -> N x C x size x size as the model is fed (bicubic, antialiased; unchanged at that size).
    Training resizes with this too (`train.degrade_native_batch`), so the model learns on what it is served."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


def to_tensor(crops: list[np.ndarray], size: int, pin: bool = False) -> torch.Tensor:
    """uint8 HxWx3 RGB crops -> float Bx3xSxS in [0, 1] (resized with antialiasing when needed). `pin`: in pinned
    (page-locked) host memory when CUDA is available, so that host-to-device copies are fast and may be
    asynchronous (the serving path on a GPU)."""
    out = []
    for c in crops:
        t = torch.from_numpy(np.array(c, dtype=np.uint8, copy=True)).permute(2, 0, 1).float().div_(255.0)
        out.append(resize_for_model(t[None], size)[0])
    x = torch.stack(out).clamp_(0, 1)
    return x.pin_memory() if pin and torch.cuda.is_available() else x


def to_uint8(batch: torch.Tensor) -> list[np.ndarray]:
    """Bx3xHxW float in [0, 1] -> list of HxWx3 uint8 RGB (clamped, rounded half to even, on the CPU)."""
    arr = batch.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return list(arr)


def model_value_range(model, value_range: Sequence[float] | None = None) -> tuple[float, float]:
    """``value_range`` if given (the card's), else the model's ``value_range`` attribute, else (0, 1)."""
    vr = value_range if value_range is not None else getattr(model, "value_range", UNIT_RANGE)
    lo, hi = (float(v) for v in vr)
    if not hi > lo:
        raise ValueError(f"bad value_range {list(vr)}: expected [low, high] with high > low")
    return lo, hi


def run_restorer(model, x: torch.Tensor, value_range: Sequence[float] | None = None, **model_kwargs) -> torch.Tensor:
    """``model`` (an nn.Module or any callable) on ``x`` in [0, 1]; returns its image output mapped back to [0, 1].

    ``model_kwargs`` are passed to the call, over the model's ``inference_kwargs`` (if any). For a [0, 1] model the
    input and output are untouched.
    """
    lo, hi = model_value_range(model, value_range)
    unit = (lo, hi) == UNIT_RANGE
    kwargs = {**getattr(model, "inference_kwargs", {}), **model_kwargs}
    out = model(x if unit else x * (hi - lo) + lo, **kwargs)
    if isinstance(out, (tuple, list)):  # GFPGAN / CodeFormer style: (image, extras...)
        out = out[0]
    return out if unit else (out.float() - lo) / (hi - lo)
