"""`train_restorer`: the small face restorer (`faceadapt train restorer`), one loop read top to bottom.

A small `swinir_face` trained on synthetic degradations (`cfg.damage`: the standard `restoration.degrade.damage`,
overridable by `cfg.degradation`, or the broad `restoration.degrade.broad` with `cfg.damage_holdout` held out;
optionally damaged at native sizes, `cfg.native_sizes`, with the loss taken there through the product's paste,
`cfg.native_loss`; at the model input size `cfg.size`, every `cfg.mix_every`-th step at `cfg.mix_size`) with an L1 (or MSE) pixel loss plus, after
`gan_start` steps, a small non-saturating GAN term against a spectral-norm patch discriminator (warmed up 100 steps
before). AdamW with a warm-up and cosine decay (`schedules.warmup_lr`), gradient clipping, an EMA of the weights.
LPIPS is not used: no LPIPS weights are available on these machines. Seeded and resumable (see `runs.Run`); every
`sample_every` steps a grid (damaged, EMA output, clean) of validation faces and its PSNR in the log.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from restoration.data.faces import FacesDataset
from restoration.models.archs import build
from restoration.runtime import ProgressFn
from restoration.training.batches import (EpochBatches, batch_images, damage_batch, native_batch, pasted_output,
                                          training_damage)
from restoration.training.discriminators import PatchDiscriminator
from restoration.training.ema import ema_update, make_ema, warmup_decay
from restoration.training.evaluate import psnr_ssim, save_grid
from restoration.training.losses import gan_loss, gradient_l1
from restoration.training.recipes import PIXEL_LOSSES, RESTORER_ARCH, RestorerTrainConfig
from restoration.training.runs import Run
from restoration.training.schedules import set_lr, warmup_lr

__all__ = ["train_restorer"]


def train_restorer(cfg: RestorerTrainConfig, progress: ProgressFn | None = None, resume: bool = True,
                   show_bar: bool = True) -> dict:
    """Train (or continue training) the small restorer; returns {step, train_seconds, stopped, checkpoint}."""
    run = Run(cfg, "restorer", RESTORER_ARCH, progress, show_bar)  # the out dir and its log; threads, seeds
    load_size = max([cfg.size, cfg.mix_size, *cfg.native_sizes])  # faces are loaded large enough for every native size
    images = run.load_faces(load_size)
    gen = torch.Generator().manual_seed(cfg.seed)  # data order and flips
    batches = EpochBatches(len(images), cfg.batch_size, gen)
    if cfg.pixel_loss not in PIXEL_LOSSES:
        raise ValueError(f"pixel_loss is one of {', '.join(PIXEL_LOSSES)}, not {cfg.pixel_loss!r}")
    params = training_damage(cfg.damage, cfg.degradation, cfg.damage_holdout)  # unknown models refused here
    if cfg.native_loss and not cfg.native_sizes:
        raise ValueError("native_loss needs native_sizes (the sizes the loss is taken at)")
    model = build(RESTORER_ARCH, cfg.model).to(run.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    disc = PatchDiscriminator(cfg.disc_channels).to(run.device).train()
    opt_d = torch.optim.AdamW(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.999))
    np_rng = np.random.default_rng(cfg.seed)  # the damage
    ema = make_ema(model)
    extra = run.start(model, ema, opt, gen, batches, resume, extra_state=lambda: {
        "disc": disc.state_dict(), "opt_d": opt_d.state_dict(), "np_rng": np_rng.bit_generator.state})
    if extra:
        disc.load_state_dict(extra["disc"])
        opt_d.load_state_dict(extra["opt_d"])
        np_rng.bit_generator.state = extra["np_rng"]

    grid_batch: list = []  # (lq, gt) of the grids, made once: validation faces (else training faces), fixed damage

    @torch.no_grad()
    def grid(step: int) -> None:
        if not grid_batch:
            try:
                ds = FacesDataset("val", load_size, root=cfg.data_root, limit=cfg.n_grid)
                gt = torch.stack([ds[i] for i in range(len(ds))])
            except FileNotFoundError:
                gt = batch_images(images, torch.arange(min(cfg.n_grid, len(images))), gen, False)
            grid_batch.extend(damage_batch(gt, params, np.random.default_rng(12345), cfg.native_sizes, cfg.size))
        lq, gt = grid_batch
        out = ema(lq.to(run.device)).clamp(0, 1).cpu()
        save_grid([lq, out, gt], run.out / f"samples_{step:08d}.png")
        ps, _ = psnr_ssim(out, gt)
        ps_lq, _ = psnr_ssim(lq, gt)
        run.log.write(step=step, grid_psnr=round(float(np.mean(ps)), 3), grid_psnr_lq=round(float(np.mean(ps_lq)), 3))

    with run.progress_bar():
        while run.more():
            gt = batch_images(images, batches.next(), gen, flip=True).to(run.device)
            lr = warmup_lr(run.step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr_schedule)
            set_lr(opt, lr)
            mixed = cfg.mix_size and run.step % cfg.mix_every == cfg.mix_every - 1
            size = cfg.mix_size if mixed else cfg.size  # the model's input size for this step
            if cfg.native_loss:  # one native size per batch; the loss where the product shows the face
                lq, lq_s, gt_s = (t.to(run.device) for t in native_batch(gt, params, np_rng, cfg.native_sizes,
                                                                          size))
                out = model(lq)
                shown, target = pasted_output(out, lq, lq_s), gt_s
                gt = gt_s  # the discriminator judges what is shown against clean faces of that size
            else:
                lq, gt = damage_batch(gt, params, np_rng, cfg.native_sizes, size)
                lq, gt = lq.to(run.device), gt.to(run.device)
                out = model(lq)
                shown, target = out, gt

            # generator: pixel loss (+ the GAN term from `gan_start`)
            l1 = (shown - target).abs().mean()
            loss = l1
            vals = {"l1": l1.item(), **({"size": float(size)} if cfg.mix_size else {})}
            if cfg.pixel_loss == "mse":
                loss = (shown - target).pow(2).mean()
                vals["mse"] = loss.item()
            if cfg.gradient_weight > 0:
                grad = gradient_l1(shown, target)
                loss = loss + cfg.gradient_weight * grad
                vals["grad"] = grad.item()
            use_gan = cfg.gan_weight > 0 and run.step >= cfg.gan_start
            if use_gan:
                disc.requires_grad_(False)
                g_adv = gan_loss(disc(shown), True)
                loss = loss + cfg.gan_weight * g_adv
                vals["g_adv"] = g_adv.item()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()

            # discriminator: from 100 steps before the GAN term (warms the critic up a little)
            if use_gan or (cfg.gan_weight > 0 and run.step >= cfg.gan_start - 100):
                disc.requires_grad_(True)
                set_lr(opt_d, cfg.disc_lr)
                d_loss = gan_loss(disc(gt), True) + gan_loss(disc(shown.detach().clamp(0, 1)), False)
                opt_d.zero_grad(set_to_none=True)
                d_loss.backward()
                opt_d.step()
                vals["d"] = d_loss.item()
            vals["loss"] = loss.item()

            ema_update(ema, model, warmup_decay(cfg.ema_rate, run.step))
            run.end_step(vals, len(gt), lr)
            if cfg.sample_every and run.step % cfg.sample_every == 0:
                run.timed(grid, run.step)
            run.checkpoint_if_due()
    return run.finish()
