"""Image quality metrics: PSNR, SSIM (also the differentiable map the training SSIM loss uses), a no-reference
sharpness score and low-pass consistency, and the masked per-face checks of the never-worse rule (`detail_energy`,
`lowpass_consistency`). LPIPS lives in :mod:`restoration.metrics.lpips`.

Inputs are images in [0, 1] unless said otherwise:

* numpy ``HxW``, ``HxWxC`` (uint8 arrays are divided by 255 when ``data_range`` is left at 1.0);
* torch ``CxHxW`` or ``BxCxHxW``. For a batch, :func:`psnr` and :func:`ssim` return the mean of the
  per-image values (``reduction='none'`` gives the per-image tensor).

SSIM follows Wang et al. 2004: an 11x11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, statistics
on the 'valid' part of the image only (no padding), computed on each channel and averaged over the
channels (RGB). ``channel='y'`` computes it on the luma instead, with the ITU-R BT.601 studio-swing Y
(16..235, as the super-resolution literature does), on the same [0, 1] range.

PSNR, SSIM, sharpness and lowpass_psnr are evaluation metrics: they detach their inputs and compute
in float64 on the CPU (no gradients). :func:`ssim_map` is the one SSIM computation under :func:`ssim`: it keeps the
inputs' dtype, device and autograd graph, so that a training loss can use it.
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "psnr",
    "ssim",
    "ssim_map",
    "sharpness",
    "lowpass_psnr",
    "detail_energy",
    "detail_recovered",
    "lowpass_consistency",
    "noise_sigma",
    "noise_detail_energy",
    "removed_structure",
]


# ------------------------------------------------------------------------------ helpers
def _to_bchw(x, data_range: float) -> tuple[torch.Tensor, float]:
    """Any accepted image to a float64 BxCxHxW tensor, and the data range that applies to it."""
    if isinstance(x, torch.Tensor):
        t = x.detach().to(torch.float64).cpu()
        if t.ndim == 2:
            t = t[None, None]
        elif t.ndim == 3:
            t = t[None]
        elif t.ndim != 4:
            raise ValueError(f"expected a CxHxW or BxCxHxW tensor, got shape {tuple(x.shape)}")
        return t, data_range
    a = np.asarray(x)
    if a.dtype == np.uint8 and data_range == 1.0:
        a = a.astype(np.float64) / 255.0
    a = a.astype(np.float64)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected an HxW or HxWxC array, got shape {a.shape}")
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))[None], data_range


def _pair(a, b, data_range: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    ta, r = _to_bchw(a, data_range)
    tb, _ = _to_bchw(b, data_range)
    if ta.shape != tb.shape:
        raise ValueError(f"images differ in shape: {tuple(ta.shape)} vs {tuple(tb.shape)}")
    return ta, tb, r


def _reduce(values: torch.Tensor, reduction: str):
    if reduction == "none":
        return values
    if reduction == "mean":
        return float(values.mean())
    raise ValueError("reduction must be 'mean' or 'none'")


def _to_hwc01(x) -> np.ndarray:
    """A single image as float64 HxWxC in [0, 1] (uint8 divided by 255)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu().to(torch.float64)
        if t.ndim == 4:
            if t.shape[0] != 1:
                raise ValueError("expected a single image, got a batch")
            t = t[0]
        if t.ndim == 3:
            return t.permute(1, 2, 0).numpy()
        return t.numpy()[..., None]
    a = np.asarray(x)
    a = a.astype(np.float64) / 255.0 if a.dtype == np.uint8 else a.astype(np.float64)
    return a[..., None] if a.ndim == 2 else a


# ------------------------------------------------------------------------------ PSNR / SSIM
def psnr(a, b, data_range: float = 1.0, reduction: str = "mean"):
    """Peak signal-to-noise ratio in dB; ``inf`` for identical images."""
    ta, tb, r = _pair(a, b, data_range)
    mse = ((ta - tb) ** 2).flatten(1).mean(1)
    vals = torch.where(mse > 0, 10.0 * torch.log10(r**2 / mse.clamp_min(1e-300)), torch.full_like(mse, math.inf))
    return _reduce(vals, reduction)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(g**2) / (2.0 * sigma**2))
    g = g / g.sum()
    return g


def _rgb_to_y(t: torch.Tensor) -> torch.Tensor:
    if t.shape[1] != 3:
        raise ValueError("channel='y' needs RGB images")
    w = torch.tensor([65.481, 128.553, 24.966], dtype=t.dtype).view(1, 3, 1, 1)
    return (t * w).sum(1, keepdim=True) / 255.0 + 16.0 / 255.0


