"""Face SwinIR of DT-BFR / DifFace, state-dict compatible with the public checkpoints.

Written from the SwinIR paper (Liang et al. 2021), the Swin Transformer paper (Liu et al. 2021) and the compat kit in
``shared/compat/swinir_face`` (key layout, shapes, golden outputs). Module attribute names follow the reference key
layout so public checkpoints load with ``strict=True``.

The face variant differs from the classic SwinIR super-resolution model: the image is first folded by
``PixelUnshuffle(unshuffle_scale)`` (512x512x3 -> 64x64x192), the transformer runs at that low resolution, and a
``nearest+conv`` head upsamples by ``sf`` (log2(sf) stages of nearest x2 + 3x3 conv) back to the input size.

Reference quirks reproduced on purpose:

* ``conv_first`` is ``Sequential(PixelUnshuffle, Conv2d)``, so its keys are ``conv_first.1.*``.
* ``attn_mask`` is a *persistent* buffer, registered only on shifted blocks (odd index) and computed for the
  construction-time token grid ``img_size // patch_size``; other grid sizes recompute the mask on the fly.
* ``relative_position_index`` is a persistent int64 buffer (part of the checkpoint).
* A block whose construction-time grid is not larger than the window uses one window of the whole grid and no shift.
* ``conv_before_upsample`` uses LeakyReLU with PyTorch's default slope 0.01; the upsampling stages use slope 0.2.
* The RGB mean is subtracted inside the model and is not part of the state_dict.
* Input padding: reflect-pad H and W to a multiple of ``window_size`` *before* the unshuffle, which only helps inputs
  a few pixels short of a multiple of ``unshuffle_scale * window_size``; other sizes are rejected (the reference
  fails on them with a reshape error).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["SwinIRFace"]

MASK_VALUE = -100.0  # additive attention mask between tokens that come from different regions of a shifted window


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/ws * W/ws, ws * ws, C), windows in row-major order."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_merge(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * nW, ws * ws, C) -> (B, H, W, C)."""
    c = windows.shape[-1]
    x = windows.view(-1, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def shifted_window_mask(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    """(nW, ws*ws, ws*ws) additive mask for a grid cyclically shifted by ``shift``: 0 within a region, -100 across.

    After the shift, the last window row/column mixes tokens from up to three regions per axis (the bulk, the last
    ``ws - shift`` and the wrapped-around ``shift`` tokens); tokens may only attend inside their own region.
    """
    region = torch.zeros(1, h, w, 1)
    bounds = ((0, -ws), (-ws, -shift), (-shift, None))
    label = 0
    for hs, he in bounds:
        for ws_, we in bounds:
            region[:, hs:he, ws_:we, :] = label
            label += 1
    windows = window_partition(region, ws).squeeze(-1)  # (nW, ws*ws)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return torch.where(diff != 0, MASK_VALUE, 0.0)


def relative_position_index(ws: int) -> torch.Tensor:
    """(ws*ws, ws*ws) int64 index into the (2ws-1)^2 relative position bias table."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + (ws - 1)  # (2, N, N), each in [0, 2ws-2]
    return rel[0] * (2 * ws - 1) + rel[1]


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample while training."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside a window, with a learned relative position bias per head."""

    def __init__(
        self, dim: int, window_size: int, num_heads: int, qkv_bias: bool, qk_scale: float | None,
        attn_drop: float, proj_drop: float,
    ):
        super().__init__()
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", relative_position_index(window_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (B*nW, N, C); mask: (nW, N, N) or None."""
        bw, n, c = x.shape
        q, k, v = self.qkv(x).reshape(bw, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # (B*nW, heads, N, N)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = (attn.view(bw // nw, nw, self.num_heads, n, n) + mask[None, :, None]).view(-1, self.num_heads, n, n)
        attn = self.attn_drop(attn.softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c)))


class SwinTransformerBlock(nn.Module):
    """(Shifted-)window attention + MLP, both pre-norm residual, on tokens of shape (B, H*W, C)."""

    def __init__(
        self, dim: int, input_resolution: tuple[int, int], num_heads: int, window_size: int, shift_size: int,
        mlp_ratio: float, qkv_bias: bool, qk_scale: float | None, drop: float, attn_drop: float, drop_path: float,
        norm_layer: Callable[[int], nn.Module],
    ):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        if min(self.input_resolution) <= window_size:
            # the whole grid fits in one window: no partition and no shift
            window_size, shift_size = min(self.input_resolution), 0
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = norm_layer(dim)
        self.attn = WindowAttention(dim, window_size, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        if shift_size:
            # persistent, so it is part of the checkpoint (and must be, for a strict load)
            self.register_buffer("attn_mask", shifted_window_mask(*self.input_resolution, window_size, shift_size))
        else:
            self.attn_mask = None

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        h, w = x_size
        b, _, c = x.shape
        ws, shift = self.window_size, self.shift_size
        y = self.norm1(x).view(b, h, w, c)
        if shift:
            y = torch.roll(y, shifts=(-shift, -shift), dims=(1, 2))
            if tuple(x_size) == self.input_resolution:
                mask = self.attn_mask
            else:
                mask = shifted_window_mask(h, w, ws, shift).to(device=x.device, dtype=x.dtype)
        else:
            mask = None
        y = window_merge(self.attn(window_partition(y, ws), mask), ws, h, w)
        if shift:
            y = torch.roll(y, shifts=(shift, shift), dims=(1, 2))
        x = x + self.drop_path(y.reshape(b, h * w, c))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BasicLayer(nn.Module):
    """``depth`` Swin blocks alternating plain and shifted windows."""

    def __init__(self, depth: int, drop_path: Sequence[float], use_checkpoint: bool, **block_kwargs):
        super().__init__()
        ws = block_kwargs["window_size"]
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(shift_size=0 if i % 2 == 0 else ws // 2, drop_path=drop_path[i], **block_kwargs)
            for i in range(depth)
        )
        self.use_checkpoint = use_checkpoint

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        for blk in self.blocks:
            if self.use_checkpoint and self.training:
                x = checkpoint(blk, x, x_size, use_reentrant=False)
            else:
                x = blk(x, x_size)
        return x


def tokens_to_image(x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
    """(B, H*W, C) -> (B, C, H, W)."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *x_size)


def image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C)."""
    return x.flatten(2).transpose(1, 2)


class PatchEmbed(nn.Module):
    """Image -> tokens, optionally layer-normed (``patch_embed.norm``); patch size 1 (no projection)."""

    def __init__(self, dim: int, norm_layer: Callable[[int], nn.Module] | None):
        super().__init__()
        if norm_layer is not None:
            self.norm = norm_layer(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = image_to_tokens(x)
        return self.norm(x) if hasattr(self, "norm") else x


def residual_conv(dim: int, kind: str) -> nn.Module:
    """The conv closing each RSTB and the body: one 3x3 conv, or a 3-conv bottleneck that saves parameters."""
    if kind == "1conv":
        return nn.Conv2d(dim, dim, 3, 1, 1)
    if kind == "3conv":
        return nn.Sequential(
            nn.Conv2d(dim, dim // 4, 3, 1, 1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim // 4, dim // 4, 1, 1, 0), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(dim // 4, dim, 3, 1, 1),
        )
    raise ValueError(f"resi_connection must be '1conv' or '3conv', got {kind!r}")


class RSTB(nn.Module):
    """Residual Swin Transformer Block: Swin layer, then a conv on the image, plus a long skip."""

    def __init__(self, dim: int, resi_connection: str, **layer_kwargs):
        super().__init__()
        self.residual_group = BasicLayer(dim=dim, **layer_kwargs)
        self.conv = residual_conv(dim, resi_connection)

    def forward(self, x: torch.Tensor, x_size: tuple[int, int]) -> torch.Tensor:
        y = tokens_to_image(self.residual_group(x, x_size), x_size)
        return image_to_tokens(self.conv(y)) + x


class SwinIRFace(nn.Module):
    """DT-BFR / DifFace face SwinIR (``models/swinir.py:SwinIR``) with the ``nearest+conv`` upsampler.

    ``forward(x)``: x is Bx``in_chans``xHxW in [0, 1]; returns the raw (unclamped) restored image of size
    ``H * sf / unshuffle_scale`` (the input size for the published config). H and W must be multiples of
    ``unshuffle_scale * window_size`` (64 for the published config), up to the reference's small reflect padding.
    """

    NUM_FEAT = 64  # channels of the upsampling head, fixed in the reference

    def __init__(
        self,
        img_size: int | tuple[int, int] = 64,
        patch_size: int = 1,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (6, 6, 6, 6),
        num_heads: Sequence[int] = (6, 6, 6, 6),
        window_size: int = 7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        ape: bool = False,
        patch_norm: bool = True,
        use_checkpoint: bool = False,
        sf: int = 4,
        img_range: float = 1.0,
        upsampler: str = "",
        resi_connection: str = "1conv",
        unshuffle: bool = False,
        unshuffle_scale: int | None = None,
    ):
        super().__init__()
        if upsampler != "nearest+conv":
            raise ValueError(f"only upsampler='nearest+conv' (the face model) is implemented, got {upsampler!r}")
        if sf < 2 or sf & (sf - 1):
            raise ValueError(f"'nearest+conv' upsamples by powers of two; sf must be 2, 4, 8, ..., got {sf}")
        if patch_size != 1:
            raise ValueError(f"only patch_size=1 is supported (as in every SwinIR config), got {patch_size}")
        if len(depths) != len(num_heads):
            raise ValueError("depths and num_heads must have the same length")
        if unshuffle and not unshuffle_scale:
            raise ValueError("unshuffle=True needs unshuffle_scale")

        self.img_range = img_range
        self.sf = sf
        self.window_size = window_size
        self.unshuffle_scale = unshuffle_scale if unshuffle else 1
        rgb_mean = (0.4488, 0.4371, 0.4040) if in_chans == 3 else (0.0,) * in_chans
        # not a checkpoint entry in the reference, hence non-persistent
        self.register_buffer("mean", torch.tensor(rgb_mean).view(1, in_chans, 1, 1), persistent=False)

        # shallow features
        if unshuffle:
            self.conv_first = nn.Sequential(
                nn.PixelUnshuffle(unshuffle_scale), nn.Conv2d(in_chans * unshuffle_scale**2, embed_dim, 3, 1, 1)
            )
        else:
            self.conv_first = nn.Conv2d(in_chans, embed_dim, 3, 1, 1)

        # deep features
        img_h, img_w = (img_size, img_size) if isinstance(img_size, int) else img_size
        grid = (img_h // patch_size, img_w // patch_size)  # token grid the stored attn_mask buffers are built for
        self.patch_embed = PatchEmbed(embed_dim, norm_layer if patch_norm else None)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
            nn.init.trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(drop_rate)
        n_blocks = sum(depths)  # stochastic depth rate grows linearly over all blocks
        dpr = [drop_path_rate * i / max(n_blocks - 1, 1) for i in range(n_blocks)]
        self.layers = nn.ModuleList(
            RSTB(
                dim=embed_dim, resi_connection=resi_connection, depth=depth, use_checkpoint=use_checkpoint,
                drop_path=dpr[sum(depths[:i]):sum(depths[: i + 1])], input_resolution=grid, num_heads=heads,
                window_size=window_size, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                drop=drop_rate, attn_drop=attn_drop_rate, norm_layer=norm_layer,
            )
            for i, (depth, heads) in enumerate(zip(depths, num_heads))
        )
        self.norm = norm_layer(embed_dim)
        self.conv_after_body = residual_conv(embed_dim, resi_connection)

        # reconstruction: conv, then log2(sf) x (nearest x2, conv, lrelu), conv_hr, conv_last
        nf = self.NUM_FEAT
        self.conv_before_upsample = nn.Sequential(nn.Conv2d(embed_dim, nf, 3, 1, 1), nn.LeakyReLU(inplace=True))
        self.num_up = int(math.log2(sf))
        for i in range(1, self.num_up + 1):
            setattr(self, f"conv_up{i}", nn.Conv2d(nf, nf, 3, 1, 1))
        self.conv_hr = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, in_chans, 3, 1, 1)
        self.lrelu = nn.LeakyReLU(negative_slope=0.2, inplace=True)

        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, WindowAttention):
            nn.init.trunc_normal_(m.relative_position_bias_table, std=0.02)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """Reflect-pad to a multiple of window_size (reference behaviour); reject sizes that still do not fit."""
        ws, need = self.window_size, self.unshuffle_scale * self.window_size
        h, w = x.shape[-2:]
        ph, pw = (-h) % ws, (-w) % ws
        if (h + ph) % need or (w + pw) % need:
            raise ValueError(
                f"input size {h}x{w} not supported: H and W must be multiples of {need} "
                f"(unshuffle_scale {self.unshuffle_scale} x window_size {ws})"
            )
        return F.pad(x, (0, pw, 0, ph), mode="reflect") if ph or pw else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x_size = (x.shape[2], x.shape[3])
        t = self.patch_embed(x)
        if hasattr(self, "absolute_pos_embed"):
            if t.shape[1] != self.absolute_pos_embed.shape[1]:
                raise ValueError(f"ape=True needs a token grid of img_size, got {x_size[0]}x{x_size[1]}")
            t = t + self.absolute_pos_embed
        t = self.pos_drop(t)
        for layer in self.layers:
            t = layer(t, x_size)
        return tokens_to_image(self.norm(t), x_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        mean = self.mean.type_as(x)
        x = (self._pad(x) - mean) * self.img_range
        x = self.conv_first(x)
        x = self.conv_before_upsample(self.conv_after_body(self.forward_features(x)) + x)
        for i in range(1, self.num_up + 1):
            x = self.lrelu(getattr(self, f"conv_up{i}")(F.interpolate(x, scale_factor=2, mode="nearest")))
        x = self.conv_last(self.lrelu(self.conv_hr(x)))
        x = x / self.img_range + mean
        return x[:, :, : h * self.sf // self.unshuffle_scale, : w * self.sf // self.unshuffle_scale]
