"""The restorer on faces at the sizes users send: UTK200 test faces resized to a native size (128 px by default),
damaged there with the standard pipeline scaled for that size (`restoration.degrade.damage.DEFAULT`, seed
2000000 + i), saved as uint8 like an uploaded crop, and restored through `restoration.faces.restore.Restorer.restore_crops` (the product path:
resize to the model size, restore, paste back by the native-size rule). PSNR / SSIM (RGB, at the native size)
against the clean face at that size, next to the damaged input and the bicubic baseline (the same low-resolution
image upsampled bicubically instead of bilinearly), with two texture figures: sharpness (no reference; noise raises
it) and detail (the share of the clean face's fine detail the image has in place, `metrics.detail_recovered`).

    python bench/restorer_native.py                                   # the bundled restorer, 200 faces, 128 px
    python bench/restorer_native.py --sizes 128,192 --n 100 --model runs/restorer3   # a training run's last EMA
    python bench/restorer_native.py --model restoration/zoo_defaults/faceadapt-swinir-small --model runs/restorer3

`--damages` picks the test damage (comma-separated, one table each): `standard` (above), `broad` (the broad damage
model with the bundled restorer's held-out types left out: what it trained on), and one held-out type by name
(`motion_blur`, `shot_noise`: the broad model with that type forced into its first round; damage the restorer never
saw in training), or an unseen domain of the adaptation bench (`camera`, `scan`: `restoration.degrade.PRESETS`):

    python bench/restorer_native.py --damages standard,broad,motion_blur,shot_noise --n 200

`--guarded` scores what a user gets from `faceadapt restore --aligned` instead: `Restorer.restore_aligned` with the
never-worse check and its face prior (FACEADAPT_GUARD_PRIOR), which sends a result that would lose the input's fine
detail to the detail-preserving paste; each row then says how many faces fell back.

`--model` takes a zoo name, a zoo folder or a training run folder (its last checkpoint's EMA weights); repeat it to
compare models on the same faces. `MODEL@SIZE` restores at that model input size instead of the card's (a run
trained with `--size 128`: `--model runs/restorer8a@128`; a run folder otherwise gets the bundled card's size). `--flip-ensemble` adds, per model, a row for the average of its outputs on the face
and on its mirror image (a test-time ensemble the product does not use: two network passes per face).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from restoration.data import FacesDataset
from restoration.degrade import DAMAGE_TYPES, HELD_OUT, PRESETS, BroadDamage
from restoration.diffusion import load_guard_prior
from restoration.faces import Restorer
from restoration.metrics import detail_recovered, sharpness as one_sharpness
from restoration.models import CARD, Zoo
from restoration.training import degradation_params, degrade_pair, last_checkpoint, load_run_model, psnr_ssim

REPO = Path(__file__).resolve().parents[1]
TEST_SEED = 2_000_000


class _FlipEnsemble(torch.nn.Module):
    """The mean of a restorer's outputs on the face and on its mirror image (mirrored back)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return 0.5 * (self.model(x) + self.model(x.flip(-1)).flip(-1))


def _spec_size(spec: str) -> tuple[str, int | None]:
    """'MODEL@SIZE' -> (MODEL, SIZE); 'MODEL' -> (MODEL, None)."""
    name, _, size = spec.rpartition("@")
    if not name:
        return spec, None
    if not size.isdigit() or int(size) % 32:
        raise SystemExit(f"--model {spec}: the size after @ is a multiple of 32")
    return name, int(size)


def _load_restorer(spec: str, serve_size: int | None, zoo_dir: str):
    """A Restorer and its label; `serve_size` overrides the card's (the size the model restores at)."""
    zoo = Zoo(root=zoo_dir, builtin_dir=None)
    p = Path(spec)
    if p.is_dir() and (p / CARD).is_file():
        zoo, spec_name = Zoo(root=p.parent, builtin_dir=None), p.name
    elif p.is_dir() and (ck := last_checkpoint(p)) is not None:  # a run: its EMA weights, the bundled card
        model = load_run_model(p, "ema", ck)
        card = replace(zoo.get("faceadapt-swinir-small"), serve_size=serve_size)
        return (Restorer(model, card, device="cpu", batch_size=32),
                f"{spec} ({ck.name}{f', at {serve_size} px' if serve_size else ''})")
    else:
        spec_name = spec
    card = zoo.get(spec_name)
    if serve_size:
        card = replace(card, serve_size=serve_size)
    label = f"{spec} (at {card.restore_size} px)" if card.restore_size != card.input_size else spec
    return Restorer(zoo.load(spec_name), card, device="cpu", batch_size=32), label


@torch.no_grad()
def test_damage(name: str):
    """The test damage called `name` (module doc)."""
    if name == "standard":
        return degradation_params()
    if name == "broad":
        return BroadDamage(holdout=HELD_OUT)
    if name in DAMAGE_TYPES:
        return BroadDamage(force=(name,))
    if name in ("camera", "scan"):  # the adaptation bench's unseen domains
        return PRESETS[name]
    raise SystemExit(f"--damages: unknown damage {name!r}; use standard, broad, camera, scan or one of "
                     f"{', '.join(DAMAGE_TYPES)}")


