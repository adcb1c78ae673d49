"""Diffusion priors for pseudo-target generation: a network wired to a :class:`GaussianDiffusion`.

The diffusion process lives in :mod:`restoration.diffusion.gaussian` and the samplers in
:mod:`restoration.diffusion.samplers`; this module only adapts models to the
``model(x in [-1, 1], original_timesteps int64) -> eps [+ learned-range v]`` convention used there
and converts images between [0, 1] (the rest of FaceAdapt) and [-1, 1] (the prior).

* :class:`IDDPMPrior` wraps our ``iddpm_unet`` (DifFace / DT-BFR ADM UNet, 6 output channels: eps
  and the learned-range variance value) with the DT-BFR process (1000 linear steps respaced to 250).
* :class:`DiffusersPrior` wraps a diffusers ``UNet2DModel`` saved with ``save_pretrained``:

  - ``out_channels == 2 * in_channels`` (6 for RGB): eps + learned-range v (iDDPM,
    ``variance_type="learned_range"``); the ancestral sampler uses the learned variance;
  - ``out_channels == in_channels`` (3): eps only, fixed variance. ``fixed_small`` (the posterior
    variance, diffusers' DDPMScheduler default) unless the scheduler config says ``fixed_large``.

  Only epsilon-prediction models are supported. The beta schedule (``linear`` with its
  ``beta_start``/``beta_end``, or ``squaredcos_cap_v2``) and ``num_train_timesteps`` are read from a
  ``scheduler_config.json`` next to the UNet (or in ``../scheduler/`` of a pipeline folder) when
  present; otherwise the iDDPM defaults (1000 linear steps) are assumed.

Both priors expose ``image_size``, ``pseudo_targets(...)`` and ``denoise_x0(x_t, t)``.
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from restoration.diffusion.gaussian import (GaussianDiffusion, create_gaussian_diffusion, get_named_beta_schedule,
                                            linear_beta_schedule, space_timesteps)
from restoration.diffusion.resample import LowPass
from restoration.diffusion.samplers import constrained_sample, constrained_sample_ddim
from restoration.models.zoo import Zoo
from restoration.runtime import ProgressFn
from restoration.settings import get_settings

__all__ = ["Prior", "IDDPMPrior", "DiffusersPrior", "SCHEDULES", "load_guard_prior"]

SCHEDULES = ("ancestral", "ddim")


class Prior:
    """A diffusion prior: ``model_fn`` (network in the iDDPM calling convention) + ``diffusion``.

    Subclasses set ``self.diffusion`` (a respaced :class:`~restoration.diffusion.gaussian.GaussianDiffusion`),
    ``self.image_size`` and implement :meth:`model_fn` and :attr:`device`.
    """

    diffusion: GaussianDiffusion
    image_size: int

    # -- to implement -------------------------------------------------------------------
    def model_fn(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Network output for ``x`` in [-1, 1] at *original* ``timesteps`` (int64 [B])."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    # -- shared ----------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.model_fn(x, timesteps)

    def _lowpass(self, size: tuple[int, int], down_N: int) -> LowPass:
        cache = self.__dict__.setdefault("_lowpass_cache", {})
        key = (size, int(down_N), str(self.device))
        if key not in cache:
            cache[key] = LowPass(size, int(down_N)).to(self.device)
        return cache[key]

    @torch.no_grad()
    def pseudo_targets(
        self,
        x0_in_01: torch.Tensor,
        start: int = 150,
        constrain_until: int = 90,
        down_N: int = 16,
        schedule: str = "ancestral",
        steps: int = 25,
        generator: "torch.Generator | Sequence[torch.Generator] | None" = None,
        *,
        eta: float = 0.0,
        progress: ProgressFn | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """DT-BFR pseudo targets for a batch of restored faces.

        Args:
            x0_in_01: restored images [B, 3, H, W] in [0, 1] (clamped here, as the reference).
            start, constrain_until: respaced indices (of ``self.diffusion``, 250 steps for DT-BFR):
                noise level of the start point and last step with the low-frequency constraint.
            down_N: low-pass factor N (DT-BFR: 16 for SwinIR targets, 8 for general targets).
            schedule: ``'ancestral'`` (the paper's sampler: ``start`` network calls) or ``'ddim'``
                (``steps`` calls over the same noise window, eta ``eta``).
            generator: noise source: None (torch default generator), a ``torch.Generator`` or a
                list with one generator per image (results independent of batching).
            progress: ``progress("diffusion", done, total)`` per reverse step.
            should_cancel: checked every step; raises ``samplers.SamplingCancelled``.

        Returns [B, 3, H, W] in [0, 1] on the input's device. If H x W differs from the prior's
        ``image_size`` the batch is resized (bicubic, antialiased) to the prior size and the result
        back to H x W (the reference resizes its inputs to 512 the same way, with ResizeRight).
        """
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        in_device, in_size = x0_in_01.device, tuple(x0_in_01.shape[-2:])
        x = x0_in_01.to(self.device, torch.float32).clamp(0, 1)
        size = (self.image_size, self.image_size)
        if in_size != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        x0 = (x - 0.5) / 0.5
        lp = self._lowpass(size, down_N)
        if schedule == "ancestral":
            out = constrained_sample(self.model_fn, x0, start, constrain_until, lp, generator, progress,
                                     diffusion=self.diffusion, should_cancel=should_cancel)
        else:
            out = constrained_sample_ddim(self.model_fn, x0, start, constrain_until, lp, steps=steps, eta=eta,
                                          generator=generator, progress=progress, diffusion=self.diffusion,
                                          should_cancel=should_cancel)
        out = (out * 0.5 + 0.5).clamp(0, 1)
        if in_size != size:
            out = F.interpolate(out, size=in_size, mode="bicubic", align_corners=False,
                                antialias=True).clamp(0, 1)
        return out.to(in_device)

    @torch.no_grad()
    def denoise_x0(self, x_t: torch.Tensor, t: "int | torch.Tensor", clip: bool = True) -> torch.Tensor:
        """One-shot x0 prediction for evaluation.

        ``x_t`` is in the prior's space ([-1, 1] scale, e.g. ``diffusion.q_sample(2*img-1, t)``),
        ``t`` a *respaced* index (int or int64 [B]). Returns ``pred_xstart`` in [-1, 1] (clamped
        when ``clip``).
        """
        x_t = x_t.to(self.device, torch.float32)
        out = self.diffusion.p_mean_variance(self.model_fn, x_t, t, clip_denoised=clip)
        return out["pred_xstart"]

    @torch.no_grad()
    def naturalness(self, imgs01: torch.Tensor, t: "float | int" = 0.1, seed: int = 0, down: int = 1,
                    shared_noise: bool = False) -> list[float]:
        """Per image: the PSNR (dB) between an image (Bx3xHxW in [0, 1], at the prior's size) and the prior's one-shot
        x0 prediction from that image noised to respaced step ``t`` (a float in (0, 1): that fraction of the respaced
        schedule). Clean faces are reconstructed better than noisy or broken ones. Fixed noise per position in the
        batch, seeded, so that two images at the same position are compared on the same noise (``shared_noise``: one
        noise for the whole batch, so that its images are compared with each other). ``down`` > 1: both
        are first reduced ``down`` x by area averaging (the coarse structure only: fine texture, which any real face
        has and the prior reconstructs poorly, then does not count)."""
        if isinstance(t, float):
            t = max(1, int(round(t * int(self.diffusion.num_timesteps))))
        g = torch.Generator(device="cpu")
        g.manual_seed(int(seed))
        tt = torch.full((imgs01.shape[0],), int(t), dtype=torch.long, device=self.device)
        shape = (1, *imgs01.shape[1:]) if shared_noise else tuple(imgs01.shape)
        noise = torch.randn(shape, generator=g).expand(imgs01.shape).to(self.device)
        x = imgs01.to(self.device, torch.float32).clamp(0, 1)
        rec = (self.denoise_x0(self.diffusion.q_sample(x * 2 - 1, tt, noise=noise), tt) + 1) / 2
        if down > 1:
            rec, x = F.avg_pool2d(rec, int(down)), F.avg_pool2d(x, int(down))
        mse = ((rec.float() - x) ** 2).flatten(1).mean(1).clamp_min(1e-10)
        return [float(v) for v in (-10.0 * torch.log10(mse)).cpu()]

    @torch.no_grad()
    def noise_image(self, img_01: torch.Tensor, t: "int | torch.Tensor", generator=None) -> torch.Tensor:
        """``q_sample(2*img-1, t)`` at respaced ``t``: the input :meth:`denoise_x0` expects."""
        x0 = img_01.to(self.device, torch.float32).clamp(0, 1) * 2 - 1
        return self.diffusion.q_sample(x0, t, generator=generator)


class IDDPMPrior(Prior):
    """Our ``iddpm_unet`` (``restoration.models.archs.build("iddpm_unet", cfg)``) with the DT-BFR process.

    Args:
        unet: any module ``unet(x, original_timesteps) -> [B, 6, H, W]`` (eps, learned-range v);
            it is put in eval mode.
        diffusion: default ``create_gaussian_diffusion()`` (1000 linear steps, learned range,
            respaced '250'), the DifFace / DT-BFR configuration.
        image_size: default ``unet.image_size`` if the module has it, else 512.
    """

    def __init__(self, unet: torch.nn.Module, diffusion: GaussianDiffusion | None = None,
                 image_size: int | None = None):
        self.unet = unet.eval() if isinstance(unet, torch.nn.Module) else unet
        self.diffusion = diffusion or create_gaussian_diffusion()
        self.image_size = int(image_size or getattr(unet, "image_size", 512))
        if not self.diffusion.learn_sigma:
            raise ValueError("IDDPMPrior expects a learned-range diffusion (6-channel iddpm_unet)")

    def model_fn(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.unet(x, timesteps)

    @property
    def device(self) -> torch.device:
        try:
            return next(self.unet.parameters()).device
        except (StopIteration, AttributeError):
            return torch.device("cpu")

    def to(self, device) -> "IDDPMPrior":
        self.unet.to(device)
        return self

    @classmethod
    def from_zoo(cls, name: str, zoo=None, device: str | torch.device = "cpu",
                 respacing: str | None = None) -> "IDDPMPrior":
        """Load a zoo prior (``kind='prior'``, arch ``iddpm_unet``).

        The process comes from ``card.extra["diffusion"]`` (docs/ARCHITECTURE.md: ``steps``,
        ``noise_schedule``, ``learn_sigma``, ``respacing``); ``respacing`` overrides the sampler's
        timestep respacing (e.g. the pseudo-target parameter).
        """
        zoo = zoo or Zoo()
        card = zoo.get(name)
        if card.kind != "prior" or card.arch != "iddpm_unet":
            raise ValueError(f"zoo model {name!r} is a {card.kind} ({card.arch}), not an iddpm_unet prior")
        d = dict((card.extra or {}).get("diffusion") or {})
        if "respacing" in d:
            d.setdefault("timestep_respacing", d.pop("respacing"))
        if respacing is not None:
            d["timestep_respacing"] = respacing
        if isinstance(d.get("timestep_respacing"), int):
            d["timestep_respacing"] = str(d["timestep_respacing"])
        known = set(inspect.signature(create_gaussian_diffusion).parameters)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"prior {name!r}: unknown diffusion settings in its card: {unknown}")
        diff = create_gaussian_diffusion(**d)
        return cls(zoo.load(name, device=device), diff, image_size=card.input_size)


class DiffusersPrior(Prior):
    """A diffusers ``UNet2DModel`` as prior (see the module docstring for the channel convention).

    Args:
        unet: a ``diffusers.UNet2DModel`` (eps prediction).
        num_train_timesteps, beta_schedule, beta_start, beta_end: the training process (diffusers
            names; ``beta_start``/``beta_end`` None = iDDPM's 1e-4 / 0.02 scaled to 1000 steps).
        variance_type: for 3-channel models ``'fixed_small'`` (default) or ``'fixed_large'``;
            6-channel models are always ``'learned_range'``.
        timestep_respacing: sampler respacing (default '250', as DT-BFR), so ``start`` /
            ``constrain_until`` keep their DT-BFR meaning.
    """

    def __init__(self, unet, num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                 beta_start: float | None = None, beta_end: float | None = None,
                 variance_type: str | None = None, timestep_respacing: str | None = "250"):
        self.unet = unet.eval()
        cfg = unet.config
        in_ch, out_ch = int(cfg.in_channels), int(cfg.out_channels)
        if out_ch == 2 * in_ch:
            if variance_type not in (None, "learned_range"):
                raise ValueError(f"a {out_ch}-channel UNet needs variance_type 'learned_range', not {variance_type!r}")
            learn_sigma, sigma_small = True, False
        elif out_ch == in_ch:
            variance_type = variance_type or "fixed_small"
            if variance_type not in ("fixed_small", "fixed_large"):
                raise ValueError(f"unsupported variance_type {variance_type!r} for a {out_ch}-channel UNet")
            learn_sigma, sigma_small = False, variance_type == "fixed_small"
        else:
            raise ValueError(f"UNet2DModel with in={in_ch}, out={out_ch} channels is neither eps (out=in) "
                             f"nor eps+learned-range (out=2*in)")
        if beta_schedule == "linear":
            betas = linear_beta_schedule(num_train_timesteps, beta_start, beta_end)
        elif beta_schedule in ("squaredcos_cap_v2", "cosine"):
            betas = get_named_beta_schedule("cosine", num_train_timesteps)
        else:
            raise ValueError(f"unsupported beta_schedule {beta_schedule!r} (linear or squaredcos_cap_v2)")
        use = space_timesteps(num_train_timesteps, timestep_respacing) if timestep_respacing else None
        self.diffusion = GaussianDiffusion(betas, use, learn_sigma=learn_sigma, sigma_small=sigma_small)
        size = cfg.sample_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        timestep_respacing: str | None = "250", **overrides) -> "DiffusersPrior":
        """Load ``UNet2DModel.from_pretrained(path)`` (a UNet folder, or a pipeline folder with
        ``unet/``) and read the training schedule from a ``scheduler_config.json`` if there is one."""
        # diffusers is an optional heavy dependency here: imported only when a diffusers prior is loaded
        from diffusers import UNet2DModel

        path = Path(path)
        unet_dir = path / "unet" if (path / "unet" / "config.json").is_file() else path
        unet = UNet2DModel.from_pretrained(str(unet_dir)).to(device)
        kwargs: dict = {}
        for cand in (unet_dir / "scheduler_config.json", path / "scheduler" / "scheduler_config.json",
                     path / "scheduler_config.json"):
            if cand.is_file():
                sc = json.loads(cand.read_text())
                if sc.get("prediction_type", "epsilon") != "epsilon":
                    raise ValueError(f"only epsilon-prediction priors are supported ({cand})")
                for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "variance_type"):
                    if k in sc:
                        kwargs[k] = sc[k]
                break
        kwargs.update(overrides)
        if kwargs.get("variance_type") == "learned_range" and unet.config.out_channels == unet.config.in_channels:
            raise ValueError("scheduler says learned_range but the UNet has no variance channels")
        if int(unet.config.out_channels) == 2 * int(unet.config.in_channels):
            kwargs.pop("variance_type", None)
        return cls(unet, timestep_respacing=timestep_respacing, **kwargs)

    def model_fn(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.unet(x, timesteps).sample

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device) -> "DiffusersPrior":
        self.unet.to(device)
        return self


def load_guard_prior(name: str | None = None, zoo=None, device: str | torch.device = "cpu") -> IDDPMPrior | None:
    """The face prior of the never-worse check (`restoration.faces.Restorer.guard_prior`): zoo prior ``name`` (None:
    FACEADAPT_GUARD_PRIOR), or None when that is 'none' or empty. A name the zoo does not hold raises its
    ModelNotFound."""
    name = get_settings().guard_prior if name is None else name
    if not name or name.strip().lower() == "none":
        return None
    return IDDPMPrior.from_zoo(name.strip(), zoo=zoo, device=device)
