"""Export of a default-model training run to the zoo (`faceadapt train export`): the EMA weights of a checkpoint as
a zoo folder (`model.safetensors`, `config.json`, `card.json`, see docs/ARCHITECTURE.md) through
`restoration.models.zoo.Zoo.register`, with a card that records the data, the recipe and the run's lineage."""
from __future__ import annotations

from pathlib import Path

import torch

from restoration.data import faces as D
from restoration.models.zoo import Zoo
import restoration.training.state as state
from restoration.training.recipes import DIFFUSION_DEFAULT, PSEUDO_TARGET_DEFAULTS_REFERENCE
from restoration.training.runs import last_checkpoint

__all__ = ["LICENSE_TEXT", "export", "average_state_dicts"]

LICENSE_TEXT = ("Weights trained on UTKFace (non-commercial research use only): research / non-commercial use only. "
                "Code: Apache-2.0.")


def export(run_dir: str | Path, dest: str | Path, *, checkpoint: str | Path | None = None, metrics: dict | None = None,
           extra: dict | None = None, description: str | None = None, command: str | None = None,
           train_command: str | None = None, input_size: int | None = None, serve_size: int | None = None,
           average_with: tuple[str, dict] | None = None) -> Path:
    """Write the EMA weights of the last checkpoint of `run_dir` as the zoo folder `dest` (`<zoo>/<name>`).

    `input_size` (default: the run's `size`) and `serve_size` (the size the model restores at, when it differs; a
    restorer trained at two sizes, `mix_size`, is adapted at one and restores at the other) go into the card; each
    must be a size the run trained at. `average_with` (label, state dict of the same arch): the weights written are
    the mean of the checkpoint's EMA weights and these (a weight average of two runs), and the card says so.

    The card records the data (UTKFace subset, terms), the split files and their sha256, steps, seed, wall time,
    the training config and `metrics`; `extra` is merged into `card.extra` (e.g. `pseudo_target_defaults`).
    """
    ck = Path(checkpoint) if checkpoint else last_checkpoint(run_dir)
    if ck is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}")
    s = state.load(ck)
    kind, arch, tcfg = s["kind"], s["arch"], s["config"]
    trained = {int(tcfg["size"])} | ({int(tcfg["mix_size"])} if tcfg.get("mix_size") else set())
    input_size = int(input_size or tcfg["size"])
    for label, v in (("input size", input_size), ("serve size", serve_size)):
        if v is not None and int(v) not in trained:
            raise ValueError(f"{label} {v}: {run_dir} trained at {', '.join(map(str, sorted(trained)))} px only")
    serve_size = int(serve_size) if serve_size and int(serve_size) != input_size else None
    dest = Path(dest)
    imgs_per_s = tcfg["batch_size"] * s["step"] / max(1e-9, s["train_seconds"])
    card_extra: dict = {
        "training": {
            "recipe": ("iDDPM hybrid loss (L_simple + rescaled L_vlb, learned range), AdamW, EMA"
                       if kind == "prior" else
                       f"{'MSE' if tcfg.get('pixel_loss') == 'mse' else 'L1'}"
                       f"{' + non-saturating GAN (small spectral-norm patch discriminator)' if tcfg.get('gan_weight', 0) > 0 else ''}"
                       f"{' + gradient L1' if tcfg.get('gradient_weight', 0) > 0 else ''}"
                       f"{' at the native size through the product paste' if tcfg.get('native_loss') else ''}"
                       f"{'; standard + broad damage (held out: ' + ', '.join(tcfg.get('damage_holdout') or ['none']) + ')' if tcfg.get('damage') == 'broad' else ''}"
                       ", AdamW, EMA; no LPIPS (no LPIPS weights available locally)"),
            "steps": s["step"], "seed": tcfg["seed"], "batch_size": tcfg["batch_size"], "lr": tcfg["lr"],
            "lr_schedule": tcfg["lr_schedule"], "ema_rate": tcfg["ema_rate"], "size": tcfg["size"],
            "mix_size": tcfg.get("mix_size") or None,
            "images_seen": s["step"] * tcfg["batch_size"], "wall_seconds": round(s["train_seconds"], 1),
            "images_per_second": round(imgs_per_s, 2), "threads": tcfg["threads"], "device": tcfg["device"],
            "segments": s.get("segments", []), "config": tcfg, "checkpoint": ck.name, "weights": "EMA",
            "torch": torch.__version__,
        },
        "data": {
            "name": D.DATA_NAME, "terms": D.DATA_TERMS, "split": tcfg.get("split", "train"),
            "count": s.get("train_names_count"),
            "split_files": [f"restoration/data/{D.SPLIT_PREFIX}_{x}.txt" for x in D.SPLITS],
            "split_sha256": D.split_sha256() if D.split_path("train").is_file() else None,
            "split_seed": D.SPLIT_SEED,
        },
        "params": s["params"],
        "metrics": metrics or {},
    }
    init = s.get("init")
    tr = card_extra["training"]
    tr["init_from"] = init
    tr["total"] = {  # this run plus the warm starts it continues
        "steps": s["step"] + (init["steps"] if init else 0),
        "images_seen": tr["images_seen"] + (init["images_seen"] if init else 0),
        "wall_seconds": round(tr["wall_seconds"] + (init["wall_seconds"] if init else 0.0), 1),
    }
    if train_command:
        card_extra["training"]["command"] = train_command
    if command:
        card_extra["training"]["export_command"] = command
    if kind == "prior":
        card_extra["diffusion"] = dict(tcfg.get("diffusion") or DIFFUSION_DEFAULT)
        card_extra["pseudo_target_defaults"] = dict(PSEUDO_TARGET_DEFAULTS_REFERENCE)
    else:
        card_extra["degradation"] = tcfg.get("degradation") or "restoration.degrade.damage.DegradationParams() (standard)"
        card_extra["lpips"] = "not used: no LPIPS weights on disk"
    for k, v in (extra or {}).items():
        card_extra[k] = v
    sizes = " and ".join(f"{v}x{v}" for v in sorted(trained))
    what = f"Small {arch} {'diffusion prior' if kind == 'prior' else 'face restorer'} at {sizes}"
    if init:
        how = (f"trained on the UTK200 training split: {init['steps']} steps ({init['name']}, sha256 "
               f"{init['sha256'][:12]}) then {s['step']} more (batch {tcfg['batch_size']}), "
               f"{tr['total']['steps']} in all.")
    else:
        how = f"trained from scratch on the UTK200 training split ({s['step']} steps, batch {tcfg['batch_size']})."
    desc = description or f"{what}, {how}"
    weights, what_weights = s["ema"], f"EMA weights of {ck.name}"
    if average_with is not None:
        label, other = average_with
        weights = average_state_dicts(s["ema"], other)
        what_weights = f"the mean of the EMA weights of {ck.name} and of {label}"
        card_extra["training"]["weights"] = f"mean of the EMA weights and {label}"
        desc = f"{desc} Its weights are {what_weights}."
    zoo = Zoo(root=dest.parent, builtin_dir=None)
    zoo.register(
        dest.name, arch, tcfg["model"], weights, kind=kind, input_size=input_size, serve_size=serve_size,
        value_range=[-1.0, 1.0] if kind == "prior" else [0.0, 1.0], overwrite=True,
        license=LICENSE_TEXT, provenance=(f"FaceAdapt `faceadapt train {kind}` (restoration/training/{kind}.py), "
                                          f"{what_weights}; data: UTKFace subset faces-utk200 (non-commercial "
                                          "research terms)"),
        description=desc, random_init=False, extra=card_extra,
    )
    return dest


def average_state_dicts(a: dict, b: dict) -> dict:
    """The parameter-wise mean of two state dicts of one architecture (non-float buffers taken from ``a``)."""
    if set(a) != set(b):
        raise ValueError(f"the two state dicts differ in keys: {sorted(set(a) ^ set(b))[:5]}")
    out = {}
    for k, v in a.items():
        if v.shape != b[k].shape:
            raise ValueError(f"{k}: shapes {tuple(v.shape)} and {tuple(b[k].shape)} differ")
        out[k] = ((v.float() + b[k].float()) / 2).to(v.dtype) if v.is_floating_point() else v.clone()
    return out
