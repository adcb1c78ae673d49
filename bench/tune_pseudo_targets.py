"""Tune the pseudo-target settings (start, constrain_until, down_N) of a small prior on damaged val faces.

    python bench/tune_pseudo_targets.py --run runs/prior --n 16 \
        --settings 150,90,4 100,50,4 60,20,4 60,20,2 40,0,4 --out runs/tune_pseudo.json
    python bench/tune_pseudo_targets.py --zoo restoration/zoo_defaults/faceadapt-iddpm-small ...

For N val faces of the UTK200 split (64x64), each damaged with the standard degradation
(`restoration.degrade.damage.DEFAULT`, seeds `--seed + i`), the DT-BFR ancestral sampler
(`diffusion.diffusion.constrained_sample`, 250-step respacing) makes pseudo targets from x0 = the damaged face (`--x0 input`) or
from the restorer's output (`--x0 restorer --restorer ...`), and PSNR / SSIM against the ground truth are printed
next to those of x0 itself. Every image uses its own generator (seeded from `--seed` and its index), so results do
not depend on batching.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from restoration.data import FacesDataset
from restoration import diffusion
from restoration.models import Zoo
from restoration.training import degrade_pair, load_run_model, psnr_ssim, save_grid


def _load_prior(args):
    if args.run:
        m = load_run_model(args.run)
        return m, f"{args.run} (EMA, step {m.step})"
    p = Path(args.zoo)
    return Zoo(root=p.parent, builtin_dir=None).load(p.name), str(p)


def _load_restorer(spec: str):
    p = Path(spec)
    if (p / "card.json").is_file():
        return Zoo(root=p.parent, builtin_dir=None).load(p.name)
    return load_run_model(p)


def pseudo_targets(prior, x0_01: torch.Tensor, start: int, until: int, down_n: int, seed: int, batch: int = 16):
    diff = diffusion.create_gaussian_diffusion(timestep_respacing="250")
    lp = diffusion.LowPass(tuple(x0_01.shape[-2:]), down_n)
    outs = []
    for b in range(0, len(x0_01), batch):
        x = x0_01[b:b + batch].clamp(0, 1) * 2 - 1
        gens = [torch.Generator().manual_seed(seed * 100003 + b + i) for i in range(len(x))]
        with torch.no_grad():
            y = diffusion.constrained_sample(prior, x, start, until, lp, gens, diffusion=diff)
        outs.append((y * 0.5 + 0.5).clamp(0, 1))
    return torch.cat(outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--run", help="training run folder (EMA of its last checkpoint)")
    g.add_argument("--zoo", help="zoo model folder of the prior")
    ap.add_argument("--n", type=int, default=16, help="number of val faces")
    ap.add_argument("--split", default="val")
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--settings", nargs="+", default=["150,90,4", "100,50,4", "60,20,4"],
                    help="start,constrain_until,down_N triples (respaced indices of 250)")
    ap.add_argument("--x0", choices=["input", "restorer"], default="input")
    ap.add_argument("--restorer", help="restorer zoo folder or run folder (for --x0 restorer)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--grid", help="write a PNG grid (rows: damaged, x0, pseudo targets per setting, GT)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    prior, prior_label = _load_prior(args)
    ds = FacesDataset(args.split, 64, limit=args.n)
    gt = torch.stack([ds[i] for i in range(len(ds))])
    lq, _ = degrade_pair(gt, seed=args.seed)
    x0 = lq
    if args.x0 == "restorer":
        r = _load_restorer(args.restorer)
        with torch.no_grad():
            x0 = r(lq).clamp(0, 1)
    res = {"prior": prior_label, "n": len(gt), "split": args.split, "degradation": "DEFAULT (standard)",
           "seed": args.seed, "x0": args.x0, "sampler": "ancestral, respacing 250", "results": []}
    for key, img in (("damaged", lq), ("x0", x0)):
        p, s = psnr_ssim(img, gt)
        res[f"psnr_{key}"], res[f"ssim_{key}"] = round(float(np.mean(p)), 3), round(float(np.mean(s)), 4)
    print(f"prior {prior_label}; {len(gt)} {args.split} faces; damaged input PSNR {res['psnr_damaged']:.2f} "
          f"SSIM {res['ssim_damaged']:.4f}; x0={args.x0} PSNR {res['psnr_x0']:.2f} SSIM {res['ssim_x0']:.4f}", flush=True)
    rows = [lq, x0]
    for spec in args.settings:
        start, until, n = (int(v) for v in spec.split(","))
        t0 = time.time()
        pt = pseudo_targets(prior, x0, start, until, n, args.seed)
        p, s = psnr_ssim(pt, gt)
        r = {"start": start, "constrain_until": until, "down_N": n, "psnr": round(float(np.mean(p)), 3),
             "ssim": round(float(np.mean(s)), 4), "seconds": round(time.time() - t0, 1)}
        res["results"].append(r)
        rows.append(pt)
        print(f"start {start:3d} until {until:3d} down_N {n:2d}: PSNR {r['psnr']:.2f} SSIM {r['ssim']:.4f} "
              f"({r['seconds']:.0f} s)", flush=True)
    rows.append(gt)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1))
    if args.grid:
        save_grid([r[:8] for r in rows], args.grid)


if __name__ == "__main__":
    main()