def ssim_map(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, win_size: int = 11,
             sigma: float = 1.5) -> torch.Tensor:
    """The SSIM map (BxCxH'xW', the 'valid' part) of two BxCxHxW tensors, differentiable, in ``a``'s dtype and device.

    A separable Gaussian window (``win_size``, ``sigma``; built in float64, then cast), constants
    ``(0.01 * data_range) ** 2`` and ``(0.03 * data_range) ** 2``. Its mean is the SSIM of the batch; 1 - its mean is
    the training SSIM loss (`restoration.training.losses.ssim_loss`).
    """
    c = a.shape[1]
    g = _gaussian_window(win_size, sigma).to(dtype=a.dtype, device=a.device)
    kx = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    ky = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def filt(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(x, kx, groups=c), ky, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = filt(a), filt(b)
    saa = filt(a * a) - mu_a**2
    sbb = filt(b * b) - mu_b**2
    sab = filt(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * sab + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2)
    return num / den


def ssim(a, b, data_range: float = 1.0, channel: str = "rgb", win_size: int = 11, sigma: float = 1.5,
         reduction: str = "mean"):
    """Structural similarity (see the module doc); 1.0 for identical images."""
    ta, tb, r = _pair(a, b, data_range)
    if channel == "y":
        if r != 1.0:
            ta, tb, r = ta / r, tb / r, 1.0
        ta, tb = _rgb_to_y(ta), _rgb_to_y(tb)
    elif channel != "rgb":
        raise ValueError("channel must be 'rgb' or 'y'")
    if min(ta.shape[-2:]) < win_size:
        raise ValueError(f"SSIM needs images of at least {win_size}x{win_size}, got {tuple(ta.shape[-2:])}")
    vals = ssim_map(ta, tb, r, win_size, sigma).flatten(1).mean(1)
    return _reduce(vals, reduction)


# ------------------------------------------------------------------------------ no-reference / consistency
def sharpness(img) -> float:
    """Variance of the Laplacian of the luma (image in [0, 1], uint8 accepted); higher = sharper.

    A no-reference score, comparable only between images of the same size and content type.
    """
    a = _to_hwc01(img)
    y = a[..., 0] if a.shape[2] == 1 else a[..., :3] @ np.array([0.299, 0.587, 0.114])
    lap = cv2.Laplacian(np.ascontiguousarray(y, dtype=np.float64), cv2.CV_64F, ksize=1,
                        borderType=cv2.BORDER_REFLECT_101)
    return float(lap.var())


def lowpass_psnr(out, inp, factor: float = 4.0, match_color: bool = False) -> float:
    """PSNR between the low-passed output and the low-passed input (fidelity to the input's content).

    Both images are reduced with area averaging (an anti-aliased low-pass) to the input's size divided
    by ``factor``; the output may be larger than the input (for example an upscaled result). ``match_color``
    first scales each channel of the low-passed output to the input's channel mean, so that a global white-balance
    change (a removed colour cast) does not count as lost content.
    """
    if factor < 1:
        raise ValueError("factor must be >= 1")
    o, i = _to_hwc01(out), _to_hwc01(inp)
    h, w = i.shape[:2]
    size = (max(1, int(round(w / factor))), max(1, int(round(h / factor))))

    def low(x: np.ndarray) -> np.ndarray:
        y = cv2.resize(np.ascontiguousarray(x, dtype=np.float64), size, interpolation=cv2.INTER_AREA)
        return y[..., None] if y.ndim == 2 else y

    lo, li = low(o), low(i)
    if match_color:
        mo = lo.reshape(-1, lo.shape[-1]).mean(0)
        mi = li.reshape(-1, li.shape[-1]).mean(0)
        lo = lo * np.where(mo > 1e-6, mi / np.maximum(mo, 1e-6), 1.0)
    return psnr(lo, li)


# ------------------------------------------------------------------------------ per-face checks (masked, at one scale)
def _luma(a: np.ndarray) -> np.ndarray:
    return a[..., 0] if a.shape[2] == 1 else a[..., :3] @ np.array([0.299, 0.587, 0.114])


def _weights(weight, shape: tuple[int, int]) -> np.ndarray:
    if weight is None:
        return np.ones(shape, np.float64)
    w = np.asarray(weight, np.float64)
    if w.shape != shape:
        raise ValueError(f"weight map of shape {w.shape} for an image of {shape}")
    return w


def _highpass(img, sigma: float) -> np.ndarray:
    """The luma of an image (in [0, 1], uint8 accepted) minus its Gaussian blur of ``sigma`` px: its fine detail."""
    y = _luma(_to_hwc01(img))
    return y - cv2.GaussianBlur(np.ascontiguousarray(y), (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)


def detail_energy(img, sigma: float = 1.0, weight=None) -> float:
    """Fine detail of an image at its own scale: the (``weight``-weighted) mean square of the luma minus its Gaussian
    blur of ``sigma`` px (image in [0, 1], uint8 accepted). A blurred copy of an image has less of it, a sharpened one
    more; comparable only between two versions of the same picture (before / after)."""
    hp = _highpass(img, sigma)
    w = _weights(weight, hp.shape)
    return float((w * hp**2).sum() / max(w.sum(), 1e-12))


def detail_recovered(img, ref, sigma: float = 1.0) -> float:
    """The share of a reference's fine detail that an image has in place: the projection of its high-pass
    (`detail_energy`'s) on the reference's, <hp(img), hp(ref)> / <hp(ref), hp(ref)> (1: all of it; noise and invented
    texture, uncorrelated with the reference, add nothing; a blur lowers it). A full-reference texture figure beside
    `sharpness`, which noise raises."""
    a, b = _highpass(img, sigma), _highpass(ref, sigma)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    return float((a * b).sum() / max(float((b * b).sum()), 1e-12))


def removed_structure(before, after, sigma: float = 1.0, weight=None) -> float:
    """How much the fine detail a result removed lines up with the result's own edges: the (``weight``-weighted)
    correlation between the high-pass (`detail_energy`'s) of ``before - after`` and that of ``after``, in [-1, 1].
    A smear removes part of each edge's contrast, which lies where the result's (weakened) edges are: positive. Removed
    noise or blocking is unrelated to them (about 0), and a result that denoised and sharpened gives negative values.
    Two same-size images in [0, 1] (uint8 accepted)."""
    b, a = _highpass(before, sigma), _highpass(after, sigma)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {b.shape} vs {a.shape}")
    r, w = b - a, _weights(weight, a.shape)
    den = math.sqrt(float((w * r * r).sum()) * float((w * a * a).sum()))
    return float((w * r * a).sum()) / den if den > 1e-12 else 0.0


def lowpass_consistency(out, inp, sigma: float = 2.0, weight=None) -> float:
    """PSNR (dB) between Gaussian low-passes (``sigma`` px) of two same-size images (in [0, 1], uint8 accepted),
    over the ``weight``-weighted pixels and all channels: how well ``out`` keeps ``inp``'s coarse content (a washed-out
    face, a shifted colour or a moved feature lowers it; changed fine detail does not). ``inf`` when they agree."""
    o, i = _to_hwc01(out), _to_hwc01(inp)
    if o.shape != i.shape:
        raise ValueError(f"images differ in shape: {o.shape} vs {i.shape}")
    w = _weights(weight, o.shape[:2])

    def low(x: np.ndarray) -> np.ndarray:
        y = cv2.GaussianBlur(np.ascontiguousarray(x), (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
        return y[..., None] if y.ndim == 2 else y

    d = ((low(o) - low(i)) ** 2).mean(axis=2)
    mse = float((w * d).sum() / max(w.sum(), 1e-12))
    return math.inf if mse <= 0 else 10.0 * math.log10(1.0 / mse)


_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)


def noise_sigma(img, weight=None) -> float:
    """Standard deviation of the luma's white noise (in [0, 1] units), Immerkaer's fast estimate: the mean absolute
    response to a mask that cancels smooth ramps, x sqrt(pi / 2) / 6, over the (``weight``-weighted) inner pixels.
    Edges count a little too: a clean face gives ~0.01."""
    y = _luma(_to_hwc01(img))
    if min(y.shape) < 3:
        return 0.0
    c = np.abs(cv2.filter2D(np.ascontiguousarray(y), -1, _IMMERKAER, borderType=cv2.BORDER_REFLECT_101))[1:-1, 1:-1]
    w = _weights(weight, y.shape)[1:-1, 1:-1]
    return float(math.sqrt(math.pi / 2.0) / 6.0 * (w * c).sum() / max(w.sum(), 1e-12))


def noise_detail_energy(sigma_noise: float, sigma: float = 1.0) -> float:
    """What white noise of ``sigma_noise`` adds to :func:`detail_energy` (same ``sigma``): sigma_noise^2 x the
    squared norm of the high-pass kernel."""
    d = np.zeros((33, 33), np.float64)
    d[16, 16] = 1.0
    hp = d - cv2.GaussianBlur(d, (0, 0), sigma, borderType=cv2.BORDER_CONSTANT)
    return float(sigma_noise**2 * (hp**2).sum())
