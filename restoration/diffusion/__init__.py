"""The diffusion prior: the Gaussian process, its samplers, the low-pass resampler and the prior wrappers."""
