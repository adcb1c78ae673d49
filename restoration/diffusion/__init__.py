"""The diffusion prior: the Gaussian process, its samplers, the low-pass resampler and the prior wrappers.

The public surface of the subpackage: code outside `restoration` imports these names from here.
"""
from __future__ import annotations

from restoration.diffusion.gaussian import (GaussianDiffusion, create_gaussian_diffusion, space_timesteps,
                                            linear_beta_schedule, get_named_beta_schedule)
from restoration.diffusion.resample import (LowPass, resize_weights)
from restoration.diffusion.samplers import (SamplingCancelled, constrained_sample, constrained_sample_ddim,
                                            consistency_step, ddim_timesteps)
from restoration.diffusion.prior import (Prior, IDDPMPrior, DiffusersPrior, SCHEDULES, load_guard_prior)

__all__ = [
    "GaussianDiffusion", "create_gaussian_diffusion", "space_timesteps", "linear_beta_schedule",
    "get_named_beta_schedule", "LowPass", "resize_weights", "SamplingCancelled", "constrained_sample",
    "constrained_sample_ddim", "consistency_step", "ddim_timesteps", "Prior", "IDDPMPrior", "DiffusersPrior",
    "SCHEDULES", "load_guard_prior",
]
