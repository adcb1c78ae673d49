"""Engine parameters a tenant may send (`POST /v1/adaptations` `params`): bounds for every field, and the mapping of
API-level names to what the engine takes.

Every field of `restoration.adaptation.config.AdaptConfig` (and its `pseudo` / `finetune` parts) that the API accepts has a type
and a range here; anything else is refused with a 422 naming the field. Numbers must be finite (no NaN/inf), integers
must be integers (no 1e9 floats, no booleans). `device` is limited to `settings.allowed_devices`.

`hq_dir` (a server path) is never accepted from the API: a job names a server-configured HQ set with `hq_set`
(`settings.hq_sets`), which the worker turns into the engine's `hq_dir` (`engine_params`). The CLI still takes a path.
`validate_params` runs both checks: these bounds, then `AdaptConfig` itself.
"""
from __future__ import annotations

import math
import re
from typing import Any

from restoration.adaptation import AdaptConfig
from service.errors import LimitExceeded, ServiceError
from service.settings import ServiceSettings, get_settings

INT_MAX = 2**31 - 1

# field: (kind, lo, hi); kind in int | float | bool | choice | str; hi may be a callable of settings
TOP = {
    "eval_fraction": ("float", 0.0, 0.9),
    "seed": ("int", 0, INT_MAX),
    "aligned": ("bool",),
    "auto_schedule": ("bool",),
    "size": ("int_or_none", 32, 1024),
    "use_prior": ("bool",),
    "hq_set": ("hq_set",),
    "hq_count": ("int", 1, 10_000),
    "max_faces": ("int", 1, 16),
    "device": ("device",),
    "grid_count": ("int", 0, 64),
    "quality_gate": ("bool",),
}
PSEUDO = {
    "start": ("int", 0, 1000),
    "respacing": ("respacing",),
    "constrain_until": ("int", 0, 1000),
    "down_N": ("int", 1, 64),
    "schedule": ("choice", ("ancestral", "ddim")),
    "fast_steps": ("int", 1, 1000),
    "batch_size": ("int", 1, 64),
    "seed": ("int", 0, INT_MAX),
    "save_x0": ("bool",),
    "color_correction": ("float", 0.0, 1.0),
}
FINETUNE = {
    "steps": ("int", 1, lambda s: s.max_finetune_steps),
    "batch_size": ("int", 1, 64),
    "grad_accum": ("int", 1, 64),
    "lr": ("float_pos", 0.0, 1e-2),
    "lr_min": ("float", 0.0, 1e-2),
    "betas": ("pair", 0.0, 0.9999),
    "weight_decay": ("float", 0.0, 1.0),
    "ema_decay": ("float", 0.0, 0.99999),
    "l1": ("float", 0.0, 100.0),
    "lpips": ("float", 0.0, 100.0),
    "perceptual_fallback": ("choice", ("gradient", "ssim", "none")),
    "gan": ("float", 0.0, 100.0),
    "d_lr": ("float_pos", 0.0, 1e-2),
    "d_betas": ("pair", 0.0, 0.9999),
    "d_channels": ("int", 8, 256),
    "flip": ("bool",),
    "grad_clip": ("float", 0.0, 1000.0),
    "shift": ("int", 0, 64),
    "val_every": ("int", 0, 1_000_000),
    "patience": ("int", 0, 1000),
    "min_delta": ("float", 0.0, 10.0),
    "ckpt_every": ("int", 1, 1_000_000),
    "log_every": ("int", 1, 1_000_000),
    "seed": ("int", 0, INT_MAX),
    "device": ("device",),
}


def _bad(path: str, msg: str) -> ServiceError:
    return ServiceError(422, "bad_params", f"invalid engine parameter {path}: {msg}", field=path)


def allowed_devices(settings: ServiceSettings) -> list[str]:
    return [d.strip() for d in settings.allowed_devices.split(",") if d.strip()]


def _check_device(path: str, v: Any, settings: ServiceSettings) -> None:
    allowed = allowed_devices(settings)
    if not isinstance(v, str):
        raise _bad(path, "must be a string")
    ok = v in allowed or ("cuda" in allowed and re.fullmatch(r"cuda:\d{1,2}", v) is not None)
    if not ok:
        raise _bad(path, f"device {v!r} is not allowed on this server (allowed: {', '.join(allowed)})")


