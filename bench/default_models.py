"""Benchmark of the two bundled default models (faceadapt-swinir-small, faceadapt-iddpm-small) on this machine.

    python bench/default_models.py                       # the bundled models, all 500 test faces, 1 thread
    python bench/default_models.py --n-test 100 --images /tmp/imgs

Prints:
 (a) restorer on the UTK200 test split (64x64), each face damaged with the standard pipeline
     (`restoration.degrade.damage.DEFAULT`, seed 2000000 + i): PSNR / SSIM of the restorer output, of its input (what `degrade` returns: the low-resolution
     image upsampled back *bilinearly* by the pipeline) and of the same low-resolution image upsampled *bicubically*;
 (b) prior: a grid of unconditional samples (ancestral, learned variances, respacing `--sample-respacing`) and a grid
     of pseudo targets for damaged test faces with the card's `pseudo_target_defaults` (rows: damaged, pseudo target,
     ground truth), written under `--images`; PSNR of the pseudo targets; and the denoising PSNR of the one-shot
     x0-prediction at the pseudo-target start step (q_sample of clean test faces, respacing 250);
 (c) per-face restore time of the restorer (CPU, `--threads`), batch 1 and batch 16.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from restoration.data import FacesDataset
from restoration.models import Zoo
from restoration.training import (degrade_pair, denoise_psnr, evaluate_restorer, make_diffusion, psnr_ssim,
                                  sample_prior, save_grid)

REPO = Path(__file__).resolve().parents[1]
TEST_SEED = 2_000_000


def _steps(card) -> str:
    """Training steps of a card: the total over warm starts, with the last run's share."""
    tr = card.extra.get("training", {})
    total = tr.get("total", {}).get("steps", tr.get("steps"))
    return f"{total}" if total == tr.get("steps") else f"{total} ({tr.get('steps')} in the last run)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo-dir", default=str(REPO / "restoration" / "zoo_defaults"))
    ap.add_argument("--restorer", default="faceadapt-swinir-small")
    ap.add_argument("--prior", default="faceadapt-iddpm-small")
    ap.add_argument("--n-test", type=int, default=500, help="test faces for (a)")
    ap.add_argument("--n-denoise", type=int, default=100, help="clean test faces for the denoising PSNR")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--sample-respacing", default="100")
    ap.add_argument("--n-pseudo", type=int, default=8)
    ap.add_argument("--images", default=str(REPO / "docs" / "images"))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t_all = time.time()
    zoo = Zoo(root=args.zoo_dir, builtin_dir=None)
    rcard, pcard = zoo.get(args.restorer), zoo.get(args.prior)
    restorer, prior = zoo.load(args.restorer), zoo.load(args.prior)
    size = rcard.input_size
    print(f"models: {args.restorer} ({sum(p.numel() for p in restorer.parameters()) / 1e6:.2f}M params, "
          f"{_steps(rcard)} steps), {args.prior} "
          f"({sum(p.numel() for p in prior.parameters()) / 1e6:.2f}M params, {_steps(pcard)} steps)")
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU")
    images = Path(args.images)
    images.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------------------------------------------- (a)
    t0 = time.time()
    ds = FacesDataset("test", size, limit=args.n_test)
    gt = torch.stack([ds[i] for i in range(len(ds))])
    r = evaluate_restorer(restorer, gt, seed=TEST_SEED)
    print(f"\n(a) restorer, {r['n']} test faces {size}x{size}, standard degradation (DEFAULT, seeds {TEST_SEED}+i):")
    print(f"    {'':34} {'PSNR dB':>8} {'SSIM':>7}")
    print(f"    {'restorer output':34} {r['psnr_restorer']:8.2f} {r['ssim_restorer']:7.4f}")
    print(f"    {'input (LQ, bilinear up = degrade)':34} {r['psnr_input']:8.2f} {r['ssim_input']:7.4f}")
    print(f"    {'LQ upsampled bicubic':34} {r['psnr_bicubic']:8.2f} {r['ssim_bicubic']:7.4f}")
    print(f"    ({time.time() - t0:.0f} s)")
    lq, lqb = degrade_pair(gt[:8], seed=TEST_SEED)
    with torch.no_grad():
        out = restorer(lq).clamp(0, 1)
    save_grid([lq, lqb, out, gt[:8]], images / "default_restorer.png")

    # ---------------------------------------------------------------------------------------------------- (b)
    t0 = time.time()
    ptd = dict(pcard.extra.get("pseudo_target_defaults") or {})
    start, until, down_n = int(ptd.get("start", 150)), int(ptd.get("constrain_until", 90)), int(ptd.get("down_N", 4))
    samples = sample_prior(prior, args.n_samples, pcard.input_size, args.sample_respacing, seed=0)
    cols = min(8, args.n_samples)
    save_grid([samples[i:i + cols] for i in range(0, args.n_samples - cols + 1, cols)], images / "default_prior_samples.png")
    t_samp = time.time() - t0
    from bench_tune import pseudo_targets  # noqa: E402  (bench/tune_pseudo_targets.py)

    n_p = args.n_pseudo
    dmg, _ = degrade_pair(gt[:n_p], seed=TEST_SEED)
    t1 = time.time()
    pt = pseudo_targets(prior, dmg, start, until, down_n, seed=0)
    t_pt = time.time() - t1
    save_grid([dmg, pt, gt[:n_p]], images / "default_pseudo_targets.png")
    p_d, s_d = psnr_ssim(dmg, gt[:n_p])
    p_p, s_p = psnr_ssim(pt, gt[:n_p])
    dn = FacesDataset("test", pcard.input_size, limit=args.n_denoise)
    clean = torch.stack([dn[i] for i in range(len(dn))])
    t2 = time.time()
    den = denoise_psnr(prior, clean, start, seed=0)
    print(f"\n(b) prior: {args.n_samples} unconditional samples (respacing {args.sample_respacing}, "
          f"{t_samp:.0f} s) -> {images / 'default_prior_samples.png'}")
    print(f"    pseudo targets (start {start}/250, constrain_until {until}, down_N {down_n}, ancestral) for {n_p} damaged "
          f"test faces ({t_pt:.0f} s) -> {images / 'default_pseudo_targets.png'}")
    print(f"      damaged input vs GT: PSNR {np.mean(p_d):.2f} SSIM {np.mean(s_d):.4f}; "
          f"pseudo targets vs GT: PSNR {np.mean(p_p):.2f} SSIM {np.mean(s_p):.4f}")
    print(f"    denoising PSNR of the x0-prediction at respaced t={start} (original t="
          f"{int(make_diffusion('250').timestep_map[start])}), {len(clean)} clean test faces: {den:.2f} dB "
          f"({time.time() - t2:.0f} s)")

    # ---------------------------------------------------------------------------------------------------- (c)
    print(f"\n(c) restore time per face ({size}x{size}, CPU, {args.threads} thread(s), median of 5 after warm-up):")
    for bs in (1, 16):
        x = torch.rand(bs, 3, size, size)
        with torch.no_grad():
            restorer(x)
            ts = []
            for _ in range(5):
                t = time.perf_counter()
                restorer(x)
                ts.append(time.perf_counter() - t)
        print(f"    batch {bs:2d}: {statistics.median(ts) / bs * 1000:.1f} ms/face")
    print(f"\ntotal {time.time() - t_all:.0f} s")


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_tune", Path(__file__).resolve().parent / "tune_pseudo_targets.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    sys.modules["bench_tune"] = mod
    main()
