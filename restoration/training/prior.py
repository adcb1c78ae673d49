"""`train_prior`: the small diffusion prior (`faceadapt train prior`), one loop read top to bottom.

A small `iddpm_unet` trained with the iDDPM hybrid loss (`GaussianDiffusion.training_losses`: L_simple + rescaled
L_vlb, 1000 linear steps, learned range) on the UTK200 training faces at 64x64 (random flips), AdamW with a warm-up
(`schedules.warmup_lr`), gradient clipping and an EMA of the weights. Seeded and resumable (see `runs.Run`); every
`sample_every` steps a grid of ancestral samples of the EMA (`samples_XXXXXXXX.png`).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from restoration.models.archs import build
from restoration.runtime import ProgressFn
from restoration.training.batches import EpochBatches, batch_images
from restoration.training.ema import ema_update, make_ema, warmup_decay
from restoration.training.evaluate import sample_prior, save_grid
from restoration.training.recipes import PRIOR_ARCH, PriorTrainConfig, make_diffusion
from restoration.training.runs import Run
from restoration.training.schedules import set_lr, warmup_lr

__all__ = ["train_prior"]


def train_prior(cfg: PriorTrainConfig, progress: ProgressFn | None = None, resume: bool = True,
                show_bar: bool = True) -> dict:
    """Train (or continue training) the small diffusion prior; returns {step, train_seconds, stopped, checkpoint}."""
    run = Run(cfg, "prior", PRIOR_ARCH, progress, show_bar)  # the out dir and its log; threads, seeds
    images = run.load_faces(cfg.size)
    gen = torch.Generator().manual_seed(cfg.seed)  # data order, flips, timesteps and noise
    batches = EpochBatches(len(images), cfg.batch_size, gen)
    diffusion = make_diffusion(None, cfg.diffusion)
    model = build(PRIOR_ARCH, cfg.model).to(run.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    ema = make_ema(model)
    run.start(model, ema, opt, gen, batches, resume)

    def grid(step: int) -> None:
        x = sample_prior(ema, cfg.n_samples, cfg.size, cfg.sample_respacing, seed=cfg.seed, diffusion=cfg.diffusion)
        n = cfg.n_samples
        cols = 8 if n >= 8 else n
        rows = [x[i:i + cols] for i in range(0, n, cols)]
        save_grid([r for r in rows if len(r) == cols] or [x], run.out / f"samples_{step:08d}.png")
        model.train()

    with run.progress_bar():
        while run.more():
            x = batch_images(images, batches.next(), gen, flip=True).to(run.device) * 2 - 1
            lr = warmup_lr(run.step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr_schedule)
            set_lr(opt, lr)
            t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), generator=gen).to(run.device)
            noise = torch.randn(x.shape, generator=gen).to(run.device)
            terms = diffusion.training_losses(model, x, t, noise=noise)
            loss = terms["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            ema_update(ema, model, warmup_decay(cfg.ema_rate, run.step))
            run.end_step({"loss": loss.item(), "mse": terms["mse"].mean().item(), "vb": terms["vb"].mean().item()},
                         len(x), lr)
            if cfg.sample_every and run.step % cfg.sample_every == 0:
                run.timed(grid, run.step)
            run.checkpoint_if_due()
    return run.finish()
