"""Evaluating trained models and looking at them: per-image PSNR / SSIM, the restorer on synthetically damaged faces,
the prior's samples and one-shot denoising, and sample grids (the trainers' grids, bench/default_models.py)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from restoration.degrade.broad import BroadDamage
from restoration.degrade.damage import DegradationParams, apply_degradation, sample_degradation
from restoration.metrics import quality
from restoration.runtime import ProgressFn
from restoration.training.batches import degradation_params
from restoration.training.recipes import make_diffusion

__all__ = ["psnr_ssim", "save_grid", "sample_prior", "denoise_psnr", "evaluate_restorer", "degrade_pair"]


def psnr_ssim(out01: torch.Tensor, gt01: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-image PSNR / SSIM (`restoration.metrics.quality`) of two NCHW batches, clamped to [0, 1]."""
    out01, gt01 = out01.clamp(0, 1).float(), gt01.clamp(0, 1).float()
    ps = [float(quality.psnr(out01[i:i + 1], gt01[i:i + 1])) for i in range(len(out01))]
    ss = [float(quality.ssim(out01[i:i + 1], gt01[i:i + 1])) for i in range(len(out01))]
    return ps, ss


def save_grid(rows: list[torch.Tensor], path: str | Path, pad: int = 2) -> Path:
    """rows: tensors [N, 3, H, W] in [0, 1] (same N, H, W); one row each. Written as PNG."""
    n = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2:]
    canvas = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, r in enumerate(rows):
        arr = (r.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
        for j in range(arr.shape[0]):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = arr[j]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path, optimize=True)
    return path


@torch.no_grad()
def sample_prior(model: nn.Module, n: int, size: int, respacing: str = "50", seed: int = 0,
                 diffusion: dict | None = None, progress: ProgressFn | None = None) -> torch.Tensor:
    """Unconditional ancestral samples in [0,1] with a respaced schedule (learned variances)."""
    model.eval()
    dev = next(model.parameters()).device
    diff = make_diffusion(respacing, diffusion)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, 3, size, size), generator=g)
    x = noise.to(dev)
    for i in reversed(range(diff.num_timesteps)):
        x = diff.p_sample(model, x, i, noise=torch.randn(x.shape, generator=g).to(dev))["sample"]
        if progress is not None:
            progress("sample", diff.num_timesteps - i, diff.num_timesteps)
    return (x * 0.5 + 0.5).clamp(0, 1).cpu()


@torch.no_grad()
def denoise_psnr(model: nn.Module, clean01: torch.Tensor, t_respaced: int, respacing: str = "250", seed: int = 0,
                 batch: int = 16) -> float:
    """Mean PSNR of the x0-prediction from q_sample(x0, t) (respaced index t) against x0, clean faces [0,1]."""
    model.eval()
    dev = next(model.parameters()).device
    diff = make_diffusion(respacing)
    g = torch.Generator().manual_seed(seed)
    ps = []
    for i in range(0, len(clean01), batch):
        x0 = clean01[i:i + batch] * 2 - 1
        noise = torch.randn(x0.shape, generator=g)
        xt = diff.q_sample(x0, t_respaced, noise=noise).to(dev)
        pred = diff.p_mean_variance(model, xt, t_respaced)["pred_xstart"].cpu()
        p, _ = psnr_ssim(pred * 0.5 + 0.5, x0 * 0.5 + 0.5)
        ps += p
    return float(np.mean(ps))


@torch.no_grad()
def evaluate_restorer(model: nn.Module, gt01: torch.Tensor, params: DegradationParams | None = None, seed: int = 0,
                      batch: int = 32) -> dict:
    """Degrade `gt01` (N,3,S,S in [0,1]) with per-image seeds `seed + i` (see `degrade_pair`) and compare with the
    ground truth: the restorer output, its input (the degraded image as `degrade` returns it, low resolution upsampled
    bilinearly) and the same low-resolution image upsampled bicubically. Returns mean PSNR (dB) / SSIM of each."""
    model.eval()
    dev = next(model.parameters()).device
    lq, lqb = degrade_pair(gt01, params, seed)
    outs = []
    for i in range(0, len(lq), batch):
        outs.append(model(lq[i:i + batch].to(dev)).clamp(0, 1).cpu())
    out = torch.cat(outs)
    res: dict = {"n": len(gt01), "seed": seed}
    for key, img in (("restorer", out), ("input", lq), ("bicubic", lqb)):
        p, s_ = psnr_ssim(img, gt01)
        res[f"psnr_{key}"], res[f"ssim_{key}"] = float(np.mean(p)), float(np.mean(s_))
    return res


def degrade_pair(gt01: torch.Tensor, params: DegradationParams | BroadDamage | None = None,
                 seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Degrade each image i of `gt01` (N,3,S,S in [0,1]) with `np.random.default_rng(seed + i)`.

    Returns (lq, lq_bicubic): `lq` is what `degrade` returns (the low-resolution image upsampled back with the
    pipeline's interpolation, bilinear by default): the restorer's input; `lq_bicubic` is the same low-resolution
    image upsampled with bicubic interpolation instead (the classic baseline).
    """
    params = params if params is not None else degradation_params()
    lq, lqb = [], []
    for i in range(len(gt01)):
        a = gt01[i].permute(1, 2, 0).cpu().numpy().astype(np.float32)
        if isinstance(params, BroadDamage):  # the same draws twice, ending bilinear / bicubic
            lq.append(replace(params, final_up="bilinear").apply(a, np.random.default_rng(seed + i)))
            lqb.append(replace(params, final_up="bicubic").apply(a, np.random.default_rng(seed + i)))
            continue
        info = sample_degradation(params, np.random.default_rng(seed + i), a.shape)
        lq.append(apply_degradation(a, info))
        lqb.append(apply_degradation(a, dict(info, up_interp="bicubic")))
    to_t = lambda arrs: torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous().float()  # noqa: E731
    return to_t(lq), to_t(lqb)
