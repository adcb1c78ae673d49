"""Register a tiny GFPGAN (arch `gfpgan_v1_4`, out_size 64) into a zoo folder, briefly trained here, as a base for
`bench/adaptation.py` (the GFPGAN row of issue 11).

The public GFPGAN v1.4 is 512 px and 86 M parameters: far too slow for the CPU benchmark, and it is not on disk.
This script builds the same architecture at 64 px with narrow channels (`narrow=0.0625, num_style_feat=32`: 0.27 M
parameters) and trains it the plain way on the *standard* degradations (`restoration.degrade.damage.DEFAULT`) of the
faces-utk200 training split: L1 between the model's output and the clean face, both in [0, 1] (the model itself works
in [-1, 1]: `restoration.models.io.run_restorer` converts, with the arch's deterministic `inference_kwargs`),
Adam with a cosine schedule, EMA weights. So, like `faceadapt-swinir-small`, it knows the standard damage and has
never seen the benchmark's target domains. The card records the recipe, the measured figures on 50 test faces
(standard degradations) and `face_template: utk200` (UTK crops, as the bundled models).

    python bench/make_tiny_gfpgan.py --zoo-root /tmp/gfpgan-zoo                  # 800 steps, 1 thread (~9 min here)
    python bench/adaptation.py --zoo-root /tmp/gfpgan-zoo --base tiny-gfpgan ... # see docs/MODELS.md

Everything is seeded (same thread count -> same weights).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from restoration import data

from restoration import degrade

from restoration import metrics
from restoration.models import Zoo, build, run_restorer  # noqa: E402

TINY_GFPGAN = dict(out_size=64, num_style_feat=32, channel_multiplier=2, decoder_load_path=None, fix_decoder=False,
                   num_mlp=8, input_is_latent=True, different_w=True, narrow=0.0625, sft_half=True)
SIZE = 64
LICENSE = ("Weights trained on UTKFace (non-commercial research use only): research / non-commercial use only. "
           "Architecture after GFPGAN (Apache-2.0 with a StyleGAN2 decoder under NVIDIA's non-commercial terms); "
           "FaceAdapt's own implementation.")


def _degraded(hq_u8: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """N x S x S x 3 uint8 -> N x S x S x 3 float32 in [0, 1], standard degradations."""
    return np.stack([np.asarray(degrade.degrade(im, degrade.DEFAULT, rng), dtype=np.float32) for im in hq_u8])


def _t(arr: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dtype == torch.uint8:
        t = t.float().div(255.0)
    return t.permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def evaluate(model: torch.nn.Module, lq: torch.Tensor, gt: torch.Tensor) -> dict:
    out = run_restorer(model.eval(), lq, (-1.0, 1.0)).clamp(0, 1)
    q = lambda t: t.mul(255).round().div(255).permute(0, 2, 3, 1).numpy().astype(np.float64)  # noqa: E731
    o, g, i = q(out), q(gt), q(lq)
    ps = lambda a: float(np.mean([metrics.psnr(a[k], g[k]) for k in range(len(g))]))  # noqa: E731
    ss = lambda a: float(np.mean([metrics.ssim(a[k], g[k]) for k in range(len(g))]))  # noqa: E731
    return {"input_psnr": round(ps(i), 3), "input_ssim": round(ss(i), 4), "psnr": round(ps(o), 3),
            "ssim": round(ss(o), 4), "count": len(g)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo-root", required=True, help="zoo folder to register into (created if missing)")
    ap.add_argument("--name", default="tiny-gfpgan")
    ap.add_argument("--steps", type=int, default=800, help="training steps (0: random init, registered as such)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lr-min", type=float, default=2e-4)
    ap.add_argument("--ema", type=float, default=0.995)
    ap.add_argument("--n-faces", type=int, default=3000, help="training-split faces held in memory")
    ap.add_argument("--n-test", type=int, default=50, help="test-split faces for the figures in the card")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()

    names = data.load_split("train")
    rs = np.random.default_rng(args.seed)
    names = [names[i] for i in rs.permutation(len(names))[: args.n_faces]]
    hq = data.load_faces_array(names, SIZE)
    test_names = sorted(data.load_split("test"))[: args.n_test]
    test_hq = data.load_faces_array(test_names, SIZE)
    test_lq = _t(_degraded(test_hq, np.random.default_rng(12345)))
    test_gt = _t(test_hq)
    print(f"{len(hq)} training faces, {len(test_hq)} test faces at {SIZE}px ({time.perf_counter() - t0:.0f}s)", flush=True)

    model = build("gfpgan_v1_4", TINY_GFPGAN).train()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99))
    floor = args.lr_min / args.lr
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(k, args.steps) / max(args.steps, 1))))
    before = evaluate(model, test_lq, test_gt)
    print(f"random init: {before}", flush=True)
    gen = torch.Generator().manual_seed(args.seed)
    np_rng = np.random.default_rng(args.seed + 1)
    t_train = time.perf_counter()
    losses = []
    for step in range(args.steps):
        idx = torch.randint(0, len(hq), (args.batch_size,), generator=gen).numpy()
        gt_u8 = hq[idx]
        if bool(torch.rand(1, generator=gen) < 0.5):
            gt_u8 = gt_u8[:, :, ::-1]
        x, y = _t(_degraded(gt_u8, np_rng)), _t(gt_u8)
        model.train()
        out = run_restorer(model, x, (-1.0, 1.0))
        loss = F.l1_loss(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            d = min(args.ema, (1.0 + step) / (10.0 + step))
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.mul_(d).add_(pm.detach(), alpha=1 - d)
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == args.steps:
            print(f"step {step + 1}/{args.steps} l1 {np.mean(losses[-50:]):.4f} "
                  f"({(time.perf_counter() - t_train) / (step + 1):.2f} s/step)", flush=True)
    train_s = time.perf_counter() - t_train
    final = ema if args.steps > 0 else model
    after = evaluate(final, test_lq, test_gt)
    print(f"{'EMA after ' + str(args.steps) + ' steps' if args.steps else 'random init'}: {after}", flush=True)

    zoo = Zoo(root=args.zoo_root)
    card = zoo.register(
        args.name, "gfpgan_v1_4", TINY_GFPGAN, final.state_dict(), kind="restorer", input_size=SIZE,
        value_range=[-1.0, 1.0], overwrite=args.overwrite, license=LICENSE, random_init=args.steps == 0,
        provenance=f"bench/make_tiny_gfpgan.py (seed {args.seed}, {args.steps} steps, {args.threads} thread(s)) on the "
                   "faces-utk200 training split, standard degradations (restoration.degrade.damage.DEFAULT)",
        description=f"Tiny GFPGAN v1.4-architecture restorer at {SIZE}x{SIZE} ({n_params:,} parameters), a CPU "
                    "benchmark base for the GFPGAN adaptation row; not a substitute for the public 512 px model",
        extra={"face_template": "utk200",
               "data": {"name": "faces-utk200", "split": "train", "faces": len(hq)},
               "training": {"recipe": "L1 on [0,1] outputs (model in [-1,1] via restorer_io.run_restorer, stored "
                                      "noise maps), standard degradations, Adam (0.9, 0.99) cosine, EMA",
                            "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "lr_min": args.lr_min,
                            "ema": args.ema, "seed": args.seed, "threads": args.threads,
                            "wall_seconds": round(train_s, 1), "final_l1": round(float(np.mean(losses[-50:])), 4)
                            if losses else None},
               "metrics": {"test_standard_degradations": after, "random_init": before}},
    )
    print(f"registered {card.name} in {zoo.root} ({n_params:,} parameters; total {time.perf_counter() - t0:.0f}s)")


if __name__ == "__main__":
    main()
