"""Training the small default models (`faceadapt train prior|restorer`), resumable, and exporting them to the zoo.

* `train_prior(PriorTrainConfig)`: a small `iddpm_unet` trained with the iDDPM hybrid loss
  (`GaussianDiffusion.training_losses`, 1000 linear steps, learned range) on the UTK200 faces at 64x64.
* `train_restorer(RestorerTrainConfig)`: a small `swinir_face` trained on `degrade.py`'s standard synthetic
  degradations with L1 + a small non-saturating GAN term (a small spectral-norm patch discriminator). LPIPS is not
  used: no LPIPS weights are available on these machines.
* Both are seeded and resumable: the out dir holds `ckpt_XXXXXXXX.pt` (model, EMA, optimizer(s), step, all RNG
  states, data order position, accumulated wall time), `log.jsonl` (one line per log interval) and sample grids
  `samples_XXXXXXXX.png`. Re-running with the same out dir continues from the last checkpoint.
* `export(run_dir, dest)`: writes the EMA weights as a zoo folder (`model.safetensors`, `config.json`, `card.json`,
  see docs/ARCHITECTURE.md) through `restoration.models.zoo.Zoo.register`.

Progress callbacks follow the project convention `progress(stage, done, total)`.
"""
from __future__ import annotations

import copy
import glob
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from restoration.training import rng
from restoration.runtime import ProgressFn


# --------------------------------------------------------------------------------------------------------------------
# default small configurations (reference constructor keywords)
# --------------------------------------------------------------------------------------------------------------------
# 3.95M parameters; measured 16.7 img/s (batch 16, 1 thread) for a training step at 64 px on this CPU.
PRIOR_MODEL_SMALL: dict = dict(
    image_size=64, in_channels=3, model_channels=32, out_channels=6, attention_resolutions=[16, 8], dropout=0.0,
    channel_mult=[1, 2, 3, 4], num_res_blocks=[1, 1, 1, 1], conv_resample=True, dims=2, use_fp16=False,
    num_heads=1, num_head_channels=32, use_scale_shift_norm=True, resblock_updown=False, use_new_attention_order=False,
)
# 0.67M parameters; 4x PixelUnshuffle -> 16x16 tokens at 64 px (two 8x8 windows per side).
RESTORER_MODEL_SMALL: dict = dict(
    img_size=16, patch_size=1, in_chans=3, embed_dim=60, depths=[4, 4, 4], num_heads=[6, 6, 6], window_size=8,
    mlp_ratio=2, drop_path_rate=0.0, sf=4, img_range=1.0, upsampler="nearest+conv", resi_connection="1conv",
    unshuffle=True, unshuffle_scale=4,
)
DIFFUSION_DEFAULT: dict = dict(steps=1000, noise_schedule="linear", learn_sigma=True, respacing="250")
# the DT-BFR defaults (respaced indices out of 250; down_N for 512 px); the tuned values for the small prior are
# written into its card by whoever exports it (see docs/MODELS.md)
PSEUDO_TARGET_DEFAULTS_REFERENCE: dict = dict(start=150, constrain_until=90, down_N=16)

CKPT_GLOB = "ckpt_*.pt"


@dataclass
class _TrainConfig:
    out_dir: str = "runs/model"
    seed: int = 0
    size: int = 64
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 200
    lr_schedule: str = "constant"  # "constant" | "cosine" (to 10% of lr at `steps`)
    grad_clip: float = 1.0
    steps: int = 10000
    ema_rate: float = 0.999
    ckpt_every: int = 500  # steps
    ckpt_minutes: float = 5.0  # also checkpoint when this much wall time passed since the last one
    keep_ckpts: int = 2
    sample_every: int = 1000  # sample grid PNG every N steps (0: never)
    log_every: int = 50
    threads: int = 1
    device: str = "cpu"
    data_root: str | None = None  # default: restoration.data.faces.default_faces_root()
    split: str = "train"
    cache_dir: str | None = "runs/cache"
    limit: int | None = None  # only the first N images of the split (tests)
    until: float | None = None  # unix time; stop (after a checkpoint) when passed
    init_from: str | None = None  # warm start: a zoo model name or folder with the same arch and model config
    model: dict = field(default_factory=dict)


@dataclass
class PriorTrainConfig(_TrainConfig):
    out_dir: str = "runs/prior"
    model: dict = field(default_factory=lambda: copy.deepcopy(PRIOR_MODEL_SMALL))
    diffusion: dict = field(default_factory=lambda: dict(DIFFUSION_DEFAULT))
    sample_respacing: str = "50"  # short schedule for the sample grids
    n_samples: int = 16


PIXEL_LOSSES = ("l1", "mse")


