"""The models an adaptation stage loads: the zoo, the device, the prior, the adapted weights, the base's value range."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from restoration.adaptation.config import AdaptConfig
from restoration.adaptation.workdir import MODEL
from restoration.diffusion.prior import IDDPMPrior
from restoration.models.archs.codeformer import CodeFormer
from restoration.models.zoo import ModelNotFound, Zoo, instantiate
from restoration.runtime import resolve_device

__all__ = ["zoo_or_default", "job_device", "load_prior", "load_adapted", "base_value_range", "is_codeformer"]


def zoo_or_default(zoo: Zoo | None) -> Zoo:
    """`zoo`, or the settings' zoo when None."""
    return zoo if zoo is not None else Zoo()


def job_device(device: str | None, config: AdaptConfig | None = None) -> torch.device:
    """`device`, else the job config's, resolved (`restoration.runtime.resolve_device`)."""
    return resolve_device(device or (config.device if config else None))


def load_prior(zoo: Zoo | None, name: str, device, respacing: str | None = None) -> IDDPMPrior:
    """A `restoration.diffusion.prior.IDDPMPrior` for the zoo prior `name`; `respacing` (the pseudo-target parameter)
    overrides the sampler respacing of the card's `extra.diffusion`."""
    return IDDPMPrior.from_zoo(name, zoo=zoo_or_default(zoo), device=device, respacing=respacing)


def load_adapted(workdir: str | Path, job: dict, zoo: Zoo | None, device) -> torch.nn.Module:
    """The fine-tuned EMA weights of the work dir in the base model's arch."""
    c = zoo_or_default(zoo).config(job["base"])
    sd = load_file(str(Path(workdir) / MODEL))
    return instantiate(c["arch"], c["config"], sd, name="adapted").to(device)


def base_value_range(zoo: Zoo | None, job: dict) -> list[float] | None:
    """The base restorer card's value_range (the range the model works in; the adapted model keeps it), None when the
    base is not in the zoo (`restoration.models.io.run_restorer` then uses the arch's own `value_range` attribute)."""
    try:
        return [float(v) for v in zoo_or_default(zoo).get(job["base"]).value_range]
    except ModelNotFound:
        return None


def is_codeformer(model) -> bool:
    return isinstance(model, CodeFormer)
