"""What an adaptation job must satisfy before any work starts; the CLI (`run_adaptation`) and the API both call it.

`check_job(zoo, base, prior, config, name=...)` raises `restoration.models.zoo.ModelNotFound` (a `ZooError` and a
`KeyError`) for a model the zoo does not hold and `ValueError` for everything else, with the messages the CLI has
always printed; it returns the side of the job's face crops. `check_cards` is the same rule on model cards already
read (a service that keeps its cards elsewhere than in a `Zoo`). `check_min_images` refuses a set too small to
adapt to (`MIN_IMAGES`), before any work.
"""
from __future__ import annotations

from restoration.adaptation.config import AdaptConfig, crop_size
from restoration.models.zoo import ModelNotFound
from restoration.settings import get_settings

__all__ = ["FIXED_SIZE_ARCHS", "MAX_SIZE_FACTOR", "MIN_IMAGES", "min_images", "check_min_images", "check_cards", "check_job"]

#: The fewest images an adaptation takes by default (the setting FACEADAPT_MIN_ADAPT_IMAGES), measured with
#: bench/adaptation.py (docs/ADAPTATION.md): from 8 face crops the default job beat the base on held-out faces of two
#: unseen damages by 1.6 dB or more, with at least 2 faces held out; 4 gained nothing on one of them, 6 gained but
#: left a single held-out face to judge by; issue 20's 3-image run was refused by the gate after 6.5 min.
MIN_IMAGES = 8

#: restorer archs that take one input size only (the base card's input_size): GFPGAN (out_size), CodeFormer (img_size)
FIXED_SIZE_ARCHS = ("gfpgan_v1_4", "codeformer")
#: a size-flexible base takes crops of at most this many times its card's input_size (memory grows with the square)
MAX_SIZE_FACTOR = 2


def _check_kind(card, kind: str, label: str) -> None:
    if card.kind != kind:
        raise ValueError(f"{label} is a {card.kind}, not a {kind}")


def _check_size(base_card, config: AdaptConfig, label: str) -> int:
    size = crop_size(config, base_card)
    if base_card.arch in FIXED_SIZE_ARCHS and size != int(base_card.input_size):
        raise ValueError(f"{label} ({base_card.arch}) takes {base_card.input_size}x{base_card.input_size} faces only, "
                         f"not {size}x{size}: leave size unset")
    limit = MAX_SIZE_FACTOR * int(base_card.input_size)
    if size > limit:
        raise ValueError(f"size {size} is too large for {label} (input size {base_card.input_size}): at most "
                         f"{limit} ({MAX_SIZE_FACTOR}x the model's input size); leave size unset to use "
                         f"{base_card.input_size}")
    return size


def min_images() -> int:
    """The fewest images an adaptation takes: the setting `min_adapt_images` (default `MIN_IMAGES`)."""
    return int(get_settings().min_adapt_images)


def check_min_images(count: int, minimum: int | None = None) -> None:
    """Refuse (ValueError, with the numbers) a set of `count` images below `minimum` (None: `min_images()`)."""
    minimum = min_images() if minimum is None else int(minimum)
    if count < minimum:
        raise ValueError(f"{count} image{'s' if count != 1 else ''}: too few to adapt to; at least "
                         f"{minimum} are needed (with fewer, adaptation was measured not to beat the base model on "
                         f"held-out faces: docs/ADAPTATION.md)")


def check_cards(base_card, prior_card, config: AdaptConfig) -> int:
    """The model kinds and the input size: `base_card` must be a restorer, `prior_card` (None when
    `config.use_prior` is off) a prior, a fixed-size base (`FIXED_SIZE_ARCHS`) takes only its own input size and
    any other at most `MAX_SIZE_FACTOR` times it.
    Returns the crop side (`crop_size`). Raises ValueError."""
    _check_kind(base_card, "restorer", base_card.name)
    if config.use_prior:
        _check_kind(prior_card, "prior", prior_card.name)
    return _check_size(base_card, config, base_card.name)


def check_job(zoo, base: str, prior: str | None, config: AdaptConfig, *, name: str | None = None,
              overwrite: bool = False) -> int:
    """What `check_cards` checks, on the zoo's cards of `base` and (when `config.use_prior`) `prior`, and, given the
    `name` the adapted model will be registered under, that the zoo has no model of that name (unless `overwrite`).
    Returns the crop side. Raises ModelNotFound (unknown base or prior) or ValueError, in this order: base, prior,
    name, size."""
    base_card = zoo.get(base)
    _check_kind(base_card, "restorer", base)
    if config.use_prior:
        _check_kind(zoo.get(prior), "prior", prior)
    if name is not None and not overwrite:
        try:
            zoo.get(name)
        except ModelNotFound:
            pass
        else:
            raise ValueError(f"a model named {name!r} already exists in the zoo; choose another name or overwrite")
    return _check_size(base_card, config, base)