@dataclass
class RestorerTrainConfig(_TrainConfig):
    out_dir: str = "runs/restorer"
    model: dict = field(default_factory=lambda: copy.deepcopy(RESTORER_MODEL_SMALL))
    steps: int = 4000
    lr_schedule: str = "cosine"
    gan_weight: float = 0.005
    gan_start: int = 500  # steps of pure L1 before the GAN term is switched on
    # Pixel loss, one of PIXEL_LOSSES: 'l1' (default) or 'mse' (optimises PSNR directly; for a last PSNR-oriented
    # stage of a warm start).
    pixel_loss: str = "l1"
    disc_lr: float = 2e-4
    disc_channels: int = 32
    degradation: dict = field(default_factory=dict)  # overrides of DegradationParams (empty: standard)
    n_grid: int = 8
    # Train on what the product feeds the model: each face is damaged at a native size drawn from this list (the
    # damage scaled for that size, as `degrade` does), then resized to `size` the way the pipeline resizes a crop
    # (`models.io.resize_for_model`); its target is the clean face resized to `size`. Empty: damaged at `size`.
    native_sizes: list = field(default_factory=list)


def config_from_dict(cls, d: dict):
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in d.items() if k in known})


# --------------------------------------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------------------------------------
def set_threads(n: int) -> None:
    torch.set_num_threads(max(1, int(n)))
    try:
        torch.set_num_interop_threads(max(1, int(n)))
    except RuntimeError:  # can only be set once, before any parallel work
        pass
    try:
        import cv2

        cv2.setNumThreads(max(1, int(n)))
    except Exception:  # pragma: no cover - cv2 is optional here
        pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


_rng_state, _set_rng_state = rng.capture, rng.restore


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, rate: float) -> None:
    ema_p = [p for p in ema.parameters()]
    mod_p = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(ema_p, mod_p, 1.0 - rate)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def lr_at(cfg: _TrainConfig, step: int) -> float:
    warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    if cfg.lr_schedule == "cosine":
        frac = min(1.0, step / max(1, cfg.steps))
        return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
    return cfg.lr * warm


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(Path(out_dir) / CKPT_GLOB)))


def last_checkpoint(out_dir: str | Path) -> Path | None:
    c = list_checkpoints(out_dir)
    return c[-1] if c else None


