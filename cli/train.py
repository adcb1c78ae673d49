"""`faceadapt train ...`: train the small default models (prior, restorer) and export them to a zoo folder."""
from __future__ import annotations

import json
import shlex
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Optional

import typer

from cli.app import app
from cli.checks import check_device
from cli.errors import fail
from restoration.degrade import DAMAGE_TYPES, HELD_OUT, BroadDamage
from restoration.models import CARD, ModelNotFound, Zoo, ZooError
from restoration.training import (DAMAGE_MODELS, PIXEL_LOSSES, PriorTrainConfig, RestorerTrainConfig, TrainSetupError, export,
                                  last_checkpoint, train_prior, train_restorer)

train_app = typer.Typer(
    help=("Train the small default models on the UTK200 faces (64x64 by default): the diffusion prior (iddpm_unet) and the "
          "restorer (swinir_face). Runs are seeded and resume from the last checkpoint in their out dir. "
          "See docs/MODELS.md for the commands used for the shipped weights."),
    no_args_is_help=True,
)
app.add_typer(train_app, name="train")


def _deadline(until: Optional[str], max_minutes: Optional[float]) -> Optional[float]:
    """'HH:MM' (local time, today or tomorrow) or a unix time -> unix time; combined with --max-minutes (earliest)."""
    out = []
    if until:
        if ":" in until:
            try:
                hh, mm = (int(v) for v in until.split(":"))
                now = datetime.now()
                t = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
            except ValueError:
                fail(f"--until must be HH:MM or a unix time, not {until!r}", 2)
            if t <= now:
                t += timedelta(days=1)
            out.append(t.timestamp())
        else:
            try:
                out.append(float(until))
            except ValueError:
                fail(f"--until must be HH:MM or a unix time, not {until!r}", 2)
    if max_minutes:
        out.append(time.time() + 60 * max_minutes)
    return min(out) if out else None


def _common(cfg, out, steps, seed, device, batch_size, lr, threads, ckpt_every, sample_every, data_root, cache_dir,
            limit, until, max_minutes, init_from=None):
    if out.exists() and not out.is_dir():
        fail(f"--out {out}: exists and is not a folder; give a run folder", 2)
    if device is not None:
        device = check_device(device)
    if init_from is not None and not (Path(init_from) / CARD).is_file():
        try:
            Zoo().get(init_from)
        except ModelNotFound as exc:  # names nothing: a usage error, like an unknown --model elsewhere
            fail(f"--init-from {init_from}: {exc}; give a zoo model name or a model folder", 2)
        except ZooError:
            pass  # a model that exists but cannot be read: the training setup says why
    cfg.out_dir = str(out)
    cfg.init_from = init_from
    for k, v in dict(steps=steps, seed=seed, device=device, batch_size=batch_size, lr=lr, threads=threads,
                     ckpt_every=ckpt_every, sample_every=sample_every, limit=limit).items():
        if v is not None:
            setattr(cfg, k, v)
    if data_root is not None:
        cfg.data_root = str(data_root)
    if cache_dir is not None:
        cfg.cache_dir = str(cache_dir) if str(cache_dir) else None
    cfg.until = _deadline(until, max_minutes)
    return cfg


def _report(res: dict) -> None:
    typer.echo(json.dumps(res, indent=1))


_OUT = typer.Option(..., "--out", "-o", help="Run folder: checkpoints, log.jsonl and sample grids (resumed if present).")
_STEPS = typer.Option(None, help="Total optimizer steps (a resumed run continues up to this number).")
_SEED = typer.Option(None, help="Random seed (default 0).")
_DEVICE = typer.Option(None, help="Torch device: 'cpu' (default), 'cuda', 'cuda:1'.")
_RESUME = typer.Option(True, "--resume/--no-resume", help="Continue from the last checkpoint in --out (default) or refuse to reuse it.")
_BS = typer.Option(None, "--batch-size", help="Batch size (default 16).")
_LR = typer.Option(None, help="Learning rate (AdamW).")
_THREADS = typer.Option(None, help="torch.set_num_threads (default 1).")
_CK = typer.Option(None, "--ckpt-every", help="Checkpoint every N steps (also every 5 minutes).")
_SAMPLE = typer.Option(None, "--sample-every", help="Write a sample grid PNG every N steps (0: never).")
_DATA = typer.Option(None, "--data-root", help="Faces folder (default: shared/data/faces-utk200).")
_CACHE = typer.Option(None, "--cache-dir", help="Cache folder for the resized faces (.npy); '' disables (default runs/cache).")
_LIMIT = typer.Option(None, help="Use only the first N training faces (smoke tests).")
_UNTIL = typer.Option(None, help="Stop (after a checkpoint) at this local time HH:MM, or unix time.")
_MAXMIN = typer.Option(None, "--max-minutes", help="Stop (after a checkpoint) after this many minutes.")
_INIT = typer.Option(None, "--init-from", help=("Warm start a new run from a zoo model (name or folder) with the same "
                                                "model config, e.g. faceadapt-iddpm-small; its steps count in the card's "
                                                "totals. Ignored when --out already holds a checkpoint."))


