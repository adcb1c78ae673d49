"""The samplers of the diffusion prior: DT-BFR's constrained ancestral sampling (`constrained_sample`, with its
low-frequency `consistency_step`), the DDIM fast schedule over the same noise window (`constrained_sample_ddim`,
`ddim_timesteps`, `ddim_step`) and `SamplingCancelled`.

Every sampler runs a respaced :class:`~restoration.diffusion.gaussian.GaussianDiffusion` (default: DT-BFR's 250-step
one) and pins the low frequencies with a :class:`~restoration.diffusion.resample.LowPass`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from restoration.diffusion.gaussian import GaussianDiffusion, ModelFn, create_gaussian_diffusion, noise_like
from restoration.diffusion.resample import LowPass
from restoration.runtime import Cancelled, ProgressFn

__all__ = [
    "SamplingCancelled",
    "consistency_step",
    "constrained_sample",
    "ddim_timesteps",
    "ddim_step",
    "constrained_sample_ddim",
]


class SamplingCancelled(Cancelled):
    """Raised by the samplers when their ``should_cancel()`` callback returns True."""


def _as_lowpass(lowpass: "LowPass | int | None", x: torch.Tensor) -> LowPass | None:
    if lowpass is None or isinstance(lowpass, nn.Module):
        return lowpass.to(x.device) if lowpass is not None else None
    return LowPass(x.shape, int(lowpass)).to(x.device)


def consistency_step(diffusion: "GaussianDiffusion", img: torch.Tensor, ref: torch.Tensor, t: int,
                     lowpass: LowPass, noise: torch.Tensor | None = None,
                     generator=None) -> torch.Tensor:
    """DT-BFR's low-frequency replacement after the reverse step at respaced ``t`` (img is x_{t-1}):
    ``img - phi(img) + phi(q_sample(ref, t - 1))``.

    For ``t = 0`` the target level is the clean image (the reference would index the schedule at
    -1, i.e. wrap around to the *noisiest* step; DT-BFR never reaches this since it stops at 90).
    """
    if t - 1 >= 0:
        target = diffusion.q_sample(ref, t - 1, noise=noise, generator=generator)
    else:
        target = ref
    return img - lowpass(img) + lowpass(target)


# ---------------------------------------------------------------------------------------------
# DT-BFR constrained sampling (ancestral, the reference procedure)
# ---------------------------------------------------------------------------------------------
_DEFAULT_DIFFUSION: "GaussianDiffusion | None" = None


def _default_diffusion() -> GaussianDiffusion:
    global _DEFAULT_DIFFUSION
    if _DEFAULT_DIFFUSION is None:
        _DEFAULT_DIFFUSION = create_gaussian_diffusion()
    return _DEFAULT_DIFFUSION


def constrained_sample(model: ModelFn, x0: torch.Tensor, start: int = 150, constrain_until: int = 90,
                       lowpass: "LowPass | int | None" = 16, generator=None,
                       progress: ProgressFn | None = None, *, diffusion: GaussianDiffusion | None = None,
                       clip_denoised: bool = True, should_cancel: Callable[[], bool] | None = None) -> torch.Tensor:
    """DT-BFR pseudo-target sampler (``sample_func_ir_aligned`` + ``p_sample_loop`` with the filter).

    1. ``x = q_sample(x0, start)`` (respaced index ``start``; quirk kept from the reference: the
       loop below starts one step lower, at ``start - 1``);
    2. for ``t = start-1 .. 0``: ``x = p_sample(x, t)``; if ``t >= constrain_until``:
       ``x = x - phi(x) + phi(q_sample(x0, t - 1))`` with fresh noise.

    Args:
        model: ``model(x, original_timesteps) -> [B, 6, H, W]``.
        x0: the (restored) images in [-1, 1], [B, C, H, W]; a batch is processed in one go.
        start, constrain_until: respaced indices (DT-BFR: 150 and 90 of 250).
        lowpass: a :class:`LowPass`, an int N (built for x0's size) or None (no constraint).
        generator: noise source. ``None`` uses torch's default generator with exactly the
            reference draw order (seed it with ``torch.manual_seed`` to reproduce DT-BFR on CPU);
            a ``torch.Generator`` gives a reproducible stream independent of global state; a list of
            generators (one per image) makes each image's result independent of batching.
        progress: ``progress("diffusion", done, total)`` after every step.
        diffusion: the respaced process (default: DT-BFR's 250-step one).
        should_cancel: checked before every step; if it returns True :class:`SamplingCancelled`
            is raised.

    Returns the final sample in [-1, 1] (not clamped; map with ``(x*0.5+0.5).clamp(0, 1)``).
    """
    diffusion = diffusion or _default_diffusion()
    if not 0 < start < diffusion.num_timesteps:
        raise ValueError(f"start must be in 1..{diffusion.num_timesteps - 1}, got {start}")
    lp = _as_lowpass(lowpass, x0)
    x = diffusion.q_sample(x0, start, generator=generator)
    total = start
    for done, t in enumerate(range(start - 1, -1, -1), start=1):
        if should_cancel is not None and should_cancel():
            raise SamplingCancelled("sampling cancelled")
        x = diffusion.p_sample(model, x, t, clip_denoised=clip_denoised, generator=generator)["sample"]
        if lp is not None and t >= constrain_until:
            x = consistency_step(diffusion, x, x0, t, lp, generator=generator)
        if progress is not None:
            progress("diffusion", done, total)
    return x


# ---------------------------------------------------------------------------------------------
# fast schedule: DDIM over the same noise window
# ---------------------------------------------------------------------------------------------
# Why not diffusers.DDIMScheduler (checked in diffusers 0.42.1): its previous timestep is always
# `t - num_train_timesteps // num_inference_steps` and set_timesteps() takes no custom list, so it
# cannot run a partial window such as 602 -> 0 in 25 evenly spaced steps (img2img pipelines only
# slice its fixed grid); it also keeps alphas_cumprod in float32 (cumprod in float32), while the
# rest of this module uses the float64 schedule of the reference. The update itself is a few lines.
def ddim_timesteps(t_start: int, steps: int) -> list[int]:
    """``steps`` original timesteps evenly spaced from ``t_start`` down to 0 (inclusive, distinct)."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    ts = np.round(np.linspace(t_start, 0, min(steps, t_start + 1))).astype(np.int64)
    return sorted(set(int(t) for t in ts), reverse=True)


def ddim_step(x: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor | float, abar_prev: torch.Tensor | float,
              eta: float = 0.0, noise: torch.Tensor | None = None, clip_denoised: bool = True) -> dict:
    """One DDIM update from noise level ``abar_t`` to ``abar_prev`` (Song et al. 2021).

    ``x0_hat = (x - sqrt(1-a) eps) / sqrt(a)``, optionally clamped to [-1, 1] with eps re-derived
    from the clamped x0 (as guided-diffusion's ``ddim_sample`` and diffusers' DDIM do), then
    ``x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps + sigma noise`` with
    ``sigma = eta sqrt((1-a_prev)/(1-a)) sqrt(1 - a/a_prev)``. ``noise`` is required when the
    resulting sigma is non-zero. Returns ``sample`` and ``pred_xstart``.
    """
    a = torch.as_tensor(abar_t, dtype=x.dtype, device=x.device)
    a_prev = torch.as_tensor(abar_prev, dtype=x.dtype, device=x.device)
    x0_hat = (x - torch.sqrt(1 - a) * eps) / torch.sqrt(a)
    if clip_denoised:
        x0_hat = x0_hat.clamp(-1, 1)
        eps = (x - torch.sqrt(a) * x0_hat) / torch.sqrt(1 - a)
    sigma = eta * torch.sqrt((1 - a_prev) / (1 - a)) * torch.sqrt(1 - a / a_prev)
    sample = torch.sqrt(a_prev) * x0_hat + torch.sqrt((1 - a_prev - sigma ** 2).clamp(min=0)) * eps
    if eta > 0 and float(sigma) > 0:
        if noise is None:
            raise ValueError("ddim_step: noise is required when eta > 0")
        sample = sample + sigma * noise
    return {"sample": sample, "pred_xstart": x0_hat}


def constrained_sample_ddim(model: ModelFn, x0: torch.Tensor, start: int = 150, constrain_until: int = 90,
                            lowpass: "LowPass | int | None" = 16, steps: int = 25, eta: float = 0.0,
                            generator=None, progress: ProgressFn | None = None, *,
                            diffusion: GaussianDiffusion | None = None, clip_denoised: bool = True,
                            constraint_noise: str = "fresh",
                            should_cancel: Callable[[], bool] | None = None) -> torch.Tensor:
    """DDIM version of :func:`constrained_sample` with ``steps`` network evaluations.

    The noise window is the reference one, in original timesteps: ``x0`` is noised to
    ``T = timestep_map[start]`` (the level of ``q_sample(x0, start)``) and DDIM steps run through
    ``ddim_timesteps(T, steps)`` (evenly spaced, ending with t = 0 and a final jump to abar = 1,
    i.e. the clipped x0 prediction, like the reference's last ancestral step). Every step that
    starts at an original timestep ``>= timestep_map[constrain_until]`` is followed by the same
    low-frequency replacement, with the target ``q_sample(x0)`` at the level just reached.

    DDIM update (Song et al.; clipped pred_x0, eps re-derived from the clipped x0 like
    guided-diffusion's ``ddim_sample``)::

        sigma = eta * sqrt((1 - a_prev) / (1 - a)) * sqrt(1 - a / a_prev)
        x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps + sigma z

    ``eta=0`` is deterministic given the noise drawn for the start point and for the constraint
    targets (both from ``generator``). ``constraint_noise='initial'`` reuses the start noise for
    the constraint targets (the exact DDIM trajectory of x0 itself) instead of fresh noise.
    Only the eps channels of the model output are used (the learned variance is not needed).
    """
    diffusion = diffusion or _default_diffusion()
    if constraint_noise not in ("fresh", "initial"):
        raise ValueError("constraint_noise must be 'fresh' or 'initial'")
    lp = _as_lowpass(lowpass, x0)
    abar_all = diffusion.base_alphas_cumprod
    t_top = int(diffusion.timestep_map[start])
    t_limit = int(diffusion.timestep_map[constrain_until])
    grid = ddim_timesteps(t_top, steps)
    b, c = x0.shape[0], x0.shape[1]

    def abar(t: int | None) -> torch.Tensor:
        # float64 schedule scalar cast to float32, like the ancestral path
        v = 1.0 if t is None else abar_all[t]
        return torch.tensor(v, dtype=torch.float64).to(device=x0.device, dtype=x0.dtype)

    def q_at(t: int | None, noise: torch.Tensor) -> torch.Tensor:
        if t is None:
            return x0
        a = np.float64(abar_all[t])
        return (torch.tensor(np.sqrt(a), dtype=x0.dtype, device=x0.device) * x0
                + torch.tensor(np.sqrt(1.0 - a), dtype=x0.dtype, device=x0.device) * noise)

    init_noise = noise_like(x0, generator)
    x = q_at(t_top, init_noise)
    for i, t in enumerate(grid):
        if should_cancel is not None and should_cancel():
            raise SamplingCancelled("sampling cancelled")
        t_prev = grid[i + 1] if i + 1 < len(grid) else None
        ts = torch.full((b,), t, dtype=torch.long, device=x0.device)
        eps = model(x, ts)[:, :c]
        noise = noise_like(x, generator) if (eta > 0 and t_prev is not None) else None
        x = ddim_step(x, eps, abar(t), abar(t_prev), eta=eta, noise=noise, clip_denoised=clip_denoised)["sample"]
        if lp is not None and t >= t_limit:
            noise = init_noise if constraint_noise == "initial" else (
                None if t_prev is None else noise_like(x0, generator))
            target = q_at(t_prev, noise)
            x = x - lp(x) + lp(target)
        if progress is not None:
            progress("diffusion", i + 1, len(grid))
    return x
