"""The bicubic resampler of DT-BFR (its ``Resizer``: antialiased when down-scaling, mirrored edges) and the low-pass
projector `LowPass` built from it, phi_N(x) = up_N(down_N(x)), bit-exact to the reference.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

__all__ = ["resize_weights", "LowPass"]


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (support [-2, 2]), float64."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    near = (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
    far = (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2))
    return near + far


def resize_weights(in_len: int, scale: float, antialias: bool) -> tuple[np.ndarray, np.ndarray]:
    """Tap table of a 1-D cubic resize of ``in_len`` samples by ``scale``.

    Returns ``(index, weights)``, both shaped [taps, out_len]: output sample ``j`` is
    ``sum_k weights[k, j] * x[index[k, j]]``. ``out_len = ceil(in_len * scale)``.

    Semantics (the reference ``Resizer`` of DT-BFR / ILVR, re-derived here):

    * pixel centres are aligned ("half-pixel"): output pixel j (1-based) sits at input coordinate
      ``(j - (out_len - in_len*scale)/2) / scale + (1 - 1/scale)/2``;
    * when ``antialias`` (used when down-scaling) the kernel is stretched by ``1/scale`` and
      scaled by ``scale``, i.e. it becomes a low-pass filter of the output rate;
    * each output row of weights is normalised to sum to 1;
    * out-of-range inputs are mirrored with the edge sample repeated (``... 1 0 | 0 1 ... n-1 | n-1 n-2 ...``);
    * tap columns whose weights are zero for every output are dropped.
    Computed in float64; callers cast the weights to float32.
    """
    out_len = int(math.ceil(in_len * scale))
    if antialias:
        width = 4.0 / scale

        def kernel(u):
            return scale * _cubic(scale * u)
    else:
        width = 4.0
        kernel = _cubic
    j = np.arange(1, out_len + 1, dtype=np.float64)
    centre = (j - (out_len - in_len * scale) / 2) / scale + 0.5 * (1 - 1 / scale)
    first = np.floor(centre - width / 2)
    ntaps = int(math.ceil(width)) + 2
    # 0-based input index of every tap (small ints, exact in float64)
    idx = (first[:, None] + np.arange(ntaps) - 1).astype(np.int64)
    w = kernel(centre[:, None] - idx - 1)
    total = w.sum(axis=1)
    total[total == 0] = 1.0
    w = w / total[:, None]
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len - 1, -1, -1)])
    idx = mirror[np.mod(idx, len(mirror))]
    keep = np.any(w != 0, axis=0)
    return idx[:, keep].T.copy(), w[:, keep].T.copy()


class _Resize1D(nn.Module):
    """One separable pass of the cubic resizer along ``dim`` (2 = height, 3 = width of NCHW)."""

    def __init__(self, dim: int, in_len: int, scale: float, antialias: bool):
        super().__init__()
        self.dim = dim
        index, weights = resize_weights(in_len, scale, antialias)
        self.in_len = in_len
        self.out_len = index.shape[1]
        self.register_buffer("index", torch.from_numpy(index), persistent=False)
        # [taps, out, 1, 1, 1]: broadcasts against the gathered [taps, out, <other 3 dims>] tensor
        w = torch.from_numpy(weights).to(torch.float32)
        self.register_buffer("weights", w.reshape(w.shape + (1, 1, 1)), persistent=False)

    def _one(self, x: torch.Tensor) -> torch.Tensor:
        # Move the resized dim to the front, gather all taps at once ([taps, out, ...]), weight and
        # reduce over the taps axis. This exact sequence (gather, multiply, sum over dim 0) is what
        # makes the result bit-identical to the reference; a matmul would differ at ~1e-7.
        y = x.transpose(self.dim, 0)
        y = (y[self.index] * self.weights.to(y.dtype)).sum(dim=0)
        return y.transpose(self.dim, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[self.dim] != self.in_len:
            raise ValueError(f"expected size {self.in_len} along dim {self.dim}, got {tuple(x.shape)}")
        if x.shape[0] == 1:
            return self._one(x)
        # Per image: torch's CPU sum picks its reduction order from the tensor layout, so a batched
        # call differs from single-image calls at the 1e-7 level. Looping keeps every image
        # bit-identical to the (batch-1) reference, whatever the batch composition.
        return torch.cat([self._one(x[k:k + 1]) for k in range(x.shape[0])], 0)


class LowPass(nn.Module):
    """phi_N(x) = up_N(down_N(x)): DT-BFR's low-frequency projector for NCHW images.

    ``down`` is an antialiased bicubic resize by 1/N, ``up`` a bicubic resize by N (no
    antialiasing when enlarging). Both are separable; as in the reference, ``down`` processes the
    width first and then the height (the reference orders dims with ``np.argsort`` of the scale
    vector, which gives [3, 2] for [1, 1, 1/N, 1/N]), and ``up`` the height first ([2, 3]). The
    order changes results at the 1e-7 level only but is kept for bit-exactness.

    Args:
        shape: the image shape the filter is built for: (H, W) or (B, C, H, W) (only H, W matter;
            any batch size / channel count works at call time). H and W must be multiples of N.
        N: the down-scaling factor (DT-BFR uses 16 for SwinIR targets, 8 for general targets).
    """

    def __init__(self, shape: Sequence[int], N: int):
        super().__init__()
        h, w = int(shape[-2]), int(shape[-1])
        N = int(N)
        if N < 1 or h % N or w % N:
            raise ValueError(f"LowPass: H and W ({h}x{w}) must be multiples of N={N}")
        self.N, self.size = N, (h, w)
        down_scale, up_scale = 1.0 / N, float(N)
        if N == 1:
            self.down = nn.Sequential()
            self.up = nn.Sequential()
        else:
            self.down = nn.Sequential(_Resize1D(3, w, down_scale, True), _Resize1D(2, h, down_scale, True))
            self.up = nn.Sequential(_Resize1D(2, h // N, up_scale, False), _Resize1D(3, w // N, up_scale, False))

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """down_N(x): [B, C, H, W] -> [B, C, H/N, W/N]."""
        return self.down(x)

    def upsample(self, x: torch.Tensor) -> torch.Tensor:
        """up_N(x): [B, C, H/N, W/N] -> [B, C, H, W]."""
        return self.up(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"size={self.size}, N={self.N}"
