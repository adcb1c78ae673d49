"""What every long-running piece of the ML core shares: the device, CPU threads, progress and cancellation callbacks.

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


def set_torch_threads(n: int | None) -> int:
    """torch's intra-op CPU threads for this process: `n` (None or < 1: left as they are, torch's default is every
    core). Several workers or API processes on one machine should share its cores (cores / processes each), or
    they slow each other down. Returns the count in use."""
    if n is not None and int(n) >= 1 and torch.get_num_threads() != int(n):
        torch.set_num_threads(int(n))
    return torch.get_num_threads()


def to_channels_last(module: torch.nn.Module) -> torch.nn.Module:
    """Put every 4-D parameter and buffer of `module` in channels_last memory format, in place (the convolutions'
    weights; unlike `module.to(memory_format=...)` this also works for modules that hold 5-D weights, GFPGAN's
    modulated convolutions). Returns `module`."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if t.dim() == 4:
                t.data = t.data.contiguous(memory_format=torch.channels_last)
    return module


def to_contiguous(module: torch.nn.Module) -> torch.nn.Module:
    """Undo `to_channels_last`: every parameter and buffer contiguous again, in place. Returns `module`."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            if not t.data.is_contiguous():
                t.data = t.data.contiguous()
    return module


__all__ = ["ProgressFn", "CancelFn", "Cancelled", "check_cancel", "resolve_device", "set_torch_threads",
           "to_channels_last", "to_contiguous"]
