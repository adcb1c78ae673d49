"""The Gaussian diffusion process of FaceAdapt: beta schedules, respacing and `GaussianDiffusion` (q_sample, the
posterior, p_mean_variance, p_sample, training losses); our own implementation, guided-diffusion / iDDPM semantics.

The process reproduced here is the one DT-BFR (Kuai et al., WACV 2025) and DifFace use for their
FFHQ-512 prior: 1000 training steps, linear beta schedule, epsilon prediction, learned-range
variance, ``rescale_learned_sigmas=True`` (the RESCALED_MSE hybrid loss) and, at sampling time,
respacing to 250 kept steps.

Numerical conventions (they matter at the 1e-7 level and are checked against
``shared/compat/iddpm_diffusion_math``):

* every schedule array is computed and kept in **float64** numpy;
* when a value is needed for timestep ``t`` it is indexed in float64 and only then **cast to
  float32**; all tensor math afterwards is float32 (or the dtype of ``x``);
* ``t`` given to the methods of :class:`GaussianDiffusion` is always the **respaced index**
  (0..num_timesteps-1); the network receives ``timestep_map[t]`` (original 0..999).

Why not diffusers' schedulers for the reference process: see the note above
:class:`GaussianDiffusion` (measured, not assumed). The samplers built on this process (DT-BFR's constrained
sampling, DDIM) are in :mod:`restoration.diffusion.samplers`, the low-pass filter in :mod:`restoration.diffusion.resample`.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from restoration.runtime import ProgressFn

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = [
    "ModelFn",
    "linear_beta_schedule",
    "get_named_beta_schedule",
    "space_timesteps",
    "GaussianDiffusion",
    "create_gaussian_diffusion",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "noise_like",
]


# ---------------------------------------------------------------------------------------------
# schedules and respacing
# ---------------------------------------------------------------------------------------------
def linear_beta_schedule(num_steps: int, beta_start: float | None = None, beta_end: float | None = None) -> np.ndarray:
    """Linear betas of Ho et al., scaled so any step count spans the same range as 1000 steps.

    Returns a float64 array of length ``num_steps`` from ``1e-4 * 1000/num_steps`` to
    ``0.02 * 1000/num_steps`` (``np.linspace`` in float64, as the reference). Explicit
    ``beta_start`` / ``beta_end`` (diffusers configs) are used unscaled.
    """
    scale = 1000.0 / num_steps
    start = scale * 0.0001 if beta_start is None else beta_start
    end = scale * 0.02 if beta_end is None else beta_end
    return np.linspace(start, end, num_steps, dtype=np.float64)


def get_named_beta_schedule(name: str, num_steps: int) -> np.ndarray:
    """Beta schedule by name. Only ``'linear'`` is used by the DT-BFR / DifFace prior; ``'cosine'``
    (Nichol & Dhariwal) is provided for completeness."""
    if name == "linear":
        return linear_beta_schedule(num_steps)
    if name == "cosine":
        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - abar((i + 1) / num_steps) / abar(i / num_steps), 0.999) for i in range(num_steps)]
        return np.array(betas, dtype=np.float64)
    raise ValueError(f"unknown beta schedule {name!r}")


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> set[int]:
    """Which original timesteps to keep when respacing a ``num_timesteps`` process.

    ``section_counts`` is a comma separated string (or list) of step counts; the original range is
    cut into that many equal sections and each section keeps its count of (approximately) evenly
    strided steps, always including both ends of the section. ``"ddimN"`` picks an exact integer
    stride giving N steps starting from 0 (DDIM paper convention).

    ``space_timesteps(1000, "250")`` keeps 0, 4, 8, ..., 995, 999 (``round(j * 999/249)``).
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            wanted = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {wanted} steps with an integer stride")
        counts = [int(c) for c in section_counts.split(",")]
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = [int(c) for c in section_counts]

    per_section, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    section_start = 0
    for i, count in enumerate(counts):
        size = per_section + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot keep {count} steps from a section of {size}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        # accumulate the fractional position exactly as the reference (float sum, then round())
        position = 0.0
        for _ in range(count):
            kept.append(section_start + round(position))
            position += stride
        section_start += size
    return set(kept)


