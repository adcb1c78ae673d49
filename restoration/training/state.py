"""Training state on disk: the atomic, fsynced save and the one load of every training checkpoint, and the RNG
states they hold (as plain tensors and numbers, so that `torch.load(weights_only=True)` reads them back)."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

__all__ = ["save", "load", "capture_rng", "restore_rng"]


def save(state: dict, path: str | Path) -> Path:
    """Write `state` to `path` atomically and durably: a temp file beside it (fsynced), renamed over `path`, then the
    folder fsynced so that the rename survives a crash. A reader sees the old file or the new one, never a torn one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def load(path: str | Path) -> dict:
    """A checkpoint written by :func:`save`, on the CPU (tensors, numbers, strings and containers only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def capture_rng(data: torch.Generator | None = None, cuda: bool = False) -> dict:
    """The global torch, numpy and Python RNG states; with `data`, that generator's state under "data"; with `cuda`
    (and a CUDA device present), every CUDA device's state under "cuda"."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if data is not None:
        st["data"] = data.get_state()
    if cuda and torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def restore_rng(state: dict, data: torch.Generator | None = None) -> None:
    """Set the states :func:`capture_rng` returned: the global ones, `data`'s from "data" when given, CUDA's when
    the state holds them and a CUDA device is present."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate(state["python"])
    if data is not None:
        data.set_state(state["data"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
