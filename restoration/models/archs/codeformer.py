"""CodeFormer (Zhou et al., NeurIPS 2022), state-dict compatible with the public ``codeformer.pth``.

Written from the CodeFormer paper ("Towards Robust Blind Face Restoration with Codebook Lookup Transformer") and
the compat kit in ``shared/compat/codeformer`` (key layout, shapes, golden outputs). Attribute names follow the
reference key layout so the public checkpoint (its ``params_ema`` entry) loads with ``strict=True``.

The model has three parts:

* a VQGAN: a convolutional ``encoder`` (``encoder.blocks.N``) that maps a 512x512 face to a 16x16x256 latent, a
  codebook ``quantize.embedding`` (1024 x 256), and a ``generator`` (``generator.blocks.N``) that decodes codebook
  features back to an image;
* a transformer (``feat_emb``, ``position_emb``, ``ft_layers``, ``idx_pred_layer``) that predicts, for each of
  the 256 latent positions, logits over the codebook entries from the low-quality encoder features;
* controllable feature transformation (CFT) blocks (``fuse_convs_dict``) that modulate the generator features
  with encoder features at the resolutions in ``connect_list``; the fidelity weight ``w`` scales their residual
  (``w=0``: pure codebook output, the best quality; ``w=1``: the most faithful to the input).

Call: ``out, logits, lq_feat = model(x, w=0.5, adain=True)`` with ``x`` Bx3x512x512 RGB in [-1, 1]; ``out`` is
the image (about [-1, 1], not clamped), ``logits`` is (B, 256, codebook_size), ``lq_feat`` the encoder latent.

Reference behaviour reproduced on purpose:

* GroupNorm(32 groups, eps 1e-6) everywhere in the VQGAN; swish is ``x * sigmoid(x)``.
* Downsampling pads right/bottom by one zero pixel and uses a 3x3 stride-2 convolution without padding.
* The VQGAN attention block scales ``q k`` by ``C ** -0.5`` (one head over all channels).
* The transformer layer is pre-norm; the positional embedding is added to queries and keys, not to values;
  the MLP uses exact GELU and a hidden width of ``2 * dim_embd``.
* The codebook entry is the top-1 of ``softmax(logits)``; with ``adain=True`` the looked-up features get the
  per-channel mean and (unbiased, eps 1e-5) std of the encoder features.
* The encoder feature of a resolution is taken after its last residual block; the generator is fused after the
  first residual block of a resolution (after the last one at the lowest resolution), as in the reference tables.
* ``fix_modules`` (default ``quantize`` and ``generator``) turns off ``requires_grad`` of those parts.

The reference hard-codes the VQGAN (``img_size=512, nf=64, ch_mult=[1,2,2,4,4,8], res_blocks=2,
attn_resolutions=[16], emb_dim=256``). Here they are keyword-only arguments with those defaults, so that small
structure-preserving variants can be built for tests and for training on a CPU; the reference keywords alone
build the published model.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from restoration.models.checkpoints import load_strict, read_pth

__all__ = ["CodeFormer", "VectorQuantizer", "adaptive_instance_norm"]

GROUPS = 32
GN_EPS = 1e-6
ADAIN_EPS = 1e-5


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=GN_EPS, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _channel_stats(feat: torch.Tensor, eps: float = ADAIN_EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and sqrt(unbiased variance + eps), shaped (B, C, 1, 1)."""
    b, c = feat.shape[:2]
    flat = feat.reshape(b, c, -1)
    return flat.mean(dim=2).view(b, c, 1, 1), (flat.var(dim=2) + eps).sqrt().view(b, c, 1, 1)


