"""Per-face restore time of a restorer, at several batch sizes, on this machine.

    python bench/restore_speed.py                        # swinir_face full config (random weights), 512x512
    python bench/restore_speed.py --model faceadapt-swinir-small --batch-sizes 1 8 32

Prints seconds per face (median of --repeats timed passes after one warm-up pass).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from restoration.models import SWINIR_FACE_CONFIG
from restoration.runtime import resolve_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="zoo restorer name (default: swinir_face full config with random weights)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.model:
        from restoration.models import Zoo, build

        zoo = Zoo()
        size, model, label = zoo.get(args.model).input_size, zoo.load(args.model), args.model
    else:

        torch.manual_seed(0)
        size, model, label = 512, build("swinir_face", SWINIR_FACE_CONFIG), "swinir_face full config (random weights)"
    model = model.to(device).eval()
    print(f"model: {label}; input {size}x{size}; device {device}; torch threads {torch.get_num_threads()}")
    print(f"{'batch':>5}  {'s/face':>8}  {'s/batch':>8}")
    for bs in args.batch_sizes:
        x = torch.rand(bs, 3, size, size, device=device)
        times = []
        with torch.inference_mode():
            for i in range(args.repeats + 1):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i:  # the first pass is a warm-up
                    times.append(time.perf_counter() - t0)
        med = statistics.median(times)
        print(f"{bs:>5}  {med / bs:>8.3f}  {med:>8.3f}")


if __name__ == "__main__":
    main()
