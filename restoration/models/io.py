"""Calling a restorer on [0, 1] images whatever its own value range: the one place where that conversion lives.

The archs keep the reference forward exactly (for checkpoint numerics): the face SwinIR takes and returns [0, 1],
GFPGAN takes and returns [-1, 1] and returns a tuple ``(image, extras)``. Callers (`pipeline.Restorer`,
`pseudo.restore_batch`) work in [0, 1] and go through `run_restorer`, which maps the input to the model's range
(the zoo card's ``value_range``; without a card, the arch class's ``value_range`` attribute, else [0, 1]), keeps
element 0 of a tuple output and maps it back to [0, 1]. Nothing is clamped here; callers clamp. An arch whose
reference inference call differs from its bare forward says so in an ``inference_kwargs`` class attribute
(CodeFormer: ``w=0.5, adain=True``); those keywords are passed unless the caller gives its own.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

UNIT_RANGE = (0.0, 1.0)


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
