"""The paper's synthetic experiment in miniature (Kuai et al., WACV 2025, Sec. 5.1), on faces-utk200 at the base
model's size (64x64 for the bundled defaults).

* base restorer: the default small model (`settings.default_restorer`), trained on the DEFAULT degradations;
* target domain: `restoration.degrade.DOMAIN_SHIFT` (correlated colour sensor noise, colour cast, heavy JPEG),
  which the base model never saw;
* adaptation data: N_TRAIN degraded faces of the *train* split (their ground truth is never used for training;
  it is only read for the diagnostic "pseudo-target PSNR" column); the discriminator's real images are N_HQ other
  clean faces of the train split (disjoint from the adaptation faces);
* evaluation: N_TEST degraded faces of the *test* split against their ground truth (PSNR / SSIM, RGB, [0, 1]).

Rows: base; adapted with diffusion pseudo targets (reference ancestral schedule, start/constrain_until/down_N from
the prior card); adapted with the fast DDIM schedule; ablation "self-training without the prior" (pseudo target = x0).
Every adapted row uses the same fine-tuning recipe (L1 1.0 + LPIPS-or-substitute 0.1 + GAN 0.1, AdamW cosine) and
runs through the engine's stage functions (`restoration.adapt.prepare / generate_targets / finetune`).

    python bench/adaptation.py                    # defaults sized for ~20-25 min on 2 busy CPU cores
    python bench/adaptation.py --zoo-root /tmp/zoo   # models exported from runs/ (train.export) before they ship
    python bench/adaptation.py --n-train 32 --steps 100 --methods base,fast,self

Work files go to --out (default /tmp/faceadapt-bench-adaptation); re-running resumes finished stages.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from restoration import adapt, data, degrade, metrics  # noqa: E402
from restoration.finetune import FinetuneConfig  # noqa: E402
from restoration.pseudo import PseudoTargetParams, restore_batch  # noqa: E402
from restoration.settings import get_settings  # noqa: E402
from restoration.zoo import Zoo  # noqa: E402

METHODS = {
    "base": "base (no adaptation)",
    "prior": "adapted, diffusion pseudo targets (ancestral)",
    "fast": "adapted, diffusion pseudo targets (ddim fast)",
    "self": "adapted, self-training w/o prior (target = x0)",
}


def _seed_of(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little")


def _save(arr: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        Image.fromarray(arr).save(path)


def _load(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def make_data(out: Path, size: int, n_train: int, n_test: int, n_hq: int, seed: int):
    """Degraded train/test faces (PNG) and the names used; deterministic."""
    root = data.default_faces_root()
    train = data.load_split("train")
    test = data.load_split("test")
    rnd = random.Random(seed)
    rnd.shuffle(train)
    adapt_names, hq_names = train[:n_train], train[n_train:n_train + n_hq]
    test_names = sorted(test)[:n_test]
    params = degrade.DOMAIN_SHIFT
    for split, names in (("train", adapt_names), ("test", test_names)):
        for n in names:
            stem = Path(n).name.split(".")[0]
            lq_path = out / "data" / f"{split}_lq" / f"{stem}.png"
            gt_path = out / "data" / f"{split}_gt" / f"{stem}.png"
            if lq_path.is_file() and gt_path.is_file():
                continue
            hq = data.load_face(root / n, size)
            lq = degrade.degrade(hq, params, np.random.default_rng(_seed_of(n, seed)))
            _save(np.clip(np.rint(lq * 255.0), 0, 255).astype(np.uint8), lq_path)
            _save(hq, gt_path)
    hq = [data.load_face(root / n, size) for n in hq_names]
    return hq


@torch.no_grad()
def run_model(model, paths: list[Path], batch: int = 32) -> list[np.ndarray]:
    outs = []
    for i in range(0, len(paths), batch):
        x = torch.from_numpy(np.stack([_load(p) for p in paths[i:i + batch]])).permute(0, 3, 1, 2).float() / 255.0
        y = restore_batch(model.eval(), x)
        outs += list(y.mul(255).round().byte().permute(0, 2, 3, 1).numpy())
    return outs


def score(outs: list[np.ndarray], gts: list[np.ndarray]) -> tuple[float, float]:
    ps = [float(metrics.psnr(o.astype(np.float64) / 255, g.astype(np.float64) / 255)) for o, g in zip(outs, gts)]
    ss = [float(metrics.ssim(o.astype(np.float64) / 255, g.astype(np.float64) / 255)) for o, g in zip(outs, gts)]
    return float(np.mean(ps)), float(np.mean(ss))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s = get_settings()
    ap.add_argument("--base", default=s.default_restorer)
    ap.add_argument("--prior", default=s.default_prior)
    ap.add_argument("--zoo-root", default=None, help="user zoo folder (default: settings); bundled defaults always searched")
    ap.add_argument("--out", default="/tmp/faceadapt-bench-adaptation")
    ap.add_argument("--methods", default="base,prior,fast,self")
    ap.add_argument("--n-train", type=int, default=24)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--n-hq", type=int, default=500)
    ap.add_argument("--steps", type=int, default=100, help="fine-tuning steps")
    ap.add_argument("--d-channels", type=int, default=16, help="discriminator width (64x64 faces: 16 is plenty)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4, help="miniature: fewer steps than the paper, higher lr")
    ap.add_argument("--lr-min", type=float, default=2.5e-5)
    ap.add_argument("--start", type=int, default=None)
    ap.add_argument("--constrain-until", type=int, default=None)
    ap.add_argument("--down-n", type=int, default=None)
    ap.add_argument("--fast-steps", type=int, default=15)
    ap.add_argument("--pt-batch", type=int, default=12, help="pseudo-target batch size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    out = Path(args.out)
    zoo = Zoo(root=args.zoo_root) if args.zoo_root else Zoo()
    base_card = zoo.get(args.base)
    size = int(base_card.input_size)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {sorted(METHODS)}")

    # ---- data ----
    t = time.perf_counter()
    hq = make_data(out, size, args.n_train, args.n_test, args.n_hq, args.seed)
    train_lq = sorted((out / "data" / "train_lq").glob("*.png"))[: args.n_train]
    test_lq = sorted((out / "data" / "test_lq").glob("*.png"))[: args.n_test]
    test_gt = [_load(out / "data" / "test_gt" / p.name) for p in test_lq]
    print(f"data: {len(train_lq)} adaptation faces (train split, DOMAIN_SHIFT), {len(test_lq)} test faces, "
          f"{len(hq)} clean HQ faces for D, {size}x{size}, {time.perf_counter() - t:.0f}s", flush=True)

    # ---- config shared by the adapted rows ----
    base_cfg = adapt.AdaptConfig(
        pseudo=PseudoTargetParams(batch_size=args.pt_batch, seed=args.seed, fast_steps=args.fast_steps),
        finetune=FinetuneConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, lr_min=args.lr_min,
                                ckpt_every=max(1, args.steps // 3), seed=args.seed, ema_decay=0.99,
                                d_channels=args.d_channels),
        eval_fraction=0.0, aligned=True, size=size, device="cpu", seed=args.seed)
    if any(m in methods for m in ("prior", "fast")):
        prior_card = zoo.get(args.prior)
        base_cfg = adapt.apply_prior_defaults(base_cfg, prior_card)
    given = {k: v for k, v in {"start": args.start, "constrain_until": args.constrain_until,
                               "down_N": args.down_n}.items() if v is not None}
    base_cfg = dataclasses.replace(base_cfg, pseudo=dataclasses.replace(base_cfg.pseudo, **given))
    p = base_cfg.pseudo
    print(f"pseudo targets: start {p.start}/{p.respacing}, constrain_until {p.constrain_until}, down_N {p.down_N}; "
          f"fast: ddim {p.fast_steps} steps", flush=True)
    f = base_cfg.finetune
    print(f"fine-tuning: {f.steps} steps x batch {f.batch_size}, AdamW lr {f.lr} -> {f.lr_min} cosine, EMA {f.ema_decay}, "
          f"L1 {f.l1} + perceptual {f.lpips} + GAN {f.gan} (U-Net D, {f.d_channels} channels, lr {f.d_lr})", flush=True)

    rows = []
    base_model = zoo.load(args.base)
    in_psnr, in_ssim = score([_load(p) for p in test_lq], test_gt)
    rows.append({"method": "input (degraded, no restoration)", "psnr": in_psnr, "ssim": in_ssim, "minutes": 0.0})
    if "base" in methods:
        t = time.perf_counter()
        ps, ss = score(run_model(base_model, test_lq), test_gt)
        rows.append({"method": METHODS["base"], "psnr": ps, "ssim": ss, "minutes": (time.perf_counter() - t) / 60})
        print(f"base: PSNR {ps:.2f} SSIM {ss:.4f}", flush=True)

    for m in methods:
        if m == "base":
            continue
        cfg = base_cfg
        if m == "fast":
            cfg = dataclasses.replace(cfg, pseudo=dataclasses.replace(cfg.pseudo, schedule="ddim"))
        if m == "self":
            cfg = dataclasses.replace(cfg, use_prior=False)
        wd = out / f"work-{m}"
        t0 = time.perf_counter()
        adapt.prepare(wd, train_lq, aligned=True, size=size, config=cfg, base=args.base, prior=args.prior,
                      name=f"bench-{m}")
        last = {"t": 0.0}

        def progress(stage, done, total, _m=m):
            now = time.perf_counter()
            if now - last["t"] > 60 or done == total:
                last["t"] = now
                print(f"  [{_m}] {stage} {done}/{total} ({(now - t0) / 60:.1f} min)", flush=True)

        adapt.generate_targets(wd, 0, 1, zoo=zoo, device="cpu", progress=progress)
        t_pt = time.perf_counter() - t0
        # diagnostic only (never used for training): how close are the pseudo targets to the ground truth?
        tg = [_load(wd / "targets" / f"{q.stem}.png") for q in train_lq]
        gt_train = [_load(out / "data" / "train_gt" / q.name) for q in train_lq]
        pt_psnr, _ = score(tg, gt_train)
        t1 = time.perf_counter()
        res = adapt.finetune(wd, zoo=zoo, device="cpu", hq_images=hq, progress=progress)
        t_ft = time.perf_counter() - t1
        model = adapt._load_adapted(wd, adapt.read_job(wd), zoo, torch.device("cpu"))
        ps, ss = score(run_model(model, test_lq), test_gt)
        rows.append({"method": METHODS[m], "psnr": ps, "ssim": ss, "minutes": (time.perf_counter() - t0) / 60,
                     "pt_minutes": t_pt / 60, "ft_minutes": t_ft / 60, "pseudo_psnr": pt_psnr,
                     "losses": res["losses"]})
        print(f"{m}: PSNR {ps:.2f} SSIM {ss:.4f} (pseudo targets {t_pt / 60:.1f} min, PSNR vs GT {pt_psnr:.2f}; "
              f"fine-tune {t_ft / 60:.1f} min)", flush=True)

    losses = next((r["losses"] for r in rows if "losses" in r), None)
    print()
    print(f"Adaptation to DOMAIN_SHIFT, faces-utk200 {size}x{size}: base {args.base}, prior {args.prior}; "
          f"{len(train_lq)} adaptation faces (train split, no GT), {len(test_lq)} test faces (test split, GT)")
    hdr = f"| {'method':50} | {'PSNR':>6} | {'SSIM':>6} | {'pseudo-target PSNR*':>19} | {'minutes (targets + fine-tune)':>30} |"
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for r in rows:
        mins = f"{r['minutes']:.1f}" + (f" ({r['pt_minutes']:.1f} + {r['ft_minutes']:.1f})" if "pt_minutes" in r else "")
        pp = f"{r['pseudo_psnr']:.2f}" if "pseudo_psnr" in r else "-"
        print(f"| {r['method']:50} | {r['psnr']:6.2f} | {r['ssim']:6.4f} | {pp:>19} | {mins:>30} |")
    print("* diagnostic: PSNR of the pseudo targets against the (unused) ground truth of the adaptation faces")
    if losses:
        print(f"losses: {json.dumps(losses)}")
    print(f"total wall time {(time.perf_counter() - t_all) / 60:.1f} min, torch threads {args.threads}")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1, default=str))


if __name__ == "__main__":
    main()
