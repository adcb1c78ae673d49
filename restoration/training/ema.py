"""The exponential moving average of a model's weights, which every trainer keeps and exports."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

__all__ = ["make_ema", "warmup_decay", "ema_update"]


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen copy of `model` in eval mode, the EMA's starting point."""
    return copy.deepcopy(model).eval().requires_grad_(False)


def warmup_decay(decay: float, step: int) -> float:
    """The decay at optimizer step `step` (0-based) with the usual warm-up: min(decay, (1 + step) / (10 + step))."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, *, lerp: bool = True, trainable_only: bool = False,
               copy_buffers: bool = True) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter; then model's buffers copied into ema.

    Each trainer keeps the arithmetic it has always used, so that its runs stay the same bit for bit:
    ``lerp=True`` (the prior and restorer trainers) is one fused ``lerp`` over all parameters,
    ``lerp=False`` (the fine-tunes) a multiply-add per parameter; the two differ in the last bit.
    ``trainable_only``: only the parameters with ``requires_grad`` (an EMA of a frozen parameter would drift by
    rounding); ``copy_buffers=False`` leaves ema's buffers alone (the CodeFormer fine-tune).
    """
    pairs = [(pe, pm) for pe, pm in zip(ema.parameters(), model.parameters()) if pm.requires_grad or not trainable_only]
    if lerp:
        torch._foreach_lerp_([pe for pe, _ in pairs], [pm.detach() for _, pm in pairs], 1.0 - decay)
    else:
        for pe, pm in pairs:
            pe.mul_(decay).add_(pm.detach(), alpha=1.0 - decay)
    if copy_buffers:
        for be, bm in zip(ema.buffers(), model.buffers()):
            be.copy_(bm)