def _set_schedule(cfg, lr_schedule: Optional[str]) -> None:
    if lr_schedule is not None:
        if lr_schedule not in ("cosine", "constant"):
            fail("--lr-schedule must be 'cosine' or 'constant'")
        cfg.lr_schedule = lr_schedule


def _run(fn, cfg, resume: bool) -> None:
    try:
        _report(fn(cfg, resume=resume))
    except (TrainSetupError, ModelNotFound) as exc:  # config differs on resume / warm start, unknown --init-from
        fail(str(exc))


def _check_fresh(out: Path, resume: bool) -> None:
    if not resume and last_checkpoint(out) is not None:
        fail(f"{out} already holds checkpoints; pass --resume or choose another --out")


@train_app.command("prior")
def prior(
    out: Path = _OUT, steps: Optional[int] = _STEPS, seed: Optional[int] = _SEED, device: Optional[str] = _DEVICE,
    resume: bool = _RESUME, batch_size: Optional[int] = _BS, lr: Optional[float] = _LR,
    threads: Optional[int] = _THREADS, ckpt_every: Optional[int] = _CK, sample_every: Optional[int] = _SAMPLE,
    data_root: Optional[Path] = _DATA, cache_dir: Optional[str] = _CACHE, limit: Optional[int] = _LIMIT,
    until: Optional[str] = _UNTIL, max_minutes: Optional[float] = _MAXMIN, init_from: Optional[str] = _INIT,
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="'constant' (default) or 'cosine' (to 10% at --steps)."),
    model_json: Optional[str] = typer.Option(None, "--model-json", help="iddpm_unet constructor config as JSON (default: the small 64 px config)."),
):
    """Train the small iddpm_unet diffusion prior (iDDPM hybrid loss, AdamW, EMA) at 64x64."""
    _check_fresh(out, resume)
    cfg = _common(PriorTrainConfig(), out, steps, seed, device, batch_size, lr, threads, ckpt_every, sample_every,
                  data_root, cache_dir, limit, until, max_minutes, init_from)
    _set_schedule(cfg, lr_schedule)
    if model_json:
        cfg.model = json.loads(model_json)
    _run(train_prior, cfg, resume)


