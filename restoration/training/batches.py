"""Training data for the loops: face images held in memory, the batches drawn from them (epoch-wise for the
default-model trainers, with replacement for the fine-tunes) and the restorer trainer's synthetic damage."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from restoration.data.faces import FacesDataset
from restoration.degrade.broad import BroadDamage, broad_mix
from restoration.degrade.damage import DegradationParams, degrade_batch
from restoration.faces.fidelity import DETAIL_RATIO
from restoration.models.io import resize_for_model
from restoration.runtime import ProgressFn
from restoration.training.recipes import DAMAGE_MODELS

__all__ = ["EpochBatches", "load_faces", "batch_images", "load_uint8", "stack_uint8", "to_float", "sample_pairs",
           "degradation_params", "training_damage", "damage_batch", "degrade_native_batch", "native_batch",
           "pasted_output"]


# ------------------------------------------------------------------------------------------------
# the default-model trainers: a split of the UTK200 faces, epoch-wise shuffled batches
# ------------------------------------------------------------------------------------------------
class EpochBatches:
    """Epoch-wise shuffled batches from a persistent torch.Generator (its state goes into the checkpoint)."""

    def __init__(self, n: int, batch: int, gen: torch.Generator):
        self.n, self.batch, self.gen = n, batch, gen
        self.perm: torch.Tensor | None = None
        self.pos = 0
        self.epoch = 0

    def state(self) -> dict:
        return {"perm": self.perm, "pos": self.pos, "epoch": self.epoch}

    def load(self, s: dict) -> None:
        self.perm, self.pos, self.epoch = s["perm"], s["pos"], s["epoch"]

    def next(self) -> torch.Tensor:
        out = []
        need = self.batch
        while need > 0:
            if self.perm is None or self.pos >= self.n:
                self.perm = torch.randperm(self.n, generator=self.gen)
                self.pos = 0
                self.epoch += 1
            take = self.perm[self.pos:self.pos + need]
            self.pos += len(take)
            need -= len(take)
            out.append(take)
        return torch.cat(out)


def load_faces(split: str, size: int, root: str | None, cache_dir: str | None, limit: int | None,
               progress: ProgressFn | None = None) -> tuple[np.ndarray, list[str]]:
    """(N x size x size x 3 uint8 faces, their names) of a split of the faces folder (`FacesDataset`, no flips)."""
    ds = FacesDataset(split, size, root=root, flip=False, cache_dir=cache_dir, limit=limit, progress=progress)
    return ds.images, ds.names


def batch_images(images: np.ndarray, idx: torch.Tensor, gen: torch.Generator, flip: bool) -> torch.Tensor:
    """The faces `idx` of `images` (NHWC uint8) as NCHW float in [0, 1], each flipped horizontally with probability
    0.5 from `gen` when `flip`."""
    x = torch.from_numpy(images[idx.numpy()]).permute(0, 3, 1, 2).float().div_(255.0)
    if flip:
        f = torch.rand(len(idx), generator=gen) < 0.5
        x[f] = x[f].flip(-1)
    return x


# ------------------------------------------------------------------------------------------------
# the fine-tunes: (input, target) pairs in memory as uint8, batches drawn with replacement
# ------------------------------------------------------------------------------------------------
def load_uint8(item, size: int | None) -> np.ndarray:
    """A path or an HxWx3 uint8 array (or CHW float tensor in [0,1]) -> HxWx3 uint8, resized to `size` (bicubic)."""
    if isinstance(item, (str, Path)):
        with Image.open(item) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8).copy()
    if isinstance(item, torch.Tensor):
        item = item.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    arr = np.asarray(item)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got {arr.dtype} {arr.shape}")
    if size is not None and arr.shape[:2] != (size, size):
        arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.BICUBIC))
    return arr


def stack_uint8(items: Sequence, size: int | None) -> torch.Tensor:
    """N x 3 x H x W uint8 (kept uint8 in memory; converted to float per batch)."""
    return torch.from_numpy(np.stack([load_uint8(it, size) for it in items])).permute(0, 3, 1, 2).contiguous()


def to_float(x_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x_u8.to(device).float().div_(255.0)


def sample_pairs(lq: torch.Tensor, tgt: torch.Tensor, batch_size: int, gen: torch.Generator, device: torch.device,
                 flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of (input, target) pairs drawn with replacement from `gen`, as float [0, 1] on `device`, each pair
    flipped horizontally (both images) with probability 0.5 when `flip`. The draws are made whether or not `flip`."""
    idx = torch.randint(0, lq.shape[0], (batch_size,), generator=gen)
    flips = torch.rand(batch_size, generator=gen) < 0.5
    x, y = to_float(lq[idx], device), to_float(tgt[idx], device)
    if flip and bool(flips.any()):
        fl = flips.to(device)[:, None, None, None]
        x, y = torch.where(fl, x.flip(-1), x), torch.where(fl, y.flip(-1), y)
    return x, y


