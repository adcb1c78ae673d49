"""Fine-tuning a restorer on (low-quality input, pseudo target) pairs (Kuai et al., WACV 2025, step 3).

One loop, read top to bottom:

    loss_G = l1 * |G(y) - target|_1 + lpips * LPIPS(G(y), target) + gan * BCE(D(G(y)), real)
    loss_D = BCE(D(x_hq), real) + BCE(D(G(y).detach()), fake)

* G is any restorer built by `restoration.models.archs.build`, called through `restoration.models.io.run_restorer`
  (Bx3xHxW in [0,1] -> same, whatever the model's own value range; tuple outputs give element 0); D is a U-Net discriminator
  with spectral norm (`UNetDiscriminatorSN`, per-pixel logits). D's REAL images are clean high-quality faces,
  never the pseudo targets: pseudo targets only supervise G through the L1/LPIPS terms.
* LPIPS needs its weights on disk (`restoration.metrics.quality.lpips_available()`); without them the perceptual term is
  replaced by `perceptual_fallback` ('gradient': L1 between image gradients; 'ssim': 1 - SSIM; 'none') with the
  same weight. What was used is recorded in `FinetuneResult.losses` and in every checkpoint.
* AdamW, cosine decay lr -> lr_min over `steps` optimizer steps (per-step LambdaLR), gradient accumulation,
  EMA of G's weights (decay warmed up as min(ema_decay, (1 + k) / (10 + k))).
* A checkpoint `ckpt_dir/last.pt` every `ckpt_every` steps and at the end, written atomically (temp + fsync +
  rename): G, EMA, D, both optimizers, both schedulers, step, loss history and every RNG state (torch CPU/CUDA,
  the data sampler's generator, python, numpy). `finetune` resumes from it, so a killed run continues exactly
  (bit-exact on CPU with the same thread count).
* Batches are sampled with replacement from a private `torch.Generator` seeded by `seed`, with random
  horizontal flips (the same flip for input and target).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from restoration.configs import strict_from_dict
from restoration.training import rng
from restoration.runtime import Cancelled, CancelFn, ProgressFn, resolve_device
from restoration.models.io import run_restorer


__all__ = ["FinetuneConfig", "FinetuneResult", "UNetDiscriminatorSN", "finetune", "load_checkpoint", "Cancelled"]

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
    ckpt_every: int = 200
    log_every: int = 10
    seed: int = 0
    device: str = "cpu"               # 'cpu', 'cuda[:N]' or 'auto'

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.d_betas = tuple(float(b) for b in self.d_betas)  # type: ignore[assignment]
        if self.perceptual_fallback not in ("gradient", "ssim", "none"):
            raise ValueError(f"perceptual_fallback must be 'gradient', 'ssim' or 'none', got {self.perceptual_fallback!r}")
        if min(self.steps, self.batch_size, self.grad_accum, self.ckpt_every, self.log_every) < 1:
            raise ValueError("steps, batch_size, grad_accum, ckpt_every and log_every must be >= 1")

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


# ------------------------------------------------------------------------------------------------
# the discriminator: U-Net with spectral norm (per-pixel real/fake logits)
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def _load_uint8(item, size: int | None) -> np.ndarray:
    """A path or an HxWx3 uint8 array (or CHW float tensor in [0,1]) -> HxWx3 uint8, resized to `size`."""
    from PIL import Image

    if isinstance(item, (str, Path)):
        with Image.open(item) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BICUBIC)
            return np.asarray(im, dtype=np.uint8).copy()
    if isinstance(item, torch.Tensor):
        item = item.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
    arr = np.asarray(item)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got {arr.dtype} {arr.shape}")
    if size is not None and arr.shape[:2] != (size, size):
        arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.BICUBIC))
    return arr


def _stack(items: Sequence, size: int | None) -> torch.Tensor:
    """N x 3 x H x W uint8 (kept uint8 in memory; converted to float per batch)."""
    return torch.from_numpy(np.stack([_load_uint8(it, size) for it in items])).permute(0, 3, 1, 2).contiguous()


def _to_float(x_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x_u8.to(device).float().div_(255.0)


def _cosine_factor(steps: int, lr: float, lr_min: float) -> Callable[[int], float]:
    floor = lr_min / lr if lr > 0 else 0.0

    def f(k: int) -> float:
        k = min(max(k, 0), steps)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * k / steps))

    return f


def _gradient_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    dxa, dxb = a[..., :, 1:] - a[..., :, :-1], b[..., :, 1:] - b[..., :, :-1]
    dya, dyb = a[..., 1:, :] - a[..., :-1, :], b[..., 1:, :] - b[..., :-1, :]
    return (dxa - dxb).abs().mean() + (dya - dyb).abs().mean()


def _ssim_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - SSIM (11x11 Gaussian window, sigma 1.5, per channel), differentiable."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    g = torch.exp(-((torch.arange(11, dtype=a.dtype, device=a.device) - 5) ** 2) / (2 * 1.5 ** 2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).expand(a.shape[1], 1, 11, 11).contiguous()
    blur = lambda t: F.conv2d(t, w, groups=a.shape[1])  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    s_aa = blur(a * a) - mu_a ** 2
    s_bb = blur(b * b) - mu_b ** 2
    s_ab = blur(a * b) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + c1) * (2 * s_ab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2))
    return 1.0 - ssim.mean()


def _make_perceptual(cfg: FinetuneConfig, device: torch.device) -> tuple[Callable | None, str]:
    """(loss_fn(pred, target) on [0,1] images or None, description)."""
    if cfg.lpips <= 0:
        return None, "none (weight 0)"
    try:
        from restoration.metrics import quality as metrics

        ok, why = metrics.lpips_available()
        if ok:
            lp = metrics.LPIPS().to(device).eval()
            for p in lp.parameters():
                p.requires_grad_(False)
            return (lambda a, b: lp(a, b).mean()), "lpips"
    except (ImportError, AttributeError, FileNotFoundError, RuntimeError, OSError) as exc:
        why = f"LPIPS unavailable: {exc}"
    if cfg.perceptual_fallback == "gradient":
        return _gradient_l1, f"gradient-l1 instead of LPIPS ({why})"
    if cfg.perceptual_fallback == "ssim":
        return _ssim_loss, f"1-ssim instead of LPIPS ({why})"
    return None, f"none ({why})"


@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(decay).add_(pm.detach(), alpha=1.0 - decay)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def _rng_state(data_gen: torch.Generator) -> dict:
    st = {**rng.capture(), "data": data_gen.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict, data_gen: torch.Generator) -> None:
    rng.restore(st)
    data_gen.set_state(st["data"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _atomic_save(obj: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    try:  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def load_checkpoint(ckpt_dir: str | Path) -> dict | None:
    """The last checkpoint of `ckpt_dir` (a dict), or None when there is none."""
    p = Path(ckpt_dir) / CKPT_NAME
    if not p.is_file():
        return None
    return torch.load(p, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------------
# the loop
# ------------------------------------------------------------------------------------------------
def sample_pairs(lq: torch.Tensor, tgt: torch.Tensor, batch_size: int, gen: torch.Generator, device: torch.device,
                 flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of (input, target) pairs drawn with replacement from `gen`, as float [0, 1] on `device`, each pair
    flipped horizontally (both images) with probability 0.5 when `flip`. The draws are made whether or not `flip`."""
    idx = torch.randint(0, lq.shape[0], (batch_size,), generator=gen)
    flips = torch.rand(batch_size, generator=gen) < 0.5
    x, y = _to_float(lq[idx], device), _to_float(tgt[idx], device)
    if flip and bool(flips.any()):
        fl = flips.to(device)[:, None, None, None]
        x, y = torch.where(fl, x.flip(-1), x), torch.where(fl, y.flip(-1), y)
    return x, y


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


