"""Export the two default models from their training runs into `restoration/zoo_defaults/`, with val metrics.

    python bench/export_defaults.py --restorer-run runs/restorer2 --prior-run runs/prior2 --ptd 60,20,2 --tune runs/tune_all.json
    python bench/export_defaults.py --only restorer --restorer-run runs/restorer3

* restorer (`--restorer-run`, default `runs/restorer` -> `faceadapt-swinir-small`): PSNR / SSIM on the 500 val faces damaged with the standard
  pipeline (seeds 3000000 + i) at 64 px, of the restorer, of its input and of the bicubic-upsampled low-resolution
  image, and on 200 test faces at 128 px through the product path at the size it restores at (as
  bench/restorer_native.py); the card's adaptation defaults (`finetune_defaults`, ...) are kept; `--input-size` and
  `--serve-size` for a run trained at two sizes (`--mix-size`): the bundled restorer is adapted at 64 px and restores
  at 128 (`--input-size 64 --serve-size 128`);
* prior (`--prior-run`, default `runs/prior` -> `faceadapt-iddpm-small`): `pseudo_target_defaults` from `--ptd start,constrain_until,down_N`,
  the tuning table from `--tune` (the JSON written by bench/tune_pseudo_targets.py) and the denoising PSNR of the
  x0-prediction at the start step on 100 clean val faces.

Both go through `restoration.training.export.export` (EMA weights of the last checkpoint; `--restorer-checkpoint`
another one). `--average-with NAME` exports the mean of the restorer run's EMA weights and the zoo model NAME's (the
shipped restorer is the mean of run 9 at step 550 and its warm start, run 8b: docs/MODELS.md):

    python bench/export_defaults.py --only restorer --restorer-run runs/restorer9 \
        --restorer-checkpoint runs/restorer9/ckpt_00000550.pt --average-with faceadapt-swinir-small \
        --input-size 64 --serve-size 128 --threads 2
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from bench.restorer_native import TEST_SEED, measure, test_damage  # noqa: E402
from restoration.adaptation import color_stats  # noqa: E402
from restoration import data
from restoration.data import FacesDataset  # noqa: E402
from restoration.degrade import HELD_OUT  # noqa: E402
from restoration.faces import Restorer, load_image  # noqa: E402
from restoration.models import Zoo  # noqa: E402
from restoration.training import (average_state_dicts, denoise_psnr, evaluate_restorer, export,  # noqa: E402
                                  load_run_model)

VAL_SEED = 3_000_000
# the commands of the last training run behind the shipped weights (docs/MODELS.md); run from the repo root. Each
# continues the previous shipped model (--init-from); the cards carry the earlier runs' commands under
# extra.training.init_from.
PRIOR_TRAIN_COMMAND = ("OMP_NUM_THREADS=1 faceadapt train prior --out runs/prior2 --init-from faceadapt-iddpm-small "
                       "--steps 4500 --seed 1 --threads 1 --lr-schedule cosine --until 13:25 --ckpt-every 500 "
                       "--sample-every 1000")
RESTORER_TRAIN_COMMAND = ("OMP_NUM_THREADS=1 faceadapt train restorer --out runs/restorer9 --init-from "
                          "faceadapt-swinir-small --steps 1000 --seed 91 --threads 1 --batch-size 16 --lr 5e-5 "
                          "--lr-schedule cosine --gan-weight 0.05 --gan-start 0 --size 128 --mix-size 64 "
                          "--native-sizes 64,96,128,160,192 --damage broad --hold-out motion_blur,shot_noise "
                          "--ckpt-every 50 --sample-every 500  # stopped after step 600; exported: step 550, "
                          "averaged with its warm start (run 8b)")
# card.extra entries that are not about the training run (chosen with the adaptation bench): an export keeps them
KEEP_EXTRA = ("finetune_defaults", "finetune_defaults_note", "pseudo_target_defaults", "pseudo_target_tuning")


def face_color_stats() -> dict:
    """The prior card's clean-face colour reference (`restoration.adaptation.color.color_correction` without HQ faces)."""
    names = data.load_split("train")[::4]
    root = data.default_faces_root()
    return {**color_stats(load_image(root / n) for n in names),
            "how": f"restoration.adaptation.color.color_stats of {len(names):,} of its training faces (every 4th of the "
                   "faces-utk200 train split): the clean-face colour reference of pseudo.color_correction when no "
                   "HQ faces are configured"}


