"""Training data for the small default models: the UTKFace 200x200 subset (`shared/data/faces-utk200`).

* `make_split(...)` builds the deterministic, seeded split by image name (15,500 train / 500 val / 500 test by
  default); `write_split(...)` writes it as `restoration/data/utk200_{train,val,test}.txt` (committed, one file name a
  line, sorted); `load_split(name)` reads it back.
* `FacesDataset(split, size, ...)`: the faces of one split at `size` x `size` (resized from 200 with antialiasing), as
  float32 CHW tensors in [0, 1], with an optional random horizontal flip for training. The resized faces can be cached
  as one uint8 `.npy` array per (split, size) so that restarts do not decode 16,500 JPEGs again.

UTKFace is licensed for non-commercial research use only; the files are read in place and never copied into git.
"""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from restoration.faces.imageio import read_rgb

SPLIT_DIR = Path(__file__).resolve().parent
SPLIT_PREFIX = "utk200"
SPLITS = ("train", "val", "test")
SPLIT_SEED = 20240601
SPLIT_SIZES = {"val": 500, "test": 500}  # train = the rest (15,500 of 16,500)
DATA_NAME = "faces-utk200"
DATA_TERMS = "UTKFace (aligned & cropped, sharpest 16,500 faces): non-commercial research use only"


def default_faces_root() -> Path:
    """`$FACEADAPT_UTK200`, else `$FACEADAPT_SHARED/data/faces-utk200`, else `<repo>/../shared/data/faces-utk200`."""
    if os.environ.get("FACEADAPT_UTK200"):
        return Path(os.environ["FACEADAPT_UTK200"]).expanduser()
    shared = os.environ.get("FACEADAPT_SHARED")
    base = Path(shared).expanduser() if shared else Path(__file__).resolve().parents[3] / "shared"
    return base / "data" / DATA_NAME


def list_faces(root: str | Path | None = None) -> list[str]:
    root = Path(root) if root is not None else default_faces_root()
    if not root.is_dir():
        raise FileNotFoundError(f"faces folder not found: {root}")
    return sorted(p.name for p in root.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def make_split(names: Sequence[str], seed: int = SPLIT_SEED, sizes: dict[str, int] | None = None) -> dict[str, list[str]]:
    """Deterministic split by name: sort, shuffle with `random.Random(seed)`, take test, then val, the rest is train.

    Each returned list is sorted. The result depends only on the set of names and the seed.
    """
    sizes = dict(SPLIT_SIZES if sizes is None else sizes)
    order = sorted(set(names))
    random.Random(seed).shuffle(order)
    n_test, n_val = sizes.get("test", 0), sizes.get("val", 0)
    if n_test + n_val >= len(order):
        raise ValueError(f"split sizes {sizes} leave no training images out of {len(order)}")
    return {
        "test": sorted(order[:n_test]),
        "val": sorted(order[n_test:n_test + n_val]),
        "train": sorted(order[n_test + n_val:]),
    }


def split_path(split: str, split_dir: str | Path | None = None) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(split_dir or SPLIT_DIR) / f"{SPLIT_PREFIX}_{split}.txt"


def write_split(root: str | Path | None = None, seed: int = SPLIT_SEED, split_dir: str | Path | None = None) -> dict[str, list[str]]:
    """(Re)generate the committed split files from the faces folder."""
    split = make_split(list_faces(root), seed=seed)
    for name, files in split.items():
        p = split_path(name, split_dir)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("\n".join(files) + "\n")
    return split


def load_split(split: str, split_dir: str | Path | None = None) -> list[str]:
    p = split_path(split, split_dir)
    if not p.is_file():
        raise FileNotFoundError(f"split file missing: {p} (run `python -m restoration.data.faces` to generate it)")
    return [line.strip() for line in p.read_text().splitlines() if line.strip()]


def split_sha256(split_dir: str | Path | None = None) -> str:
    """sha256 over the three split files (recorded in model cards)."""
    h = hashlib.sha256()
    for s in SPLITS:
        h.update(split_path(s, split_dir).read_bytes())
    return h.hexdigest()


def load_face(path: str | Path, size: int) -> np.ndarray:
    """One face as uint8 HxWx3 RGB at `size` (`restoration.faces.imageio.read_rgb`: PIL bicubic resize, which is
    antialiased when downscaling)."""
    return read_rgb(path, size)


def load_faces_array(names: Sequence[str], size: int, root: str | Path | None = None,
                     cache_file: str | Path | None = None, progress=None) -> np.ndarray:
    """N x size x size x 3 uint8; read from / written to `cache_file` (.npy) when given."""
    root = Path(root) if root is not None else default_faces_root()
    if cache_file is not None and Path(cache_file).is_file():
        arr = np.load(cache_file, mmap_mode=None)
        if arr.shape == (len(names), size, size, 3):
            return arr
    out = np.empty((len(names), size, size, 3), dtype=np.uint8)
    for i, n in enumerate(names):
        out[i] = load_face(root / n, size)
        if progress is not None and (i % 500 == 0 or i == len(names) - 1):
            progress("load_faces", i + 1, len(names))
    if cache_file is not None:
        cache_file = Path(cache_file)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, out)
        os.replace(tmp, cache_file)
    return out


class FacesDataset:
    """Faces of one split as float32 CHW tensors in [0, 1] at `size` x `size`.

    `flip=True` applies a random horizontal flip (p=0.5) drawn from `torch`'s global RNG (seeded by the trainer).
    `limit` keeps the first N names of the split (tests). `names` overrides the split file.
    """

    def __init__(self, split: str = "train", size: int = 64, root: str | Path | None = None, flip: bool = False,
                 cache_dir: str | Path | None = None, limit: int | None = None, names: Sequence[str] | None = None,
                 split_dir: str | Path | None = None, progress=None):
        self.split, self.size, self.flip = split, int(size), bool(flip)
        self.root = Path(root) if root is not None else default_faces_root()
        names = list(names) if names is not None else load_split(split, split_dir)
        if limit is not None:
            names = names[: int(limit)]
        self.names = names
        cache_file = None
        if cache_dir is not None and limit is None:
            cache_file = Path(cache_dir) / f"{SPLIT_PREFIX}_{split}_{self.size}.npy"
        self.images = load_faces_array(self.names, self.size, self.root, cache_file, progress=progress)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, i: int):
        x = torch.from_numpy(self.images[i]).permute(2, 0, 1).float().div_(255.0)
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x

    def uint8(self, i: int) -> np.ndarray:
        return self.images[i]


if __name__ == "__main__":  # regenerate the committed split files
    s = write_split()
    print({k: len(v) for k, v in s.items()}, "->", SPLIT_DIR, "sha256", split_sha256())
