"""Helpers for the checkpoint-compatibility kit in shared/compat (see its README, "Weight recipe")."""
from __future__ import annotations

import math

import torch
from torch import nn

RECIPE_BASE_SEED = 100000


def recipe_tensor(index: int, key: str, shape: list[int], base_seed: int = RECIPE_BASE_SEED) -> torch.Tensor:
    """The recipe value of the manifest row ``index`` (0-based, manifest ``state_dict`` order)."""
    t = torch.randn(shape, generator=torch.Generator().manual_seed(base_seed + index), dtype=torch.float32)
    if len(shape) >= 2:
        return t / math.sqrt(math.prod(shape[1:]))
    if key.endswith("weight"):
        return 1 + 0.1 * t
    return 0.1 * t


def recipe_state_dict(rows: list) -> dict[str, torch.Tensor]:
    """Recipe weights for the manifest ``state_dict`` rows ``[key, shape, dtype]`` (in manifest order).

    Non-float entries and ``attn_mask`` buffers are skipped: the model keeps the values it computes itself.
    """
    return {
        key: recipe_tensor(i, key, shape)
        for i, (key, shape, dtype) in enumerate(rows)
        if dtype.startswith("float") and not key.endswith("attn_mask")
    }


def load_recipe(model: nn.Module, rows: list) -> None:
    """Fill ``model`` with the recipe weights; every key the recipe skips must already exist in the model."""
    weights = recipe_state_dict(rows)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected, unexpected
    skipped = {key for key, _, _ in rows} - weights.keys()
    assert set(missing) == skipped, set(missing) ^ skipped


def checksum(t: torch.Tensor) -> dict:
    """The kit's checksum format: float64 sum / abs_sum, first 3 and last value of the flattened tensor."""
    flat = t.detach().reshape(-1)
    return {
        "sum": flat.double().sum().item(),
        "abs_sum": flat.double().abs().sum().item(),
        "first": flat[:3].tolist(),
        "last": flat[-1].item(),
    }
