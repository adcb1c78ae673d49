"""Per-face restore time of one restorer, at several batch sizes, on this machine (a front end of bench/speed.py's
arch section: the same timing code, one model).

    python bench/restore_speed.py                        # swinir_face full config (random weights), 512x512
    python bench/restore_speed.py --model faceadapt-swinir-small --batch-sizes 1 8 32
    python bench/restore_speed.py --variants fp32 bf16 cl compile

Prints a markdown table: seconds per face (median of --repeats timed passes after one warm-up pass) and peak memory.
"""
from __future__ import annotations

import argparse

import torch

from restoration import Zoo, build
from restoration.models import SWINIR_FACE_CONFIG
from restoration.runtime import resolve_device
from speed import Plan, bench_model
from timing import markdown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="zoo restorer name (default: swinir_face full config with random weights)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--variants", nargs="+", default=["fp32"], help="fp32, bf16, cl (channels_last), compile, or "
                    "combinations such as bf16+cl")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.model:
        zoo = Zoo()
        size, model, label = zoo.get(args.model).input_size, zoo.load(args.model), args.model
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
