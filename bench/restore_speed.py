"""Per-face restore time of one restorer, at several batch sizes, on this machine (a front end of bench/speed.py's
arch section: the same timing code, one model).

    python bench/restore_speed.py                        # swinir_face full config (random weights), 512x512
    python bench/restore_speed.py --model faceadapt-swinir-small --batch-sizes 1 8 32
    python bench/restore_speed.py --variants fp32 bf16 cl compile
    python bench/restore_speed.py --model faceadapt-swinir-small --end-to-end --threads 1 --repeats 10

Prints a markdown table: seconds per face (median of --repeats timed passes after one warm-up pass) and peak memory.
The model is timed at the size it restores at (its card's `serve_size`, else `input_size`). `--end-to-end` times
what a user waits for instead, with the never-worse check and its guard prior: `Restorer.restore_aligned` on a 512 px
aligned face and `Restorer.restore_image` on realworld photos (03.jpg: one small face; Blake_Lively.jpg: two), with
the model at its restore size and, paired call by call, at its card's input size when that differs (the median of
the paired differences beside them).
"""
from __future__ import annotations

import argparse

import torch

from dataclasses import replace
from pathlib import Path

import numpy as np

from restoration import Zoo, build
from restoration.diffusion import load_guard_prior
from restoration.faces import Restorer, load_image
from restoration.models import SWINIR_FACE_CONFIG
from restoration.runtime import resolve_device
from speed import Plan, bench_model
from timing import markdown, median, time_calls

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def end_to_end(name: str, repeats: int, device) -> None:
    """Median latency of restore_aligned / restore_image (module doc), at the restore size and the input size."""
    zoo = Zoo()
    card, model = zoo.get(name), zoo.load(name)
    prior = load_guard_prior(device=device)
    sizes = [card.restore_size] + ([card.input_size] if card.input_size != card.restore_size else [])
    restorers = {s: Restorer(model, replace(card, serve_size=s), device=device, guard_prior=prior) for s in sizes}
    hq = sorted((SHARED / "data" / "hq512").glob("*/*.png"))
    cases = [("aligned 512 px face", lambda r: r.restore_aligned([load_image(hq[0])]))]
    for photo in ("03.jpg", "Blake_Lively.jpg"):
        img = load_image(SHARED / "data" / "realworld" / "whole" / photo)
        cases.append((f"photo {photo}", lambda r, img=img: r.restore_image(img, detector="retinaface")))
    print(f"{name}: restores at {card.restore_size} px (input size {card.input_size}); guard prior on; "
          f"{repeats} paired runs, torch threads {torch.get_num_threads()}")
    for label, fn in cases:
        times = {s: [] for s in sizes}
        for s, r in restorers.items():
            fn(r)  # warm-up: detector and helper loaded, first call paid
        for _ in range(repeats):
            for s, r in restorers.items():
                times[s].append(time_calls(lambda: fn(r), 1, warmup=0, device=device)[0][0])
        line = ", ".join(f"at {s} px {1000 * median(t):.0f} ms" for s, t in times.items())
        if len(sizes) == 2:
            diff = median([a - b for a, b in zip(times[sizes[0]], times[sizes[1]])])
            line += f" (paired difference {1000 * diff:+.0f} ms)"
        print(f"  {label:28} {line}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="zoo restorer name (default: swinir_face full config with random weights)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--variants", nargs="+", default=["fp32"], help="fp32, bf16, cl (channels_last), compile, or "
                    "combinations such as bf16+cl")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--end-to-end", action="store_true", help="time restore_aligned / restore_image with --model "
                                                               "instead (module doc)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.end_to_end:
        if not args.model:
            raise SystemExit("--end-to-end needs --model")
        end_to_end(args.model, args.repeats, device)
        return
    if args.model:
        zoo = Zoo()
        size, model, label = zoo.get(args.model).restore_size, zoo.load(args.model), args.model
    else:
        torch.manual_seed(0)
        size, model, label = 512, build("swinir_face", SWINIR_FACE_CONFIG), "swinir_face full config (random weights)"
    plan = Plan("full", device)
    plan.repeats = args.repeats
    print(f"model: {label}; input {size}x{size}; device {device}; torch threads {torch.get_num_threads()}")
    print(markdown(bench_model(plan, label, model, size, [(b, args.variants) for b in args.batch_sizes],
                               f"{size} px")))


if __name__ == "__main__":
    main()
