"""Fine-tuning CodeFormer on (low-quality input, pseudo target) pairs (Kuai et al., WACV 2025, CodeFormer setting).

As CodeFormer's own code-prediction stage (``options/CodeFormer_stage2.yml`` of sczhou/CodeFormer), which the paper
follows for its CodeFormer experiments: only the encoder and the transformer learn, the codebook, the generator and
the CFT fusion blocks stay frozen, and the supervision is in code space:

    codes_t  = nearest codebook entries of E_hq(target)             (B, h*w), no gradient
    loss     = entropy * CE(logits(y), codes_t) + feat * mean((lq_feat(y) - codebook[codes_t])^2)

with ``logits, lq_feat = model(y, code_only=True)`` and y in [-1, 1] (the model's range; pairs come in [0, 1]).
``E_hq`` is a frozen copy of the *base model's* encoder unless another one is given (CodeFormer's own stage II
takes the codes from its stage-I VQGAN encoder, a separate file, ``vqgan_code1024.pth``; pass such an encoder as
``hq_encoder`` when you have it). Defaults: Adam lr 1e-4, betas (0.9, 0.99), no weight decay, EMA 0.995 of the
weights (no warm-up), entropy weight 0.5, feature weight 1.0, random horizontal flips (same for input and target).

Like `restoration.training.finetune.finetune`: batches sampled with replacement from a private generator seeded by
``seed``, gradient accumulation, ``ckpt_dir/last.pt`` (model, EMA, optimizer, step, history, RNG states) every
``ckpt_every`` steps and at the end, written atomically (`restoration.training.state.save`); a run resumes from it. ``progress("finetune", step,
steps)`` after every step; ``should_cancel()`` before every step (checkpoint, then `Cancelled`).
"""
from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from restoration.configs import strict_from_dict
from restoration.runtime import CancelFn, ProgressFn, resolve_device
import restoration.training.state as state
from restoration.training.batches import sample_pairs
from restoration.training.ema import ema_update, make_ema
from restoration.training.finetune import (
    CKPT_NAME, FinetuneResult, after_step, cancel_point, last_state, seeded_generator, stack_pairs,
)


__all__ = ["CodeFormerFinetuneConfig", "TRAINABLE", "trainable_parameters", "HQCodes", "code_losses",
           "finetune_codeformer"]

#: the parts that learn (encoder + transformer); everything else (quantize, generator, fuse_convs_dict) is frozen
TRAINABLE = ("encoder", "position_emb", "feat_emb", "ft_layers", "idx_pred_layer")