def adaptive_instance_norm(content: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
    """Give ``content`` the channel statistics of ``style`` (adaptive instance normalisation)."""
    s_mean, s_std = _channel_stats(style)
    c_mean, c_std = _channel_stats(content)
    return (content - c_mean) / c_std * s_std + s_mean


class ResBlock(nn.Module):
    """norm-swish-conv3x3 twice plus a skip (1x1 conv ``conv_out`` when the channel count changes)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.cin, self.cout = cin, cout
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.conv_out = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        skip = self.conv_out(x) if self.cin != self.cout else x
        return h + skip


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all H*W positions with 1x1-conv projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = x.shape
        q = self.q(h).reshape(b, c, hh * ww)
        k = self.k(h).reshape(b, c, hh * ww)
        v = self.v(h).reshape(b, c, hh * ww)
        attn = torch.bmm(q.transpose(1, 2), k) * (int(c) ** -0.5)  # (B, query, key)
        attn = attn.softmax(dim=2)
        out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Blocks(nn.Module):
    """A flat ``blocks`` ModuleList (the reference key layout) plus the per-resolution fusion taps."""

    def __init__(self, blocks: list[nn.Module], taps: dict[int, int]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.taps = taps  # resolution -> index of the block after which its feature is taken / fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _encoder(nf: int, emb_dim: int, ch_mult: Sequence[int], res_blocks: int, img_size: int,
             attn_resolutions: Sequence[int]) -> _Blocks:
    blocks: list[nn.Module] = [nn.Conv2d(3, nf, 3, padding=1)]
    taps: dict[int, int] = {}
    ch, res = nf, img_size
    for i, mult in enumerate(ch_mult):
        for _ in range(res_blocks):
            blocks.append(ResBlock(ch, nf * mult))
            ch = nf * mult
            taps[res] = len(blocks) - 1  # after the stage's last residual block
            if res in attn_resolutions:
                blocks.append(AttnBlock(ch))
        if i < len(ch_mult) - 1:
            blocks.append(Downsample(ch))
            res //= 2
    blocks += [ResBlock(ch, ch), AttnBlock(ch), ResBlock(ch, ch), _norm(ch), nn.Conv2d(ch, emb_dim, 3, padding=1)]
    return _Blocks(blocks, taps)


def _generator(nf: int, emb_dim: int, ch_mult: Sequence[int], res_blocks: int, img_size: int,
               attn_resolutions: Sequence[int]) -> _Blocks:
    ch = nf * ch_mult[-1]
    res = img_size // 2 ** (len(ch_mult) - 1)
    lowest = res
    blocks: list[nn.Module] = [nn.Conv2d(emb_dim, ch, 3, padding=1), ResBlock(ch, ch), AttnBlock(ch), ResBlock(ch, ch)]
    taps: dict[int, int] = {}
    for i in reversed(range(len(ch_mult))):
        for j in range(res_blocks):
            blocks.append(ResBlock(ch, nf * ch_mult[i]))
            ch = nf * ch_mult[i]
            if j == 0 or res == lowest:  # first residual block of a stage; the last one at the lowest resolution
                taps[res] = len(blocks) - 1
            if res in attn_resolutions:
                blocks.append(AttnBlock(ch))
        if i > 0:
            blocks.append(Upsample(ch))
            res *= 2
    blocks += [_norm(ch), nn.Conv2d(ch, 3, 3, padding=1)]
    return _Blocks(blocks, taps)


class VectorQuantizer(nn.Module):
    """The codebook: nearest-entry quantisation (VQGAN training) and lookup by index (CodeFormer)."""

    def __init__(self, codebook_size: int, emb_dim: int, beta: float = 0.25):
        super().__init__()
        self.codebook_size, self.emb_dim, self.beta = codebook_size, emb_dim, beta
        self.embedding = nn.Embedding(codebook_size, emb_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Indices (B, H*W) of the codebook entries closest (L2) to the vectors of z (B, C, H, W)."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.emb_dim)
        e = self.embedding.weight
        dist = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        return dist.argmin(dim=1).view(z.shape[0], -1)

    def lookup(self, indices: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Codebook vectors for indices (B, H*W[, 1]) as a (B, C, H, W) feature map."""
        b = indices.shape[0]
        feat = F.embedding(indices.reshape(b, -1), self.embedding.weight)  # (B, HW, C)
        return feat.view(b, hw[0], hw[1], self.emb_dim).permute(0, 3, 1, 2).contiguous()

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(straight-through z_q, codebook + beta * commitment loss, {"indices", "perplexity"})."""
        idx = self.nearest(z)
        z_q = self.lookup(idx, z.shape[-2:])
        loss = (z_q.detach() - z).pow(2).mean() + self.beta * (z_q - z.detach()).pow(2).mean()
        usage = torch.bincount(idx.reshape(-1), minlength=self.codebook_size).float() / idx.numel()
        perplexity = torch.exp(-(usage * torch.log(usage + 1e-10)).sum())
        return z + (z_q - z).detach(), loss, {"indices": idx, "perplexity": perplexity}


class TransformerSALayer(nn.Module):
    """Pre-norm self-attention + GELU MLP; sequence-first tensors (HW, B, C); position added to q and k only."""

    def __init__(self, dim: int, n_head: int, dim_mlp: int, dropout: float = 0.0):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, n_head, dropout=dropout)
        self.linear1 = nn.Linear(dim, dim_mlp)
        self.linear2 = nn.Linear(dim_mlp, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        qk = h if pos is None else h + pos
        x = x + self.dropout(self.self_attn(qk, qk, value=h)[0])  # default need_weights: the reference's code path
        h = self.linear2(self.dropout(F.gelu(self.linear1(self.norm2(x)))))
        return x + self.dropout(h)


class FuseSFT(nn.Module):
    """CFT block: scale/shift of the generator feature predicted from [encoder feature, generator feature]."""

    def __init__(self, ch: int):
        super().__init__()
        self.encode_enc = ResBlock(2 * ch, ch)
        self.scale = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.LeakyReLU(0.2, True), nn.Conv2d(ch, ch, 3, padding=1))
        self.shift = nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1), nn.LeakyReLU(0.2, True), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, enc: torch.Tensor, dec: torch.Tensor, w: float = 1.0) -> torch.Tensor:
        h = self.encode_enc(torch.cat([enc, dec], dim=1))
        return dec + w * (dec * self.scale(h) + self.shift(h))


class CodeFormer(nn.Module):
    """CodeFormer with the reference constructor keywords (plus keyword-only VQGAN sizes for small variants)."""

    value_range = (-1.0, 1.0)  # input and output image range (restoration.models.io reads it without a card)
    default_fidelity = 0.5  # `w` of the reference inference script (inference_codeformer.py --w 0.5)
    # the reference inference call (restoration.models.io.run_restorer uses it; the bare forward keeps w=0, no adain)
    inference_kwargs = {"w": 0.5, "adain": True}

    def __init__(
        self,
        dim_embd: int = 512,
        n_head: int = 8,
        n_layers: int = 9,
        codebook_size: int = 1024,
        latent_size: int = 256,
        connect_list: Sequence[str] = ("32", "64", "128", "256"),
        fix_modules: Sequence[str] | None = ("quantize", "generator"),
        vqgan_path: str | None = None,
        *,
        img_size: int = 512,
        nf: int = 64,
        ch_mult: Sequence[int] = (1, 2, 2, 4, 4, 8),
        res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        emb_dim: int = 256,
        beta: float = 0.25,
    ):
        super().__init__()
        ch_mult, attn_resolutions = list(ch_mult), [int(r) for r in attn_resolutions]
        self.img_size = int(img_size)
        self.latent_hw = self.img_size // 2 ** (len(ch_mult) - 1)
        if self.img_size % 2 ** (len(ch_mult) - 1) or self.latent_hw ** 2 != latent_size:
            raise ValueError(
                f"latent_size {latent_size} must be ({img_size} / 2**{len(ch_mult) - 1})**2 = {self.latent_hw ** 2}"
            )
        self.dim_embd, self.n_layers, self.emb_dim = dim_embd, n_layers, emb_dim

        # VQGAN part, registered first: the reference VQAutoEncoder base class creates these before the rest.
        self.encoder = _encoder(nf, emb_dim, ch_mult, res_blocks, self.img_size, attn_resolutions)
        self.quantize = VectorQuantizer(codebook_size, emb_dim, beta)
        self.generator = _generator(nf, emb_dim, ch_mult, res_blocks, self.img_size, attn_resolutions)
        if vqgan_path is not None:
            self._load_vqgan(vqgan_path)
        for name in fix_modules or ():
            for p in getattr(self, name).parameters():
                p.requires_grad = False

        self.position_emb = nn.Parameter(torch.zeros(latent_size, dim_embd))
        self.feat_emb = nn.Linear(emb_dim, dim_embd)
        self.ft_layers = nn.Sequential(*[TransformerSALayer(dim_embd, n_head, 2 * dim_embd) for _ in range(n_layers)])
        self.idx_pred_layer = nn.Sequential(nn.LayerNorm(dim_embd), nn.Linear(dim_embd, codebook_size, bias=False))

        self.channels = {str(self.img_size // 2**i): nf * m for i, m in enumerate(ch_mult)}
        self.fuse_encoder_block = {str(r): i for r, i in self.encoder.taps.items()}
        self.fuse_generator_block = {str(r): i for r, i in self.generator.taps.items()}
        self.connect_list = [str(s) for s in connect_list]
        unknown = [s for s in self.connect_list if s not in self.channels]
        if unknown:
            raise ValueError(f"connect_list {unknown} not among the resolutions {sorted(self.channels, key=int)}")
        self.fuse_convs_dict = nn.ModuleDict({s: FuseSFT(self.channels[s]) for s in self.connect_list})

    def _load_vqgan(self, path: str | Path) -> None:
        """Pre-trained VQGAN weights (``params_ema``) into encoder/quantize/generator, strictly."""
        vq = nn.Module()
        vq.encoder, vq.quantize, vq.generator = self.encoder, self.quantize, self.generator
        load_strict(vq, read_pth(path), name=Path(path).name)

    # ------------------------------------------------------------------------------------------------ pieces
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Encoder latent (B, emb_dim, h, w) and the features at the ``connect_list`` resolutions."""
        taps = {self.fuse_encoder_block[s]: s for s in self.connect_list}
        feats: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.encoder.blocks):
            x = block(x)
            if i in taps:
                feats[str(x.shape[-1])] = x
        return x, feats

    def predict_logits(self, lq_feat: torch.Tensor) -> torch.Tensor:
        """Transformer code prediction: (B, h*w, codebook_size) logits from the encoder latent."""
        b = lq_feat.shape[0]
        pos = self.position_emb.unsqueeze(1).expand(-1, b, -1)
        q = self.feat_emb(lq_feat.flatten(2).permute(2, 0, 1))  # (HW, B, dim_embd)
        for layer in self.ft_layers:
            q = layer(q, pos)
        return self.idx_pred_layer(q).permute(1, 0, 2)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """Codebook indices (B, h*w) of the nearest entries to the encoder latent of ``x`` (e.g. of a target)."""
        return self.quantize.nearest(self.encode(x)[0])

    def decode(self, quant_feat: torch.Tensor, enc_feats: dict[str, torch.Tensor] | None = None,
               w: float = 0.0) -> torch.Tensor:
        """Generator pass from codebook features, fused with ``enc_feats`` through the CFT blocks when ``w > 0``."""
        taps = {self.fuse_generator_block[s]: s for s in self.connect_list}
        x = quant_feat
        for i, block in enumerate(self.generator.blocks):
            x = block(x)
            if i in taps and w > 0:
                size = str(x.shape[-1])
                x = self.fuse_convs_dict[size](enc_feats[size].detach(), x, w)
        return x

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, w: float = 0.0, detach_16: bool = True, code_only: bool = False,
                adain: bool = False):
        """``(out, logits, lq_feat)``; with ``code_only`` just ``(logits, lq_feat)``. ``x`` in [-1, 1]."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"CodeFormer takes {self.img_size}x{self.img_size} inputs, got {tuple(x.shape[-2:])}")
        lq_feat, enc_feats = self.encode(x)
        logits = self.predict_logits(lq_feat)
        if code_only:
            return logits, lq_feat
        top = logits.softmax(dim=2).topk(1, dim=2).indices  # (B, HW, 1): the top-1 code, ties as the reference
        quant = self.quantize.lookup(top, (self.latent_hw, self.latent_hw))
        if detach_16:
            quant = quant.detach()
        if adain:
            quant = adaptive_instance_norm(quant, lq_feat)
        return self.decode(quant, enc_feats, w), logits, lq_feat
