"""What every long-running piece of the ML core shares: the device, progress and cancellation callbacks.

`progress(stage, done, total)` reports how far a stage is; `should_cancel()` is checked between batches and, when it
returns True, the stage stops with `Cancelled`, leaving its work dir in a resumable state.
"""
from __future__ import annotations

from typing import Callable

import torch

from restoration.settings import get_settings

#: `progress(stage, done, total)`: called as a stage advances
ProgressFn = Callable[[str, int, int], None]
#: `should_cancel() -> bool`: checked between batches
CancelFn = Callable[[], bool]


class Cancelled(Exception):
    """The caller asked the running stage to stop (its `should_cancel()` returned True)."""


def check_cancel(should_cancel: CancelFn | None, what: str) -> None:
    """Raise `Cancelled(what)` when `should_cancel` is given and returns True."""
    if should_cancel is not None and should_cancel():
        raise Cancelled(what)


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """A torch device from 'auto' (CUDA when available, else CPU), 'cpu', 'cuda' or 'cuda:N'; None means the
    settings' `device`. Asking for CUDA where there is none is a ValueError saying so."""
    if isinstance(device, torch.device):
        return device
    device = device or get_settings().device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but no CUDA device is available")
    return torch.device(device)


__all__ = ["ProgressFn", "CancelFn", "Cancelled", "check_cancel", "resolve_device"]
