"""The adaptation configuration: `AdaptConfig`, and the defaults layered from the prior and base model cards.

`default_config` builds it as the CLI, the worker and the benchmark all do: `AdaptConfig` defaults (the paper's),
then the prior card's pseudo-target defaults, then the base card's fine-tuning defaults, then what the caller gave.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Sequence

from restoration.adaptation.pseudo import PseudoTargetParams
from restoration.configs import strict_from_dict
from restoration.training.finetune import FinetuneConfig

__all__ = ["AdaptConfig", "apply_prior_defaults", "apply_base_defaults", "nest_overrides", "default_config",
           "crop_size", "SMALL_SET", "held_out_count", "scale_for_faces"]

#: How `auto_schedule` fits the fine-tune to the number of faces (`scale_for_faces`, `held_out_count`), chosen with
#: bench/adaptation.py at 8-200 faces (docs/ADAPTATION.md):
#:   steps_per_face / min_steps: steps = min(the base card's steps, max(min_steps, steps_per_face * training faces))
#:   full_lr_at: below this many training faces the learning rate is scaled by sqrt(faces / full_lr_at) ...
#:   min_lr_scale: ... but never below this share of it
#:   evals / patience: early stopping scores the held-out faces `evals` times over the run (and once before it) and
#:       stops after `patience` scores without a gain; the best weights are kept
#:   shift_div: augmentation shift of up to size // shift_div pixels (with the horizontal flips)
#:   min_held_out / held_out_share: at least min(min_held_out, images * held_out_share) images held out, so that the
#:       gate and the early stopping judge more than one face
SMALL_SET = {"steps_per_face": 25, "min_steps": 150, "full_lr_at": 64, "min_lr_scale": 0.5, "evals": 10,
             "patience": 4, "shift_div": 32, "min_held_out": 4, "held_out_share": 0.25}


@dataclass
class AdaptConfig:
    """Everything the engine needs besides the data and the model names. JSON-serialisable via `to_dict`.

    pseudo: pseudo-target parameters; finetune: fine-tuning parameters (its `device` is overridden by `device`).
    eval_fraction: share of the source images held out for evaluation (never trained on), split by source image.
    aligned: the inputs are already aligned face crops (else faces are detected and aligned).
    size: crop side (None: the base model card's input_size).
    use_prior: False gives the "self-training without the prior" ablation (pseudo target = x0).
    hq_dir: clean high-quality faces for the discriminator's real images (None: the UTKFace training split of
        `restoration.data.faces` when present, else no GAN term); hq_count: how many of them to use at most.
    max_faces: faces kept per source image when detecting (largest first).
    quality_gate: `register` refuses an adapted model that `evaluate` judged worse than the base on the held-out
        images (see `restoration.adaptation.gate.GATE`); False registers it anyway (the verdict is still recorded in
        the card).
    aligned: True: every image is an aligned face crop (no detection); False: every image is a photo (faces are
        detected and aligned); None (default): decided per image from its detection (`prepare`: one face filling
        the frame with its landmarks near the base's alignment template is used as the aligned crop it is).
    auto_schedule: fit the fine-tune to the data (`scale_for_faces`: steps and learning rate scaled to the number
        of faces, shift augmentation, early stopping on the held-out pseudo targets with the best weights kept, a
        held-out part of at least `SMALL_SET["min_held_out"]` images); `default_config` turns it off when the
        fine-tune's steps or learning rate are given.
    """

    pseudo: PseudoTargetParams = field(default_factory=PseudoTargetParams)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval_fraction: float = 0.1
    seed: int = 0
    aligned: bool | None = None
    size: int | None = None
    use_prior: bool = True
    hq_dir: str | None = None
    hq_count: int = 1000
    max_faces: int = 4
    device: str = "auto"
    grid_count: int = 8
    quality_gate: bool = True
    auto_schedule: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.pseudo, dict):
            self.pseudo = PseudoTargetParams.from_dict(self.pseudo)
        if isinstance(self.finetune, dict):
            self.finetune = FinetuneConfig.from_dict(self.finetune)
        if not 0.0 <= float(self.eval_fraction) < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["pseudo"] = self.pseudo.to_dict()
        d["finetune"] = self.finetune.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "AdaptConfig":
        return strict_from_dict(cls, d, "adaptation")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "AdaptConfig":
        return cls.from_dict(json.loads(s))


def _card_defaults(current: dict, defaults: dict, explicit: Sequence[str]) -> dict:
    """`current` with the known keys of `defaults` filled in, except the names in `explicit`."""
    out = dict(current)
    for k, v in defaults.items():
        if k in out and k not in explicit:
            out[k] = v
    return out


def apply_prior_defaults(config: AdaptConfig, prior_card, explicit: Sequence[str] = ()) -> AdaptConfig:
    """Fill start / constrain_until / down_N (and respacing) from the prior card's `extra.pseudo_target_defaults`
    (and `extra.diffusion.respacing`), except the names in `explicit` (given by the user)."""
    extra = getattr(prior_card, "extra", None) or {}
    defaults = dict(extra.get("pseudo_target_defaults") or {})
    resp = (extra.get("diffusion") or {}).get("respacing")
    if resp is not None:
        defaults.setdefault("respacing", str(resp))
    p = _card_defaults(config.pseudo.to_dict(), defaults, explicit)
    return dataclasses.replace(config, pseudo=PseudoTargetParams.from_dict(p))


def apply_base_defaults(config: AdaptConfig, base_card, explicit: Sequence[str] = ()) -> AdaptConfig:
    """Fill the fine-tuning settings from the base restorer card's `extra.finetune_defaults` (the settings chosen
    for that model with `bench/adaptation.py`), except the names in `explicit` (given by the user). A card without
    them keeps `FinetuneConfig`'s defaults (the paper's)."""
    extra = getattr(base_card, "extra", None) or {}
    f = _card_defaults(config.finetune.to_dict(), dict(extra.get("finetune_defaults") or {}), explicit)
    return dataclasses.replace(config, finetune=FinetuneConfig.from_dict(f))


def nest_overrides(overrides: dict | None) -> dict:
    """{"finetune.steps": 300, "seed": 1} -> {"finetune": {"steps": 300}, "seed": 1} (nested dicts pass through)."""
    out: dict = {}
    for key, value in (overrides or {}).items():
        parts = str(key).split(".")
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise ValueError(f"bad override {key!r}")
        if isinstance(value, dict) and isinstance(d.get(parts[-1]), dict):
            d[parts[-1]].update(value)
        else:
            d[parts[-1]] = value
    return out


def default_config(zoo, base: str, prior: str | None, params: dict | None = None, **fields) -> AdaptConfig:
    """The engine configuration for adapting `base` with `prior`, as the CLI, the worker and the benchmark build it:
    `AdaptConfig` defaults, then the prior card's pseudo-target defaults and the base card's fine-tuning defaults,
    then `params` (an `AdaptConfig` dict, nested or with dotted keys such as "finetune.steps") and `fields` (top-level
    fields such as aligned=True), which always win."""
    params = nest_overrides(params)
    params.update({k: v for k, v in fields.items()})
    if "auto_schedule" not in params and {"steps", "lr"} & set(params.get("finetune") or {}):
        params["auto_schedule"] = False  # a schedule given by hand is run as given
    cfg = AdaptConfig.from_dict(params)
    if cfg.use_prior and prior:
        cfg = apply_prior_defaults(cfg, zoo.get(prior), explicit=list(params.get("pseudo") or {}))
    return apply_base_defaults(cfg, zoo.get(base), explicit=list(params.get("finetune") or {}))


def crop_size(config: AdaptConfig, base_card) -> int:
    """The side of the job's face crops: `config.size`, else the base card's input size."""
    return int(config.size or base_card.input_size)


def held_out_count(n_images: int, config: AdaptConfig) -> int:
    """How many of `n_images` source images are held out: `eval_fraction` of them (at least one, and one image left
    to train on); with `auto_schedule`, at least min(`SMALL_SET["min_held_out"]`, a quarter of them)."""
    if config.eval_fraction <= 0 or n_images < 2:
        return 0
    k = max(int(round(config.eval_fraction * n_images)), 1)
    if config.auto_schedule:
        k = max(k, min(SMALL_SET["min_held_out"], int(n_images * SMALL_SET["held_out_share"])))
    return min(k, n_images - 1)


def scale_for_faces(config: AdaptConfig, n_train: int, n_eval: int, size: int) -> AdaptConfig:
    """`config` with its fine-tune fitted to `n_train` training and `n_eval` held-out faces of `size` px when
    `auto_schedule` is on (else `config` as it is): see `SMALL_SET`."""
    if not config.auto_schedule:
        return config
    f, k = config.finetune, SMALL_SET
    steps = max(1, min(f.steps, max(k["min_steps"], k["steps_per_face"] * n_train)))
    scale = max(k["min_lr_scale"], min(1.0, math.sqrt(n_train / k["full_lr_at"])))
    val_every = max(1, steps // k["evals"]) if n_eval > 0 else 0
    ft = dataclasses.replace(f, steps=steps, lr=f.lr * scale, lr_min=f.lr_min * scale, val_every=val_every,
                             patience=k["patience"] if n_eval > 0 else 0, shift=max(1, int(size) // k["shift_div"]))
    return dataclasses.replace(config, finetune=ft)
