"""Image quality metrics: `quality` (PSNR, SSIM and its differentiable map, sharpness, low-pass consistency) and
`lpips` (the learned perceptual distance, from weights on disk only)."""
