"""The restorer on faces at the sizes users send: UTK200 test faces resized to a native size (128 px by default),
damaged there with the standard pipeline scaled for that size (`degrade.py` DEFAULT, seed 2000000 + i), saved as
uint8 like an uploaded crop, and restored through `restoration.pipeline.Restorer.restore_crops` (the product path:
resize to the model size, restore, paste back by the native-size rule). PSNR / SSIM (RGB, at the native size)
against the clean face at that size, next to the damaged input and the bicubic baseline (the same low-resolution
image upsampled bicubically instead of bilinearly).

    python bench/restorer_native.py                                   # the bundled restorer, 200 faces, 128 px
    python bench/restorer_native.py --sizes 128,192 --n 100 --model runs/restorer3   # a training run's last EMA
    python bench/restorer_native.py --model restoration/zoo_defaults/faceadapt-swinir-small --model runs/restorer3

`--model` takes a zoo name, a zoo folder or a training run folder (its last checkpoint's EMA weights); repeat it to
compare models on the same faces.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TEST_SEED = 2_000_000


def _load_restorer(spec: str, zoo_dir: str):
    from restoration import train as T
    from restoration.pipeline import Restorer
    from restoration.zoo import CARD, Zoo

    zoo = Zoo(root=zoo_dir, builtin_dir=None)
    base_card = zoo.get("faceadapt-swinir-small")
    p = Path(spec)
    if p.is_dir() and (p / CARD).is_file():
        z = Zoo(root=p.parent, builtin_dir=None)
        return Restorer(z.load(p.name), z.get(p.name), device="cpu", batch_size=32), spec
    if p.is_dir() and T.last_checkpoint(p) is not None:
        ck = T.last_checkpoint(p)
        model = T.load_run_model(p, "ema", ck)
        return Restorer(model, base_card, device="cpu", batch_size=32), f"{spec} ({ck.name})"
    return Restorer(zoo.load(spec), zoo.get(spec), device="cpu", batch_size=32), spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="zoo name/folder or training run folder (repeatable); "
                                                      "default: the bundled faceadapt-swinir-small")
    ap.add_argument("--zoo-dir", default=str(REPO / "restoration" / "zoo_defaults"))
    ap.add_argument("--sizes", default="128", help="comma-separated native sizes (px)")
    ap.add_argument("--n", type=int, default=200, help="test faces")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from restoration import train as T
    from restoration.data import FacesDataset

    models = [_load_restorer(m, args.zoo_dir) for m in (args.model or ["faceadapt-swinir-small"])]
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU; {args.n} UTK200 test faces, standard damage "
          f"scaled for each size, seeds {TEST_SEED}+i")
    for size in [int(s) for s in args.sizes.split(",")]:
        t0 = time.time()
        ds = FacesDataset("test", size, limit=args.n)
        gt = torch.stack([ds[i] for i in range(len(ds))])
        lq, lqb = T.degrade_pair(gt, T.degradation_params(), TEST_SEED)
        crops = [(lq[i].permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8) for i in range(len(lq))]
        rows = [("damaged input (bilinear up)", lq), ("bicubic baseline", lqb)]
        for restorer, label in models:
            out = restorer.restore_crops(crops)
            rows.append((f"restorer {label}", torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0))
        print(f"\nnative {size} px ({len(gt)} faces)")
        bic = None
        for label, img in rows:
            p, s = T._psnr_ssim(img.clamp(0, 1), gt)
            mp = float(np.mean(p))
            bic = mp if label == "bicubic baseline" else bic
            gain = f"  {mp - bic:+.2f} dB vs bicubic" if bic is not None and label.startswith("restorer") else ""
            print(f"  {label:60} {mp:6.2f} dB  SSIM {float(np.mean(s)):.4f}{gain}")
        print(f"  ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
