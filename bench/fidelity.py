"""Fidelity / native-size paste-back benchmark: picks `restoration.faces.fidelity.DETAIL_RATIO` and the default rule.

    python bench/fidelity.py [--model faceadapt-swinir-small] [--n-sharp 32] [--n-damaged 48]

Three measurements, each for the old behaviour ("plain": the face replaced by the upsampled model output, i.e.
`detail_ratio=inf`), the detail-preserving paste at every size ("detail": `detail_ratio=0`) and the shipped default
(`DETAIL_RATIO`):

(a) sharp references: `shared/data/hq512` faces (FFHQ-aligned, 512 px) downscaled to native sizes 96..256 and
    restored as aligned crops: PSNR of the output against the input (how much of the face is changed) and the
    Laplacian-variance ratio output / input (how much texture survives). "Never worse" wants both high.
(b) damaged faces: UTK200 test split resized to the native size (GT), standard damage (`degrade.DEFAULT`) and a
    cheap camera (`degrade.CAMERA`), scaled for the size, seed 2000000 + i as bench/default_models.py, restored as
    aligned crops: PSNR / SSIM against the GT. Here replacing the face is the point, so this is the cost of keeping
    the input's own fine detail.
(c) whole photos (`shared/data/realworld/whole`, RetinaFace): per face the native size, and over the faces'
    landmark boxes (eyes to mouth) PSNR against the input and the Laplacian-variance ratio, plain vs default.

Prints the tables; nothing is written.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHARED = Path(os.environ.get("FACEADAPT_SHARED", REPO.parent / "shared")).resolve()
from restoration import data as D  # noqa: E402
from restoration import metrics as M  # noqa: E402
from restoration.degrade import PRESETS, degrade  # noqa: E402
from restoration.faces import DETAIL_RATIO, Restorer, load_image  # noqa: E402

INF = 1e9


def lapvar(img: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(M.psnr(a.astype(np.float64) / 255.0, b.astype(np.float64) / 255.0))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    return float(M.ssim(a.astype(np.float64) / 255.0, b.astype(np.float64) / 255.0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="faceadapt-swinir-small")
    ap.add_argument("--n-sharp", type=int, default=32)
    ap.add_argument("--n-damaged", type=int, default=48)
    ap.add_argument("--sizes", default="96,128,160,192,256", help="native sizes of the aligned crops (px)")
    ap.add_argument("--damaged-sizes", default="96,128,160,192", help="native sizes of the damaged faces (<= 200)")
    ap.add_argument("--presets", default="default,camera", help="degrade.PRESETS names for (b)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("FACEADAPT_FACEXLIB_MODEL_ROOT", str(SHARED / "weights" / "facexlib"))

    t_all = time.perf_counter()
    r = Restorer.from_zoo(args.model, device="cpu")
    size = r.size
    rules = {"plain": INF, "detail": 0.0, "default": None}
    print(f"model {args.model} (input {size} px), DETAIL_RATIO {DETAIL_RATIO} (default: detail-preserving above "
          f"{DETAIL_RATIO * size:g} px), torch {torch.__version__}, {args.threads} thread(s), CPU")

    # (a) sharp references --------------------------------------------------------------------------------------
    sizes = [int(s) for s in args.sizes.split(",")]
    files = sorted((SHARED / "data/hq512").glob("*/*.png"))[: args.n_sharp]
    hq = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    print(f"\n(a) sharp references: {len(hq)} hq512 faces downscaled (area) to the native size, aligned crops;"
          f" PSNR output vs input (dB) / Laplacian variance output / input")
    print(f"    {'native':>6} {'lapvar in':>9} " + "".join(f"{k + ' PSNR':>14}{k + ' lap':>12}" for k in rules))
    t0 = time.perf_counter()
    for s in sizes:
        crops = [cv2.resize(im, (s, s), interpolation=cv2.INTER_AREA) for im in hq]
        row = f"    {s:>6} {np.mean([lapvar(c) for c in crops]):>9.1f} "
        for k, ratio in rules.items():
            outs = r.restore_crops(crops, detail_ratio=ratio)
            row += f"{np.mean([psnr(o, c) for o, c in zip(outs, crops)]):>14.2f}"
            row += f"{np.mean([lapvar(o) / max(lapvar(c), 1e-9) for o, c in zip(outs, crops)]):>12.3f}"
        print(row)
    print(f"    ({time.perf_counter() - t0:.0f} s)")

    # (b) damaged faces -----------------------------------------------------------------------------------------
    root = D.default_faces_root()
    names = D.load_split("test")[: args.n_damaged]
    src = [Image.open(root / n).convert("RGB") for n in names]
    for preset in args.presets.split(","):
        params = PRESETS[preset]
        print(f"\n(b) damaged faces: {len(src)} UTK200 test faces at the native size, damage {preset} (scaled for the "
              f"size, seeds 2000000+i), aligned crops; PSNR dB / SSIM vs the ground truth")
        print(f"    {'native':>6} {'input':>15} " + "".join(f"{k:>17}" for k in rules))
        t0 = time.perf_counter()
        for s in [int(v) for v in args.damaged_sizes.split(",")]:
            gt = [np.asarray(im.resize((s, s), Image.BICUBIC)) for im in src]
            lq = [np.clip(np.rint(degrade(g.astype(np.float32) / 255.0, params, rng=2000000 + i) * 255), 0, 255)
                  .astype(np.uint8) for i, g in enumerate(gt)]
            cells = [(np.mean([psnr(x, g) for x, g in zip(lq, gt)]), np.mean([ssim(x, g) for x, g in zip(lq, gt)]))]
            for k, ratio in rules.items():
                outs = r.restore_crops(lq, detail_ratio=ratio)
                cells.append((np.mean([psnr(o, g) for o, g in zip(outs, gt)]),
                              np.mean([ssim(o, g) for o, g in zip(outs, gt)])))
            print(f"    {s:>6} " + "".join(f"{p:>9.2f} {q:.4f}" for p, q in cells))
        print(f"    ({time.perf_counter() - t0:.0f} s)")

    # (c) whole photos ------------------------------------------------------------------------------------------
    photos = sorted(p for p in (SHARED / "data/realworld/whole").iterdir() if p.is_file())
    print(f"\n(c) whole photos: {len(photos)} from realworld/whole, detector retinaface; over each face's landmark box "
          f"(eyes to mouth): PSNR vs input / Laplacian variance output / input")
    print(f"    {'photo':18} {'native':>7} {'default mode':>18} {'plain PSNR':>11} {'plain lap':>10} "
          f"{'default PSNR':>13} {'default lap':>12}")
    t0 = time.perf_counter()
    agg = {"plain": [], "default": []}
    for p in photos:
        img = load_image(p)
        plain = r.restore_image(img, detector="retinaface", detail_ratio=INF)
        new = r.restore_image(img, detector="retinaface")
        for f_old, f_new in zip(plain.faces, new.faces):
            lm = f_new.landmarks5
            x0, y0 = (max(0, int(v)) for v in lm.min(0))
            x1, y1 = (int(v) + 1 for v in lm.max(0))
            roi = lambda im: im[y0:y1, x0:x1]  # noqa: E731
            vals = {}
            for k, res in (("plain", plain), ("default", new)):
                vals[k] = (psnr(roi(res.image), roi(img)), lapvar(roi(res.image)) / max(lapvar(roi(img)), 1e-9))
                agg[k].append(vals[k])
            print(f"    {p.name[:18]:18} {f_new.extra['native_size']:>7.0f} {f_new.extra['mode']:>18} "
                  f"{vals['plain'][0]:>11.2f} {vals['plain'][1]:>10.3f} {vals['default'][0]:>13.2f} {vals['default'][1]:>12.3f}")
    for k in agg:
        a = np.array(agg[k])
        print(f"    mean {k:8}: PSNR {a[:, 0].mean():.2f} dB, Laplacian ratio {a[:, 1].mean():.3f} ({len(a)} faces)")
    print(f"    ({time.perf_counter() - t0:.0f} s)")
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
