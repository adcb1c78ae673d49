"""Training losses on images in [0, 1]: gradient L1, the SSIM loss (from the metrics SSIM), the perceptual loss
(LPIPS when its weights are on disk, else a named fallback) and the GAN loss on discriminator logits."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from restoration.metrics.lpips import LPIPS, lpips_available
from restoration.metrics.quality import ssim_map

__all__ = ["PERCEPTUAL_FALLBACKS", "gradient_l1", "ssim_loss", "make_perceptual", "gan_loss"]

#: what stands in for LPIPS when its weights are missing
PERCEPTUAL_FALLBACKS = ("gradient", "ssim", "none")


def gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """L1 between the horizontal and between the vertical finite differences of two BxCxHxW images (summed)."""
    dxa, dxb = a[..., :, 1:] - a[..., :, :-1], b[..., :, 1:] - b[..., :, :-1]
    dya, dyb = a[..., 1:, :] - a[..., :-1, :], b[..., 1:, :] - b[..., :-1, :]
    return (dxa - dxb).abs().mean() + (dya - dyb).abs().mean()


def ssim_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - SSIM (`restoration.metrics.quality.ssim_map`: 11x11 Gaussian window, sigma 1.5, per channel);
    differentiable."""
    return 1.0 - ssim_map(a, b).mean()


def make_perceptual(weight: float, fallback: str, device: torch.device) -> tuple[Callable | None, str]:
    """(loss_fn(pred, target) on [0,1] images or None, description): LPIPS (frozen) when its weights are on disk,
    else `fallback` ('gradient': `gradient_l1`, 'ssim': `ssim_loss`, 'none'); None when `weight` <= 0."""
    if weight <= 0:
        return None, "none (weight 0)"
    try:
        ok, why = lpips_available()
        if ok:
            lp = LPIPS().to(device).eval()
            for p in lp.parameters():
                p.requires_grad_(False)
            return (lambda a, b: lp(a, b).mean()), "lpips"
    except (AttributeError, FileNotFoundError, RuntimeError, OSError) as exc:
        why = f"LPIPS unavailable: {exc}"
    if fallback == "gradient":
        return gradient_l1, f"gradient-l1 instead of LPIPS ({why})"
    if fallback == "ssim":
        return ssim_loss, f"1-ssim instead of LPIPS ({why})"
    return None, f"none ({why})"


def gan_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Binary cross-entropy of discriminator logits against the label "real" (softplus(-x)) or "fake" (softplus(x)),
    averaged. The generator's non-saturating term is ``gan_loss(D(fake), True)``; the discriminator's loss is
    ``gan_loss(D(real), True) + gan_loss(D(fake), False)``."""
    return F.softplus(-logits).mean() if real else F.softplus(logits).mean()
