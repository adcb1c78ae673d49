"""Adaptation benchmark: does adapting the default restorer to an unseen damage type help, at the size users send,
and from how few images?

The paper's synthetic experiment (Kuai et al., WACV 2025, Sec. 5.1) in miniature, on faces-utk200, run exactly as a
user would run `faceadapt adapt --aligned` and then `faceadapt restore --aligned`:

* base restorer: the default model (`settings.default_restorer`), trained on the DEFAULT degradations only;
* target domains (`--domains`, presets of `restoration.degrade.damage.PRESETS` that the base never saw): `camera` (cheap
  camera: 3-4x resolution loss, low-light colour noise, cool cast, JPEG), `scan` (scanned album print: sepia fade,
  soft optics, film grain) and `domain_shift` (strong correlated colour noise, warm cast, heavy JPEG); and this
  bench's own damages (`BENCH_DAMAGES`), unseen by the bundled restorer and by the presets' tuning: `lowlight`
  (a phone at night: blotchy shot noise, a green cast, 2x loss, JPEG 55-70) and `blocky` (a re-encoded video
  still: 2-2.5x loss, very low JPEG quality 12-20, a magenta cast);
* set sizes (`--n-train`, a comma list, e.g. 8,16,32,200): the adaptation faces are the first N of one shuffled
  list, so a smaller set is part of every larger one;
* faces at `--size` pixels (default 128, the size users send; the 64 px default models see them through the same
  resize the product uses);
* adaptation data: N_TRAIN damaged faces of the *train* split, no ground truth (it is read only for the diagnostic
  "pseudo-target PSNR" column); evaluation: N_TEST damaged faces of the *test* split against their ground truth
  (PSNR / SSIM at `--size`, RGB), restored through `restoration.faces.restore.Restorer.restore_crops`, the product path;
  beside them the mean sharpness (Laplacian variance, `restoration.metrics.sharpness`) of the outputs, with the
  ground truth's for reference: a gain in PSNR must not be bought with lost texture;
* the adaptation runs as the default job does: the images' use is decided per image from their detection
  (`aligned` unset: the crops are recognised as aligned crops), the fine-tune fitted to the number of faces.

Rows per domain: the damaged input; the base model; adapted with diffusion pseudo targets (the engine's defaults:
the prior card's pseudo-target settings, the base card's fine-tuning settings); the ablation "self-training without
the prior" (pseudo target = the base model's own output x0, same fine-tuning). Every adapted row runs through the
engine's stage functions (`restoration.adaptation`: `prepare.prepare`, `targets.generate_targets`, `tune.finetune`,
`evaluate.evaluate`) with the same configuration the CLI builds (`restoration.adaptation.config.default_config`), so the
figures are the defaults' figures; the
quality gate's verdict (`evaluate`, no ground truth used) is printed too. Options override single settings for
tuning.

    python bench/adaptation.py                                   # camera + scan, 128 px, engine defaults
    python bench/adaptation.py --domains lowlight,blocky --n-train 8,16,32,200 --methods base,prior  # small sets
    python bench/adaptation.py --domains domain_shift --size 64  # the earlier miniature setting
    python bench/adaptation.py --steps 300 --lr 1e-4 --methods base,prior

Work files go to --out (default /tmp/faceadapt-bench-adaptation); re-running resumes finished stages (a changed
setting starts that stage afresh).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from restoration.adaptation import (MANIFEST, adapted_serve_size, crop_size, default_config, evaluate,  # noqa: E402
                                    finetune, generate_targets, load_adapted, prepare, read_job)

from restoration import data

from restoration import degrade

from restoration import metrics
from restoration.faces import Restorer  # noqa: E402
from restoration.settings import get_settings  # noqa: E402
from restoration.models import Zoo  # noqa: E402

#: this bench's own damages (see the module doc), for faces of 128 px (scaled like the presets for other sizes)
BENCH_DAMAGES = {
    "lowlight": degrade.DegradationParams(
        color_cast_prob=1.0, color_cast_gains=(0.94, 1.06, 0.92), color_cast_jitter=0.02,
        blur_prob=1.0, kernel_types=("iso",), kernel_probs=(1.0,), blur_sigma=(0.5, 1.0), kernel_size=7,
        downsample_prob=1.0, downsample=(2.0, 2.0), down_interpolations=("bilinear",),
        noise_prob=1.0, noise_sigma=(2.0 / 255.0, 4.0 / 255.0), poisson_prob=1.0, poisson_peak=(200.0, 400.0),
        gray_noise_prob=0.0, noise_correlation=(0.6, 0.9), jpeg_prob=1.0, jpeg_quality=(55.0, 70.0),
        reference_size=128),
    "blocky": degrade.DegradationParams(
        color_cast_prob=1.0, color_cast_gains=(1.05, 0.93, 1.05), color_cast_jitter=0.02,
        blur_prob=1.0, kernel_types=("iso",), kernel_probs=(1.0,), blur_sigma=(0.4, 0.8), kernel_size=7,
        downsample_prob=1.0, downsample=(2.0, 2.5), down_interpolations=("bicubic",),
        noise_prob=1.0, noise_sigma=(1.0 / 255.0, 3.0 / 255.0), poisson_prob=0.0, gray_noise_prob=0.0,
        jpeg_prob=1.0, jpeg_quality=(12.0, 20.0), reference_size=128),
}
DAMAGES = {**{k: v for k, v in degrade.PRESETS.items() if k != "default"}, **BENCH_DAMAGES}

METHODS = {
    "base": "base (no adaptation)",
    "prior": "adapted, diffusion pseudo targets",
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


def _train_names(seed: int) -> list[str]:
    """The training split, shuffled with `seed`: the adaptation faces are its first N, the discriminator's after them."""
    names = data.load_split("train")
    random.Random(seed).shuffle(names)
    return names


