"""How the never-worse check's naturalness criterion was set: the face prior's naturalness figure (`Prior.naturalness`,
the PSNR of its one-shot reconstruction of a face noised to t) of results against their damaged inputs, for honest
results and for broken ones.

    python bench/naturalness.py [--n 48] [--size 128] [--prior faceadapt-iddpm-small]

UTK200 test faces at `--size` px, the standard damage scaled for that size (seeds 2000000 + i), restored by the
bundled restorer (`Restorer.restore_crops`). Each image's naturalness is what the check computes
(`Restorer.naturalness`: resized to the prior's size, every image on the same noise, seed 0), at each t of `--ts`
(fraction of the respaced schedule) over area-averaging grids of `--grids` squares (64: every pixel of the 64 px
prior; 16: the coarse structure). Prints, per setting,
each kind of image minus its damaged input (dB): min / 5th percentile / median / max, and the share under
-MAX_NATURALNESS_DROP_DB. A criterion must keep the clean faces and the restorations (no false alarm) and catch the
broken ones: JPEG quality 8 blocks, low-frequency colour blotches (sigma 40 levels on an 8 x 8 grid), Gaussian noise
(12 levels); a 2 px blur is shown for reference (the detail criterion catches it, not this one).
"""
from __future__ import annotations

import argparse
import time

import cv2
import numpy as np
import torch

from restoration.data import FacesDataset
from restoration.diffusion import load_guard_prior
from restoration.faces import MAX_NATURALNESS_DROP_DB, Restorer
from restoration.training import degradation_params, degrade_pair

TEST_SEED = 2_000_000


def broken(kind: str, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if kind == "jpeg q8":
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 8])
        return cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if kind == "blotches":
        n = cv2.resize(rng.normal(0, 40, (8, 8, 3)).astype(np.float32), img.shape[1::-1], interpolation=cv2.INTER_CUBIC)
        return np.clip(img + n, 0, 255).astype(np.uint8)
    if kind == "noise 12":
        return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    if kind == "blur 2 px":
        return cv2.GaussianBlur(img, (0, 0), 2.0)
    raise ValueError(kind)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--prior", default="faceadapt-iddpm-small")
    ap.add_argument("--ts", default="0.1,0.3", help="comma-separated t (fraction of the respaced schedule)")
    ap.add_argument("--grids", default="64,16", help="comma-separated grid sides the images are area-averaged to")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    restorer = Restorer.from_zoo("faceadapt-swinir-small", device="cpu", guard_prior=load_guard_prior(args.prior))
    ds = FacesDataset("test", args.size, limit=args.n)
    gt = torch.stack([ds[i] for i in range(len(ds))])
    lq, _ = degrade_pair(gt, degradation_params(), TEST_SEED)
    u8 = lambda t: [(x.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8) for x in t]  # noqa: E731
    inputs = u8(lq)
    restored = restorer.restore_crops(inputs)
    rng = np.random.default_rng(0)
    sets = {"clean face": u8(gt), "restored": restored}
    for kind in ("jpeg q8", "blotches", "noise 12", "blur 2 px"):
        sets[f"restored + {kind}"] = [broken(kind, r, rng) for r in restored]
    s = restorer.guard_prior.image_size

    def figures(imgs, t, grid):  # what the check computes (`Restorer.naturalness`), at this t and grid
        return np.array(restorer.naturalness(imgs, t, grid))

    print(f"{len(gt)} UTK200 test faces at {args.size} px, standard damage; prior {args.prior} ({s} px); "
          f"naturalness of each image minus its damaged input's (dB): min / p5 / median / max, share < "
          f"-{MAX_NATURALNESS_DROP_DB:g}")
    for t in (float(v) for v in args.ts.split(",")):
        for grid in (int(v) for v in args.grids.split(",")):
            base = figures(inputs, t, grid)
            print(f"\nt {t}, grid {grid} x {grid}")
            for label, imgs in sets.items():
                d = figures(imgs, t, grid) - base
                print(f"  {label:26} {d.min():+6.2f} {np.percentile(d, 5):+6.2f} {np.median(d):+6.2f} {d.max():+6.2f}"
                      f"   {np.mean(d < -MAX_NATURALNESS_DROP_DB):.2f}")
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
