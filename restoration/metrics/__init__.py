"""Image quality metrics: `quality` (PSNR, SSIM and its differentiable map, sharpness, low-pass consistency) and
`lpips` (the learned perceptual distance, from weights on disk only).

The public surface of the subpackage: code outside `restoration` imports these names from here.
"""
from __future__ import annotations

from restoration.metrics.quality import (psnr, ssim, ssim_map, sharpness, lowpass_psnr, detail_recovered,
                                         removed_structure)
from restoration.metrics.lpips import (LPIPS, LPIPSUnavailable, lpips_available)

__all__ = [
    "psnr", "ssim", "ssim_map", "sharpness", "lowpass_psnr", "detail_recovered", "removed_structure", "LPIPS",
    "LPIPSUnavailable", "lpips_available",
]
