"""When does the domain white balance of the pseudo targets (`pseudo.color_correction`) fire?

It must take out a cast that a whole domain shares and leave clean domains alone, whoever is in them. This prints
the gains `restoration.adaptation.color.domain_color_gains` computes against the engine's default reference (256 faces of the
UTKFace train split, as `restoration.adaptation.color.color_correction` reads them) for:

* clean test faces of one UTKFace ethnicity label at a time (the file names' third field), which must give no
  correction ("-": inside the dead zone), with the largest |log gain| before the dead zone;
* each damage preset of `restoration.degrade.damage` applied to the test faces at 128 px (the casts the benchmark domains
  carry), next to the inverse of the preset's mean cast gains where it has one.

    python bench/color_correction.py            # 200 faces per group / domain
"""
from __future__ import annotations

import argparse
import collections
import random
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from restoration import data

from restoration import degrade
from restoration.adaptation import COLOR_DEAD_ZONE, COLOR_REFERENCE_COUNT, color_stats, domain_color_gains
from restoration.faces import load_image  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="faces per group / domain")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    root = data.default_faces_root()
    train = data.load_split("train")
    random.Random(args.seed).shuffle(train)
    ref = color_stats(load_image(root / n) for n in train[:COLOR_REFERENCE_COUNT])
    test = data.load_split("test")
    print(f"reference: {COLOR_REFERENCE_COUNT} train-split faces; dead zone |log gain| < {COLOR_DEAD_ZONE}")
    print(f"\n{'clean test faces':28} {'faces':>5}  {'max |log g|':>11}  gains (R, G, B)")
    groups = collections.defaultdict(list)
    for n in test:
        parts = n.split("_")
        groups[parts[2] if len(parts) > 3 else "?"].append(n)
    for g, names in sorted(groups.items()):
        st = color_stats(load_image(root / n) for n in names[: args.n])
        raw = domain_color_gains(st, ref, dead_zone=0.0)
        print(f"{'ethnicity label ' + g:28} {min(len(names), args.n):5d}  "
              f"{(np.abs(np.log(raw)).max() if raw else 0.0):11.3f}  {domain_color_gains(st, ref) or '-'}")
    print(f"\n{'damaged test faces (128 px)':28} {'faces':>5}  {'max |log g|':>11}  gains (R, G, B)   [inverse cast]")
    faces = [data.load_face(root / n, 128) for n in test[: args.n]]
    for name, params in degrade.PRESETS.items():
        rng = np.random.default_rng(args.seed)
        lq = [np.clip(np.rint(degrade.degrade(f, params, rng) * 255.0), 0, 255).astype(np.uint8) for f in faces]
        g = domain_color_gains(color_stats(lq), ref)
        raw = domain_color_gains(color_stats(lq), ref, dead_zone=0.0)
        inv = ""
        if params.color_cast_prob > 0:
            c = 1.0 / np.asarray(params.color_cast_gains)
            inv = str([round(float(v), 3) for v in c / np.exp(np.log(c).mean())])
        print(f"{name:28} {len(lq):5d}  {(np.abs(np.log(raw)).max() if raw else 0.0):11.3f}  {g or '-'}   {inv}")


if __name__ == "__main__":
    main()
