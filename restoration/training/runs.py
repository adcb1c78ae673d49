"""The run folder of the default-model trainers (`train_prior`, `train_restorer`): numbered checkpoints, resume and
warm start, `log.jsonl`, the progress bar, the deadline and the wall-time segments; and the model of a run.

A run folder holds `ckpt_XXXXXXXX.pt` (model, EMA, optimizer, the loop's extra state, step, all RNG states, data
order position, accumulated wall time, segments), `log.jsonl` (one line per log interval and per event) and the
sample grids the loop writes. Re-running with the same folder continues from the last checkpoint.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

import cv2
import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from restoration.models.archs import build
from restoration.models.checkpoints import load_strict
from restoration.models.zoo import CARD, Zoo
from restoration.runtime import ProgressFn
import restoration.training.state as state
from restoration.training.batches import EpochBatches, load_faces
from restoration.training.recipes import TrainConfig

__all__ = ["CKPT_GLOB", "TrainSetupError", "Run", "list_checkpoints", "last_checkpoint", "load_init",
           "load_run_model", "param_count"]

CKPT_GLOB = "ckpt_*.pt"


class TrainSetupError(ValueError):
    """A run cannot start or resume as asked (config differs from the checkpoint, bad warm start); says why."""


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(Path(out_dir) / CKPT_GLOB)))


def last_checkpoint(out_dir: str | Path) -> Path | None:
    c = list_checkpoints(out_dir)
    return c[-1] if c else None


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def set_threads(n: int) -> None:
    """torch's intra- and inter-op threads and OpenCV's."""
    torch.set_num_threads(max(1, int(n)))
    try:
        torch.set_num_interop_threads(max(1, int(n)))
    except RuntimeError:  # can only be set once, before any parallel work
        pass
    cv2.setNumThreads(max(1, int(n)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def load_init(init_from: str, arch: str, model_cfg: dict) -> tuple[dict, dict]:
    """Weights and lineage of a warm start: `init_from` is a zoo folder (model.safetensors, config.json, card.json)
    or the name of a model in the zoo, read through `Zoo` (strict load). Its arch and constructor config must equal
    the run's.

    Returns (state_dict, lineage) where lineage records the source (name, sha256) and its own training totals
    (steps, images seen, wall seconds, including the source's own warm starts).
    """
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


def load_run_model(run_dir: str | Path, which: str = "ema", checkpoint: str | Path | None = None) -> nn.Module:
    """The EMA (or raw) model of a run's last checkpoint, in eval mode (for evaluation before export)."""
    ck = Path(checkpoint) if checkpoint else last_checkpoint(run_dir)
    if ck is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}")
    s = state.load(ck)
    m = build(s["arch"], s["config"]["model"])
    m.load_state_dict(s[which])
    m.step = int(s["step"])  # type: ignore[attr-defined]
    return m.eval()