@train_app.command("restorer")
def restorer(
    out: Path = _OUT, steps: Optional[int] = _STEPS, seed: Optional[int] = _SEED, device: Optional[str] = _DEVICE,
    resume: bool = _RESUME, batch_size: Optional[int] = _BS, lr: Optional[float] = _LR,
    threads: Optional[int] = _THREADS, ckpt_every: Optional[int] = _CK, sample_every: Optional[int] = _SAMPLE,
    data_root: Optional[Path] = _DATA, cache_dir: Optional[str] = _CACHE, limit: Optional[int] = _LIMIT,
    until: Optional[str] = _UNTIL, max_minutes: Optional[float] = _MAXMIN, init_from: Optional[str] = _INIT,
    gan_weight: Optional[float] = typer.Option(None, "--gan-weight", help="Weight of the GAN term (default 0.005; 0 = L1 only)."),
    gan_start: Optional[int] = typer.Option(None, "--gan-start", help="Steps of pure L1 before the GAN term starts (default 500)."),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="'cosine' (default, to 10% at --steps) or 'constant'."),
    model_json: Optional[str] = typer.Option(None, "--model-json", help="swinir_face constructor config as JSON (default: the small 64 px config)."),
    pixel_loss: Optional[str] = typer.Option(None, "--pixel-loss", help="'l1' (default) or 'mse' (optimises PSNR directly; for a last stage started with --init-from)."),
    native_sizes: Optional[str] = typer.Option(None, "--native-sizes", help="Comma-separated face sizes, e.g. 64,96,128,192: each face is damaged at one of them and resized to 64 as the pipeline resizes a crop (default: damaged at 64)."),
    damage: Optional[str] = typer.Option(None, "--damage", help="Damage model: 'standard' (default; one pass of blur, resize, noise, JPEG) or 'broad' (35% of the faces the standard pass, the others two shuffled rounds with colour noise and ringing)."),
    hold_out: Optional[str] = typer.Option(None, "--hold-out", help=f"With --damage broad: comma-separated damage types never trained on ({', '.join(DAMAGE_TYPES)}); the bundled restorer holds out {','.join(HELD_OUT)}."),
    gradient_weight: Optional[float] = typer.Option(None, "--gradient-weight", help="Weight of an L1 between the output's and the clean face's finite differences (default 0: none)."),
    native_loss: bool = typer.Option(False, "--native-loss", help="With --native-sizes: one native size per batch, the loss taken at that size through the product's paste (bicubic upsampling of the output) instead of at 64 px."),
    size: Optional[int] = typer.Option(None, "--size", help="The model's input size in training (default 64; a multiple of 32 for the small model)."),
    mix_size: Optional[int] = typer.Option(None, "--mix-size", help="Every 4th step (--mix-every) at this input size instead of --size, e.g. --size 128 --mix-size 64 (default: none)."),
    mix_every: Optional[int] = typer.Option(None, "--mix-every", help="With --mix-size: one step in this many at --mix-size (default 4)."),
):
    """Train the small swinir_face restorer on synthetic degradations (L1 + small GAN term) at 64x64 (--size for
    another input size, --mix-size for a second one); --damage broad
    --hold-out ... trains on the broad damage model with some damage types held out."""
    _check_fresh(out, resume)
    cfg = _common(RestorerTrainConfig(), out, steps, seed, device, batch_size, lr, threads, ckpt_every, sample_every,
                  data_root, cache_dir, limit, until, max_minutes, init_from)
    if gan_weight is not None:
        cfg.gan_weight = gan_weight
    if gan_start is not None:
        cfg.gan_start = gan_start
    if pixel_loss is not None:
        if pixel_loss not in PIXEL_LOSSES:  # checked before any data is loaded
            raise typer.BadParameter(f"--pixel-loss is one of {', '.join(PIXEL_LOSSES)}, not {pixel_loss!r}")
        cfg.pixel_loss = pixel_loss
    _set_schedule(cfg, lr_schedule)
    if model_json:
        cfg.model = json.loads(model_json)
    if native_sizes:
        try:
            cfg.native_sizes = sorted({int(v) for v in native_sizes.split(",") if v.strip()})
        except ValueError:
            raise typer.BadParameter(f"--native-sizes takes comma-separated integers, not {native_sizes!r}")
        if not cfg.native_sizes or min(cfg.native_sizes) < 16 or max(cfg.native_sizes) > 1024:
            raise typer.BadParameter("--native-sizes: sizes from 16 to 1024 px")
    if damage is not None:
        if damage not in DAMAGE_MODELS:
            raise typer.BadParameter(f"--damage is one of {', '.join(DAMAGE_MODELS)}, not {damage!r}")
        cfg.damage = damage
    if hold_out:
        if cfg.damage != "broad":
            raise typer.BadParameter("--hold-out needs --damage broad")
        cfg.damage_holdout = [v.strip() for v in hold_out.split(",") if v.strip()]
        try:
            BroadDamage(holdout=tuple(cfg.damage_holdout))
        except ValueError as exc:
            raise typer.BadParameter(f"--hold-out: {exc}")
    if gradient_weight is not None:
        if gradient_weight < 0:
            raise typer.BadParameter("--gradient-weight must be >= 0")
        cfg.gradient_weight = gradient_weight
    if native_loss:
        if not cfg.native_sizes:
            raise typer.BadParameter("--native-loss needs --native-sizes")
        cfg.native_loss = True
    for opt, val in (("--size", size), ("--mix-size", mix_size)):
        if val is not None and (val < 32 or val > 512 or val % 32):
            raise typer.BadParameter(f"{opt}: a multiple of 32 from 32 to 512, not {val}")
    if size is not None:
        cfg.size = size
    if mix_size is not None:
        cfg.mix_size = mix_size
    if mix_every is not None:
        if mix_every < 2:
            raise typer.BadParameter("--mix-every must be >= 2")
        if not mix_size:
            raise typer.BadParameter("--mix-every needs --mix-size")
        cfg.mix_every = mix_every
    _run(train_restorer, cfg, resume)


@train_app.command("export")
def export_cmd(
    run_dir: Path = typer.Argument(..., help="Run folder written by `faceadapt train prior|restorer`."),
    dest: Path = typer.Argument(..., help="Zoo model folder to (over)write, e.g. restoration/zoo_defaults/faceadapt-iddpm-small."),
    extra_json: Optional[Path] = typer.Option(None, "--extra-json", help="JSON file merged into card.extra (e.g. pseudo_target_defaults, metrics)."),
    input_size: Optional[int] = typer.Option(None, "--input-size", help="The card's input size, the size the model is adapted at (default: the run's --size)."),
    serve_size: Optional[int] = typer.Option(None, "--serve-size", help="The size the model restores faces at, when not --input-size (a run with --mix-size trained at both)."),
):
    """Export the EMA weights of a run's last checkpoint as a zoo folder (model.safetensors, config.json, card.json)."""
    extra = json.loads(extra_json.read_text()) if extra_json else None
    metrics = extra.pop("metrics", None) if extra else None
    try:
        p = export(run_dir, dest, extra=extra, metrics=metrics, command=" ".join(shlex.quote(a) for a in sys.argv),
                   input_size=input_size, serve_size=serve_size)
    except FileNotFoundError as exc:
        fail(str(exc))
    except ValueError as exc:
        raise typer.BadParameter(str(exc))
    size = (p / "model.safetensors").stat().st_size
    typer.echo(f"exported {run_dir} -> {p} ({size / 1e6:.2f} MB)")