def finetune(
    model: nn.Module,
    pairs: Sequence[tuple],
    hq_images: Sequence,
    cfg: FinetuneConfig | None = None,
    ckpt_dir: str | Path = "finetune_ckpt",
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    value_range: Sequence[float] | None = None,
) -> FinetuneResult:
    """Fine-tune `model` in place on `pairs` [(lq, pseudo_target), ...] (paths or HxWx3 uint8 arrays).

    `model` is called through `restoration.models.io.run_restorer` (with gradients): images in [0, 1] are mapped
    to `value_range` (the zoo card's; None: the arch's `value_range` attribute, else [0, 1]) and back, element 0 of a
    tuple output is taken and the arch's `inference_kwargs` are passed (GFPGAN: the stored noise maps), so every
    restorer family trains on the call it is served with; losses and D always see [0, 1] images.

    `hq_images` (paths or arrays) are D's real images; they are resized to the training size. With no HQ images
    or `cfg.gan == 0` there is no discriminator. Resumes from `ckpt_dir/last.pt` when it exists.
    `progress("finetune", step, steps)` after every step; `should_cancel()` before every step: a checkpoint is
    written, then `Cancelled` is raised.
    """
    import copy

    cfg = cfg or FinetuneConfig()
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if len(pairs) == 0:
        raise ValueError("no training pairs")

    # ---- data (uint8 in memory) ----
    lq = _stack([p[0] for p in pairs], None)
    tgt = _stack([p[1] for p in pairs], None)
    if lq.shape != tgt.shape:
        raise ValueError(f"inputs {tuple(lq.shape)} and targets {tuple(tgt.shape)} differ in shape")
    size = lq.shape[-1]
    use_gan = cfg.gan > 0 and len(hq_images) > 0
    hq = _stack(list(hq_images), size) if use_gan else None

    # ---- models, optimisers, schedules (seeded, so a fresh start is reproducible) ----
    torch.manual_seed(cfg.seed)
    data_gen = torch.Generator(device="cpu")
    data_gen.manual_seed(cfg.seed)
    model.to(device).train()
    ema = copy.deepcopy(model).eval()
    for p in ema.parameters():
        p.requires_grad_(False)
    net_d = UNetDiscriminatorSN(3, cfg.d_channels).to(device).train() if use_gan else None
    opt_g = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, _cosine_factor(cfg.steps, cfg.lr, cfg.lr_min))
    opt_d = sched_d = None
    if use_gan:
        opt_d = torch.optim.AdamW(net_d.parameters(), lr=cfg.d_lr, betas=cfg.d_betas, weight_decay=0.0)
        sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, _cosine_factor(cfg.steps, cfg.lr, cfg.lr_min))
    perceptual, perceptual_name = _make_perceptual(cfg, device)
    losses = {"l1": cfg.l1, "perceptual": perceptual_name, "perceptual_weight": cfg.lpips if perceptual else 0.0,
              "gan": cfg.gan if use_gan else 0.0,
              "gan_note": "D real = clean HQ faces" if use_gan else "no discriminator (gan=0 or no HQ images)"}

    # ---- resume ----
    step, history, resumed_from = 0, [], 0
    ck = load_checkpoint(ckpt_dir)
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
        _set_rng_state(ck["rng"], data_gen)
        step = resumed_from = int(ck["step"])
        history = list(ck.get("history", []))

    def save() -> None:
        _atomic_save({
            "step": step, "config": cfg.to_dict(), "use_gan": use_gan, "losses": losses, "history": history,
            "model": model.state_dict(), "ema": ema.state_dict(),
            "net_d": net_d.state_dict() if use_gan else None,
            "opt_g": opt_g.state_dict(), "sched_g": sched_g.state_dict(),
            "opt_d": opt_d.state_dict() if use_gan else None, "sched_d": sched_d.state_dict() if use_gan else None,
            "rng": _rng_state(data_gen),
        }, ckpt_dir / CKPT_NAME)

    if progress is not None:
        progress("finetune", step, cfg.steps)
    bs = cfg.batch_size

    while step < cfg.steps:
        if should_cancel is not None and should_cancel():
            save()
            raise Cancelled(f"fine-tuning cancelled at step {step}/{cfg.steps} (checkpoint saved, resumable)")

        # ---- G step (gradient accumulation over micro-batches) ----
        opt_g.zero_grad(set_to_none=True)
        fakes, logs = [], {"l1": 0.0, "perc": 0.0, "gan_g": 0.0, "loss_g": 0.0, "loss_d": 0.0}
        if use_gan:
            net_d.requires_grad_(False)
        for _ in range(cfg.grad_accum):
            x, y = sample_pairs(lq, tgt, bs, data_gen, device, cfg.flip)
            out = run_restorer(model, x, value_range)  # [0, 1] scale whatever the model's range; differentiable
            l_pix = F.l1_loss(out, y)
            loss = cfg.l1 * l_pix
            logs["l1"] += l_pix.item() / cfg.grad_accum
            if perceptual is not None:
                l_perc = perceptual(out, y)
                loss = loss + cfg.lpips * l_perc
                logs["perc"] += l_perc.item() / cfg.grad_accum
            if use_gan:
                l_gan = F.softplus(-net_d(out)).mean()  # BCE-with-logits against "real"
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
                real = _to_float(hq[ridx], device)
                l_d = F.softplus(-net_d(real)).mean() + F.softplus(net_d(fake)).mean()
                (l_d / len(fakes)).backward()
                logs["loss_d"] += l_d.item() / len(fakes)
            opt_d.step()
            sched_d.step()

        # ---- EMA, bookkeeping, checkpoint ----
        _ema_update(ema, model, min(cfg.ema_decay, (1.0 + step) / (10.0 + step)))
        step += 1
        after_step(step, cfg, history, opt_g.param_groups[0]["lr"], logs, save, progress)

    model.eval()
    return FinetuneResult(step=step, model=model, ema=ema, losses=losses, history=history,
                          resumed_from=resumed_from, seconds=time.perf_counter() - t0)
