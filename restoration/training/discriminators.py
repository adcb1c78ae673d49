"""The discriminators of the GAN terms: `PatchDiscriminator` (the restorer trainer's small critic) and
`UNetDiscriminatorSN` (the fine-tune's per-pixel critic). Both take RGB images in [0, 1] and return logits."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["PatchDiscriminator", "UNetDiscriminatorSN"]


class PatchDiscriminator(nn.Module):
    """A small spectral-norm patch discriminator (3 stride-2 convs): input [0,1] RGB, output logits at 1/8 size.

    Spectral norm by the `nn.utils.spectral_norm` hook (its `weight_orig` / `weight_u` / `weight_v` entries are what
    the restorer trainer's checkpoints hold)."""

    def __init__(self, ch: int = 32):
        super().__init__()
        sn = nn.utils.spectral_norm
        self.net = nn.Sequential(
            sn(nn.Conv2d(3, ch, 4, 2, 1)), nn.LeakyReLU(0.2, True),
            sn(nn.Conv2d(ch, ch * 2, 4, 2, 1)), nn.LeakyReLU(0.2, True),
            sn(nn.Conv2d(ch * 2, ch * 4, 4, 2, 1)), nn.LeakyReLU(0.2, True),
            sn(nn.Conv2d(ch * 4, 1, 3, 1, 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


class UNetDiscriminatorSN(nn.Module):
    """U-Net discriminator with spectral normalisation (in the spirit of Real-ESRGAN's).

    Three stride-2 4x4 convolutions down (C, 2C, 4C, 8C), three bilinear x2 + 3x3 convolutions up with skip
    additions, two more 3x3 convolutions and a 1-channel 3x3 head: a logit per pixel. H and W must be multiples
    of 8. Every convolution but the first and the head is spectrally normalised.
    """

    def __init__(self, in_ch: int = 3, ch: int = 64, skip: bool = True):
        super().__init__()
        sn = nn.utils.parametrizations.spectral_norm
        self.skip = skip
        self.conv0 = nn.Conv2d(in_ch, ch, 3, 1, 1)
        self.down1 = sn(nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False))
        self.down2 = sn(nn.Conv2d(ch * 2, ch * 4, 4, 2, 1, bias=False))
        self.down3 = sn(nn.Conv2d(ch * 4, ch * 8, 4, 2, 1, bias=False))
        self.up1 = sn(nn.Conv2d(ch * 8, ch * 4, 3, 1, 1, bias=False))
        self.up2 = sn(nn.Conv2d(ch * 4, ch * 2, 3, 1, 1, bias=False))
        self.up3 = sn(nn.Conv2d(ch * 2, ch, 3, 1, 1, bias=False))
        self.conv1 = sn(nn.Conv2d(ch, ch, 3, 1, 1, bias=False))
        self.conv2 = sn(nn.Conv2d(ch, ch, 3, 1, 1, bias=False))
        self.head = nn.Conv2d(ch, 1, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
        up = lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)  # noqa: E731
        x = x * 2.0 - 1.0  # images come in [0, 1]
        x0 = act(self.conv0(x))
        x1 = act(self.down1(x0))
        x2 = act(self.down2(x1))
        x3 = act(self.down3(x2))
        y = act(self.up1(up(x3)))
        y = y + x2 if self.skip else y
        y = act(self.up2(up(y)))
        y = y + x1 if self.skip else y
        y = act(self.up3(up(y)))
        y = y + x0 if self.skip else y
        y = act(self.conv1(y))
        y = act(self.conv2(y))
        return self.head(y)