def load_checkpoint(path: str | Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _save_checkpoint(out_dir: Path, state: dict, keep: int) -> Path:
    path = out_dir / f"ckpt_{state['step']:08d}.pt"
    tmp = out_dir / f".{path.name}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)
    for old in list_checkpoints(out_dir)[:-max(1, keep)]:
        old.unlink(missing_ok=True)
    return path


def save_grid(rows: list[torch.Tensor], path: str | Path, pad: int = 2) -> Path:
    """rows: tensors [N, 3, H, W] in [0, 1] (same N, H, W); one row each. Written as PNG."""
    from PIL import Image

    n = max(r.shape[0] for r in rows)
    h, w = rows[0].shape[-2:]
    canvas = np.full((len(rows) * (h + pad) + pad, n * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, r in enumerate(rows):
        arr = (r.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
        for j in range(arr.shape[0]):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y:y + h, x:x + w] = arr[j]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path, optimize=True)
    return path


class _Batches:
    """Epoch-wise shuffled batches from a persistent torch.Generator (its state goes into the checkpoint)."""

    def __init__(self, n: int, batch: int, gen: torch.Generator):
        self.n, self.batch, self.gen = n, batch, gen
        self.perm: torch.Tensor | None = None
        self.pos = 0
        self.epoch = 0

    def state(self) -> dict:
        return {"perm": self.perm, "pos": self.pos, "epoch": self.epoch}

    def load(self, s: dict) -> None:
        self.perm, self.pos, self.epoch = s["perm"], s["pos"], s["epoch"]

    def next(self) -> torch.Tensor:
        out = []
        need = self.batch
        while need > 0:
            if self.perm is None or self.pos >= self.n:
                self.perm = torch.randperm(self.n, generator=self.gen)
                self.pos = 0
                self.epoch += 1
            take = self.perm[self.pos:self.pos + need]
            self.pos += len(take)
            need -= len(take)
            out.append(take)
        return torch.cat(out)


def _batch_images(images: np.ndarray, idx: torch.Tensor, gen: torch.Generator, flip: bool) -> torch.Tensor:
    x = torch.from_numpy(images[idx.numpy()]).permute(0, 3, 1, 2).float().div_(255.0)
    if flip:
        f = torch.rand(len(idx), generator=gen) < 0.5
        x[f] = x[f].flip(-1)
    return x


def _load_train_images(cfg: _TrainConfig, progress: ProgressFn | None, size: int) -> tuple[np.ndarray, list[str]]:
    from restoration.data.faces import FacesDataset

    ds = FacesDataset(cfg.split, size, root=cfg.data_root, flip=False, cache_dir=cfg.cache_dir, limit=cfg.limit,
                      progress=progress)
    return ds.images, ds.names


def _psnr_ssim(out01: torch.Tensor, gt01: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-image PSNR / SSIM ([0,1] tensors NCHW), with restoration.metrics.quality when present."""
    out01, gt01 = out01.clamp(0, 1).float(), gt01.clamp(0, 1).float()
    try:
        from restoration.metrics import quality as M

        ps = [float(M.psnr(out01[i:i + 1], gt01[i:i + 1])) for i in range(len(out01))]
        ss = [float(M.ssim(out01[i:i + 1], gt01[i:i + 1])) for i in range(len(out01))]
        return ps, ss
    except ImportError:
        pass
    mse = ((out01 - gt01) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    ps = (10 * torch.log10(1.0 / mse)).tolist()
    # fallback SSIM: gaussian window 11, sigma 1.5, on each channel, averaged
    g = torch.exp(-((torch.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    g = (g / g.sum()).float()
    win = (g[:, None] * g[None, :]).expand(3, 1, 11, 11)
    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = F.conv2d(out01, win, groups=3), F.conv2d(gt01, win, groups=3)
    sxx = F.conv2d(out01 * out01, win, groups=3) - mu_x**2
    syy = F.conv2d(gt01 * gt01, win, groups=3) - mu_y**2
    sxy = F.conv2d(out01 * gt01, win, groups=3) - mu_x * mu_y
    m = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return ps, m.mean(dim=(1, 2, 3)).tolist()


class _Log:
    def __init__(self, path: Path):
        self.path = path

    def write(self, **rec) -> None:
        rec["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


class TrainSetupError(ValueError):
    """A run cannot start or resume as asked (config differs from the checkpoint, bad warm start); says why."""


def load_init(init_from: str, arch: str, model_cfg: dict) -> tuple[dict, dict]:
    """Weights and lineage of a warm start: `init_from` is a zoo folder (model.safetensors, config.json, card.json)
    or the name of a model in the zoo, read through `Zoo` (strict load). Its arch and constructor config must equal
    the run's.

    Returns (state_dict, lineage) where lineage records the source (name, sha256) and its own training totals
    (steps, images seen, wall seconds, including the source's own warm starts).
    """
    from restoration.models.zoo import CARD, Zoo

    p = Path(init_from)
    zoo, name = (Zoo(root=p.parent, builtin_dir=None), p.name) if (p / CARD).is_file() else (Zoo(), init_from)
    cfg, card = zoo.config(name), zoo.get(name)  # ModelNotFound says where to look
    if cfg.get("arch") != arch:
        raise TrainSetupError(f"cannot warm-start from {init_from}: its arch is {cfg.get('arch')!r}, this run trains {arch!r}")
    if cfg.get("config") != model_cfg:
        diff = sorted(k for k in set(cfg.get("config", {})) | set(model_cfg) if cfg["config"].get(k) != model_cfg.get(k))
        raise TrainSetupError(f"cannot warm-start from {init_from}: its model config differs in {diff}")
    tr = card.extra.get("training", {})
    tot = tr.get("total", {})
    lineage = {
        "name": card.name, "sha256": card.sha256,
        "steps": int(tot.get("steps", tr.get("steps", 0))),
        "images_seen": int(tot.get("images_seen", tr.get("images_seen", 0))),
        "wall_seconds": float(tot.get("wall_seconds", tr.get("wall_seconds", 0.0))),
        "training": {k: tr.get(k) for k in ("steps", "batch_size", "lr", "lr_schedule", "wall_seconds", "command",
                                            "segments", "init_from") if k in tr},
    }
    return zoo.load(name).state_dict(), lineage


def _check_resume_config(saved: dict, cfg: _TrainConfig) -> None:
    for key in ("model", "size", "seed"):
        if saved.get(key) != asdict(cfg).get(key):
            raise TrainSetupError(f"cannot resume: '{key}' differs from the checkpoint ({saved.get(key)!r} != {asdict(cfg).get(key)!r}); "
                             "use another out dir")


# --------------------------------------------------------------------------------------------------------------------
# the generic loop
# --------------------------------------------------------------------------------------------------------------------
class _Loop:
    """Holds model/EMA/optimizers and runs steps with checkpoints, logs, grids, tqdm and the deadline."""

    kind = "model"

    def __init__(self, cfg: _TrainConfig, progress: ProgressFn | None, resume: bool, show_bar: bool):
        self.cfg, self.progress, self.resume, self.show_bar = cfg, progress, resume, show_bar
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(cfg.device)
        self.log = _Log(self.out / "log.jsonl")

    # subclasses: build(), train_step(x) -> dict of floats, grid(step), extra_state(), load_extra_state()
    def run(self) -> dict:
        cfg = self.cfg
        set_threads(cfg.threads)
        seed_everything(cfg.seed)
        self.images, self.names = _load_train_images(cfg, self.progress, self.load_size())
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.batches = _Batches(len(self.images), cfg.batch_size, self.gen)
        self.build()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.step, self.train_seconds, self.segments = 0, 0.0, []
        self.init: dict | None = None
        ck = last_checkpoint(self.out) if self.resume else None
        if ck is not None:
            s = load_checkpoint(ck)
            _check_resume_config(s["config"], cfg)
            self.model.load_state_dict(s["model"])
            self.ema.load_state_dict(s["ema"])
            self.opt.load_state_dict(s["opt"])
            self.load_extra_state(s.get("extra", {}))
            self.step, self.train_seconds = int(s["step"]), float(s["train_seconds"])
            self.segments = list(s.get("segments", []))
            self.init = s.get("init")
            _set_rng_state(s["rng"])
            self.gen.set_state(s["gen"])
            self.batches.load(s["batches"])
            self.log.write(event="resume", step=self.step, checkpoint=ck.name)
        else:
            if cfg.init_from:
                from restoration.models.checkpoints import load_strict

                sd, self.init = load_init(cfg.init_from, self.arch, cfg.model)
                load_strict(self.model, sd, name=cfg.init_from)
                self.ema.load_state_dict(self.model.state_dict())
            self.log.write(event="start", step=0, params=param_count(self.model), config=asdict(cfg), init=self.init)
        seg = {"start": datetime.now(timezone.utc).isoformat(timespec="seconds"), "from_step": self.step}
        self.segments.append(seg)

        bar = None
        if self.show_bar:
            from tqdm import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {self.kind}", dynamic_ncols=True,
                       mininterval=float(os.environ.get("FACEADAPT_TQDM_MININTERVAL", "1")))
        t_last_ck = time.time()
        t_seg = time.time()
        acc: dict[str, float] = {}
        n_acc, imgs_t0, imgs_n = 0, time.time(), 0
        stopped = "steps"
        last_saved = -1
        try:
            while self.step < cfg.steps:
                if cfg.until is not None and time.time() >= cfg.until:
                    stopped = "deadline"
                    break
                t0 = time.time()
                idx = self.batches.next()
                x = _batch_images(self.images, idx, self.gen, flip=True).to(self.device)
                for g in self.opt.param_groups:
                    g["lr"] = lr_at(cfg, self.step)
                vals = self.train_step(x)
                ema_update(self.ema, self.model, min(cfg.ema_rate, (1 + self.step) / (10 + self.step)))
                self.step += 1
                self.train_seconds += time.time() - t0
                imgs_n += len(idx)
                for k, v in vals.items():
                    acc[k] = acc.get(k, 0.0) + v
                n_acc += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({k: f"{v:.4f}" for k, v in vals.items()}, refresh=False)
                if self.progress is not None:
                    self.progress(f"train_{self.kind}", self.step, cfg.steps)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    dt = max(1e-9, time.time() - imgs_t0)
                    self.log.write(step=self.step, lr=lr_at(cfg, self.step - 1), imgs_per_s=round(imgs_n / dt, 2),
                                   train_seconds=round(self.train_seconds, 1),
                                   **{k: round(v / n_acc, 5) for k, v in acc.items()})
                    acc, n_acc, imgs_t0, imgs_n = {}, 0, time.time(), 0
                if cfg.sample_every and self.step % cfg.sample_every == 0:
                    t1 = time.time()
                    self.grid(self.step)
                    self.train_seconds += time.time() - t1
                if self.step % cfg.ckpt_every == 0 or time.time() - t_last_ck >= cfg.ckpt_minutes * 60:
                    self.save(seg)
                    last_saved = self.step
                    t_last_ck = time.time()
        finally:
            if bar is not None:
                bar.close()
        if last_saved != self.step:
            self.save(seg)
        seg_time = time.time() - t_seg
        self.log.write(event="stop", reason=stopped, step=self.step, segment_seconds=round(seg_time, 1),
                       train_seconds=round(self.train_seconds, 1))
        return {"step": self.step, "train_seconds": self.train_seconds, "stopped": stopped,
                "checkpoint": str(last_checkpoint(self.out))}

    def save(self, seg: dict) -> Path:
        seg["end"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        seg["to_step"] = self.step
        state = {
            "kind": self.kind, "step": self.step, "train_seconds": self.train_seconds, "segments": self.segments,
            "config": asdict(self.cfg), "arch": self.arch, "params": param_count(self.model),
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
            "extra": self.extra_state(), "rng": _rng_state(), "gen": self.gen.get_state(),
            "batches": self.batches.state(), "train_names_count": len(self.names), "init": self.init,
        }
        return _save_checkpoint(self.out, state, self.cfg.keep_ckpts)

    def load_size(self) -> int:
        """Side of the training faces as loaded (the batches the loop hands to train_step)."""
        return self.cfg.size

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, s: dict) -> None:
        pass


class _PriorLoop(_Loop):
    kind = "prior"
    arch = "iddpm_unet"

    def build(self) -> None:
        from restoration.models.archs import build
        from restoration.diffusion.gaussian import create_gaussian_diffusion

        cfg: PriorTrainConfig = self.cfg  # type: ignore[assignment]
        d = cfg.diffusion
        self.diffusion = create_gaussian_diffusion(steps=d["steps"], learn_sigma=d["learn_sigma"],
                                                   noise_schedule=d["noise_schedule"], timestep_respacing=None)
        self.model = build(self.arch, cfg.model).to(self.device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def train_step(self, x01: torch.Tensor) -> dict:
        x = x01 * 2 - 1
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), generator=self.gen).to(self.device)
        noise = torch.randn(x.shape, generator=self.gen).to(self.device)
        terms = self.diffusion.training_losses(self.model, x, t, noise=noise)
        loss = terms["loss"].mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        return {"loss": loss.item(), "mse": terms["mse"].mean().item(), "vb": terms["vb"].mean().item()}

    def grid(self, step: int) -> None:
        cfg: PriorTrainConfig = self.cfg  # type: ignore[assignment]
        x = sample_prior(self.ema, cfg.n_samples, cfg.size, cfg.sample_respacing, seed=cfg.seed, diffusion=cfg.diffusion)
        n = cfg.n_samples
        cols = 8 if n >= 8 else n
        rows = [x[i:i + cols] for i in range(0, n, cols)]
        save_grid([r for r in rows if len(r) == cols] or [x], self.out / f"samples_{step:08d}.png")
        self.model.train()


class PatchDiscriminator(nn.Module):
    """A small spectral-norm patch discriminator (3 stride-2 convs): input [0,1] RGB, output logits at 1/8 size."""

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


def degrade_batch(x01: torch.Tensor, params, rng: np.random.Generator) -> torch.Tensor:
    """Apply restoration.degrade.damage.degrade to each image of an NCHW [0,1] batch (numpy, float32)."""
    from restoration.degrade.damage import degrade

    arr = x01.permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
    out = np.stack([np.asarray(degrade(a, params, rng), dtype=np.float32) for a in arr])
    return torch.from_numpy(out).permute(0, 3, 1, 2).clamp(0, 1).contiguous()


def degrade_native_batch(gt_hi: torch.Tensor, params, rng: np.random.Generator, sizes: list[int],
                         size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lq, gt) at `size` for faces seen at native sizes drawn from `sizes`: each clean face (NCHW, loaded at least
    as large as the largest size) is resized to its native size, damaged there (`degrade` scales the damage for
    that size), and resized to `size` like a crop in the pipeline; the target is the clean face resized to `size`."""
    from restoration.models.io import resize_for_model

    def resize(x: torch.Tensor, s: int) -> torch.Tensor:
        return resize_for_model(x, s).clamp(0, 1)

    lqs = []
    for i in range(len(gt_hi)):
        s = int(sizes[int(rng.integers(len(sizes)))])
        lqs.append(resize(degrade_batch(resize(gt_hi[i:i + 1], s), params, rng), size))
    return torch.cat(lqs), resize(gt_hi, size)


def degradation_params(overrides: dict | None = None):
    from restoration.degrade.damage import DegradationParams

    return DegradationParams(**(overrides or {}))


class _RestorerLoop(_Loop):
    kind = "restorer"
    arch = "swinir_face"

    def build(self) -> None:
        from restoration.models.archs import build

        cfg: RestorerTrainConfig = self.cfg  # type: ignore[assignment]
        if cfg.pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss is one of {', '.join(PIXEL_LOSSES)}, not {cfg.pixel_loss!r}")
        self.model = build(self.arch, cfg.model).to(self.device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.disc = PatchDiscriminator(cfg.disc_channels).to(self.device).train()
        self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.999))
        self.params = degradation_params(cfg.degradation)
        self.np_rng = np.random.default_rng(cfg.seed)
        self._grid_batch = None

    def load_size(self) -> int:
        cfg: RestorerTrainConfig = self.cfg  # type: ignore[assignment]
        return max([cfg.size, *cfg.native_sizes])

    def damage(self, gt: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        cfg: RestorerTrainConfig = self.cfg  # type: ignore[assignment]
        if cfg.native_sizes:
            return degrade_native_batch(gt, self.params, rng, cfg.native_sizes, cfg.size)
        return degrade_batch(gt, self.params, rng), gt

    def extra_state(self) -> dict:
        return {"disc": self.disc.state_dict(), "opt_d": self.opt_d.state_dict(),
                "np_rng": self.np_rng.bit_generator.state}

    def load_extra_state(self, s: dict) -> None:
        if s:
            self.disc.load_state_dict(s["disc"])
            self.opt_d.load_state_dict(s["opt_d"])
            self.np_rng.bit_generator.state = s["np_rng"]

    def train_step(self, gt: torch.Tensor) -> dict:
        cfg: RestorerTrainConfig = self.cfg  # type: ignore[assignment]
        lq, gt = self.damage(gt, self.np_rng)
        lq, gt = lq.to(self.device), gt.to(self.device)
        out = self.model(lq)
        l1 = (out - gt).abs().mean()
        loss = l1
        vals = {"l1": l1.item()}
        if cfg.pixel_loss == "mse":
            loss = (out - gt).pow(2).mean()
            vals["mse"] = loss.item()
        use_gan = cfg.gan_weight > 0 and self.step >= cfg.gan_start
        if use_gan:
            self.disc.requires_grad_(False)
            g_adv = F.softplus(-self.disc(out)).mean()
            loss = loss + cfg.gan_weight * g_adv
            vals["g_adv"] = g_adv.item()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.opt.step()
        if use_gan or (cfg.gan_weight > 0 and self.step >= cfg.gan_start - 100):  # warm the critic up a little
            self.disc.requires_grad_(True)
            for g in self.opt_d.param_groups:
                g["lr"] = cfg.disc_lr
            d_loss = F.softplus(-self.disc(gt)).mean() + F.softplus(self.disc(out.detach().clamp(0, 1))).mean()
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
            vals["d"] = d_loss.item()
        vals["loss"] = loss.item()
        return vals

    def _grid_data(self):
        if self._grid_batch is None:
            from restoration.data.faces import FacesDataset

            cfg: RestorerTrainConfig = self.cfg  # type: ignore[assignment]
            try:
                ds = FacesDataset("val", self.load_size(), root=cfg.data_root, limit=cfg.n_grid)
                gt = torch.stack([ds[i] for i in range(len(ds))])
            except FileNotFoundError:
                gt = _batch_images(self.images, torch.arange(min(cfg.n_grid, len(self.images))), self.gen, False)
            lq, gt = self.damage(gt, np.random.default_rng(12345))
            self._grid_batch = (lq, gt)
        return self._grid_batch

    @torch.no_grad()
    def grid(self, step: int) -> None:
        lq, gt = self._grid_data()
        out = self.ema(lq.to(self.device)).clamp(0, 1).cpu()
        save_grid([lq, out, gt], self.out / f"samples_{step:08d}.png")
        ps, _ = _psnr_ssim(out, gt)
        ps_lq, _ = _psnr_ssim(lq, gt)
        self.log.write(step=step, grid_psnr=round(float(np.mean(ps)), 3), grid_psnr_lq=round(float(np.mean(ps_lq)), 3))


def train_prior(cfg: PriorTrainConfig, progress: ProgressFn | None = None, resume: bool = True,
                show_bar: bool = True) -> dict:
    """Train (or continue training) the small diffusion prior; returns {step, train_seconds, stopped, checkpoint}."""
    return _PriorLoop(cfg, progress, resume, show_bar).run()


def train_restorer(cfg: RestorerTrainConfig, progress: ProgressFn | None = None, resume: bool = True,
                   show_bar: bool = True) -> dict:
    """Train (or continue training) the small restorer; returns {step, train_seconds, stopped, checkpoint}."""
    return _RestorerLoop(cfg, progress, resume, show_bar).run()


# --------------------------------------------------------------------------------------------------------------------
# sampling / evaluation helpers (also used by bench/default_models.py)
# --------------------------------------------------------------------------------------------------------------------
def make_diffusion(respacing: str | None = "250", diffusion: dict | None = None):
    from restoration.diffusion.gaussian import create_gaussian_diffusion

    d = dict(DIFFUSION_DEFAULT, **(diffusion or {}))
    return create_gaussian_diffusion(steps=d["steps"], learn_sigma=d["learn_sigma"], noise_schedule=d["noise_schedule"],
                                     timestep_respacing=respacing)


@torch.no_grad()
def sample_prior(model: nn.Module, n: int, size: int, respacing: str = "50", seed: int = 0,
                 diffusion: dict | None = None, progress: ProgressFn | None = None) -> torch.Tensor:
    """Unconditional ancestral samples in [0,1] with a respaced schedule (learned variances)."""
    model.eval()
    dev = next(model.parameters()).device
    diff = make_diffusion(respacing, diffusion)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n, 3, size, size), generator=g)
    x = noise.to(dev)
    for i in reversed(range(diff.num_timesteps)):
        x = diff.p_sample(model, x, i, noise=torch.randn(x.shape, generator=g).to(dev))["sample"]
        if progress is not None:
            progress("sample", diff.num_timesteps - i, diff.num_timesteps)
    return (x * 0.5 + 0.5).clamp(0, 1).cpu()


@torch.no_grad()
def denoise_psnr(model: nn.Module, clean01: torch.Tensor, t_respaced: int, respacing: str = "250", seed: int = 0,
                 batch: int = 16) -> float:
    """Mean PSNR of the x0-prediction from q_sample(x0, t) (respaced index t) against x0, clean faces [0,1]."""
    model.eval()
    dev = next(model.parameters()).device
    diff = make_diffusion(respacing)
    g = torch.Generator().manual_seed(seed)
    ps = []
    for i in range(0, len(clean01), batch):
        x0 = clean01[i:i + batch] * 2 - 1
        noise = torch.randn(x0.shape, generator=g)
        xt = diff.q_sample(x0, t_respaced, noise=noise).to(dev)
        pred = diff.p_mean_variance(model, xt, t_respaced)["pred_xstart"].cpu()
        p, _ = _psnr_ssim(pred * 0.5 + 0.5, x0 * 0.5 + 0.5)
        ps += p
    return float(np.mean(ps))


@torch.no_grad()
def evaluate_restorer(model: nn.Module, gt01: torch.Tensor, params=None, seed: int = 0, batch: int = 32) -> dict:
    """Degrade `gt01` (N,3,S,S in [0,1]) with per-image seeds `seed + i` (see `degrade_pair`) and compare with the
    ground truth: the restorer output, its input (the degraded image as `degrade` returns it, low resolution upsampled
    bilinearly) and the same low-resolution image upsampled bicubically. Returns mean PSNR (dB) / SSIM of each."""
    model.eval()
    dev = next(model.parameters()).device
    lq, lqb = degrade_pair(gt01, params, seed)
    outs = []
    for i in range(0, len(lq), batch):
        outs.append(model(lq[i:i + batch].to(dev)).clamp(0, 1).cpu())
    out = torch.cat(outs)
    res: dict = {"n": len(gt01), "seed": seed}
    for key, img in (("restorer", out), ("input", lq), ("bicubic", lqb)):
        p, s_ = _psnr_ssim(img, gt01)
        res[f"psnr_{key}"], res[f"ssim_{key}"] = float(np.mean(p)), float(np.mean(s_))
    return res


# --------------------------------------------------------------------------------------------------------------------
# export to the zoo
# --------------------------------------------------------------------------------------------------------------------
LICENSE_TEXT = ("Weights trained on UTKFace (non-commercial research use only): research / non-commercial use only. "
                "Code: Apache-2.0.")


def export(run_dir: str | Path, dest: str | Path, *, checkpoint: str | Path | None = None, metrics: dict | None = None,
           extra: dict | None = None, description: str | None = None, command: str | None = None,
           train_command: str | None = None) -> Path:
    """Write the EMA weights of the last checkpoint of `run_dir` as the zoo folder `dest` (`<zoo>/<name>`).

    The card records the data (UTKFace subset, terms), the split files and their sha256, steps, seed, wall time,
    the training config and `metrics`; `extra` is merged into `card.extra` (e.g. `pseudo_target_defaults`).
    """
    from restoration.data import faces as D
    from restoration.models.zoo import Zoo

    ck = Path(checkpoint) if checkpoint else last_checkpoint(run_dir)
    if ck is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}")
    s = load_checkpoint(ck)
    kind, arch, tcfg = s["kind"], s["arch"], s["config"]
    dest = Path(dest)
    imgs_per_s = tcfg["batch_size"] * s["step"] / max(1e-9, s["train_seconds"])
    card_extra: dict = {
        "training": {
            "recipe": ("iDDPM hybrid loss (L_simple + rescaled L_vlb, learned range), AdamW, EMA"
                       if kind == "prior" else
                       f"{'MSE' if tcfg.get('pixel_loss') == 'mse' else 'L1'}"
                       f"{' + non-saturating GAN (small spectral-norm patch discriminator)' if tcfg.get('gan_weight', 0) > 0 else ''}"
                       ", AdamW, EMA; no LPIPS (no LPIPS weights available locally)"),
            "steps": s["step"], "seed": tcfg["seed"], "batch_size": tcfg["batch_size"], "lr": tcfg["lr"],
            "lr_schedule": tcfg["lr_schedule"], "ema_rate": tcfg["ema_rate"], "size": tcfg["size"],
            "images_seen": s["step"] * tcfg["batch_size"], "wall_seconds": round(s["train_seconds"], 1),
            "images_per_second": round(imgs_per_s, 2), "threads": tcfg["threads"], "device": tcfg["device"],
            "segments": s.get("segments", []), "config": tcfg, "checkpoint": ck.name, "weights": "EMA",
            "torch": torch.__version__,
        },
        "data": {
            "name": D.DATA_NAME, "terms": D.DATA_TERMS, "split": tcfg.get("split", "train"),
            "count": s.get("train_names_count"),
            "split_files": [f"restoration/data/{D.SPLIT_PREFIX}_{x}.txt" for x in D.SPLITS],
            "split_sha256": D.split_sha256() if D.split_path("train").is_file() else None,
            "split_seed": D.SPLIT_SEED,
        },
        "params": s["params"],
        "metrics": metrics or {},
    }
    init = s.get("init")
    tr = card_extra["training"]
    tr["init_from"] = init
    tr["total"] = {  # this run plus the warm starts it continues
        "steps": s["step"] + (init["steps"] if init else 0),
        "images_seen": tr["images_seen"] + (init["images_seen"] if init else 0),
        "wall_seconds": round(tr["wall_seconds"] + (init["wall_seconds"] if init else 0.0), 1),
    }
    if train_command:
        card_extra["training"]["command"] = train_command
    if command:
        card_extra["training"]["export_command"] = command
    if kind == "prior":
        card_extra["diffusion"] = dict(tcfg.get("diffusion") or DIFFUSION_DEFAULT)
        card_extra["pseudo_target_defaults"] = dict(PSEUDO_TARGET_DEFAULTS_REFERENCE)
    else:
        card_extra["degradation"] = tcfg.get("degradation") or "restoration.degrade.damage.DegradationParams() (standard)"
        card_extra["lpips"] = "not used: no LPIPS weights on disk"
    for k, v in (extra or {}).items():
        card_extra[k] = v
    what = f"Small {arch} {'diffusion prior' if kind == 'prior' else 'face restorer'} at {tcfg['size']}x{tcfg['size']}"
    if init:
        how = (f"trained on the UTK200 training split: {init['steps']} steps ({init['name']}, sha256 "
               f"{init['sha256'][:12]}) then {s['step']} more (batch {tcfg['batch_size']}), "
               f"{tr['total']['steps']} in all.")
    else:
        how = f"trained from scratch on the UTK200 training split ({s['step']} steps, batch {tcfg['batch_size']})."
    desc = description or f"{what}, {how}"
    zoo = Zoo(root=dest.parent, builtin_dir=None)
    zoo.register(
        dest.name, arch, tcfg["model"], s["ema"], kind=kind, input_size=int(tcfg["size"]),
        value_range=[-1.0, 1.0] if kind == "prior" else [0.0, 1.0], overwrite=True,
        license=LICENSE_TEXT, provenance=(f"FaceAdapt `faceadapt train {kind}` (restoration/training/train.py), EMA weights of "
                                          f"{ck.name}; data: UTKFace subset faces-utk200 (non-commercial research terms)"),
        description=desc, random_init=False, extra=card_extra,
    )
    return dest


def load_run_model(run_dir: str | Path, which: str = "ema", checkpoint: str | Path | None = None) -> nn.Module:
    """The EMA (or raw) model of a run's last checkpoint, in eval mode (for evaluation before export)."""
    from restoration.models.archs import build

    ck = Path(checkpoint) if checkpoint else last_checkpoint(run_dir)
    if ck is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}")
    s = load_checkpoint(ck)
    m = build(s["arch"], s["config"]["model"])
    m.load_state_dict(s[which])
    m.step = int(s["step"])  # type: ignore[attr-defined]
    return m.eval()


def degrade_pair(gt01: torch.Tensor, params=None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Degrade each image i of `gt01` (N,3,S,S in [0,1]) with `np.random.default_rng(seed + i)`.

    Returns (lq, lq_bicubic): `lq` is what `degrade` returns (the low-resolution image upsampled back with the
    pipeline's interpolation, bilinear by default): the restorer's input; `lq_bicubic` is the same low-resolution
    image upsampled with bicubic interpolation instead (the classic baseline).
    """
    from restoration.degrade.damage import apply_degradation, sample_degradation

    params = params if params is not None else degradation_params()
    lq, lqb = [], []
    for i in range(len(gt01)):
        a = gt01[i].permute(1, 2, 0).cpu().numpy().astype(np.float32)
        info = sample_degradation(params, np.random.default_rng(seed + i), a.shape)
        lq.append(apply_degradation(a, info))
        lqb.append(apply_degradation(a, dict(info, up_interp="bicubic")))
    to_t = lambda arrs: torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous().float()  # noqa: E731
    return to_t(lq), to_t(lqb)
