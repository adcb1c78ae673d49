"""A broader damage model than :mod:`restoration.degrade.damage`'s one pass, for training a restorer that meets damage
it has not seen: two rounds of blur, resize, noise and JPEG, each round's steps in a random order, plus colour
(chroma) noise and ringing, with every *damage type* named so that some can be held out of training and tested alone.

Damage types (:data:`DAMAGE_TYPES`); each round draws one blur, one resize, one noise and JPEG, in a shuffled order:

* blur: ``gaussian_blur`` (isotropic or anisotropic Gaussian), ``motion_blur`` (a straight motion streak),
  ``ringing`` (a 2-D windowed-sinc low-pass: the overshoot halos of over-sharpened or band-limited images);
* resize: ``resize`` (down by a random factor, area / bilinear / bicubic), ``pixelate`` (down with nearest
  neighbour: blocky aliasing);
* noise: ``gaussian_noise`` (white, colour or gray), ``color_noise`` (chroma only, spatially correlated blotches: a
  phone's night mode), ``shot_noise`` (signal-dependent Poisson noise of a low photon count: a dark sensor);
* ``jpeg`` (random quality).

A type in ``holdout`` is never drawn (its siblings are drawn instead; a held-out ``jpeg`` is skipped); a type in
``force`` is used in the first round whenever its step comes (how a held-out type is tested). The second round is
milder and happens with probability ``second_round_prob``. Strengths are given for ``reference_size`` (128 px) faces
and scale with the image's side like :meth:`DegradationParams.scaled_for` (blur widths and resize factors).

All randomness comes from the generator passed in: the same seed gives the same output bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from restoration.degrade.damage import DEFAULT, _as_float_image, _correlate, _jpeg, degrade, gaussian_kernel

__all__ = ["DAMAGE_TYPES", "BroadDamage", "DamageMix", "HELD_OUT", "motion_kernel", "sinc_kernel", "broad_mix"]

BLURS = ("gaussian_blur", "motion_blur", "ringing")
RESIZES = ("resize", "pixelate")
NOISES = ("gaussian_noise", "color_noise", "shot_noise")
DAMAGE_TYPES = BLURS + RESIZES + NOISES + ("jpeg",)
#: the two types the bundled restorer's broad training holds out (docs/MODELS.md reports them alone)
HELD_OUT = ("motion_blur", "shot_noise")

_DOWN = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}


def motion_kernel(length: float, angle: float, size: int) -> np.ndarray:
    """A normalised straight motion streak of ``length`` px at ``angle`` radians in a ``size`` x ``size`` kernel
    (drawn anti-aliased on a 4x canvas, then area-reduced)."""
    s4 = size * 4
    canvas = np.zeros((s4, s4), np.float32)
    c = (s4 - 1) / 2.0
    dx, dy = 2.0 * length * math.cos(angle), 2.0 * length * math.sin(angle)
    p0 = (int(round(c - dx)), int(round(c - dy)))
    p1 = (int(round(c + dx)), int(round(c + dy)))
    cv2.line(canvas, p0, p1, 1.0, thickness=4, lineType=cv2.LINE_AA)
    k = cv2.resize(canvas, (size, size), interpolation=cv2.INTER_AREA)
    return (k / max(float(k.sum()), 1e-8)).astype(np.float32)


def sinc_kernel(cutoff: float, size: int) -> np.ndarray:
    """A normalised circular low-pass of ``cutoff`` (radians per pixel, pi = no filtering) in a ``size`` x ``size``
    kernel, Hann-windowed: its side lobes ring around edges."""
    r = size // 2
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float64)
    d = np.hypot(xx, yy)
    # the 2-D ideal low-pass (cutoff * J1(cutoff d) / (2 pi d)), approximated by a radial sinc, then windowed
    k = np.sinc(cutoff * d / math.pi) * (0.5 + 0.5 * np.cos(np.pi * np.clip(d / (r + 1), 0, 1)))
    return (k / k.sum()).astype(np.float32)


@dataclass(frozen=True)
class BroadDamage:
    """The broad damage model (module doc). ``holdout``: types never drawn; ``force``: types always used in the first
    round; strengths for ``reference_size`` faces."""

    holdout: tuple[str, ...] = ()
    force: tuple[str, ...] = ()
    second_round_prob: float = 0.7
    blur_sigma: tuple[float, float] = (0.3, 2.5)
    motion_length: tuple[float, float] = (2.0, 7.0)
    ringing_cutoff: tuple[float, float] = (math.pi / 3, math.pi / 1.5)
    down: tuple[float, float] = (1.0, 3.0)
    noise_sigma: tuple[float, float] = (1.0 / 255, 18.0 / 255)
    color_noise_sigma: tuple[float, float] = (4.0 / 255, 16.0 / 255)
    shot_peak: tuple[float, float] = (25.0, 120.0)
    jpeg_quality: tuple[float, float] = (25.0, 90.0)
    reference_size: int = 128
    final_up: str | None = None  # the last resize back to the input's size: None draws bilinear or bicubic

    def __post_init__(self) -> None:
        for name in (*self.holdout, *self.force):
            if name not in DAMAGE_TYPES:
                raise ValueError(f"unknown damage type {name!r}; use {', '.join(DAMAGE_TYPES)}")
        if self.final_up not in (None, "bilinear", "bicubic"):
            raise ValueError(f"final_up is None, 'bilinear' or 'bicubic', not {self.final_up!r}")
        if set(self.holdout) & set(self.force):
            raise ValueError("a damage type cannot be both held out and forced")
        for group in (BLURS, RESIZES, NOISES):
            if all(t in self.holdout for t in group):
                raise ValueError(f"holdout leaves no type of {', '.join(group)}")
        if any(sum(t in self.force for t in group) > 1 for group in (BLURS, RESIZES, NOISES)):
            raise ValueError("force at most one type of each step (blur, resize, noise)")

    # ------------------------------------------------------------------------------------------------ drawing
    def _pick(self, rng: np.random.Generator, group: tuple[str, ...], first: bool) -> str:
        forced = [t for t in group if t in self.force]
        choices = [t for t in group if t not in self.holdout]
        draw = choices[int(rng.integers(len(choices)))]  # drawn always: forcing does not reshuffle other draws
        return forced[0] if first and forced else draw

    def apply(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The damaged image (float32 HxWx3 in [0, 1], the input's size) of an HxWx3 image (float [0, 1] or uint8)."""
        x = _as_float_image(img)
        h, w = x.shape[:2]
        f = min(h, w) / float(self.reference_size)
        for rnd in range(2):
            first = rnd == 0
            mild = 1.0 if first else 0.5
            if not first and rng.random() >= self.second_round_prob:
                break
            steps = ["blur", "resize", "noise", "jpeg"]
            rng.shuffle(steps)
            for step in steps:
                if step == "blur":
                    x = self._blur(x, rng, self._pick(rng, BLURS, first), f, mild)
                elif step == "resize":
                    x = self._resize(x, rng, self._pick(rng, RESIZES, first), f, mild, (h, w))
                elif step == "noise":
                    x = self._noise(x, rng, self._pick(rng, NOISES, first), mild)
                else:
                    q = rng.uniform(*self.jpeg_quality) + (0 if first else 10)
                    if "jpeg" not in self.holdout:
                        x = _jpeg(np.clip(x, 0, 1), int(round(min(q, 95))))
                x = np.clip(x, 0.0, 1.0)
        up = "bilinear" if rng.random() < 0.5 else "bicubic"  # drawn always: a fixed final_up reshuffles nothing
        up = self.final_up or up
        if x.shape[:2] != (h, w):
            x = cv2.resize(x, (w, h), interpolation=cv2.INTER_LINEAR if up == "bilinear" else cv2.INTER_CUBIC)
        return np.clip(x, 0.0, 1.0).astype(np.float32)

    def _blur(self, x: np.ndarray, rng: np.random.Generator, kind: str, f: float, mild: float) -> np.ndarray:
        s = max(0.2, rng.uniform(*self.blur_sigma) * f * mild)
        s2 = max(0.2, rng.uniform(*self.blur_sigma) * f * mild)
        angle = float(rng.uniform(-math.pi, math.pi))
        length = max(1.0, rng.uniform(*self.motion_length) * f * mild)
        cutoff = float(rng.uniform(*self.ringing_cutoff))
        cutoff += (math.pi - cutoff) * (1.0 - mild)  # the second round's low-pass is milder
        if kind == "gaussian_blur":
            sy = s if rng.random() < 0.5 else s2
            k = gaussian_kernel(2 * int(math.ceil(3 * max(s, sy))) + 1, s, sy, angle)
        elif kind == "motion_blur":
            k = motion_kernel(length, angle, 2 * int(math.ceil(length / 2)) + 3)
        else:
            k = sinc_kernel(cutoff, 2 * int(round(3 + 4 * f)) + 1)
        return cv2.filter2D(x, -1, k, borderType=cv2.BORDER_REFLECT_101)

    def _resize(self, x: np.ndarray, rng: np.random.Generator, kind: str, f: float, mild: float,
                size: tuple[int, int]) -> np.ndarray:
        r = max(1.0, rng.uniform(*self.down) * f)
        r = 1.0 + (r - 1.0) * mild
        interp = ("area", "bilinear", "bicubic")[int(rng.integers(3))]
        h, w = size
        lh, lw = max(8, int(round(h / r))), max(8, int(round(w / r)))
        if (lh, lw) == x.shape[:2]:
            return x
        if kind == "pixelate":
            return cv2.resize(x, (lw, lh), interpolation=cv2.INTER_NEAREST)
        shrink = lw < x.shape[1]
        return cv2.resize(x, (lw, lh), interpolation=_DOWN[interp] if shrink else cv2.INTER_CUBIC)

    def _noise(self, x: np.ndarray, rng: np.random.Generator, kind: str, mild: float) -> np.ndarray:
        sigma = rng.uniform(*self.noise_sigma) * mild
        csigma = rng.uniform(*self.color_noise_sigma) * mild
        peak = rng.uniform(*self.shot_peak) / mild
        corr = float(rng.uniform(0.5, 1.5))
        gray = bool(rng.random() < 0.4)
        seed = int(rng.integers(0, 2**63 - 1))
        nrng = np.random.default_rng(seed)
        h, w, _ = x.shape
        if kind == "gaussian_noise":
            n = nrng.standard_normal((h, w, 1 if gray else 3)).astype(np.float32) * np.float32(sigma)
            return x + n
        if kind == "color_noise":  # chroma only: the luma of the noise is removed, then blotched
            n = nrng.standard_normal((h, w, 3)).astype(np.float32) * np.float32(csigma)
            n -= (n @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
            return x + _correlate(n, corr)
        clean = np.clip(x, 0.0, 1.0)
        shot = (nrng.poisson(clean * peak) / peak - clean).astype(np.float32)
        return x + _correlate(shot, corr * 0.5)


@dataclass(frozen=True)
class DamageMix:
    """A mixture of damage models: each image gets ``parts[i]`` with probability ``probs[i]`` (drawn from the one
    generator). Keeps the lighter standard damage in a broad training set, so that mild damage is not treated as
    heavy."""

    parts: tuple
    probs: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.parts or len(self.parts) != len(self.probs) or any(p < 0 for p in self.probs) \
                or sum(self.probs) <= 0:
            raise ValueError("a damage mix needs parts and as many non-negative probabilities, not all zero")

    def apply(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        p = np.asarray(self.probs, np.float64)
        part = self.parts[int(rng.choice(len(p), p=p / p.sum()))]
        return degrade(img, part, rng)


def broad_mix(holdout: tuple[str, ...] = HELD_OUT, standard_prob: float = 0.35) -> DamageMix:
    """The bundled restorer's training damage: the standard one pass (`DEFAULT`) with probability `standard_prob`,
    else the broad model with `holdout` held out."""
    return DamageMix((DEFAULT, BroadDamage(holdout=tuple(holdout))), (standard_prob, 1.0 - standard_prob))
