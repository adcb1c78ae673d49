"""Learning-rate schedules: the prior and restorer trainers' warm-up (+ cosine) rate and the fine-tunes' cosine
factor for `torch.optim.lr_scheduler.LambdaLR`."""
from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["warmup_lr", "cosine_factor", "set_lr"]


def warmup_lr(step: int, lr: float, warmup_steps: int, steps: int, schedule: str = "constant") -> float:
    """The rate at optimizer step `step` (0-based): linear warm-up over `warmup_steps`, then `lr` ('constant') or a
    cosine from `lr` down to 10 % of it at `steps` ('cosine')."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    if schedule == "cosine":
        frac = min(1.0, step / max(1, steps))
        return lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    return lr * warm


def cosine_factor(steps: int, lr: float, lr_min: float) -> Callable[[int], float]:
    """The LambdaLR factor of a cosine from `lr` to `lr_min` over `steps` scheduler steps (held at the ends)."""
    floor = lr_min / lr if lr > 0 else 0.0

    def f(k: int) -> float:
        k = min(max(k, 0), steps)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * k / steps))

    return f


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's rate."""
    for g in opt.param_groups:
        g["lr"] = lr