def make_data(out: Path, domain: str, size: int, n_train: int, n_test: int, seed: int) -> None:
    """Damaged train/test faces (PNG) of one domain, with their ground truth; deterministic."""
    root = data.default_faces_root()
    train = _train_names(seed)
    test = data.load_split("test")
    params = DAMAGES[domain]
    for split, names in (("train", train[:n_train]), ("test", sorted(test)[:n_test])):
        for n in names:
            stem = Path(n).name.split(".")[0]
            lq_path = out / "data" / f"{split}_lq" / f"{stem}.png"
            gt_path = out / "data" / f"{split}_gt" / f"{stem}.png"
            if lq_path.is_file() and gt_path.is_file():
                continue
            hq = data.load_face(root / n, size)
            lq = degrade.degrade(hq, params, np.random.default_rng(_seed_of(f"{domain}/{n}", seed)))
            _save(np.clip(np.rint(lq * 255.0), 0, 255).astype(np.uint8), lq_path)
            _save(hq, gt_path)


def score(outs: list[np.ndarray], gts: list[np.ndarray]) -> tuple[float, float]:
    ps = [float(metrics.psnr(o.astype(np.float64) / 255, g.astype(np.float64) / 255)) for o, g in zip(outs, gts)]
    ss = [float(metrics.ssim(o.astype(np.float64) / 255, g.astype(np.float64) / 255)) for o, g in zip(outs, gts)]
    return float(np.mean(ps)), float(np.mean(ss))


def sharp(outs: list[np.ndarray]) -> float:
    """Mean sharpness (Laplacian variance of the luma, x1000) of images of one size."""
    return 1000.0 * float(np.mean([metrics.sharpness(o) for o in outs]))


def restore_all(restorer: Restorer, paths: list[Path]) -> list[np.ndarray]:
    return restorer.restore_crops([_load(p) for p in paths])