# ------------------------------------------------------------------------------------------------
# the restorer trainer's damage
# ------------------------------------------------------------------------------------------------
def degradation_params(overrides: dict | None = None) -> DegradationParams:
    """The standard `DegradationParams` with `overrides` (a run's `degradation` config) applied."""
    return DegradationParams(**(overrides or {}))


def training_damage(model: str, overrides: dict | None = None, holdout: list | None = None):
    """The damage model of a restorer run: 'standard' (`degradation_params(overrides)`) or 'broad' (`broad_mix`: the
    standard pass for some faces, `BroadDamage` with the damage types `holdout` never drawn for the others)."""
    if model == "standard":
        if holdout:
            raise ValueError("damage_holdout is for the 'broad' damage model")
        return degradation_params(overrides)
    if model == "broad":
        if overrides:
            raise ValueError("degradation overrides are for the 'standard' damage model")
        return broad_mix(tuple(holdout or ()))
    raise ValueError(f"damage model is {' or '.join(repr(m) for m in DAMAGE_MODELS)}, not {model!r}")


def damage_batch(gt: torch.Tensor, params: DegradationParams | BroadDamage, rng: np.random.Generator, native_sizes: list[int],
                 size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lq, gt) for clean faces `gt` (NCHW [0, 1]): damaged at their own size (`degrade_batch`; `gt` returned as
    is), or, with `native_sizes`, each at a native size drawn from them (`degrade_native_batch`, both at `size`)."""
    if native_sizes:
        return degrade_native_batch(gt, params, rng, native_sizes, size)
    return degrade_batch(gt, params, rng)[0], gt


def degrade_native_batch(gt_hi: torch.Tensor, params: DegradationParams | BroadDamage, rng: np.random.Generator, sizes: list[int],
                         size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lq, gt) at `size` for faces seen at native sizes drawn from `sizes`: each clean face (NCHW, loaded at least
    as large as the largest size) is resized to its native size, damaged there (`degrade` scales the damage for
    that size), and resized to `size` like a crop in the pipeline; the target is the clean face resized to `size`."""
    lqs = [native_batch(gt_hi[i:i + 1], params, rng, sizes, size)[0] for i in range(len(gt_hi))]
    return torch.cat(lqs), resize_for_model(gt_hi, size).clamp(0, 1)


def native_batch(gt_hi: torch.Tensor, params: DegradationParams | BroadDamage, rng: np.random.Generator,
                 sizes: list[int], size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One native size `s` drawn from `sizes` for the whole batch: (lq at `size`, the damaged faces at `s`, the clean
    faces at `s`), the faces resized to `s`, damaged there and resized to `size` like a crop in the pipeline."""
    s = int(sizes[int(rng.integers(len(sizes)))])
    gt_s = resize_for_model(gt_hi, s).clamp(0, 1)
    lq_s = degrade_batch(gt_s, params, rng)[0]
    return resize_for_model(lq_s, size).clamp(0, 1), lq_s, gt_s


def pasted_output(out: torch.Tensor, lq: torch.Tensor, lq_s: torch.Tensor) -> torch.Tensor:
    """What the product shows of the model's output `out` (for input `lq`, both at the model size) on faces whose
    native crops are `lq_s`, as `restoration.faces.fidelity.blend_aligned` pastes it with the default fidelity: the
    output itself at the model size, upsampled bicubically up to DETAIL_RATIO x the model size, and above that the
    native crop plus the upsampled change (the detail-preserving mode). Differentiable in `out`."""
    size, s = out.shape[-1], lq_s.shape[-1]
    if s == size:
        return out
    if s < size:  # a face smaller than the model input: shrunk back by area, as `resize` does
        return F.interpolate(out, size=(s, s), mode="area")
    if s <= DETAIL_RATIO * size:
        return F.interpolate(out, size=(s, s), mode="bicubic", align_corners=False)
    return lq_s + F.interpolate(out - lq, size=(s, s), mode="bicubic", align_corners=False)
