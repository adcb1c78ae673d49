"""Fine-tuning a restorer on (low-quality input, pseudo target) pairs (Kuai et al., WACV 2025, step 3).

One loop, read top to bottom:

    loss_G = l1 * |G(y) - target|_1 + lpips * LPIPS(G(y), target) + gan * BCE(D(G(y)), real)
    loss_D = BCE(D(x_hq), real) + BCE(D(G(y).detach()), fake)

* G is any restorer built by `restoration.models.archs.build`, called through `restoration.models.io.run_restorer`
  (Bx3xHxW in [0,1] -> same, whatever the model's own value range; tuple outputs give element 0); D is a U-Net discriminator
  with spectral norm (`UNetDiscriminatorSN`, per-pixel logits). D's REAL images are clean high-quality faces,
  never the pseudo targets: pseudo targets only supervise G through the L1/LPIPS terms.
* LPIPS needs its weights on disk (`restoration.metrics.lpips.lpips_available()`); without them the perceptual term is
  replaced by `perceptual_fallback` ('gradient': L1 between image gradients; 'ssim': 1 - SSIM; 'none') with the
  same weight (`restoration.training.losses.make_perceptual`). What was used is recorded in `FinetuneResult.losses`
  and in every checkpoint.
* AdamW, cosine decay lr -> lr_min over `steps` optimizer steps (per-step LambdaLR, `schedules.cosine_factor`),
  gradient accumulation, EMA of G's weights (decay warmed up as min(ema_decay, (1 + k) / (10 + k))).
* A checkpoint `ckpt_dir/last.pt` (`CKPT_NAME`) every `ckpt_every` steps and at the end, written atomically (temp +
  fsync + rename, `state.save`): G, EMA, D, both optimizers, both schedulers, step, loss history and every RNG state
  (torch CPU/CUDA, the data sampler's generator, python, numpy). `finetune` resumes from it, so a killed run
  continues exactly (bit-exact on CPU with the same thread count); read it with `state.load(ckpt_dir / CKPT_NAME)`.
* Batches are sampled with replacement from a private `torch.Generator` seeded by `seed`, with random
  horizontal flips (the same flip for input and target) and, with `shift` > 0, a random shift of up to `shift`
  pixels per axis (edge pixels replicated; the same shift for input and target).
* Early stopping (`val_pairs` given and `val_every` > 0): every `val_every` steps, and once before the first, the EMA
  weights are scored by their mean PSNR against the held-out pairs' targets (never trained on); the best EMA weights
  are kept (a copy, in every checkpoint) and returned, and training stops after `patience` scores without an
  improvement of at least `min_delta` dB (0: never stops early). Scored before the first step, the base itself can
  be the best: the fine-tune then returns the base's weights.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from restoration.configs import strict_from_dict
from restoration.models.io import run_restorer
from restoration.runtime import Cancelled, CancelFn, ProgressFn, resolve_device
import restoration.training.state as state
from restoration.training.batches import sample_pairs, stack_uint8, to_float
from restoration.training.discriminators import UNetDiscriminatorSN
from restoration.training.ema import ema_update, make_ema, warmup_decay
from restoration.training.losses import PERCEPTUAL_FALLBACKS, gan_loss, make_perceptual
from restoration.training.schedules import cosine_factor


__all__ = ["CKPT_NAME", "FinetuneConfig", "FinetuneResult", "finetune", "stack_pairs", "seeded_generator", "shift_pairs",
           "held_out_psnr",
           "last_state", "cancel_point", "after_step"]

#: the fine-tunes' checkpoint in their `ckpt_dir` (read it with `restoration.training.state.load`)
CKPT_NAME = "last.pt"


# ------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------
@dataclass
class FinetuneConfig:
    steps: int = 1000                 # optimizer steps
    batch_size: int = 8               # per micro-batch
    grad_accum: int = 1               # micro-batches per optimizer step
    lr: float = 2e-5                  # G: cosine from lr to lr_min
    lr_min: float = 5e-6
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    l1: float = 1.0
    lpips: float = 0.1
    perceptual_fallback: str = "gradient"   # used when LPIPS weights are missing: 'gradient' | 'ssim' | 'none'
    gan: float = 0.1
    d_lr: float = 1e-4                # D: same cosine shape, d_lr -> d_lr * lr_min / lr
    d_betas: tuple[float, float] = (0.9, 0.99)
    d_channels: int = 64
    flip: bool = True
    grad_clip: float = 0.0            # 0 = off
    shift: int = 0                    # augmentation: random shift of up to this many pixels per axis (0 = off)
    val_every: int = 0                # early stopping: score the EMA on the held-out pairs every N steps (0 = off)
    patience: int = 0                 # stop after this many scores without improvement (0 = never stop early)
    min_delta: float = 0.01           # dB a score must gain to count as an improvement
    ckpt_every: int = 200
    log_every: int = 10
    seed: int = 0
    device: str = "cpu"               # 'cpu', 'cuda[:N]' or 'auto'

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.d_betas = tuple(float(b) for b in self.d_betas)  # type: ignore[assignment]
        if self.perceptual_fallback not in PERCEPTUAL_FALLBACKS:
            raise ValueError(f"perceptual_fallback must be 'gradient', 'ssim' or 'none', got {self.perceptual_fallback!r}")
        if min(self.steps, self.batch_size, self.grad_accum, self.ckpt_every, self.log_every) < 1:
            raise ValueError("steps, batch_size, grad_accum, ckpt_every and log_every must be >= 1")
        if min(self.shift, self.val_every, self.patience) < 0:
            raise ValueError("shift, val_every and patience must be >= 0")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"], d["d_betas"] = list(self.betas), list(self.d_betas)
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "FinetuneConfig":
        return strict_from_dict(cls, d, "fine-tune")


@dataclass
class FinetuneResult:
    step: int
    model: nn.Module                       # G after the last step (training weights)
    ema: nn.Module                         # EMA of G (use this one)
    losses: dict                           # which loss terms were used, with weights
    history: list = field(default_factory=list)   # [{step, loss_g, l1, perc, gan_g, loss_d, lr}]
    resumed_from: int = 0
    seconds: float = 0.0
    best: dict | None = None               # early stopping: {"step", "psnr", "base_psnr", "stopped_early"} (None: off)
    val_history: list = field(default_factory=list)  # [{step, psnr}] of the held-out scores


# ------------------------------------------------------------------------------------------------
# what both fine-tunes (this one and finetune_codeformer) do around their steps
# ------------------------------------------------------------------------------------------------
def stack_pairs(pairs: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs and the targets of `pairs` as two N x 3 x H x W uint8 tensors of the same shape."""
    lq = stack_uint8([p[0] for p in pairs], None)
    tgt = stack_uint8([p[1] for p in pairs], None)
    if lq.shape != tgt.shape:
        raise ValueError(f"inputs {tuple(lq.shape)} and targets {tuple(tgt.shape)} differ in shape")
    return lq, tgt


