"""The image folders an adaptation reads: the domain's photos (`list_images`) and the clean HQ faces (`hq_faces`).

The clean faces are the discriminator's real images in fine-tuning and the colour reference of the pseudo targets:
`AdaptConfig.hq_dir` when set, else the UTKFace training split of `restoration.data.faces` when present.
"""
from __future__ import annotations

import random
from pathlib import Path

from restoration.adaptation.config import AdaptConfig
from restoration.data import faces as data_mod

__all__ = ["IMAGE_EXTS", "list_images", "hq_faces"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def list_images(data_dir: str | Path) -> list[Path]:
    """Image files directly in `data_dir` (sorted by name)."""
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"data folder not found: {d}")
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def hq_faces(cfg: AdaptConfig) -> tuple[list[Path], str]:
    """At most `cfg.hq_count` clean HQ faces (paths, shuffled with `cfg.seed`) and where they come from."""
    n = int(cfg.hq_count)
    if cfg.hq_dir:
        files = list_images(cfg.hq_dir)
        if not files:
            raise ValueError(f"no images in hq_dir {cfg.hq_dir}")
        random.Random(cfg.seed).shuffle(files)
        return files[:n], f"{cfg.hq_dir} ({min(n, len(files))} images)"
    try:
        root = data_mod.default_faces_root()
        names = data_mod.load_split("train")
        random.Random(cfg.seed).shuffle(names)
        files = [root / x for x in names[:n] if (root / x).is_file()]
        if files:
            return files, f"{data_mod.DATA_NAME} train split ({len(files)} images)"
    except (FileNotFoundError, AttributeError):
        pass
    return [], "none found: no GAN term"
