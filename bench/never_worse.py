"""Never worse, counted: how many faces of `shared/data/realworld` come out worse than the input, before (the
native-size rule alone) and after (the never-worse check of `restoration.faces.fidelity.check_face`).

    python bench/never_worse.py [--model faceadapt-swinir-small] [--detector retinaface] [--limit N]
                                [--guard-prior faceadapt-iddpm-small | none]

Every image of realworld/whole (faces detected) and realworld/cropped, realworld/cropped_gray (512 px aligned crops,
`--aligned`) is restored twice with the default (auto) fidelity: `guard=False` (before) and `guard=True` (after); an aligned crop's "before" is what
`faceadapt restore --aligned` gave before (`Restorer.restore_crops`: no paste mask, no check).

Per row: mode, Laplacian-variance ratio, 4x low-pass PSNR and, before, `metrics.removed_structure` of the result
over the face's box (how much what the model removed follows the face's edges: a smear is positive).

"Worse" (the bench's own measure, not the check's filters): over the face's box (detected box; for an aligned crop
the crop less a 5% border), at the input's own scale, a face is worse when
  * blurred: the variance of its luma Laplacian (3x3) falls under 0.8 x the input's, or
  * changed: the PSNR between the two faces reduced 4x by area averaging is under 30 dB (washed out, recoloured,
    features moved).
For gray inputs it also prints the mean |R - G| of the result over the faces (a faint colour: before > 0, after 0).
The check runs with the guard prior (`--guard-prior`, default FACEADAPT_GUARD_PRIOR, as the CLI and the API run it;
`none`: detail and coarse content only); "by prior" counts the faces it made fall back ("less natural").
Prints one row per face that is worse before or after, then the counts; reads the data in place, writes nothing.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("FACEADAPT_SHARED", REPO.parent / "shared")).resolve()
from restoration import metrics as M  # noqa: E402
from restoration.diffusion import load_guard_prior  # noqa: E402
from restoration.faces import Restorer, is_gray, load_image  # noqa: E402
from restoration.settings import get_settings  # noqa: E402

BLUR_RATIO = 0.8
CHANGE_DB = 30.0


def lapvar(img: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.CV_64F, ksize=3).var())


def worse(before: np.ndarray, after: np.ndarray) -> tuple[str | None, float, float]:
    """(why or None, Laplacian-variance ratio, 4x low-pass PSNR) of one face region."""
    ratio = lapvar(after) / max(lapvar(before), 1e-9)
    lp = float(M.lowpass_psnr(after, before, 4.0))
    why = []
    if ratio < BLUR_RATIO:
        why.append("blurred")
    if lp < CHANGE_DB:
        why.append("changed")
    return ("+".join(why) or None), ratio, lp


def regions(img: np.ndarray, faces, aligned: bool) -> list[tuple[int, int, int, int]]:
    h, w = img.shape[:2]
    if aligned:
        b = int(round(0.05 * min(h, w)))
        return [(b, b, w - b, h - b)]
    out = []
    for f in faces:
        x0, y0, x1, y1 = (int(round(float(v))) for v in f.box)
        out.append((max(0, x0), max(0, y0), min(w, x1), min(h, y1)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="faceadapt-swinir-small")
    ap.add_argument("--detector", default="retinaface")
    ap.add_argument("--limit", type=int, default=0, help="at most N images per folder (0: all)")
    ap.add_argument("--guard-prior", default=None, help="face prior of the check (default: FACEADAPT_GUARD_PRIOR; "
                                                        "none: without)")
    args = ap.parse_args()
    os.environ.setdefault("FACEADAPT_FACEXLIB_MODEL_ROOT", str(SHARED / "weights/facexlib"))
    r = Restorer.from_zoo(args.model, device="cpu", guard_prior=load_guard_prior(args.guard_prior))
    root = SHARED / "data/realworld"
    sets = [("whole", False), ("cropped", True), ("cropped_gray", True)]
    totals = {k: {"faces": 0, "worse_before": 0, "worse_after": 0, "fell_back": 0, "by_prior": 0, "kept": 0}
              for k, _ in sets}
    gray_rg = {"before": [], "after": []}
    nat = []  # the prior's naturalness_db of each face's final check
    t0 = time.perf_counter()
    prior = "none" if r.guard_prior is None else (args.guard_prior or get_settings().guard_prior)
    print(f"model {args.model} ({r.size} px), guard prior {prior}; worse = Laplacian variance < {BLUR_RATIO} x input's "
          f"or 4x low-pass PSNR < {CHANGE_DB} dB, over each face's box at the input's scale")
    print(f"{'image':34} {'face':>4} {'px':>5}  {'before: mode lap low struct':>35}  {'after':>36}")
    for name, aligned in sets:
        files = sorted(p for p in (root / name).iterdir() if p.is_file())
        files = files[: args.limit] if args.limit else files
        for p in files:
            img = load_image(p)
            kw = dict(aligned=aligned, detector=None if aligned else args.detector)
            before = r.restore_image(img, guard=False, color=True, **kw)
            if aligned:  # what `faceadapt restore --aligned` did before: Restorer.restore_crops, no mask, no check
                outs, infos = r.restore_crops([img], return_info=True)
                before.image, before.faces[0].extra = outs[0], infos[0]
            after = r.restore_image(img, guard=True, **kw)
            gray = is_gray(img)
            for k, (box, fb, fa) in enumerate(zip(regions(img, after.faces, aligned), before.faces, after.faces), 1):
                x0, y0, x1, y1 = box
                if x1 - x0 < 8 or y1 - y0 < 8:
                    continue
                src = img[y0:y1, x0:x1]
                wb, rb, lb = worse(src, before.image[y0:y1, x0:x1])
                wa, ra, la = worse(src, after.image[y0:y1, x0:x1])
                t = totals[name]
                t["faces"] += 1
                t["worse_before"] += wb is not None
                t["worse_after"] += wa is not None
                t["fell_back"] += bool(fa.extra.get("reason"))
                t["by_prior"] += "less natural" in (fa.extra.get("reason") or "")
                if "naturalness_db" in fa.extra.get("check", {}) and fa.extra.get("mode") != "kept":
                    nat.append(fa.extra["check"]["naturalness_db"])
                t["kept"] += fa.extra.get("mode") == "kept"
                if gray:
                    for key, res in (("before", before), ("after", after)):
                        reg = res.image[y0:y1, x0:x1].astype(np.int16)
                        gray_rg[key].append(float(np.abs(reg[..., 0] - reg[..., 1]).mean()))
                if wb or wa or fa.extra.get("reason"):
                    struct = M.removed_structure(src, before.image[y0:y1, x0:x1])
                    sb = f"{fb.extra.get('mode', '?')[:8]:8} {rb:4.2f} {lb:5.1f} {struct:+6.2f} {wb or 'ok':>8}"
                    sa = f"{fa.extra.get('mode', '?')[:17]:17} {ra:4.2f} {la:5.1f} {wa or 'ok':>7}"
                    print(f"{name + '/' + p.name:34} {k:>4} {fa.extra.get('native_size', 0):5.0f}  {sb}  {sa}")
    print(f"\n{'set':14} {'faces':>6} {'worse before':>13} {'worse after':>12} {'fell back':>10} {'by prior':>9} "
          f"{'kept':>5}")
    all_ = {k: sum(t[k] for t in totals.values()) for k in next(iter(totals.values()))}
    for name, t in [*totals.items(), ("all", all_)]:
        print(f"{name:14} {t['faces']:>6} {t['worse_before']:>13} {t['worse_after']:>12} {t['fell_back']:>10} "
              f"{t['by_prior']:>9} {t['kept']:>5}")
    if gray_rg["before"]:
        print(f"gray inputs: mean |R-G| over the faces {np.mean(gray_rg['before']):.2f} before (colour allowed), "
              f"{np.mean(gray_rg['after']):.2f} after (kept gray)")
    if nat:
        print(f"the prior's naturalness_db of the results (not kept): min {min(nat):+.2f}, median "
              f"{float(np.median(nat)):+.2f}, max {max(nat):+.2f} over {len(nat)} faces")
    print(f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
