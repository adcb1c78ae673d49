"""The adaptation configuration: `AdaptConfig`, and the defaults layered from the prior and base model cards.

`default_config` builds it as the CLI, the worker and the benchmark all do: `AdaptConfig` defaults (the paper's),
then the prior card's pseudo-target defaults, then the base card's fine-tuning defaults, then what the caller gave.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Sequence

from restoration.adaptation.pseudo import PseudoTargetParams
from restoration.configs import strict_from_dict
from restoration.training.finetune import FinetuneConfig

__all__ = ["AdaptConfig", "apply_prior_defaults", "apply_base_defaults", "nest_overrides", "default_config",
           "crop_size"]


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
    """

    pseudo: PseudoTargetParams = field(default_factory=PseudoTargetParams)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval_fraction: float = 0.1
    seed: int = 0
    aligned: bool = False
    size: int | None = None
    use_prior: bool = True
    hq_dir: str | None = None
    hq_count: int = 1000
    max_faces: int = 4
    device: str = "auto"
    grid_count: int = 8
    quality_gate: bool = True

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
    cfg = AdaptConfig.from_dict(params)
    if cfg.use_prior and prior:
        cfg = apply_prior_defaults(cfg, zoo.get(prior), explicit=list(params.get("pseudo") or {}))
    return apply_base_defaults(cfg, zoo.get(base), explicit=list(params.get("finetune") or {}))


def crop_size(config: AdaptConfig, base_card) -> int:
    """The side of the job's face crops: `config.size`, else the base card's input size."""
    return int(config.size or base_card.input_size)