def _number(path: str, v: Any, integer: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(path, f"must be {'an integer' if integer else 'a number'}, got {type(v).__name__}")
    if isinstance(v, float) and not math.isfinite(v):
        raise _bad(path, "must be finite (no NaN or infinity)")
    if integer and not isinstance(v, int):
        raise _bad(path, f"must be an integer, got {v!r}")
    return v


def _check(path: str, spec: tuple, v: Any, settings: ServiceSettings) -> None:
    kind = spec[0]
    if kind == "bool":
        if not isinstance(v, bool):
            raise _bad(path, "must be true or false")
        return
    if kind == "choice":
        if v not in spec[1]:
            raise _bad(path, f"must be one of {list(spec[1])}")
        return
    if kind == "device":
        return _check_device(path, v, settings)
    if kind == "hq_set":
        if not isinstance(v, str) or v not in settings.hq_sets:
            names = sorted(settings.hq_sets)
            raise _bad(path, f"unknown HQ set {v!r} (configured: {names or 'none'})")
        return
    if kind == "respacing":
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str) or not re.fullmatch(r"(ddim)?\d{1,4}(,\d{1,4}){0,15}", v):
            raise _bad(path, "must be a step count such as '250', 'ddim25' or comma-separated counts")
        counts = [int(c) for c in v.removeprefix("ddim").split(",")]
        if sum(counts) > 1000 or min(counts) < 1:
            raise _bad(path, "must keep 1 to 1000 steps")
        return
    if kind == "pair":
        if not isinstance(v, (list, tuple)) or len(v) != 2:
            raise _bad(path, "must be a list of two numbers")
        for i, x in enumerate(v):
            _check(f"{path}[{i}]", ("float", spec[1], spec[2]), x, settings)
        return
    if kind == "int_or_none" and v is None:
        return
    lo, hi = spec[1], spec[2]
    hi = hi(settings) if callable(hi) else hi
    x = _number(path, v, integer=kind in ("int", "int_or_none"))
    if kind == "float_pos" and not x > lo:
        raise _bad(path, f"must be > {lo} and <= {hi}, got {v!r}")
    if not lo <= x <= hi:
        if path == "finetune.steps" and x > hi:
            raise LimitExceeded("max_finetune_steps", hi, f"finetune.steps {v} is more than max_finetune_steps ({hi})",
                                status=422)
        raise _bad(path, f"must be between {lo} and {hi}, got {v!r}")


def check_params(params: Any, settings: ServiceSettings) -> dict:
    """Check API job parameters (type and range of every field); returns them unchanged. Raises ServiceError 422."""
    if not isinstance(params, dict):
        raise _bad("params", "must be an object")
    if "hq_dir" in params:
        raise _bad("hq_dir", "server paths are not accepted; name a configured HQ set with 'hq_set' "
                             f"(configured: {sorted(settings.hq_sets) or 'none'})")
    for key, v in params.items():
        if key in ("pseudo", "finetune"):
            table = PSEUDO if key == "pseudo" else FINETUNE
            if not isinstance(v, dict):
                raise _bad(key, "must be an object")
            for k2, v2 in v.items():
                if k2 not in table:
                    raise _bad(f"{key}.{k2}", "unknown parameter")
                _check(f"{key}.{k2}", table[k2], v2, settings)
            continue
        if key not in TOP:
            raise _bad(key, "unknown parameter")
        _check(key, TOP[key], v, settings)
    return params


def engine_params(params: dict, settings: ServiceSettings) -> dict:
    """The `AdaptConfig` dict for stored job parameters: `hq_set` becomes the server's `hq_dir` for that set.
    A stored `hq_dir` (jobs created before this check) is refused, never read."""
    out = dict(params or {})
    if "hq_dir" in out:
        raise ValueError("hq_dir is not accepted from the API; use a configured hq_set")
    name = out.pop("hq_set", None)
    if name is not None:
        if name not in settings.hq_sets:
            raise ValueError(f"HQ set {name!r} is not configured on this worker (FACEADAPT_HQ_SETS)")
        out["hq_dir"] = str(settings.hq_sets[name])
    return out


def validate_params(params: dict) -> dict:
    """Engine parameters of a new job: every field typed and bounded (`check_params`), then accepted by AdaptConfig
    itself. Raises ServiceError 422."""
    settings = get_settings()
    check_params(params, settings)
    try:
        AdaptConfig.from_dict(engine_params(params, settings))
    except (TypeError, ValueError) as exc:
        raise ServiceError(422, "bad_params", f"invalid engine parameters: {exc}") from None
    return params