def native_metrics(model, card, size: int, n: int = 200, damage: str = "standard") -> dict:
    """What bench/restorer_native.py prints, for the card: PSNR / SSIM / sharpness / detail on `n` test faces at
    native size `size` with the test damage `damage` (`restorer_native.test_damage`: standard, broad or a held-out
    type) through the product path (`Restorer.restore_crops`), next to the bicubic baseline."""
    rows, count = measure([Restorer(model, card, device="cpu", batch_size=32)], size, n, test_damage(damage))
    by = {r["label"]: r for r in rows}
    res = {"split": "test", "native_size": size, "n": count, "seed": TEST_SEED, "damage": damage,
           "path": f"Restorer.restore_crops (resize to {card.restore_size}, restore, paste back by the native-size rule)"}
    for key, label in (("restorer", "restorer 0"), ("bicubic", "bicubic")):
        for m in ("psnr", "ssim", "sharpness", "detail"):
            res[f"{m}_{key}"] = round(by[label][m], 4 if m != "sharpness" else 7)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--restorer-run", default=str(REPO / "runs" / "restorer"))
    ap.add_argument("--prior-run", default=str(REPO / "runs" / "prior"))
    ap.add_argument("--dest", default=str(REPO / "restoration" / "zoo_defaults"))
    ap.add_argument("--ptd", help="pseudo-target defaults start,constrain_until,down_N (needed for the prior)")
    ap.add_argument("--tune", help="tuning JSON of bench/tune_pseudo_targets.py (recorded in the prior card)")
    ap.add_argument("--note", default="", help="free text recorded as card.extra.note (e.g. 'preliminary export')")
    ap.add_argument("--only", choices=["restorer", "prior"])
    ap.add_argument("--input-size", type=int, help="restorer: the card's input size, the size it is adapted at "
                                                   "(default: the run's --size)")
    ap.add_argument("--serve-size", type=int, help="restorer: the size it restores faces at, when not --input-size "
                                                   "(a run trained with --mix-size)")
    ap.add_argument("--restorer-checkpoint", help="restorer: this checkpoint of the run instead of its last one")
    ap.add_argument("--average-with", help="restorer: export the mean of the run's EMA weights and this zoo model's "
                                           "(a name in --dest, e.g. faceadapt-swinir-small: the run's warm start)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    dest = Path(args.dest)
    cmd = "python bench/export_defaults.py " + shlex.join(sys.argv[1:])
    val = FacesDataset("val", 64)
    gt = torch.stack([val[i] for i in range(len(val))])
    note = {"note": args.note} if args.note else {}
    if args.only in (None, "prior") and not args.ptd:
        ap.error("--ptd start,constrain_until,down_N is needed to export the prior")
    if args.only in (None, "restorer"):
        m = load_run_model(args.restorer_run, "ema", args.restorer_checkpoint)
        zoo = Zoo(root=dest, builtin_dir=None)
        average = None
        if args.average_with:  # loaded before the export overwrites it; measured as exported
            other = zoo.get(args.average_with)
            average = (f"{other.name} (sha256 {other.sha256[:12]})", zoo.load(args.average_with).state_dict())
            m.load_state_dict(average_state_dicts(m.state_dict(), average[1]))
        r = evaluate_restorer(m, gt, seed=VAL_SEED)
        metrics = {"val": {"split": "val", "degradation": "DegradationParams() standard, seeds 3000000+i",
                           **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()},
                           "input_is": "degrade() output: LQ upsampled bilinearly",
                           "bicubic_is": "the same LQ upsampled bicubically"}}
        old = zoo.get("faceadapt-swinir-small")
        new = replace(old, input_size=args.input_size or old.input_size, serve_size=args.serve_size)
        metrics["test_native_128"] = native_metrics(m, new, 128)
        for damage in ("broad", *HELD_OUT):  # the broad damage it trained on, and each type it never saw
            metrics[f"test_native_128_{damage}"] = native_metrics(m, new, 128, damage=damage)
        kept = {k: old.extra[k] for k in KEEP_EXTRA if k in old.extra}
        p = export(args.restorer_run, dest / "faceadapt-swinir-small", checkpoint=args.restorer_checkpoint,
                   metrics=metrics, extra={**kept, **note}, command=cmd, train_command=RESTORER_TRAIN_COMMAND,
                   input_size=args.input_size, serve_size=args.serve_size, average_with=average)
        print("restorer", m.step, "steps", json.dumps(metrics), "->", p)
    if args.only in (None, "prior"):
        start, until, n = (int(v) for v in args.ptd.split(","))
        m = load_run_model(args.prior_run)
        den = denoise_psnr(m, gt[:100], start, seed=0)
        metrics = {"val_denoise_psnr_at_start": {"t_respaced": start, "n": 100, "psnr": round(den, 3)}}
        extra = {"pseudo_target_defaults": {"start": start, "constrain_until": until, "down_N": n},
                 "face_color_stats": face_color_stats(), **note}
        if args.tune:
            extra["pseudo_target_tuning"] = json.loads(Path(args.tune).read_text())
        p = export(args.prior_run, dest / "faceadapt-iddpm-small", metrics=metrics, extra=extra,
                     command=cmd,
                     train_command=PRIOR_TRAIN_COMMAND)
        print("prior", m.step, "steps", json.dumps(metrics), "->", p)
    for d in sorted(dest.glob("*/model.safetensors")):
        print(f"{d.parent.name}: {d.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