class _Log:
    def __init__(self, path: Path):
        self.path = path

    def write(self, **rec) -> None:
        rec["time"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Run:
    """The bookkeeping of one segment of a default-model training run; the loop itself stays in the trainer:

        run = Run(cfg, "restorer", arch, progress, show_bar)     # out dir, log; threads and seeds
        images = run.load_faces(size)
        ... generator, batches, model, optimizer, EMA ...
        extra = run.start(model, ema, opt, gen, batches, resume, extra_state)  # resume or warm start
        with run.progress_bar():
            while run.more():                  # steps left and the deadline not passed; starts the step's clock
                ... one optimizer step ...
                run.end_step(vals, n_images, lr)   # step + 1, wall time, running means, bar, progress, log line
                run.timed(grid, run.step)          # (when a sample grid is due) its time counts as training time
                run.checkpoint_if_due()
        return run.finish()                 # last checkpoint, stop event; {step, train_seconds, stopped, checkpoint}
    """

    def __init__(self, cfg: TrainConfig, kind: str, arch: str, progress: ProgressFn | None, show_bar: bool):
        self.cfg, self.kind, self.arch, self.progress, self.show_bar = cfg, kind, arch, progress, show_bar
        self.out = Path(cfg.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(cfg.device)
        self.log = _Log(self.out / "log.jsonl")
        self.names: list[str] = []
        set_threads(cfg.threads)
        seed_everything(cfg.seed)

    def load_faces(self, size: int) -> np.ndarray:
        """The training split's faces at `size` (NHWC uint8)."""
        cfg = self.cfg
        images, self.names = load_faces(cfg.split, size, cfg.data_root, cfg.cache_dir, cfg.limit, self.progress)
        return images

    def start(self, model: nn.Module, ema: nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
              batches: EpochBatches, resume: bool, extra_state: Callable[[], dict] = dict) -> dict:
        """Resume from the last checkpoint (when `resume`; the config's model, size and seed must match it) or start
        fresh (warm-started from `cfg.init_from` when set); open a segment. Returns the checkpoint's extra state
        (what `extra_state()` returned when it was saved; {} on a fresh start) for the loop to load."""
        cfg = self.cfg
        self.model, self.ema, self.opt, self.gen, self.batches = model, ema, opt, gen, batches
        self.extra_state = extra_state
        self.step, self.train_seconds, self.segments = 0, 0.0, []
        self.init: dict | None = None
        extra: dict = {}
        ck = last_checkpoint(self.out) if resume else None
        if ck is not None:
            s = state.load(ck)
            _check_resume_config(s["config"], cfg)
            model.load_state_dict(s["model"])
            ema.load_state_dict(s["ema"])
            opt.load_state_dict(s["opt"])
            extra = s.get("extra", {})
            self.step, self.train_seconds = int(s["step"]), float(s["train_seconds"])
            self.segments = list(s.get("segments", []))
            self.init = s.get("init")
            state.restore_rng(s["rng"])
            gen.set_state(s["gen"])
            batches.load(s["batches"])
            self.log.write(event="resume", step=self.step, checkpoint=ck.name)
        else:
            if cfg.init_from:
                sd, self.init = load_init(cfg.init_from, self.arch, cfg.model)
                load_strict(model, sd, name=cfg.init_from)
                ema.load_state_dict(model.state_dict())
            self.log.write(event="start", step=0, params=param_count(model), config=asdict(cfg), init=self.init)
        self.seg = {"start": _now(), "from_step": self.step}
        self.segments.append(self.seg)
        self.bar = None
        self.t_last_ck = self.t_seg = time.time()
        self.acc: dict[str, float] = {}
        self.n_acc, self.imgs_t0, self.imgs_n = 0, time.time(), 0
        self.stopped = "steps"
        self.last_saved = -1
        return extra

    @contextlib.contextmanager
    def progress_bar(self) -> Iterator[None]:
        """A tqdm bar over the steps while the loop runs (when `show_bar`), closed however the loop ends."""
        if self.show_bar:
            self.bar = tqdm(total=self.cfg.steps, initial=self.step, desc=f"train {self.kind}", dynamic_ncols=True,
                            mininterval=float(os.environ.get("FACEADAPT_TQDM_MININTERVAL", "1")))
        try:
            yield
        finally:
            if self.bar is not None:
                self.bar.close()

    def more(self) -> bool:
        """Whether to run another step (steps left and `cfg.until` not passed); starts the step's clock."""
        if self.step >= self.cfg.steps:
            return False
        if self.cfg.until is not None and time.time() >= self.cfg.until:
            self.stopped = "deadline"
            return False
        self.t_step = time.time()
        return True

    def end_step(self, vals: dict, n_images: int, lr: float) -> None:
        """After an optimizer step at rate `lr` on `n_images` with losses `vals`: count it and its wall time, update
        the bar and the progress callback, and every `log_every` steps (and at the last) log the running means."""
        cfg = self.cfg
        self.step += 1
        self.train_seconds += time.time() - self.t_step
        self.imgs_n += n_images
        for k, v in vals.items():
            self.acc[k] = self.acc.get(k, 0.0) + v
        self.n_acc += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in vals.items()}, refresh=False)
        if self.progress is not None:
            self.progress(f"train_{self.kind}", self.step, cfg.steps)
        if self.step % cfg.log_every == 0 or self.step == cfg.steps:
            dt = max(1e-9, time.time() - self.imgs_t0)
            self.log.write(step=self.step, lr=lr, imgs_per_s=round(self.imgs_n / dt, 2),
                           train_seconds=round(self.train_seconds, 1),
                           **{k: round(v / self.n_acc, 5) for k, v in self.acc.items()})
            self.acc, self.n_acc, self.imgs_t0, self.imgs_n = {}, 0, time.time(), 0

    def timed(self, fn: Callable, *args) -> None:
        """Run `fn(*args)` (a sample grid), its wall time counted as training time."""
        t1 = time.time()
        fn(*args)
        self.train_seconds += time.time() - t1

    def checkpoint_if_due(self) -> None:
        """A checkpoint every `ckpt_every` steps, and when `ckpt_minutes` passed since the last one."""
        if self.step % self.cfg.ckpt_every == 0 or time.time() - self.t_last_ck >= self.cfg.ckpt_minutes * 60:
            self.save()
            self.last_saved = self.step
            self.t_last_ck = time.time()

    def finish(self) -> dict:
        """Checkpoint the last step (unless just saved), log the stop; {step, train_seconds, stopped, checkpoint}."""
        if self.last_saved != self.step:
            self.save()
        seg_time = time.time() - self.t_seg
        self.log.write(event="stop", reason=self.stopped, step=self.step, segment_seconds=round(seg_time, 1),
                       train_seconds=round(self.train_seconds, 1))
        return {"step": self.step, "train_seconds": self.train_seconds, "stopped": self.stopped,
                "checkpoint": str(last_checkpoint(self.out))}

    def save(self) -> Path:
        """Write `ckpt_<step>.pt` (atomic, fsynced) and keep only the last `keep_ckpts` of them."""
        self.seg["end"] = _now()
        self.seg["to_step"] = self.step
        s = {
            "kind": self.kind, "step": self.step, "train_seconds": self.train_seconds, "segments": self.segments,
            "config": asdict(self.cfg), "arch": self.arch, "params": param_count(self.model),
            "model": self.model.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
            "extra": self.extra_state(), "rng": state.capture_rng(), "gen": self.gen.get_state(),
            "batches": self.batches.state(), "train_names_count": len(self.names), "init": self.init,
        }
        path = state.save(s, self.out / f"ckpt_{self.step:08d}.pt")
        for old in list_checkpoints(self.out)[:-max(1, self.cfg.keep_ckpts)]:
            old.unlink(missing_ok=True)
        return path


def _check_resume_config(saved: dict, cfg: TrainConfig) -> None:
    for key in ("model", "size", "seed"):
        if saved.get(key) != asdict(cfg).get(key):
            raise TrainSetupError(f"cannot resume: '{key}' differs from the checkpoint ({saved.get(key)!r} != {asdict(cfg).get(key)!r}); "
                                  "use another out dir")
