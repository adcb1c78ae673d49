"""Synthetic degradations for blind face restoration.

The standard pipeline of blind face restoration training (GFPGAN, CodeFormer, DifFace):

    y = [ ((x * k_sigma) downsample_r) + n_delta ]_JPEG_q  upsample_r

1. colour cast (off by default; used by the target-domain preset) — a per-channel gain on the clean
   image, i.e. a wrong white balance;
2. blur with an isotropic or anisotropic Gaussian kernel of random sigma(s) and angle;
3. downsample by a random factor r (random interpolation);
4. noise: additive Gaussian (sigma in [0, 1] image units, colour or gray) and/or Poisson shot noise
   (photon count at white ``peak``), optionally spatially correlated (demosaic-like chroma blotches);
5. JPEG compression with a random quality;
6. upsample back to the input size.

All randomness comes from the ``np.random.Generator`` passed in, so the same seed gives the same
output bit for bit. :func:`sample_degradation` draws the random choices (a plain dict, loggable) and
:func:`apply_degradation` applies them; :func:`degrade` does both.

Size scaling: the ranges of ``DegradationParams`` are meant for ``reference_size`` (512) faces. With
``scale_with_size`` (default) an image of shorter side S uses blur sigmas multiplied by S/512 and
downsample factors ``max(1, r * S/512)``: a 128 face is treated like a 512 face that was already
reduced 4x, so its low-resolution stage keeps the absolute size range of the 512 case (down to about
43 px) instead of collapsing to a few pixels. See :meth:`DegradationParams.scaled_for`.

Presets (:data:`PRESETS`): :data:`DEFAULT` (the training distribution of the base restorer) and three
"target domains" the base model never saw: :data:`DOMAIN_SHIFT` (strong signal-dependent, spatially
correlated colour sensor noise, a warm colour cast and heavy JPEG), :data:`CAMERA` (a cheap camera:
3-4x resolution loss, low-light colour noise, cool cast, JPEG) and :data:`SCAN` (a scanned album print:
sepia fade, soft optics, film grain).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import cv2
import numpy as np
import torch

__all__ = [
    "DegradationParams",
    "DEFAULT",
    "DOMAIN_SHIFT",
    "CAMERA",
    "SCAN",
    "PRESETS",
    "gaussian_kernel",
    "sample_degradation",
    "apply_degradation",
    "degrade",
    "degrade_batch",
    "domain_shift_params",
]

_INTERP = {
    "nearest": cv2.INTER_NEAREST,
    "area": cv2.INTER_AREA,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
}

Range = tuple[float, float]


@dataclass(frozen=True)
class DegradationParams:
    """Ranges and probabilities of the degradation pipeline (image values in [0, 1]).

    A range ``(lo, hi)`` is sampled uniformly; ``lo == hi`` fixes the value.
    """

    # colour cast: per-channel RGB gains (1 = none), jittered by a normal of std `color_cast_jitter`
    color_cast_prob: float = 0.0
    color_cast_gains: tuple[float, float, float] = (1.0, 1.0, 1.0)
    color_cast_jitter: float = 0.0

    # blur
    blur_prob: float = 1.0
    kernel_types: tuple[str, ...] = ("iso", "aniso")
    kernel_probs: tuple[float, ...] = (0.5, 0.5)
    blur_sigma: Range = (0.1, 10.0)
    kernel_size: int = 41  # maximum kernel size (odd); smaller kernels are used for small sigmas

    # downsampling
    downsample_prob: float = 1.0
    downsample: Range = (1.0, 12.0)
    down_interpolations: tuple[str, ...] = ("area", "bilinear", "bicubic")
    up_interpolation: str = "bilinear"

    # noise
    noise_prob: float = 1.0
    noise_sigma: Range = (0.0, 15.0 / 255.0)
    poisson_prob: float = 0.0
    poisson_peak: Range = (30.0, 300.0)  # photon count at white: lower = noisier
    gray_noise_prob: float = 0.0
    noise_correlation: Range = (0.0, 0.0)  # Gaussian sigma (LR pixels) blurring the noise field

    # JPEG
    jpeg_prob: float = 1.0
    jpeg_quality: Range = (30.0, 90.0)

    # size scaling of blur and downsampling ranges
    scale_with_size: bool = True
    reference_size: int = 512

    def __post_init__(self) -> None:
        for name in ("color_cast_prob", "blur_prob", "downsample_prob", "noise_prob", "poisson_prob",
                     "gray_noise_prob", "jpeg_prob"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {p}")
        for name in ("blur_sigma", "downsample", "noise_sigma", "poisson_peak", "noise_correlation", "jpeg_quality"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"{name} range is reversed: {(lo, hi)}")
        if self.blur_sigma[0] <= 0:
            raise ValueError("blur_sigma must be positive")
        if self.downsample[0] < 1.0:
            raise ValueError("downsample factors must be >= 1")
        if self.noise_sigma[0] < 0 or self.noise_correlation[0] < 0:
            raise ValueError("noise_sigma and noise_correlation must be >= 0")
        if self.poisson_peak[0] <= 0:
            raise ValueError("poisson_peak must be positive")
        if not 1 <= self.jpeg_quality[0] <= self.jpeg_quality[1] <= 100:
            raise ValueError("jpeg_quality must lie in [1, 100]")
        if len(self.kernel_types) != len(self.kernel_probs) or not self.kernel_types:
            raise ValueError("kernel_types and kernel_probs must have the same, non-zero length")
        if any(k not in ("iso", "aniso") for k in self.kernel_types):
            raise ValueError("kernel_types are 'iso' or 'aniso'")
        if any(p < 0 for p in self.kernel_probs) or sum(self.kernel_probs) <= 0:
            raise ValueError("kernel_probs must be non-negative and not all zero")
        if self.kernel_size < 3 or self.kernel_size % 2 == 0:
            raise ValueError("kernel_size must be odd and >= 3")
        for name in (*self.down_interpolations, self.up_interpolation):
            if name not in _INTERP:
                raise ValueError(f"unknown interpolation {name!r}; use {sorted(_INTERP)}")
        if not self.down_interpolations:
            raise ValueError("down_interpolations must not be empty")
        if self.reference_size <= 0:
            raise ValueError("reference_size must be positive")

    def scaled_for(self, size: int) -> "DegradationParams":
        """These parameters for an image of shorter side ``size`` (see the module doc).

        Blur sigmas scale with ``size / reference_size`` and downsample factors become
        ``max(1, r * size / reference_size)``; the kernel size limit scales along (kept odd, >= 3).
        Returns ``self`` unchanged when ``scale_with_size`` is off or ``size == reference_size``.
        """
        if not self.scale_with_size or size == self.reference_size:
            return self
        f = float(size) / float(self.reference_size)
        sig = (max(1e-3, self.blur_sigma[0] * f), max(1e-3, self.blur_sigma[1] * f))
        down = (max(1.0, self.downsample[0] * f), max(1.0, self.downsample[1] * f))
        ks = max(3, int(round(self.kernel_size * f)))
        ks += 1 - ks % 2
        return replace(self, blur_sigma=sig, downsample=down, kernel_size=ks, scale_with_size=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DegradationParams":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown degradation parameters: {sorted(unknown)}")
        conv = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**conv)


def domain_shift_params(
    noise: float = 1.0, cast: tuple[float, float, float] = (1.12, 1.0, 0.80), jpeg: Range = (10.0, 25.0)
) -> DegradationParams:
    """A "target domain" degradation that the default training distribution does not contain.

    Strong sensor-like colour noise (signal-dependent Poisson shot noise with a low photon count plus
    Gaussian read noise, spatially correlated like demosaiced noise; about 0.06-0.09 std at mid grey,
    against the training distribution's white Gaussian noise), a colour cast (default warm: more red,
    less blue) and heavy JPEG (quality below the training range), on top of mild blur and 1.5-2.5x
    downsampling. ``noise`` scales the noise standard deviation.
    """
    return DegradationParams(
        color_cast_prob=1.0,
        color_cast_gains=tuple(float(c) for c in cast),  # type: ignore[arg-type]
        color_cast_jitter=0.02,
        blur_prob=1.0,
        blur_sigma=(0.5, 1.5),
        downsample_prob=1.0,
        downsample=(1.5, 2.5),
        noise_prob=1.0,
        noise_sigma=(noise * 6.0 / 255.0, noise * 12.0 / 255.0),
        poisson_prob=1.0,
        # shot noise std at mid grey: sqrt(0.5 / peak) = 0.05..0.08 for noise=1
        poisson_peak=(80.0 / max(noise, 1e-3) ** 2, 200.0 / max(noise, 1e-3) ** 2),
        gray_noise_prob=0.0,
        noise_correlation=(0.6, 1.0),
        jpeg_prob=1.0,
        jpeg_quality=jpeg,
    )


#: the base restorer's training distribution
DEFAULT = DegradationParams()
#: the target domain used by the adaptation benchmark
DOMAIN_SHIFT = domain_shift_params()

#: Unseen-domain presets of the adaptation benchmark, defined for faces of ``reference_size`` 128 px (the size
#: users send; scaled like every preset for other sizes). Neither is part of the base restorer's training
#: distribution: their noise is signal-dependent and/or spatially correlated, their colour is shifted and their
#: resolution loss is fixed and strong.
#:
#: ``camera``: a cheap surveillance / webcam sensor: 3-4x resolution loss (area or bilinear), mild lens blur,
#: low-light shot noise (photon count 40-120 at white) plus read noise, demosaic-correlated colour blotches, a cool
#: colour cast and JPEG 20-40.
CAMERA = DegradationParams(
    color_cast_prob=1.0, color_cast_gains=(0.92, 1.0, 1.12), color_cast_jitter=0.03,
    blur_prob=1.0, kernel_types=("iso",), kernel_probs=(1.0,), blur_sigma=(0.6, 1.2), kernel_size=9,
    downsample_prob=1.0, downsample=(3.0, 4.0), down_interpolations=("area", "bilinear"),
    noise_prob=1.0, noise_sigma=(4.0 / 255.0, 10.0 / 255.0), poisson_prob=1.0, poisson_peak=(40.0, 120.0),
    gray_noise_prob=0.0, noise_correlation=(0.3, 0.6), jpeg_prob=1.0, jpeg_quality=(20.0, 40.0),
    reference_size=128,
)
#: ``scan``: a scanned print from an old album: a faded warm/sepia cast, soft optics (anisotropic blur), 1.5-2x
#: resolution loss, coarse luminance film grain (correlated, the same on every channel) and mild JPEG 50-75.
SCAN = DegradationParams(
    color_cast_prob=1.0, color_cast_gains=(1.10, 0.98, 0.78), color_cast_jitter=0.03,
    blur_prob=1.0, kernel_types=("aniso",), kernel_probs=(1.0,), blur_sigma=(1.0, 2.0), kernel_size=15,
    downsample_prob=1.0, downsample=(1.5, 2.0), down_interpolations=("bicubic", "area"),
    noise_prob=1.0, noise_sigma=(10.0 / 255.0, 18.0 / 255.0), poisson_prob=0.0, gray_noise_prob=1.0,
    noise_correlation=(0.8, 1.3), jpeg_prob=1.0, jpeg_quality=(50.0, 75.0),
    reference_size=128,
)
PRESETS: dict[str, DegradationParams] = {"default": DEFAULT, "domain_shift": DOMAIN_SHIFT, "camera": CAMERA,
                                         "scan": SCAN}


# ------------------------------------------------------------------------------ kernels
def gaussian_kernel(size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0) -> np.ndarray:
    """A normalised (anisotropic) Gaussian kernel, ``size`` x ``size`` (odd), rotated by ``theta`` radians."""
    if size % 2 == 0 or size < 1:
        raise ValueError("kernel size must be odd and positive")
    sigma_y = sigma_x if sigma_y is None else sigma_y
    r = size // 2
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float64)
    c, s = math.cos(theta), math.sin(theta)
    u = c * xx + s * yy  # coordinates along the kernel's principal axes
    v = -s * xx + c * yy
    k = np.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
    return (k / k.sum()).astype(np.float32)


def _kernel_size_for(sigma: float, limit: int) -> int:
    ks = 2 * int(math.ceil(3.0 * sigma)) + 1
    return max(3, min(ks, limit if limit % 2 else limit - 1))


def _u(rng: np.random.Generator, rg: Range) -> float:
    lo, hi = float(rg[0]), float(rg[1])
    return lo if hi <= lo else float(rng.uniform(lo, hi))


# ------------------------------------------------------------------------------ pipeline
def sample_degradation(params: DegradationParams, rng: np.random.Generator, shape: Sequence[int]) -> dict[str, Any]:
    """Draw every random choice of one degradation of an image of ``shape`` (H, W[, C]).

    The draws are made in a fixed order, each whether or not its step is enabled, so that changing one
    probability does not reshuffle the other steps' values for the same seed.
    """
    h, w = int(shape[0]), int(shape[1])
    p = params.scaled_for(min(h, w))
    d: dict[str, Any] = {"size": [h, w]}

    # colour cast
    use_cast = rng.random() < p.color_cast_prob
    gains = np.asarray(p.color_cast_gains, np.float64) + rng.normal(0.0, 1.0, 3) * p.color_cast_jitter
    d["color_cast"] = [float(g) for g in np.clip(gains, 0.2, 3.0)] if use_cast else None

    # blur
    use_blur = rng.random() < p.blur_prob
    probs = np.asarray(p.kernel_probs, np.float64)
    ktype = p.kernel_types[int(rng.choice(len(probs), p=probs / probs.sum()))]
    sx = _u(rng, p.blur_sigma)
    sy = _u(rng, p.blur_sigma)
    theta = float(rng.uniform(-math.pi, math.pi))
    if use_blur:
        if ktype == "iso":
            sy, theta = sx, 0.0
        d["blur"] = {"type": ktype, "sigma_x": sx, "sigma_y": sy, "theta": theta,
                     "size": _kernel_size_for(max(sx, sy), p.kernel_size)}
    else:
        d["blur"] = None

    # downsampling
    use_down = rng.random() < p.downsample_prob
    factor = _u(rng, p.downsample)
    down_interp = p.down_interpolations[int(rng.integers(len(p.down_interpolations)))]
    if use_down and factor > 1.0:
        lh, lw = max(1, int(round(h / factor))), max(1, int(round(w / factor)))
        d["downsample"] = {"factor": factor, "size": [lh, lw], "interp": down_interp}
    else:
        lh, lw = h, w
        d["downsample"] = None

    # noise
    use_noise = rng.random() < p.noise_prob
    sigma = _u(rng, p.noise_sigma)
    use_poisson = rng.random() < p.poisson_prob
    peak = _u(rng, p.poisson_peak)
    gray = bool(rng.random() < p.gray_noise_prob)
    corr = _u(rng, p.noise_correlation)
    noise_seed = int(rng.integers(0, 2**63 - 1))
    d["noise"] = (
        {"sigma": sigma if use_noise else 0.0, "poisson_peak": peak if use_poisson else None,
         "gray": gray, "correlation": corr, "seed": noise_seed}
        if (use_noise and sigma > 0) or use_poisson
        else None
    )

    # JPEG
    use_jpeg = rng.random() < p.jpeg_prob
    q = int(round(_u(rng, p.jpeg_quality)))
    d["jpeg"] = {"quality": q} if use_jpeg else None

    d["up_interp"] = p.up_interpolation
    return d


def _correlate(noise: np.ndarray, sigma: float) -> np.ndarray:
    """Blur a zero-mean white noise field with a Gaussian, keeping its standard deviation."""
    if sigma <= 0:
        return noise
    r = max(1, int(math.ceil(3.0 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1, dtype=np.float64) / sigma) ** 2)
    k /= k.sum()
    # separable blur of white noise: the variance is multiplied by (sum k^2)^2, the std by sum k^2
    gain = 1.0 / float((k**2).sum())
    k32 = (k * math.sqrt(gain)).astype(np.float32)  # half of the gain on each pass
    out = cv2.sepFilter2D(np.ascontiguousarray(noise, dtype=np.float32), -1, k32, k32,
                          borderType=cv2.BORDER_REFLECT_101)
    return out.reshape(noise.shape)


def _add_noise(img: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    rng = np.random.default_rng(spec["seed"])
    h, w, c = img.shape
    nch = 1 if spec["gray"] else c
    out = img
    if spec.get("poisson_peak"):
        peak = float(spec["poisson_peak"])
        clean = np.clip(out, 0.0, 1.0)
        if spec["gray"]:  # shot noise on luminance, the same on every channel
            lum = clean @ np.array([0.299, 0.587, 0.114], np.float32)
            shot = (rng.poisson(lum * peak) / peak - lum).astype(np.float32)[..., None]
        else:
            shot = (rng.poisson(clean * peak) / peak - clean).astype(np.float32)
        out = out + _correlate(shot, spec["correlation"])
    if spec["sigma"] > 0:
        g = rng.standard_normal((h, w, nch)).astype(np.float32) * np.float32(spec["sigma"])
        g = _correlate(g, spec["correlation"])
        out = out + g
    return out


def _jpeg(img: np.ndarray, quality: int) -> np.ndarray:
    u8 = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(u8[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    dec = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return dec[..., ::-1].astype(np.float32) / 255.0


def apply_degradation(img: np.ndarray, d: dict[str, Any]) -> np.ndarray:
    """Apply a degradation drawn by :func:`sample_degradation` to an HxWx3 float image in [0, 1]."""
    x = _as_float_image(img)
    h, w = x.shape[:2]
    if [h, w] != list(d["size"]):
        raise ValueError(f"degradation was sampled for {d['size']}, image is {[h, w]}")
    if d.get("color_cast"):
        x = x * np.asarray(d["color_cast"], np.float32)
        x = np.clip(x, 0.0, 1.0)
    if d.get("blur"):
        b = d["blur"]
        k = gaussian_kernel(b["size"], b["sigma_x"], b["sigma_y"], b["theta"])
        x = cv2.filter2D(x, -1, k, borderType=cv2.BORDER_REFLECT_101)
    if d.get("downsample"):
        lh, lw = d["downsample"]["size"]
        x = cv2.resize(x, (lw, lh), interpolation=_INTERP[d["downsample"]["interp"]])
        if x.ndim == 2:
            x = x[..., None]
    if d.get("noise"):
        x = _add_noise(x, d["noise"])
    x = np.clip(x, 0.0, 1.0)
    if d.get("jpeg"):
        x = _jpeg(x, d["jpeg"]["quality"])
    if x.shape[:2] != (h, w):
        x = cv2.resize(x, (w, h), interpolation=_INTERP[d["up_interp"]])
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def _as_float_image(img: np.ndarray) -> np.ndarray:
    x = np.asarray(img)
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {x.shape}")
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 255.0
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"expected a float image in [0, 1] (or uint8), got {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def degrade(
    img: np.ndarray,
    params: DegradationParams = DEFAULT,
    rng: np.random.Generator | int | None = None,
    return_info: bool = False,
):
    """Degrade an HxWx3 float RGB image in [0, 1] (uint8 accepted); returns float32 of the same shape.

    ``rng``: a ``np.random.Generator`` (or an int seed); the same seed gives the same output. ``params`` may also be
    another damage model with an ``apply(img, rng)`` method (:class:`restoration.degrade.broad.BroadDamage`).
    ``return_info=True`` returns ``(out, info)`` where ``info`` holds the drawn values.
    """
    if rng is None:
        rng = np.random.default_rng()
    elif not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    x = _as_float_image(img)
    if not isinstance(params, DegradationParams):  # another damage model (restoration.degrade.broad): its own draws
        if return_info:
            raise ValueError("return_info is for DegradationParams only")
        return params.apply(x, rng)
    info = sample_degradation(params, rng, x.shape)
    out = apply_degradation(x, info)
    return (out, info) if return_info else out


def degrade_batch(hq, params: DegradationParams = DEFAULT, rng: np.random.Generator | int | None = None):
    """Make (lq, hq) training pairs as float32 torch tensors Bx3xHxW in [0, 1]: :func:`degrade` on each image in
    turn, all drawing from the one ``rng`` (the restorer trainer's damage).

    ``hq``: a Bx3xHxW tensor in [0, 1], or a sequence of HxWx3 arrays (float [0, 1] or uint8).
    """
    if rng is None or not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    if isinstance(hq, torch.Tensor):
        if hq.ndim != 4 or hq.shape[1] != 3:
            raise ValueError(f"expected a Bx3xHxW tensor, got {tuple(hq.shape)}")
        imgs = [t.detach().float().cpu().permute(1, 2, 0).numpy() for t in hq]
    else:
        imgs = [_as_float_image(a) for a in hq]
    lqs = [degrade(a, params, rng) for a in imgs]
    to_t = lambda arrs: torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous().float()  # noqa: E731
    return to_t(lqs), to_t([np.clip(a, 0.0, 1.0) for a in imgs])