def measure(restorers: list, size: int, n: int, damage=None, guarded: bool = False) -> tuple[list[dict], int]:
    """Score each `Restorer` on `n` test faces at native `size` (standard damage scaled for that size, seeds
    TEST_SEED + i, saved as uint8 crops, restored by `restore_crops`, or with `guarded` by `restore_aligned`: the
    never-worse check on, with the restorer's guard prior). Returns rows {label, psnr, ssim, sharpness, detail} (the
    damaged input, the bicubic baseline, then one per restorer, labelled "restorer <i>", with `fell_back` when
    guarded) and the number of faces."""
    ds = FacesDataset("test", size, limit=n)
    gt = torch.stack([ds[i] for i in range(len(ds))])
    lq, lqb = degrade_pair(gt, damage if damage is not None else degradation_params(), TEST_SEED)
    crops = [(lq[i].permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8) for i in range(len(lq))]
    images = [("input", lq), ("bicubic", lqb)]
    fell_back = {}
    for i, restorer in enumerate(restorers):
        if guarded:
            results = restorer.restore_aligned(crops)
            out = [r.image for r in results]
            fell_back[f"restorer {i}"] = sum(bool(r.faces[0].extra.get("reason")) for r in results)
        else:
            out = restorer.restore_crops(crops)
        images.append((f"restorer {i}", torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255.0))
    rows = []
    for label, img in images:
        p, s = psnr_ssim(img.clamp(0, 1), gt)
        rows.append({"label": label, "psnr": float(np.mean(p)), "ssim": float(np.mean(s)), "sharpness": sharpness(img),
                     "detail": detail(img, gt)})
        if label in fell_back:
            rows[-1]["fell_back"] = fell_back[label]
    rows.append({"label": "clean", "sharpness": sharpness(gt)})
    return rows, len(gt)


def sharpness(img: torch.Tensor) -> float:
    """Mean over the faces of `metrics.sharpness` (variance of the luma's Laplacian, the adaptation gate's
    no-reference measure): texture / blur, not quality."""
    return float(np.mean([one_sharpness(im.clamp(0, 1)) for im in img]))


def detail(img: torch.Tensor, gt: torch.Tensor) -> float:
    """Mean over the faces of `metrics.detail_recovered` (the share of the clean face's fine detail found in place)."""
    return float(np.mean([detail_recovered(im.clamp(0, 1), g) for im, g in zip(img, gt)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="zoo name/folder or training run folder (repeatable), with "
                                                      "@SIZE: restored at that model input size; default: the "
                                                      "bundled faceadapt-swinir-small")
    ap.add_argument("--zoo-dir", default=str(REPO / "restoration" / "zoo_defaults"))
    ap.add_argument("--sizes", default="128", help="comma-separated native sizes (px)")
    ap.add_argument("--n", type=int, default=200, help="test faces")
    ap.add_argument("--damages", default="standard", help="comma-separated test damages: standard, broad, or a "
                                                           "damage type (held out: " + ", ".join(HELD_OUT) + ")")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--flip-ensemble", action="store_true", help="also score each model averaged with its mirror pass")
    ap.add_argument("--guarded", action="store_true",
                    help="score restore_aligned with the never-worse check (what `faceadapt restore --aligned` gives) "
                         "instead of restore_crops")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    models = [_load_restorer(*_spec_size(m), args.zoo_dir) for m in (args.model or ["faceadapt-swinir-small"])]
    if args.flip_ensemble:
        models += [(Restorer(_FlipEnsemble(r.model), r.card, device="cpu", batch_size=32), f"{label} + flip ensemble")
                   for r, label in list(models)]
    if args.guarded:
        prior = load_guard_prior()
        for r, _ in models:
            r.guard_prior = prior
    names = {"input": "damaged input (bilinear up)", "bicubic": "bicubic baseline",
             **{f"restorer {i}": f"restorer {label}" for i, (_, label) in enumerate(models)}}
    damages = [d.strip() for d in args.damages.split(",") if d.strip()]
    specs = {d: test_damage(d) for d in damages}
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU; {args.n} UTK200 test faces, damage scaled for "
          f"each size, seeds {TEST_SEED}+i")
    for damage, size in [(d, int(s)) for d in damages for s in args.sizes.split(",")]:
        t0 = time.time()
        rows, n = measure([r for r, _ in models], size, args.n, specs[damage], guarded=args.guarded)
        how = "restore_aligned, never-worse check on" if args.guarded else "restore_crops"
        print(f"\n{damage} damage, native {size} px ({n} faces, {how})")
        bic = next(r["psnr"] for r in rows if r["label"] == "bicubic")
        for r in rows:
            if "psnr" not in r:
                print(f"  {names.get(r['label'], r['label']):44} {'':29}  sharpness {r['sharpness']:.3e}")
                continue
            gain = f"  {r['psnr'] - bic:+.2f} dB vs bicubic" if r["label"].startswith("restorer") else ""
            back = f"  fell back {r['fell_back']}" if "fell_back" in r else ""
            print(f"  {names[r['label']]:44} {r['psnr']:6.2f} dB  SSIM {r['ssim']:.4f}  sharpness {r['sharpness']:.3e}"
                  f"  detail {r['detail']:.3f}{gain}{back}")
        print(f"  ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
