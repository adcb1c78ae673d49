"""Random-number-generator state as plain tensors and numbers, so that training checkpoints hold nothing that
needs unpickling and are read back with `torch.load(weights_only=True)`."""
from __future__ import annotations

import random

import numpy as np
import torch


def capture() -> dict:
    """The global torch, numpy and Python RNG states."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }


def restore(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate(state["python"])