@dataclass
class CodeFormerFinetuneConfig:
    steps: int = 1000
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    ema_decay: float = 0.995
    entropy: float = 0.5          # code cross-entropy weight
    feat: float = 1.0             # L2 between lq_feat and the codebook features of the target's codes
    flip: bool = True
    ckpt_every: int = 200
    log_every: int = 10
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if min(self.steps, self.batch_size, self.grad_accum, self.ckpt_every, self.log_every) < 1:
            raise ValueError("steps, batch_size, grad_accum, ckpt_every and log_every must be >= 1")
        if self.entropy < 0 or self.feat < 0 or self.entropy + self.feat <= 0:
            raise ValueError("entropy and feat weights must be >= 0 and not both 0")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "CodeFormerFinetuneConfig":
        return strict_from_dict(cls, d, "CodeFormer fine-tune")

    @classmethod
    def from_finetune(cls, fcfg, **overrides) -> "CodeFormerFinetuneConfig":
        """The schedule fields of a `restoration.training.finetune.FinetuneConfig` (steps, batch size, accumulation, flips,
        checkpoint/log cadence, seed, device); the optimiser, EMA and loss weights stay CodeFormer's."""
        shared = ("steps", "batch_size", "grad_accum", "flip", "ckpt_every", "log_every", "seed", "device")
        return cls(**{k: getattr(fcfg, k) for k in shared}, **overrides)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Set ``requires_grad`` on the encoder + transformer only and return those (name, parameter) pairs."""
    out = []
    for name, p in model.named_parameters():
        learn = name.split(".")[0] in TRAINABLE
        p.requires_grad_(learn)
        if learn:
            out.append((name, p))
    return out


class HQCodes(nn.Module):
    """Target codes: a frozen encoder (default: a copy of ``model.encoder``) + nearest-entry lookup in the codebook.

    Images in [0, 1]; returns (codes (B, h*w) int64, codebook features (B, C, h, w))."""

    def __init__(self, model: nn.Module, encoder: nn.Module | None = None):
        super().__init__()
        self.encoder = copy.deepcopy(model.encoder) if encoder is None else encoder
        self.encoder.eval().requires_grad_(False)
        self.quantize = model.quantize  # shared with the model (frozen there too)

    @torch.no_grad()
    def forward(self, x01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x01 * 2.0 - 1.0)
        codes = self.quantize.nearest(z)
        return codes, self.quantize.lookup(codes, tuple(z.shape[-2:]))


def code_losses(model: nn.Module, x01: torch.Tensor, codes: torch.Tensor, code_feat: torch.Tensor,
                cfg: CodeFormerFinetuneConfig) -> tuple[torch.Tensor, dict]:
    """(weighted loss, {"ce", "feat", "code_acc"}) for low-quality inputs ``x01`` in [0, 1] and target codes."""
    logits, lq_feat = model(x01 * 2.0 - 1.0, code_only=True)
    ce = F.cross_entropy(logits.permute(0, 2, 1), codes)
    feat = (lq_feat - code_feat.detach()).pow(2).mean()
    loss = cfg.entropy * ce + cfg.feat * feat
    acc = (logits.detach().argmax(dim=2) == codes).float().mean()
    return loss, {"ce": ce.item(), "feat": feat.item(), "code_acc": acc.item()}


def finetune_codeformer(
    model: nn.Module,
    pairs: Sequence[tuple],
    hq_images: Sequence = (),
    cfg: CodeFormerFinetuneConfig | None = None,
    ckpt_dir: str | Path = "finetune_ckpt",
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    hq_encoder: nn.Module | None = None,
) -> FinetuneResult:
    """Fine-tune a CodeFormer in place on ``pairs`` [(lq, pseudo_target), ...] (paths or HxWx3 uint8 arrays).

    ``hq_images`` is accepted for the signature of `restoration.training.finetune.finetune` and not used (no GAN term in
    this stage). Returns a `FinetuneResult` (``ema``: the EMA weights, the ones to use).
    """
    del hq_images
    cfg = cfg or CodeFormerFinetuneConfig()
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if len(pairs) == 0:
        raise ValueError("no training pairs")
    for attr in ("encoder", "quantize", "generator", "ft_layers"):
        if not hasattr(model, attr):
            raise TypeError(f"finetune_codeformer needs a CodeFormer model (no {attr!r} on {type(model).__name__})")

    lq, tgt = stack_pairs(pairs)

    data_gen = seeded_generator(cfg.seed)
    model.to(device)
    hq_codes = HQCodes(model, hq_encoder).to(device)  # copies the base encoder before any update
    params = trainable_parameters(model)
    model.train()
    ema = make_ema(model)
    opt = torch.optim.Adam([p for _, p in params], lr=cfg.lr, betas=cfg.betas, weight_decay=0.0)
    losses = {"entropy": cfg.entropy, "feat": cfg.feat, "trainable": list(TRAINABLE),
              "frozen": sorted({n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad}),
              "target_codes": "frozen copy of the base encoder" if hq_encoder is None else "given encoder"}

    step, history, resumed_from = 0, [], 0
    ck = last_state(ckpt_dir)
    if ck is not None:
        if ck.get("kind") != "codeformer":
            raise ValueError(f"checkpoint in {ckpt_dir} is not a CodeFormer fine-tune (delete the folder to start over)")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        hq_codes.encoder.load_state_dict(ck["hq_encoder"])
        opt.load_state_dict(ck["opt"])
        state.restore_rng(ck["rng"], data_gen)
        step = resumed_from = int(ck["step"])
        history = list(ck.get("history", []))

    def save() -> None:
        state.save({
            "kind": "codeformer", "step": step, "config": cfg.to_dict(), "losses": losses, "history": history,
            "model": model.state_dict(), "ema": ema.state_dict(), "hq_encoder": hq_codes.encoder.state_dict(),
            "opt": opt.state_dict(), "rng": state.capture_rng(data_gen, cuda=True),
        }, ckpt_dir / CKPT_NAME)

    if progress is not None:
        progress("finetune", step, cfg.steps)
    bs = cfg.batch_size
    while step < cfg.steps:
        cancel_point(should_cancel, save, step, cfg.steps)
        opt.zero_grad(set_to_none=True)
        logs = {"loss": 0.0, "ce": 0.0, "feat": 0.0, "code_acc": 0.0}
        for _ in range(cfg.grad_accum):
            x, y = sample_pairs(lq, tgt, bs, data_gen, device, cfg.flip)
            codes, code_feat = hq_codes(y)
            loss, parts = code_losses(model, x, codes, code_feat, cfg)
            (loss / cfg.grad_accum).backward()
            logs["loss"] += loss.item() / cfg.grad_accum
            for k, v in parts.items():
                logs[k] += v / cfg.grad_accum
        opt.step()
        # no warm-up; frozen parameters are left alone (an EMA of a constant drifts by rounding), buffers too
        ema_update(ema, model, cfg.ema_decay, lerp=False, trainable_only=True, copy_buffers=False)
        step += 1
        after_step(step, cfg, history, opt.param_groups[0]["lr"], logs, save, progress)

    model.eval()
    return FinetuneResult(step=step, model=model, ema=ema, losses=losses, history=history,
                          resumed_from=resumed_from, seconds=time.perf_counter() - t0)