def seeded_generator(seed: int) -> torch.Generator:
    """Seed torch's global RNG (model initialisation) and return the data sampler's own CPU generator, both `seed`."""
    torch.manual_seed(seed)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return gen


def last_state(ckpt_dir: Path) -> dict | None:
    """The checkpoint `ckpt_dir/CKPT_NAME` to resume from, or None when there is none."""
    path = ckpt_dir / CKPT_NAME
    return state.load(path) if path.is_file() else None


def cancel_point(should_cancel: CancelFn | None, save: Callable[[], None], step: int, steps: int) -> None:
    """Before a step: when `should_cancel()` says so, checkpoint (`save()`) and raise `Cancelled`."""
    if should_cancel is not None and should_cancel():
        save()
        raise Cancelled(f"fine-tuning cancelled at step {step}/{steps} (checkpoint saved, resumable)")


def shift_pairs(x: torch.Tensor, y: torch.Tensor, shift: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pair (input, target) of the batch moved by the same random (dx, dy) in [-shift, shift] pixels, the edge
    pixels replicated into the uncovered border (a small shift of the face in its crop, as a detector's jitter)."""
    if shift <= 0:
        return x, y
    n, _, h, w = x.shape
    d = torch.randint(-shift, shift + 1, (n, 2), generator=gen)
    xp = F.pad(x, (shift, shift, shift, shift), mode="replicate")
    yp = F.pad(y, (shift, shift, shift, shift), mode="replicate")
    xs, ys = [], []
    for i in range(n):
        top, left = shift + int(d[i, 1]), shift + int(d[i, 0])
        xs.append(xp[i, :, top:top + h, left:left + w])
        ys.append(yp[i, :, top:top + h, left:left + w])
    return torch.stack(xs), torch.stack(ys)


def held_out_psnr(model: nn.Module, lq: torch.Tensor, tgt: torch.Tensor, device, value_range=None,
                  batch_size: int = 16) -> float:
    """Mean PSNR (dB, [0, 1] scale) of `model`'s outputs on the uint8 inputs `lq` against the uint8 targets `tgt`."""
    was_training = model.training
    model.eval()
    scores = []
    with torch.no_grad():
        for b in range(0, lq.shape[0], batch_size):
            out = run_restorer(model, to_float(lq[b:b + batch_size], device), value_range).float().clamp(0, 1)
            y = to_float(tgt[b:b + batch_size], device)
            mse = ((out - y) ** 2).flatten(1).mean(1).clamp_min(1e-10)
            scores.extend((-10.0 * torch.log10(mse)).tolist())
    model.train(was_training)
    return float(sum(scores) / len(scores))


def after_step(step: int, cfg, history: list, lr: float, logs: dict, save: Callable[[], None],
               progress: ProgressFn | None) -> None:
    """Bookkeeping after optimizer step `step`: a history row every `log_every` steps, a checkpoint every
    `ckpt_every` steps, both at the last step; then the progress callback."""
    if step % cfg.log_every == 0 or step == cfg.steps:
        history.append({"step": step, "lr": lr, **{k: round(v, 6) for k, v in logs.items()}})
    if step % cfg.ckpt_every == 0 or step == cfg.steps:
        save()
    if progress is not None:
        progress("finetune", step, cfg.steps)


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------
def finetune(
    model: nn.Module,
    pairs: Sequence[tuple],
    hq_images: Sequence,
    cfg: FinetuneConfig | None = None,
    ckpt_dir: str | Path = "finetune_ckpt",
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    value_range: Sequence[float] | None = None,
    val_pairs: Sequence[tuple] = (),
) -> FinetuneResult:
    """Fine-tune `model` in place on `pairs` [(lq, pseudo_target), ...] (paths or HxWx3 uint8 arrays).

    `val_pairs` (same form, never trained on): the held-out pairs of early stopping (`cfg.val_every`); the returned
    `ema` is then the best-scoring EMA weights, `best` says which step and score.

    `model` is called through `restoration.models.io.run_restorer` (with gradients): images in [0, 1] are mapped
    to `value_range` (the zoo card's; None: the arch's `value_range` attribute, else [0, 1]) and back, element 0 of a
    tuple output is taken and the arch's `inference_kwargs` are passed (GFPGAN: the stored noise maps), so every
    restorer family trains on the call it is served with; losses and D always see [0, 1] images.

    `hq_images` (paths or arrays) are D's real images; they are resized to the training size. With no HQ images
    or `cfg.gan == 0` there is no discriminator. Resumes from `ckpt_dir/last.pt` when it exists.
    `progress("finetune", step, steps)` after every step; `should_cancel()` before every step: a checkpoint is
    written, then `Cancelled` is raised.
    """
    cfg = cfg or FinetuneConfig()
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if len(pairs) == 0:
        raise ValueError("no training pairs")

    # ---- data (uint8 in memory) ----
    lq, tgt = stack_pairs(pairs)
    size = lq.shape[-1]
    use_gan = cfg.gan > 0 and len(hq_images) > 0
    hq = stack_uint8(list(hq_images), size) if use_gan else None
    use_val = cfg.val_every > 0 and len(val_pairs) > 0
    val_lq, val_tgt = stack_pairs(val_pairs) if use_val else (None, None)

    # ---- models, optimisers, schedules (seeded, so a fresh start is reproducible) ----
    data_gen = seeded_generator(cfg.seed)
    model.to(device).train()
    ema = make_ema(model)
    net_d = UNetDiscriminatorSN(3, cfg.d_channels).to(device).train() if use_gan else None
    opt_g = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, cosine_factor(cfg.steps, cfg.lr, cfg.lr_min))
    opt_d = sched_d = None
    if use_gan:
        opt_d = torch.optim.AdamW(net_d.parameters(), lr=cfg.d_lr, betas=cfg.d_betas, weight_decay=0.0)
        sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, cosine_factor(cfg.steps, cfg.lr, cfg.lr_min))
    perceptual, perceptual_name = make_perceptual(cfg.lpips, cfg.perceptual_fallback, device)
    losses = {"l1": cfg.l1, "perceptual": perceptual_name, "perceptual_weight": cfg.lpips if perceptual else 0.0,
              "gan": cfg.gan if use_gan else 0.0,
              "gan_note": "D real = clean HQ faces" if use_gan else "no discriminator (gan=0 or no HQ images)"}

    # ---- resume ----
    step, history, resumed_from = 0, [], 0
    # early stopping: the best EMA weights so far (CPU copy), their step and score, the scores, evals since the best
    val = {"best_state": None, "best_step": None, "best_psnr": None, "base_psnr": None, "history": [], "stale": 0,
           "stopped": False}
    ck = last_state(ckpt_dir)
    if ck is not None:
        if bool(ck.get("use_gan")) != use_gan:
            raise ValueError(f"checkpoint in {ckpt_dir} was made {'with' if ck.get('use_gan') else 'without'} a "
                             "discriminator; the current settings differ (delete the folder to start over)")
        model.load_state_dict(ck["model"])
        ema.load_state_dict(ck["ema"])
        opt_g.load_state_dict(ck["opt_g"])
        sched_g.load_state_dict(ck["sched_g"])
        if use_gan:
            net_d.load_state_dict(ck["net_d"])
            opt_d.load_state_dict(ck["opt_d"])
            sched_d.load_state_dict(ck["sched_d"])
        state.restore_rng(ck["rng"], data_gen)
        step = resumed_from = int(ck["step"])
        history = list(ck.get("history", []))
        if ck.get("val") is not None:
            val.update(ck["val"])

    def score() -> None:
        """Score the EMA weights on the held-out pairs; keep them when they are the best so far."""
        psnr = held_out_psnr(ema, val_lq, val_tgt, device, value_range)
        val["history"].append({"step": step, "psnr": round(psnr, 4)})
        if val["base_psnr"] is None:
            val["base_psnr"] = psnr
        if val["best_psnr"] is None or psnr > val["best_psnr"] + cfg.min_delta:
            val.update(best_psnr=psnr, best_step=step, stale=0,
                       best_state={k: v.detach().to("cpu").clone() for k, v in ema.state_dict().items()})
        else:
            val["stale"] += 1
            if cfg.patience and val["stale"] >= cfg.patience:
                val["stopped"] = True

    def save() -> None:
        state.save({
            "step": step, "config": cfg.to_dict(), "use_gan": use_gan, "losses": losses, "history": history,
            "model": model.state_dict(), "ema": ema.state_dict(),
            "net_d": net_d.state_dict() if use_gan else None,
            "opt_g": opt_g.state_dict(), "sched_g": sched_g.state_dict(),
            "opt_d": opt_d.state_dict() if use_gan else None, "sched_d": sched_d.state_dict() if use_gan else None,
            "rng": state.capture_rng(data_gen, cuda=True), "val": val if use_val else None,
        }, ckpt_dir / CKPT_NAME)

    if progress is not None:
        progress("finetune", step, cfg.steps)
    bs = cfg.batch_size
    if use_val and not val["history"]:
        score()  # the base: the fine-tune must beat it

    while step < cfg.steps and not val["stopped"]:
        cancel_point(should_cancel, save, step, cfg.steps)

        # ---- G step (gradient accumulation over micro-batches) ----
        opt_g.zero_grad(set_to_none=True)
        fakes, logs = [], {"l1": 0.0, "perc": 0.0, "gan_g": 0.0, "loss_g": 0.0, "loss_d": 0.0}
        if use_gan:
            net_d.requires_grad_(False)
        for _ in range(cfg.grad_accum):
            x, y = sample_pairs(lq, tgt, bs, data_gen, device, cfg.flip)
            x, y = shift_pairs(x, y, cfg.shift, data_gen)
            out = run_restorer(model, x, value_range)  # [0, 1] scale whatever the model's range; differentiable
            l_pix = F.l1_loss(out, y)
            loss = cfg.l1 * l_pix
            logs["l1"] += l_pix.item() / cfg.grad_accum
            if perceptual is not None:
                l_perc = perceptual(out, y)
                loss = loss + cfg.lpips * l_perc
                logs["perc"] += l_perc.item() / cfg.grad_accum
            if use_gan:
                l_gan = gan_loss(net_d(out), True)  # non-saturating: BCE-with-logits against "real"
                loss = loss + cfg.gan * l_gan
                logs["gan_g"] += l_gan.item() / cfg.grad_accum
                fakes.append(out.detach())
            (loss / cfg.grad_accum).backward()
            logs["loss_g"] += loss.item() / cfg.grad_accum
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt_g.step()
        sched_g.step()

        # ---- D step: real = clean HQ faces, fake = G outputs of this step ----
        if use_gan:
            net_d.requires_grad_(True)
            opt_d.zero_grad(set_to_none=True)
            for fake in fakes:
                ridx = torch.randint(0, hq.shape[0], (fake.shape[0],), generator=data_gen)
                real = to_float(hq[ridx], device)
                l_d = gan_loss(net_d(real), True) + gan_loss(net_d(fake), False)
                (l_d / len(fakes)).backward()
                logs["loss_d"] += l_d.item() / len(fakes)
            opt_d.step()
            sched_d.step()

        # ---- EMA, bookkeeping, checkpoint ----
        ema_update(ema, model, warmup_decay(cfg.ema_decay, step), lerp=False)
        step += 1
        if use_val and (step % cfg.val_every == 0 or step == cfg.steps):
            score()
        if val["stopped"]:
            save()  # the last checkpoint says that training stopped here
        after_step(step, cfg, history, opt_g.param_groups[0]["lr"], logs, save, progress)

    model.eval()
    best = None
    if use_val:
        ema.load_state_dict(val["best_state"])
        best = {"step": val["best_step"], "psnr": round(val["best_psnr"], 4), "base_psnr": round(val["base_psnr"], 4),
                "stopped_early": bool(val["stopped"]), "val_pairs": int(val_lq.shape[0])}
        if progress is not None and val["stopped"]:
            progress("finetune", cfg.steps, cfg.steps)
    return FinetuneResult(step=step, model=model, ema=ema, losses=losses, history=history,
                          resumed_from=resumed_from, seconds=time.perf_counter() - t0, best=best,
                          val_history=list(val["history"]))
