"""Domain colour correction of the pseudo targets: a colour cast that a whole domain shares is measured and taken out.

`color_stats` measures crops, `domain_color_gains` turns the domain's and the clean reference's statistics into
per-channel gains, and `color_correction` does it once per job (`targets/color.json`), for `generate_targets` and
`evaluate` (`PseudoTargetParams.color_correction` sets its strength).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from restoration.adaptation.config import AdaptConfig
from restoration.adaptation.files import read_json, write_json
from restoration.adaptation.loaders import zoo_or_default
from restoration.adaptation.sources import hq_faces
from restoration.adaptation.workdir import COLOR, items, prepared_file, read_job
from restoration.faces.imageio import load_image

__all__ = ["COLOR_REGIONS", "COLOR_DEAD_ZONE", "COLOR_REFERENCE_COUNT", "color_stats", "domain_color_gains",
           "color_correction"]


#: The two regions of an aligned crop whose colour is measured: the face (the central half of the side) and its
#: surround (outside the central 60 %: hair, background, clothes).
COLOR_REGIONS = ("face", "surround")


def color_stats(images: Iterable[np.ndarray]) -> dict | None:
    """Mean R, G, B in [0, 1] of HxWx3 uint8 aligned crops, per region: {"face": [r, g, b], "surround": [r, g, b]}
    (`COLOR_REGIONS`); None for no images."""
    sums, n = {k: np.zeros(3) for k in COLOR_REGIONS}, 0
    for im in images:
        f = im[..., :3].astype(np.float64) / 255.0
        h, w = f.shape[:2]
        sums["face"] += f[h // 4:h - h // 4, w // 4:w - w // 4].reshape(-1, 3).mean(0)
        ring = np.ones((h, w), bool)
        ring[int(0.2 * h):h - int(0.2 * h), int(0.2 * w):w - int(0.2 * w)] = False
        sums["surround"] += f[ring].mean(0)
        n += 1
    return None if n == 0 else {k: [round(float(v), 5) for v in s / n] for k, s in sums.items()}


#: Casts smaller than this (largest per-channel gain, as |log gain|) are left alone: natural variation between
#: datasets, not a domain's tint (clean UTKFace test faces of one ethnicity against the mixed training faces: at most
#: 0.023 after the agreement rule of `domain_color_gains`, 0.050 on the face alone).
COLOR_DEAD_ZONE = 0.04


def domain_color_gains(domain: dict | None, reference: dict | None, strength: float = 1.0,
                       dead_zone: float = COLOR_DEAD_ZONE) -> list[float] | None:
    """Per-channel gains that take a colour cast shared by a whole domain out, keeping its brightness.

    `domain` / `reference`: `color_stats` of the domain's crops and of clean faces. Per region, the chromaticity
    deviation d_c = log((ref_c / mean(ref)) / (dom_c / mean(dom))); a cast tints the whole picture, so only what the
    face and its surround agree on is corrected (same sign: the smaller magnitude; else 0). A domain of darker or
    warmer skin (face only) or of one coloured wall (surround only) is left alone. `strength` scales the log gains
    (0: none). None when there is nothing to correct (no statistics, strength 0, every |log g_c| below `dead_zone`).
    """
    if domain is None or reference is None or float(strength) <= 0:
        return None

    def dev(region):
        dom = np.clip(np.asarray(domain[region], np.float64), 1e-3, None)
        ref = np.clip(np.asarray(reference[region], np.float64), 1e-3, None)
        return np.log((ref / ref.mean()) / (dom / dom.mean()))

    a, b = dev("face"), dev("surround")
    log_g = np.where(np.sign(a) == np.sign(b), np.sign(a) * np.minimum(np.abs(a), np.abs(b)), 0.0)
    log_g = (log_g - log_g.mean()) * float(strength)  # a tint, not an exposure change
    if np.abs(log_g).max() < dead_zone:
        return None
    return [round(float(v), 4) for v in np.exp(log_g)]


#: Reference faces read for the clean-face colour statistics (`color_correction`).
COLOR_REFERENCE_COUNT = 256


def color_correction(workdir: str | Path, hq_images: Sequence | None = None, zoo=None) -> dict:
    """The domain white balance of the pseudo targets (`PseudoTargetParams.color_correction`), computed once per job
    and kept in `targets/color.json`: {"strength", "gains" (R, G, B, or None: nothing to correct), "domain",
    "reference_stats" (`color_stats`), "reference"}. The domain's statistics come from its training crops, the
    reference from clean faces: `hq_images` (paths or arrays), else the discriminator's real images (`config.hq_dir`,
    else the UTKFace training split), else the prior card's `extra.face_color_stats` (the faces it was trained on);
    with none of them there is no correction. Deterministic, so every shard computes the same."""
    workdir = Path(workdir)
    job = read_job(workdir)
    cfg: AdaptConfig = job["config"]
    path = workdir / COLOR
    strength = float(cfg.pseudo.color_correction)
    if path.is_file():
        rec = read_json(path)
        if rec.get("strength") == strength:
            return rec
    rec = {"strength": strength, "gains": None, "domain": None, "reference_stats": None, "reference": None}
    if strength > 0:
        if hq_images is None:
            hq_images, source = hq_faces(cfg)
        else:
            source = f"given ({len(hq_images)} images)"
        refs = list(hq_images)[:COLOR_REFERENCE_COUNT]
        if refs:
            rec["reference"] = source
            rec["reference_stats"] = color_stats(im if isinstance(im, np.ndarray) else load_image(im) for im in refs)
        elif job.get("prior"):
            try:
                fs = (zoo_or_default(zoo).get(job["prior"]).extra or {}).get("face_color_stats") or {}
            except Exception:  # noqa: BLE001 - an unknown prior has no reference; the job fails elsewhere if it matters
                fs = {}
            if fs.get("face") and fs.get("surround"):
                rec["reference"] = f"prior card {job['prior']} (face_color_stats)"
                rec["reference_stats"] = {"face": list(fs["face"]), "surround": list(fs["surround"])}
        if rec["reference_stats"] is not None:
            rec["domain"] = color_stats(load_image(prepared_file(workdir, it)) for it in items(workdir, "train"))
            rec["gains"] = domain_color_gains(rec["domain"], rec["reference_stats"], strength)
        else:
            rec["reference"] = "none found: no correction"
    write_json(path, rec)
    return rec
