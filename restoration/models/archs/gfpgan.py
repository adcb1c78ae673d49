"""GFPGAN v1.4 ("clean" architecture, no custom CUDA ops), state-dict compatible with ``GFPGANv1.4.pth``.

Written from the GFPGAN paper (Wang et al., CVPR 2021, "Towards Real-World Blind Face Restoration with Generative
Facial Prior"), the StyleGAN2 paper (Karras et al., CVPR 2020) and the compat kit in ``shared/compat/gfpgan_v1_4``
(key layout, shapes, golden outputs, full-config probe). Module attribute names follow the reference key layout so
the public checkpoint loads with ``strict=True``.

Structure:

* a U-Net encoder (``conv_body_first`` 1x1 conv, then ``log2(out_size) - 2`` residual blocks that halve the size
  down to 4x4, ``final_conv``), whose 4x4 feature is flattened and mapped by ``final_linear`` to one W latent per
  StyleGAN layer (``different_w``: ``2 * log2(out_size) - 2`` latents of ``num_style_feat``);
* a U-Net decoder (``conv_body_up``: residual blocks that double the size, each adding the encoder skip of the same
  size first) whose features give, per resolution 8..out_size, a spatial scale and shift (``condition_scale`` /
  ``condition_shift``) and, optionally, an intermediate RGB image (``toRGB``);
* a StyleGAN2 generator (``stylegan_decoder``, the "clean" variant: bilinear resampling instead of upfirdn blur,
  plain ``nn.Linear`` modulation, no equalised learning rate at run time) in which the first conv of every
  resolution is followed by the spatial feature transform ``x * scale + shift`` (on the second half of the channels
  only with ``sft_half``).

Input and output: ``B x 3 x out_size x out_size`` RGB in **[-1, 1]**; ``forward`` returns ``(image, out_rgbs)``
where ``image`` is about [-1, 1] (not clamped) and ``out_rgbs`` the intermediate RGB images (empty unless
``return_rgb``). The zoo card records ``value_range=[-1, 1]``; the pipeline converts from and to [0, 1]
(``restoration.models.io``). ``value_range`` is also a class attribute, used when no card is at hand.
``inference_kwargs`` (class attribute, ``randomize_noise=False, return_rgb=False``) is what FaceAdapt passes on
every call through ``restorer_io.run_restorer`` (restore, pseudo targets, evaluation, fine-tuning): deterministic.

Reference behaviour reproduced on purpose:

* ``randomize_noise=True`` (the default, and what GFPGANer uses) draws a fresh standard-normal noise map
  ``(B, 1, h, w)`` per StyleConv from the default generator, in layer order (``style_conv1``, then
  ``style_convs[0]``, ``[1]``, ...). ``randomize_noise=False`` uses the persistent ``noises.noiseN`` buffers.
  ``noise=[...]`` (an extension) passes one explicit map (or None) per layer.
* Extra keyword arguments (GFPGANer passes ``weight=0.5``) are accepted and ignored.
* ``style_mlp`` (unused because ``input_is_latent=True``) and ``toRGB`` (unused unless ``return_rgb``) exist so the
  checkpoint loads strictly.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GFPGANv1Clean", "StyleGAN2GeneratorClean", "StyleGAN2GeneratorCSFT"]

LRELU_SLOPE = 0.2


def _scaled_kaiming_(module: nn.Module, scale: float = 1.0, bias_fill: float = 0.0, **kaiming) -> None:
    """Kaiming-normal init of every Linear / Conv2d weight in ``module``, times ``scale``; biases set to ``bias_fill``."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, **kaiming)
            with torch.no_grad():
                m.weight.mul_(scale)
            if m.bias is not None:
                nn.init.constant_(m.bias, bias_fill)


def _resample(x: torch.Tensor, factor: float) -> torch.Tensor:
    return F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)


def _size_channels(base: float, channel_multiplier: int) -> dict[int, int]:
    """Channels per resolution of the StyleGAN2 layout, scaled by ``base`` (the ``narrow`` factor)."""
    return {
        4: int(512 * base), 8: int(512 * base), 16: int(512 * base), 32: int(512 * base),
        64: int(256 * channel_multiplier * base), 128: int(128 * channel_multiplier * base),
        256: int(64 * channel_multiplier * base), 512: int(32 * channel_multiplier * base),
        1024: int(16 * channel_multiplier * base),
    }