def _at(arr: np.ndarray, t: torch.Tensor, ndim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Index a float64 schedule array at (respaced) ``t`` (int tensor of shape [B]), cast the result
    to ``dtype`` (float32 by default: the reference cast) and shape it [B, 1, 1, ...] for
    broadcasting against a tensor with ``ndim`` dims."""
    vals = torch.from_numpy(arr).to(t.device)[t].to(dtype)
    return vals.reshape(vals.shape + (1,) * (ndim - vals.ndim))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """tanh approximation of the standard normal CDF (as used by iDDPM's decoder likelihood)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood (nats, elementwise) of data ``x`` in [-1, 1] quantised to 256 bins under a
    Gaussian with ``means`` and ``log_scales`` (log std); the outermost bins extend to +-inf."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def noise_like(like: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise shaped like ``like`` from a noise source:

    * ``None``: torch's default generator, exactly as ``torch.randn_like`` (same values and RNG
      advance as the reference code);
    * a ``torch.Generator`` (any device; CPU generators are fine for CUDA tensors: noise is drawn
      on the generator's device and moved);
    * a sequence of generators, one per batch element: image k's noise comes from generator k,
      so results do not depend on how images are batched.
    """
    if generator is None:
        return torch.randn_like(like)
    if isinstance(generator, torch.Generator):
        noise = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=generator.device)
        return noise.to(like.device)
    gens = list(generator)
    if len(gens) != like.shape[0]:
        raise ValueError(f"got {len(gens)} generators for a batch of {like.shape[0]}")
    parts = [torch.randn((1,) + tuple(like.shape[1:]), generator=g, dtype=like.dtype, device=g.device).to(like.device)
             for g in gens]
    return torch.cat(parts, 0)


# ---------------------------------------------------------------------------------------------
# the diffusion process
# ---------------------------------------------------------------------------------------------
# Why our own class instead of diffusers.DDPMScheduler (measured with diffusers 0.42.1 against the
# compat fixtures, see tests/test_diffusion_math.py::test_diffusers_ddpm_scheduler_is_not_exact):
#  * DDPMScheduler keeps betas / alphas_cumprod as float32 tensors and does the cumprod and all
#    coefficient math in float32, while the reference computes everything in float64 and casts the
#    indexed scalar to float32; the posterior coefficients differ in the last bits.
#  * With custom (respaced) timesteps it derives the respaced beta as 1 - abar_t/abar_prev in float32
#    per call; the reference precomputes respaced arrays in float64.
#  * Its learned-range lower bound is log(max(posterior_variance_t, 1e-20)); the reference uses
#    log(posterior_variance) with the t=0 entry replaced by t=1 ("clipped"), so the t=0 step differs.
#  * It does not draw noise at the last step; the reference p_sample always draws (RNG order of the
#    DT-BFR loop, needed to reproduce mini_loop).
#  * There is no clipping of pred_xstart with respaced learned variance + the low-pass constraint
#    loop hook; the constraint needs q_sample at arbitrary respaced steps anyway.
# DDPMScheduler's learned_range math is the same formula, so results agree to ~1e-6, not bit-exactly.
class GaussianDiffusion:
    """A (possibly respaced) Gaussian diffusion with epsilon prediction and iDDPM variances.

    Args:
        betas: float64 betas of the *base* process (e.g. ``linear_beta_schedule(1000)``).
        use_timesteps: original timesteps to keep (``space_timesteps(...)``); ``None`` keeps all.
        learn_sigma: the model outputs 2C channels: eps and a learned-range interpolation value v
            in [-1, 1] between log(beta_t) and the clipped log posterior variance.
        sigma_small: only for ``learn_sigma=False``: fixed variance is the posterior variance
            (True) or beta_t (False, "fixed large": betas with the t=0 entry set to posterior[1]).
        rescale_learned_sigmas: loss type RESCALED_MSE (VLB term scaled by num_timesteps/1000).
        clip_denoised: default for clamping pred_xstart to [-1, 1] in ``p_mean_variance``.

    All ``t`` arguments are respaced indices in ``[0, num_timesteps)``; the model is called with the
    original timesteps ``timestep_map[t]`` (int64).
    """

    def __init__(
        self,
        betas: np.ndarray,
        use_timesteps: Iterable[int] | None = None,
        *,
        learn_sigma: bool = True,
        sigma_small: bool = False,
        rescale_learned_sigmas: bool = True,
        use_kl: bool = False,
    ):
        base_betas = np.asarray(betas, dtype=np.float64)
        assert base_betas.ndim == 1 and (base_betas > 0).all() and (base_betas <= 1).all()
        self.base_betas = base_betas
        self.base_alphas_cumprod = np.cumprod(1.0 - base_betas, axis=0)
        self.num_base_timesteps = len(base_betas)
        self.learn_sigma = learn_sigma
        self.sigma_small = sigma_small
        self.rescale_learned_sigmas = rescale_learned_sigmas
        self.use_kl = use_kl

        # respacing: keep a subset of the base steps and recompute betas so that the kept steps
        # have exactly the base alphas_cumprod (beta'_i = 1 - abar_{k_i} / abar_{k_{i-1}}).
        if use_timesteps is None:
            kept = list(range(self.num_base_timesteps))
        else:
            kept = sorted(set(int(s) for s in use_timesteps))
        new_betas, prev_abar = [], 1.0
        for k in kept:
            abar = self.base_alphas_cumprod[k]
            new_betas.append(1.0 - abar / prev_abar)
            prev_abar = abar
        self.use_timesteps = kept
        self.timestep_map = np.array(kept, dtype=np.int64)
        self._timestep_map_t = torch.from_numpy(self.timestep_map)

        b = np.array(new_betas, dtype=np.float64)
        self.betas = b
        self.num_timesteps = len(b)
        alphas = 1.0 - b
        self.alphas_cumprod = np.cumprod(alphas, axis=0)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
        # q(x_{t-1} | x_t, x_0)
        self.posterior_variance = b * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the t=0 posterior variance is 0; its log is replaced by the t=1 value ("clipped")
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = b * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(b)

    # -- helpers ------------------------------------------------------------------------------
    def original_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Respaced indices -> original timesteps the network is trained on (int64)."""
        return self._timestep_map_t.to(t.device)[t]

    def _t(self, t: int | torch.Tensor, batch: int, device) -> torch.Tensor:
        if isinstance(t, torch.Tensor):
            t = t.to(device=device, dtype=torch.long)
            return t.expand(batch) if t.ndim == 0 else t
        return torch.full((batch,), int(t), dtype=torch.long, device=device)

    # -- forward process ------------------------------------------------------------------
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log variance of q(x_t | x_0)."""
        n = x_start.ndim
        mean = _at(self.sqrt_alphas_cumprod, t, n) * x_start
        var = _at(1.0 - self.alphas_cumprod, t, n)
        logvar = _at(self.log_one_minus_alphas_cumprod, t, n)
        return mean, var, logvar

    def q_sample(self, x_start: torch.Tensor, t, noise: torch.Tensor | None = None,
                 generator=None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise (respaced ``t``)."""
        t = self._t(t, x_start.shape[0], x_start.device)
        if noise is None:
            noise = noise_like(x_start, generator)
        n = x_start.ndim
        return _at(self.sqrt_alphas_cumprod, t, n) * x_start + _at(self.sqrt_one_minus_alphas_cumprod, t, n) * noise

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        t = self._t(t, x_t.shape[0], x_t.device)
        n = x_t.ndim
        mean = _at(self.posterior_mean_coef1, t, n) * x_start + _at(self.posterior_mean_coef2, t, n) * x_t
        var = _at(self.posterior_variance, t, n)
        logvar = _at(self.posterior_log_variance_clipped, t, n)
        return mean, var, logvar

    # alias with the guided-diffusion name
    q_posterior_mean_variance = q_posterior

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        n = x_t.ndim
        return _at(self.sqrt_recip_alphas_cumprod, t, n) * x_t - _at(self.sqrt_recipm1_alphas_cumprod, t, n) * eps

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        n = x_t.ndim
        return (_at(self.sqrt_recip_alphas_cumprod, t, n) * x_t - pred_xstart) / _at(self.sqrt_recipm1_alphas_cumprod, t, n)

    # -- reverse process ------------------------------------------------------------------
    def model_output(self, model: ModelFn, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Call the network with the original timesteps of respaced ``t``."""
        return model(x, self.original_timesteps(t))

    def p_mean_variance_from_output(self, model_out: torch.Tensor, x: torch.Tensor, t, clip_denoised: bool = True,
                                    denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
        """p(x_{t-1} | x_t) given an already computed network output (see :meth:`p_mean_variance`)."""
        t = self._t(t, x.shape[0], x.device)
        c, n = x.shape[1], x.ndim
        if self.learn_sigma:
            assert model_out.shape[1] == 2 * c, f"learned-sigma model must output {2 * c} channels, got {model_out.shape[1]}"
            eps, v = model_out[:, :c], model_out[:, c:]
            min_log = _at(self.posterior_log_variance_clipped, t, n)
            max_log = _at(self.log_betas, t, n)
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
            var = torch.exp(log_var)
        else:
            eps = model_out[:, :c]
            if self.sigma_small:
                var_arr, logvar_arr = self.posterior_variance, self.posterior_log_variance_clipped
            else:
                var_arr = np.append(self.posterior_variance[1], self.betas[1:])
                logvar_arr = np.log(var_arr)
            var = _at(var_arr, t, n).expand_as(x)
            log_var = _at(logvar_arr, t, n).expand_as(x)
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior(pred_xstart, x, t)
        return {"mean": mean, "variance": var, "log_variance": log_var, "pred_xstart": pred_xstart, "eps": eps}

    def p_mean_variance(self, model: ModelFn, x: torch.Tensor, t, clip_denoised: bool = True,
                        denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict:
        """Mean / variance / log variance of p(x_{t-1} | x_t) and the predicted x_0.

        Returns a dict with ``mean``, ``variance``, ``log_variance``, ``pred_xstart`` (clamped to
        [-1, 1] when ``clip_denoised``), ``eps`` and ``model_output`` (raw network output).
        """
        t = self._t(t, x.shape[0], x.device)
        out = self.model_output(model, x, t)
        res = self.p_mean_variance_from_output(out, x, t, clip_denoised=clip_denoised, denoised_fn=denoised_fn)
        res["model_output"] = out
        return res

    def p_sample(self, model: ModelFn, x: torch.Tensor, t, clip_denoised: bool = True,
                 noise: torch.Tensor | None = None, generator=None) -> dict:
        """One ancestral step x_t -> x_{t-1}: ``mean + (t != 0) * exp(0.5 log_var) * noise``.

        As in the reference, noise is drawn even at t = 0 (it is multiplied by zero); this keeps
        the RNG stream aligned with the DT-BFR sampler. Returns ``sample`` and ``pred_xstart``.
        """
        t = self._t(t, x.shape[0], x.device)
        out = self.p_mean_variance(model, x, t, clip_denoised=clip_denoised)
        if noise is None:
            noise = noise_like(x, generator)
        nonzero = (t != 0).float().reshape((-1,) + (1,) * (x.ndim - 1))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(self, model: ModelFn, shape, noise: torch.Tensor | None = None, clip_denoised: bool = True,
                      generator=None, device=None, progress: ProgressFn | None = None):
        """Plain unconditional ancestral sampling over all respaced steps (for smoke tests / demos)."""
        img = noise if noise is not None else noise_like(torch.empty(shape, device=device), generator)
        for i in reversed(range(self.num_timesteps)):
            img = self.p_sample(model, img, i, clip_denoised=clip_denoised, generator=generator)["sample"]
            if progress is not None:
                progress("sample", self.num_timesteps - i, self.num_timesteps)
        return img

    # -- training -------------------------------------------------------------------------
    def _vb_terms_bpd(self, model_out: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                      t: torch.Tensor, clip_denoised: bool = False) -> torch.Tensor:
        """Per-sample VLB term in bits/dim: KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and the
        discretised decoder NLL at t = 0."""
        true_mean, _, true_logvar = self.q_posterior(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_out, x_t, t, clip_denoised=clip_denoised)
        kl = _mean_flat(normal_kl(true_mean, true_logvar, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, out["mean"], 0.5 * out["log_variance"])
        nll = _mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model: ModelFn, x_start: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None = None) -> dict:
        """iDDPM hybrid loss for an epsilon / learned-range model (``L_simple + L_vlb``).

        Args:
            model: ``model(x_t, original_timesteps) -> [B, 2C, H, W]`` (or [B, C, H, W] when
                ``learn_sigma=False``).
            x_start: clean images in [-1, 1], [B, C, H, W].
            t: respaced indices [B] (for an unspaced diffusion these are the original timesteps).
            noise: optional fixed noise (default: ``torch.randn_like(x_start)``).

        Returns a dict of per-sample losses [B]: ``mse`` (eps MSE), ``vb`` (VLB in bits/dim computed
        with the predicted **mean detached**, so it only trains the variance; scaled by
        ``num_timesteps / 1000`` like RESCALED_MSE) and ``loss = mse + vb``. With
        ``learn_sigma=False``: ``vb`` is zero and ``loss = mse``. With ``use_kl=True`` the loss is
        the (rescaled) full VLB only.
        """
        t = self._t(t, x_start.shape[0], x_start.device)
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        out = self.model_output(model, x_t, t)
        c = x_start.shape[1]
        terms: dict[str, torch.Tensor] = {}
        if self.use_kl:
            vb = self._vb_terms_bpd(out, x_start, x_t, t)
            if self.rescale_learned_sigmas:  # RESCALED_KL
                vb = vb * self.num_timesteps
            return {"loss": vb, "vb": vb, "mse": torch.zeros_like(vb)}
        eps = out[:, :c]
        terms["mse"] = _mean_flat((noise - eps) ** 2)
        if self.learn_sigma:
            # stop-gradient on the mean: the VLB only sees (and trains) the variance channels
            frozen = torch.cat([eps.detach(), out[:, c:]], dim=1)
            vb = self._vb_terms_bpd(frozen, x_start, x_t, t, clip_denoised=False)
            if self.rescale_learned_sigmas:
                vb = vb * (self.num_timesteps / 1000.0)
            terms["vb"] = vb
        else:
            terms["vb"] = torch.zeros_like(terms["mse"])
        terms["loss"] = terms["mse"] + terms["vb"]
        return terms

    def sample_timesteps(self, batch: int, device=None, generator=None) -> torch.Tensor:
        """Uniform training timesteps (respaced indices) [batch]."""
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=device)


def create_gaussian_diffusion(
    steps: int = 1000,
    learn_sigma: bool = True,
    sigma_small: bool = False,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    rescale_learned_sigmas: bool = True,
    timestep_respacing: str | Sequence[int] | None = "250",
) -> GaussianDiffusion:
    """The DT-BFR / DifFace diffusion (defaults = ``configs/targets/*.yaml`` ``diffusion.params``).

    ``timestep_respacing=None`` or ``""`` gives the unspaced process (for training).
    """
    betas = get_named_beta_schedule(noise_schedule, steps)
    use = space_timesteps(steps, timestep_respacing) if timestep_respacing else None
    return GaussianDiffusion(betas, use, learn_sigma=learn_sigma, sigma_small=sigma_small,
                             rescale_learned_sigmas=rescale_learned_sigmas, use_kl=use_kl)