def run_domain(domain: str, args, zoo: Zoo, hq_paths: list[Path]) -> list[dict]:
    out = Path(args.out) / f"{domain}-{args.size}"
    t = time.perf_counter()
    n_max = max(args.n_train)
    make_data(out, domain, args.size, n_max, args.n_test, args.seed)
    # the first N of the shuffled adaptation list (make_data's order): a smaller set is part of every larger one
    order = [Path(n).name.split(".")[0] for n in _train_names(args.seed)[:n_max]]
    all_train = [out / "data" / "train_lq" / f"{stem}.png" for stem in order]
    test_lq = sorted((out / "data" / "test_lq").glob("*.png"))[: args.n_test]
    test_gt = [_load(out / "data" / "test_gt" / p.name) for p in test_lq]
    print(f"\n=== domain {domain}: up to {n_max} adaptation faces (train split, no GT), {len(test_lq)} test faces, "
          f"{args.size}x{args.size} ({time.perf_counter() - t:.0f}s to make)", flush=True)

    base_card = zoo.get(args.base)
    base = Restorer(zoo.load(args.base), base_card, device="cpu", batch_size=32)
    rows = []
    ps, ss = score([_load(p) for p in test_lq], test_gt)
    rows.append({"method": "ground truth", "n": "-", "psnr": float("inf"), "ssim": 1.0, "sharpness": sharp(test_gt),
                 "minutes": 0.0})
    rows.append({"method": "input (damaged, no restoration)", "n": "-", "psnr": ps, "ssim": ss,
                 "sharpness": sharp([_load(p) for p in test_lq]), "minutes": 0.0})
    if "base" in args.methods:
        t = time.perf_counter()
        outs = restore_all(base, test_lq)
        ps, ss = score(outs, test_gt)
        rows.append({"method": METHODS["base"], "n": "-", "psnr": ps, "ssim": ss, "sharpness": sharp(outs),
                     "minutes": (time.perf_counter() - t) / 60})
        print(f"  base: PSNR {ps:.2f} SSIM {ss:.4f}", flush=True)

    for m, n_train in [(m, n) for m in args.methods if m != "base" for n in args.n_train]:
        train_lq = all_train[:n_train]
        cfg = default_config(zoo, args.base, args.prior, args.overrides, use_prior=(m == "prior"),
                             device="cpu", seed=args.seed)
        if m == "prior":
            p = cfg.pseudo
            print(f"  pseudo targets: start {p.start}/{p.respacing}, constrain_until {p.constrain_until}, "
                  f"down_N {p.down_N}, schedule {p.schedule}" + (f" ({p.fast_steps} steps)" if p.schedule == "ddim" else ""),
                  flush=True)
        f = cfg.finetune
        if base_card.arch == "codeformer":  # only the schedule fields apply; the rest is CodeFormer's own stage II
            from restoration.training import CodeFormerFinetuneConfig

            c = CodeFormerFinetuneConfig()
            print(f"  [{m}] fine-tuning (CodeFormer code prediction): {f.steps} steps x batch {f.batch_size}, Adam lr "
                  f"{c.lr}, EMA {c.ema_decay}, code CE {c.entropy} + feature L2 {c.feat}", flush=True)
        else:
            print(f"  [{m}] fine-tuning: {f.steps} steps x batch {f.batch_size}, AdamW lr {f.lr} -> {f.lr_min} cosine, "
                  f"EMA {f.ema_decay}, L1 {f.l1} + perceptual {f.lpips} + GAN {f.gan} (D {f.d_channels} ch)", flush=True)
        wd = out / f"work-{m}-{n_train}-{hashlib.sha256(cfg.to_json().encode()).hexdigest()[:10]}"
        t0 = time.perf_counter()
        last = {"t": 0.0}

        def progress(stage, done, total, _m=m):
            now = time.perf_counter()
            if now - last["t"] > 60 or done == total:
                last["t"] = now
                print(f"    [{_m}] {stage} {done}/{total} ({(now - t0) / 60:.1f} min)", flush=True)

        # the held-out split of the engine is taken from the adaptation faces (no GT), as for a user
        man = prepare(wd, train_lq, aligned=cfg.aligned, size=crop_size(cfg, base_card), config=cfg,
                      base=args.base, prior=args.prior, name=f"bench-{domain}-{m}", progress=progress, zoo=zoo)
        ff = read_job(wd)["config"].finetune
        print(f"    [{m}] {n_train} images used as {man['usage']}; faces {man['counts']}; fitted fine-tune: "
              f"{ff.steps} steps, lr {ff.lr:.3g} -> {ff.lr_min:.3g}, shift {ff.shift} px, held-out score every "
              f"{ff.val_every} steps (patience {ff.patience})", flush=True)
        gen = generate_targets(wd, 0, 1, zoo=zoo, device="cpu", progress=progress, hq_images=hq_paths)
        print(f"    [{m}] domain colour gains (R, G, B) of the targets: {gen['color_gains'] or 'none'}", flush=True)
        t_pt = time.perf_counter() - t0
        items = [it for it in json.loads((wd / MANIFEST).read_text())["items"] if it["split"] == "train"]
        tg = [_load(wd / "targets" / f"{it['id']}.png") for it in items]
        gt_train = [data.load_face(out / "data" / "train_gt" / f"{Path(it['source']).stem}.png", tg[0].shape[0])
                    for it in items]
        pt_psnr, _ = score(tg, gt_train)
        x0_psnr, _ = score([_load(wd / "targets" / f"{it['id']}.x0.png") for it in items], gt_train)
        t1 = time.perf_counter()
        res = finetune(wd, zoo=zoo, device="cpu", hq_images=hq_paths, progress=progress)
        t_ft = time.perf_counter() - t1
        ev = evaluate(wd, zoo=zoo, device="cpu")
        minutes = (time.perf_counter() - t0) / 60
        model = load_adapted(wd, read_job(wd), zoo, torch.device("cpu"))
        # restored as the registered model is: its card's sizes (`adapted_serve_size`)
        card = replace(base_card, input_size=man["size"], serve_size=adapted_serve_size(base_card, man["size"]))
        adapted = Restorer(model, card, device="cpu", batch_size=32)
        outs = restore_all(adapted, test_lq)
        ps, ss = score(outs, test_gt)
        gate = ev.get("gate", {})
        es = res.get("early_stopping")
        if card.restore_size != man["size"]:  # for comparison: restored at the size it was fine-tuned at
            o2 = restore_all(Restorer(model, replace(card, serve_size=None), device="cpu", batch_size=32), test_lq)
            p2, s2 = score(o2, test_gt)
            rows.append({"method": f"{METHODS[m]}, restored at {man['size']} px", "n": n_train,
                         "psnr": p2, "ssim": s2, "sharpness": sharp(o2), "minutes": 0.0})
            print(f"  {m} x{n_train} restored at {man['size']} px: PSNR {p2:.2f} SSIM {s2:.4f} sharpness "
                  f"{rows[-1]['sharpness']:.2f}", flush=True)
        rows.append({"method": METHODS[m], "n": n_train, "psnr": ps, "ssim": ss, "sharpness": sharp(outs),
                     "steps": res["steps"], "best_step": es.get("step") if isinstance(es, dict) else None,
                     "minutes": minutes, "pt_minutes": t_pt / 60,
                     "ft_minutes": t_ft / 60, "pseudo_psnr": pt_psnr, "x0_psnr": x0_psnr, "losses": res["losses"],
                     "gate": gate.get("verdict", "-"), "gate_reasons": gate.get("reasons"),
                     "eval": ev.get("metrics")})
        print(f"  {m} x{n_train}: PSNR {ps:.2f} SSIM {ss:.4f} sharpness {rows[-1]['sharpness']:.2f} (best step "
              f"{rows[-1]['best_step']} of {res['steps']}; targets {t_pt / 60:.1f} min, pseudo-target PSNR {pt_psnr:.2f} (x0 {x0_psnr:.2f}) at "
              f"{tg[0].shape[0]} px; fine-tune {t_ft / 60:.1f} min; gate {gate.get('verdict', '-')})", flush=True)
    return rows