# ------------------------------------------------------------------------------------------------ StyleGAN2 (clean)
class NormStyleCode(nn.Module):
    """Pixel norm of the style code: ``x / sqrt(mean(x^2) + 1e-8)`` over the feature axis."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class ModulatedConv2d(nn.Module):
    """Style-modulated (and optionally demodulated) conv, one kernel per sample via a grouped conv.

    ``sample_mode`` 'upsample' / 'downsample' resizes the *input* bilinearly by 2 / 0.5 before the conv.
    Keys: ``weight`` (1, out, in, k, k), ``modulation.{weight,bias}`` (in, num_style_feat) / (in,).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_style_feat: int,
                 demodulate: bool = True, sample_mode: str | None = None, eps: float = 1e-8):
        super().__init__()
        if sample_mode not in (None, "upsample", "downsample"):
            raise ValueError(f"sample_mode must be None, 'upsample' or 'downsample', not {sample_mode!r}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.demodulate, self.sample_mode, self.eps = demodulate, sample_mode, eps
        self.modulation = nn.Linear(num_style_feat, in_channels, bias=True)
        _scaled_kaiming_(self.modulation, scale=1.0, bias_fill=1.0, a=0, mode="fan_in", nonlinearity="linear")
        fan_in = in_channels * kernel_size * kernel_size
        self.weight = nn.Parameter(torch.randn(1, out_channels, in_channels, kernel_size, kernel_size) / math.sqrt(fan_in))
        self.padding = kernel_size // 2

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        s = self.modulation(style).view(b, 1, c, 1, 1)
        w = self.weight * s  # (b, out, in, k, k)
        if self.demodulate:
            d = torch.rsqrt(w.pow(2).sum(dim=(2, 3, 4)) + self.eps)
            w = w * d.view(b, self.out_channels, 1, 1, 1)
        w = w.view(b * self.out_channels, c, self.kernel_size, self.kernel_size)
        if self.sample_mode == "upsample":
            x = _resample(x, 2)
        elif self.sample_mode == "downsample":
            x = _resample(x, 0.5)
        h, wd = x.shape[2:]
        out = F.conv2d(x.reshape(1, b * c, h, wd), w, padding=self.padding, groups=b)
        return out.view(b, self.out_channels, *out.shape[2:])

    def extra_repr(self) -> str:
        return (f"in={self.in_channels}, out={self.out_channels}, k={self.kernel_size}, "
                f"demodulate={self.demodulate}, sample_mode={self.sample_mode}")


class StyleConv(nn.Module):
    """Modulated conv (x sqrt 2 gain), per-pixel noise times a learned strength (``weight``), bias, LeakyReLU(0.2)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, num_style_feat: int,
                 demodulate: bool = True, sample_mode: str | None = None):
        super().__init__()
        self.modulated_conv = ModulatedConv2d(in_channels, out_channels, kernel_size, num_style_feat,
                                              demodulate=demodulate, sample_mode=sample_mode)
        self.weight = nn.Parameter(torch.zeros(1))  # noise strength
        self.bias = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) * math.sqrt(2.0)
        if noise is None:
            b, _, h, w = out.shape
            noise = out.new_empty(b, 1, h, w).normal_()
        out = out + self.weight * noise
        out = out + self.bias
        return F.leaky_relu(out, LRELU_SLOPE)


class ToRGB(nn.Module):
    """1x1 modulated conv to RGB (no demodulation) plus bias, added to the (bilinearly upsampled) previous RGB."""

    def __init__(self, in_channels: int, num_style_feat: int, upsample: bool = True):
        super().__init__()
        self.upsample = upsample
        self.modulated_conv = ModulatedConv2d(in_channels, 3, 1, num_style_feat, demodulate=False, sample_mode=None)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, style: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.modulated_conv(x, style) + self.bias
        if skip is not None:
            if self.upsample:
                skip = _resample(skip, 2)
            out = out + skip
        return out


class ConstantInput(nn.Module):
    def __init__(self, num_channel: int, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, num_channel, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.weight.expand(batch, -1, -1, -1)


class StyleGAN2GeneratorClean(nn.Module):
    """The StyleGAN2 synthesis network of the "clean" GFPGAN variant (bilinear resampling, no custom ops)."""

    def __init__(self, out_size: int, num_style_feat: int = 512, num_mlp: int = 8, channel_multiplier: int = 2,
                 narrow: float = 1):
        super().__init__()
        self.num_style_feat = num_style_feat
        mlp: list[nn.Module] = [NormStyleCode()]
        for _ in range(num_mlp):
            mlp += [nn.Linear(num_style_feat, num_style_feat, bias=True), nn.LeakyReLU(LRELU_SLOPE, inplace=True)]
        self.style_mlp = nn.Sequential(*mlp)
        _scaled_kaiming_(self.style_mlp, scale=1.0, bias_fill=0.0, a=LRELU_SLOPE, mode="fan_in",
                         nonlinearity="leaky_relu")

        ch = _size_channels(narrow, channel_multiplier)
        self.channels = ch
        self.log_size = int(math.log(out_size, 2))
        if 2 ** self.log_size != out_size or self.log_size < 3:
            raise ValueError(f"out_size must be a power of two >= 8, not {out_size}")
        self.num_layers = (self.log_size - 2) * 2 + 1
        self.num_latent = self.log_size * 2 - 2

        self.constant_input = ConstantInput(ch[4], size=4)
        self.style_conv1 = StyleConv(ch[4], ch[4], 3, num_style_feat, demodulate=True, sample_mode=None)
        self.to_rgb1 = ToRGB(ch[4], num_style_feat, upsample=False)

        self.style_convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        self.noises = nn.Module()
        for layer in range(self.num_layers):
            res = 2 ** ((layer + 5) // 2)  # 4, 8, 8, 16, 16, ...
            self.noises.register_buffer(f"noise{layer}", torch.randn(1, 1, res, res))
        in_ch = ch[4]
        for level in range(3, self.log_size + 1):
            out_ch = ch[2 ** level]
            self.style_convs.append(StyleConv(in_ch, out_ch, 3, num_style_feat, demodulate=True, sample_mode="upsample"))
            self.style_convs.append(StyleConv(out_ch, out_ch, 3, num_style_feat, demodulate=True, sample_mode=None))
            self.to_rgbs.append(ToRGB(out_ch, num_style_feat, upsample=True))
            in_ch = out_ch

    def make_noise(self) -> list[torch.Tensor]:
        dev = self.constant_input.weight.device
        return [torch.randn(1, 1, 2 ** ((i + 5) // 2), 2 ** ((i + 5) // 2), device=dev) for i in range(self.num_layers)]

    def mean_latent(self, num_latent: int) -> torch.Tensor:
        z = torch.randn(num_latent, self.num_style_feat, device=self.constant_input.weight.device)
        return self.style_mlp(z).mean(0, keepdim=True)

    def _latent(self, styles: Sequence[torch.Tensor], input_is_latent: bool, truncation: float,
                truncation_latent: torch.Tensor | None, inject_index: int | None) -> torch.Tensor:
        """(B, num_latent, num_style_feat) W+ code from one or two style codes (style mixing)."""
        if not input_is_latent:
            styles = [self.style_mlp(s) for s in styles]
        if truncation < 1:
            styles = [truncation_latent + truncation * (s - truncation_latent) for s in styles]
        if len(styles) == 1:
            s = styles[0]
            return s if s.ndim >= 3 else s.unsqueeze(1).repeat(1, self.num_latent, 1)
        if len(styles) == 2:
            if inject_index is None:
                inject_index = random.randint(1, self.num_latent - 1)
            first = styles[0].unsqueeze(1).repeat(1, inject_index, 1)
            second = styles[1].unsqueeze(1).repeat(1, self.num_latent - inject_index, 1)
            return torch.cat([first, second], 1)
        raise ValueError(f"one or two style codes expected, got {len(styles)}")

    def _noise_list(self, noise, randomize_noise: bool) -> list:
        if noise is None:
            if randomize_noise:
                return [None] * self.num_layers
            return [getattr(self.noises, f"noise{i}") for i in range(self.num_layers)]
        noise = list(noise)
        if len(noise) != self.num_layers:
            raise ValueError(f"noise: {self.num_layers} maps (or None) expected, got {len(noise)}")
        return noise

    def _synthesis(self, latent: torch.Tensor, noise: list, conditions: Sequence[torch.Tensor] | None = None,
                   sft_half: bool = False) -> torch.Tensor:
        out = self.constant_input(latent.shape[0])
        out = self.style_conv1(out, latent[:, 0], noise=noise[0])
        skip = self.to_rgb1(out, latent[:, 1])
        i = 1
        for k, to_rgb in enumerate(self.to_rgbs):
            conv_up, conv = self.style_convs[2 * k], self.style_convs[2 * k + 1]
            out = conv_up(out, latent[:, i], noise=noise[2 * k + 1])
            if conditions is not None and i < len(conditions):
                scale, shift = conditions[i - 1], conditions[i]  # conditions = [scale0, shift0, scale1, ...]
                if sft_half:
                    keep, mod = torch.split(out, out.size(1) // 2, dim=1)
                    out = torch.cat([keep, mod * scale + shift], dim=1)
                else:
                    out = out * scale + shift
            out = conv(out, latent[:, i + 1], noise=noise[2 * k + 2])
            skip = to_rgb(out, latent[:, i + 2], skip)
            i += 2
        return skip

    def forward(self, styles: Sequence[torch.Tensor], input_is_latent: bool = False, noise=None,
                randomize_noise: bool = True, truncation: float = 1, truncation_latent: torch.Tensor | None = None,
                inject_index: int | None = None, return_latents: bool = False):
        latent = self._latent(styles, input_is_latent, truncation, truncation_latent, inject_index)
        image = self._synthesis(latent, self._noise_list(noise, randomize_noise))
        return image, (latent if return_latents else None)


class StyleGAN2GeneratorCSFT(StyleGAN2GeneratorClean):
    """The clean StyleGAN2 generator with spatial feature transforms (SFT) from the GFPGAN U-Net after each upsampling conv."""

    def __init__(self, out_size: int, num_style_feat: int = 512, num_mlp: int = 8, channel_multiplier: int = 2,
                 narrow: float = 1, sft_half: bool = False):
        super().__init__(out_size, num_style_feat=num_style_feat, num_mlp=num_mlp,
                         channel_multiplier=channel_multiplier, narrow=narrow)
        self.sft_half = sft_half

    def forward(self, styles: Sequence[torch.Tensor], conditions: Sequence[torch.Tensor], input_is_latent: bool = False,
                noise=None, randomize_noise: bool = True, truncation: float = 1,
                truncation_latent: torch.Tensor | None = None, inject_index: int | None = None,
                return_latents: bool = False):
        latent = self._latent(styles, input_is_latent, truncation, truncation_latent, inject_index)
        image = self._synthesis(latent, self._noise_list(noise, randomize_noise), conditions, self.sft_half)
        return image, (latent if return_latents else None)


# ------------------------------------------------------------------------------------------------------- GFPGAN U-Net
class ResBlock(nn.Module):
    """conv3x3 + lrelu, bilinear resize (x0.5 'down' / x2 'up'), conv3x3 + lrelu; plus a resized 1x1 (no bias) skip."""

    def __init__(self, in_channels: int, out_channels: int, mode: str = "down"):
        super().__init__()
        if mode not in ("down", "up"):
            raise ValueError(f"mode must be 'down' or 'up', not {mode!r}")
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, 1, 1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.scale_factor = 0.5 if mode == "down" else 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.leaky_relu(self.conv1(x), LRELU_SLOPE)
        out = _resample(out, self.scale_factor)
        out = F.leaky_relu(self.conv2(out), LRELU_SLOPE)
        return out + self.skip(_resample(x, self.scale_factor))


def _sft_branch(channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, 1, 1), nn.LeakyReLU(LRELU_SLOPE, True),
        nn.Conv2d(channels, out_channels, 3, 1, 1),
    )


class GFPGANv1Clean(nn.Module):
    """GFPGAN v1 "clean" (v1.2-v1.4 checkpoints). Public v1.4 config: ``out_size=512, num_style_feat=512,
    channel_multiplier=2, decoder_load_path=None, fix_decoder=False, num_mlp=8, input_is_latent=True,
    different_w=True, narrow=1, sft_half=True``. Input/output in [-1, 1]; returns ``(image, out_rgbs)``."""

    value_range = (-1.0, 1.0)
    # FaceAdapt's call (restoration.models.io.run_restorer: restoring, pseudo targets, evaluation, fine-tuning):
    # the stored ``noises.noiseN`` maps instead of fresh noise per call, so the same face always gives the same
    # output (GFPGANer draws new noise each call; the bare forward keeps that default), no intermediate RGBs
    inference_kwargs = {"randomize_noise": False, "return_rgb": False}

    def __init__(self, out_size: int, num_style_feat: int = 512, channel_multiplier: int = 1,
                 decoder_load_path: str | None = None, fix_decoder: bool = True, num_mlp: int = 8,
                 input_is_latent: bool = False, different_w: bool = False, narrow: float = 1,
                 sft_half: bool = False):
        super().__init__()
        self.input_is_latent = input_is_latent
        self.different_w = different_w
        self.num_style_feat = num_style_feat
        self.out_size = out_size

        ch = _size_channels(narrow * 0.5, channel_multiplier)  # the U-Net has half the decoder's channels
        self.log_size = int(math.log(out_size, 2))
        if 2 ** self.log_size != out_size or self.log_size < 3:
            raise ValueError(f"out_size must be a power of two >= 8, not {out_size}")

        self.conv_body_first = nn.Conv2d(3, ch[out_size], 1)
        in_ch = ch[out_size]
        self.conv_body_down = nn.ModuleList()
        for level in range(self.log_size, 2, -1):
            out_ch = ch[2 ** (level - 1)]
            self.conv_body_down.append(ResBlock(in_ch, out_ch, mode="down"))
            in_ch = out_ch
        self.final_conv = nn.Conv2d(in_ch, ch[4], 3, 1, 1)

        in_ch = ch[4]
        self.conv_body_up = nn.ModuleList()
        for level in range(3, self.log_size + 1):
            out_ch = ch[2 ** level]
            self.conv_body_up.append(ResBlock(in_ch, out_ch, mode="up"))
            in_ch = out_ch

        self.toRGB = nn.ModuleList(nn.Conv2d(ch[2 ** level], 3, 1) for level in range(3, self.log_size + 1))

        num_w = (self.log_size * 2 - 2) if different_w else 1
        self.final_linear = nn.Linear(ch[4] * 4 * 4, num_w * num_style_feat)

        self.stylegan_decoder = StyleGAN2GeneratorCSFT(
            out_size=out_size, num_style_feat=num_style_feat, num_mlp=num_mlp,
            channel_multiplier=channel_multiplier, narrow=narrow, sft_half=sft_half,
        )
        if decoder_load_path:
            state = torch.load(decoder_load_path, map_location="cpu", weights_only=True)
            self.stylegan_decoder.load_state_dict(state["params_ema"])
        if fix_decoder:
            for p in self.stylegan_decoder.parameters():
                p.requires_grad = False

        self.condition_scale = nn.ModuleList()
        self.condition_shift = nn.ModuleList()
        for level in range(3, self.log_size + 1):
            c = ch[2 ** level]
            sft_out = c if sft_half else 2 * c
            self.condition_scale.append(_sft_branch(c, sft_out))
            self.condition_shift.append(_sft_branch(c, sft_out))

    def forward(self, x: torch.Tensor, return_latents: bool = False, return_rgb: bool = True,
                randomize_noise: bool = True, noise=None, **kwargs):
        """``x``: B x 3 x out_size x out_size in [-1, 1]. Returns ``(image, out_rgbs)``.

        ``kwargs`` (e.g. GFPGANer's ``weight``) are ignored, as in the reference. ``noise``: optional list of one
        noise map (or None) per StyleGAN layer, overriding ``randomize_noise``.
        """
        if x.shape[-2:] != (self.out_size, self.out_size):
            raise ValueError(f"GFPGAN expects {self.out_size}x{self.out_size} inputs, got {tuple(x.shape[-2:])}")
        skips = []
        feat = F.leaky_relu(self.conv_body_first(x), LRELU_SLOPE)
        for block in self.conv_body_down:
            feat = block(feat)
            skips.insert(0, feat)
        feat = F.leaky_relu(self.final_conv(feat), LRELU_SLOPE)

        style = self.final_linear(feat.flatten(1))
        if self.different_w:
            style = style.view(style.size(0), -1, self.num_style_feat)

        conditions, out_rgbs = [], []
        for i, block in enumerate(self.conv_body_up):
            feat = block(feat + skips[i])
            conditions.append(self.condition_scale[i](feat))
            conditions.append(self.condition_shift[i](feat))
            if return_rgb:
                out_rgbs.append(self.toRGB[i](feat))

        image, _ = self.stylegan_decoder([style], conditions, return_latents=return_latents,
                                         input_is_latent=self.input_is_latent, noise=noise,
                                         randomize_noise=randomize_noise)
        return image, out_rgbs
