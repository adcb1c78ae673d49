"""End-to-end adaptation as a user runs it, timed: `faceadapt adapt --aligned` with the defaults on N unlabeled faces of
an unseen damage type, then `faceadapt restore --aligned` on other faces of that domain with the base and the adapted
model, scored against their ground truth (which neither command ever sees).

    python bench/adapt_cli.py                                # camera damage, 200 faces at 128 px, 100 test faces
    python bench/adapt_cli.py --domain scan --n-train 16     # the small end of the 16-200 range

Prints the wall time of `faceadapt adapt` (the default adaptation must finish in <= 15 min on 2 CPU cores), the
quality gate's verdict and PSNR / SSIM of the input, the base and the adapted model on the test faces. Uses a private
FACEADAPT_HOME under --out (its own zoo: the adapted model never lands in yours).
"""
from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.adaptation import _load, _save, make_data, score  # noqa: E402
from restoration import data
from restoration import degrade


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--domain", default="camera", choices=sorted(set(degrade.PRESETS) - {"default"}))
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--n-train", type=int, default=200)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--n-hq", type=int, default=500, help="clean train-split faces for the discriminator (disjoint)")
    ap.add_argument("--out", default="/tmp/faceadapt-bench-adapt-cli")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--adapt-args", default="", help="extra arguments for `faceadapt adapt` (default: none)")
    args = ap.parse_args()
    out = Path(args.out) / f"{args.domain}-{args.size}-{args.n_train}"
    make_data(out, args.domain, args.size, args.n_train, args.n_test, args.seed)
    # the discriminator's clean faces: train-split faces disjoint from the adaptation faces (the engine's default,
    # the whole train split, would hold their clean versions)
    hq_dir = out / "data" / "hq"
    names = data.load_split("train")
    random.Random(args.seed).shuffle(names)  # the order make_data uses: its first n_train are the adaptation faces
    for n in names[args.n_train:args.n_train + args.n_hq]:
        dst = hq_dir / f"{Path(n).name.split('.')[0]}.png"
        if not dst.is_file():
            _save(data.load_face(data.default_faces_root() / n, args.size), dst)
    env = dict(os.environ, FACEADAPT_HOME=str(out / "home"), FACEADAPT_MODELS_DIR=str(out / "home" / "models"))
    exe = [sys.executable, "-m", "cli"] if not (REPO / ".venv" / "bin" / "faceadapt").is_file() \
        else [str(REPO / ".venv" / "bin" / "faceadapt")]
    name = f"bench-{args.domain}-{int(time.time())}"
    cmd = exe + ["adapt", "--data", str(out / "data" / "train_lq"), "--aligned", "--name", name, "--hq-dir",
                 str(hq_dir)] + args.adapt_args.split()
    print("$", " ".join(cmd[len(exe) - 1:]), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    minutes = (time.perf_counter() - t0) / 60
    print(r.stdout[-4000:])
    if r.returncode != 0:
        print(r.stderr[-2000:])
    print(f"faceadapt adapt: exit {r.returncode}, {minutes:.1f} min wall for {args.n_train} faces", flush=True)
    test_lq = sorted((out / "data" / "test_lq").glob("*.png"))[: args.n_test]
    gts = [_load(out / "data" / "test_gt" / p.name) for p in test_lq]
    rows = [("input (damaged)", score([_load(p) for p in test_lq], gts))]
    models = [("base", None)] + ([("adapted", name)] if r.returncode == 0 else [])
    for label, model in models:
        o = out / f"restored-{label}"
        cmd = exe + ["restore", str(out / "data" / "test_lq"), "-o", str(o), "--aligned"] + (["--model", model] if model else [])
        rr = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if rr.returncode != 0:
            print(rr.stderr[-2000:])
            continue
        rows.append((label, score([_load(o / p.name) for p in test_lq], gts)))
    print(f"\n`{args.domain}` at {args.size} px: {args.n_train} adaptation faces, {len(test_lq)} test faces")
    base = next(v for k, v in rows if k == "base")
    for label, (ps, ss) in rows:
        print(f"  {label:16} PSNR {ps:6.2f}  SSIM {ss:.4f}  ({ps - base[0]:+.2f} dB vs base)")


if __name__ == "__main__":
    main()