def print_table(domain: str, size: int, rows: list[dict]) -> None:
    print(f"\nAdaptation to `{domain}`, faces-utk200 at {size}x{size}")
    hdr = (f"| {'method':48} | {'images':>6} | {'PSNR':>6} | {'SSIM':>6} | {'vs base':>7} | {'sharpness':>9} | "
           f"{'pseudo-target PSNR*':>19} | {'best step / steps':>17} | {'gate':>8} | "
           f"{'minutes (targets + fine-tune)':>30} |")
    print(hdr)
    print("|" + "|".join("-" * len(c) for c in hdr.split("|")[1:-1]) + "|")
    base = next((r["psnr"] for r in rows if r["method"] == METHODS["base"]), None)
    for r in rows:
        mins = f"{r['minutes']:.1f}" + (f" ({r['pt_minutes']:.1f} + {r['ft_minutes']:.1f})" if "pt_minutes" in r else "")
        pp = f"{r['pseudo_psnr']:.2f}" if "pseudo_psnr" in r else "-"
        d = f"{r['psnr'] - base:+.2f}" if base is not None and np.isfinite(r["psnr"]) else "-"
        st = f"{r['best_step']} / {r['steps']}" if "steps" in r else "-"
        print(f"| {r['method']:48} | {str(r.get('n', '-')):>6} | {r['psnr']:6.2f} | {r['ssim']:6.4f} | {d:>7} | "
              f"{r['sharpness']:9.2f} | {pp:>19} | {st:>17} | {r.get('gate', '-'):>8} | {mins:>30} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s = get_settings()
    ap.add_argument("--base", default=s.default_restorer)
    ap.add_argument("--prior", default=s.default_prior)
    ap.add_argument("--zoo-root", default=None, help="user zoo folder (default: settings); bundled defaults always searched")
    ap.add_argument("--out", default="/tmp/faceadapt-bench-adaptation")
    ap.add_argument("--domains", default="camera,scan", help=f"comma list of {sorted(DAMAGES)}")
    ap.add_argument("--methods", default="base,prior,self")
    ap.add_argument("--size", type=int, default=128, help="face size of the data (what users send)")
    ap.add_argument("--n-train", default="64", help="adaptation set sizes, a comma list (e.g. 8,16,32,200)")
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--n-hq", type=int, default=500, help="clean faces (train split, disjoint) for the discriminator")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override one engine setting, e.g. finetune.steps=300, pseudo.start=60, pseudo.schedule=ddim")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {sorted(METHODS)}")
    args.n_train = [int(n) for n in str(args.n_train).split(",") if n]
    domains = [d for d in args.domains.split(",") if d]
    bad = [d for d in domains if d not in DAMAGES]
    if bad:
        raise SystemExit(f"unknown domains {bad}; choose from {sorted(DAMAGES)}")
    args.overrides = {}
    for kv in args.sets:
        k, _, v = kv.partition("=")
        args.overrides[k.strip()] = json.loads(v) if v.strip()[:1] in "0123456789-[{tfn\"" else v.strip()
    t_all = time.perf_counter()
    zoo = Zoo(root=args.zoo_root) if args.zoo_root else Zoo()
    names = _train_names(args.seed)
    root = data.default_faces_root()
    n_max = max(args.n_train)
    hq_paths = [root / n for n in names[n_max:n_max + args.n_hq]]  # disjoint from the adaptation faces
    results = {}
    for d in domains:
        results[d] = run_domain(d, args, zoo, hq_paths)
    print()
    print(f"base {args.base}, prior {args.prior}; engine settings overridden: {args.overrides or 'none'}")
    for d in domains:
        print_table(d, args.size, results[d])
    print("* diagnostic: PSNR of the pseudo targets against the (unused) ground truth of the adaptation faces, at the "
          "model's size; sharpness: mean Laplacian variance x1000 of the outputs at the test size (ground truth's in its "
          "row)")
    print(f"total wall time {(time.perf_counter() - t_all) / 60:.1f} min, torch threads {args.threads}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items()},
                                                             "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
