"""`faceadapt adapt`: adapt a restorer to a folder of your own low-quality photos (Kuai et al., WACV 2025)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from tqdm import tqdm

from cli.app import app
from cli.checks import check_detector, check_device, check_image_folder, check_new_model_name, check_zoo_model
from cli.errors import fail
from restoration.adaptation import check_min_images, default_config, list_images, run_adaptation
from restoration.models import Zoo, ZooError
from restoration.runtime import Cancelled
from restoration.settings import get_settings


class _Bars:
    """One tqdm bar per stage, driven by `progress(stage, done, total)`."""

    def __init__(self):
        self.bars = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        bar = self.bars.get(stage)
        if bar is None:
            for other in self.bars.values():
                other.close()
            bar = self.bars[stage] = tqdm(total=total, desc=f"{stage:>14}", unit="step" if stage == "finetune" else "img",
                                          dynamic_ncols=True)
        bar.total = total
        bar.n = done
        bar.refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()


@app.command("adapt")
def adapt(
    data: Path = typer.Option(..., "--data", help="Folder of low-quality photos from the target domain (no ground truth needed)."),
    name: str = typer.Option(..., "--name", help="Zoo name for the adapted model."),
    base: Optional[str] = typer.Option(None, "--base", help="Restorer to adapt (default: FACEADAPT_DEFAULT_RESTORER)."),
    prior: Optional[str] = typer.Option(None, "--prior", help="Diffusion prior (default: FACEADAPT_DEFAULT_PRIOR)."),
    aligned: Optional[bool] = typer.Option(None, "--aligned/--photos", help="--aligned: every input is an aligned face crop (no detection); --photos: every input is a photo (faces detected and aligned). Default: decided per image (one face filling the frame near the base's alignment template: used as the crop it is)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Fine-tuning steps (default: fitted to the number of faces, at most the base card's finetune_defaults, else 1000; given, it is run as given, without early stopping)."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Fine-tuning batch size (default: the base card's, else 8)."),
    lr: Optional[float] = typer.Option(None, "--lr", min=0.0, help="Fine-tuning learning rate, cosine to --lr-min (default: the base card's, else 2e-5, scaled down for fewer than 64 faces; given, it is run as given, without early stopping)."),
    lr_min: Optional[float] = typer.Option(None, "--lr-min", min=0.0, help="Final learning rate (default: the base card's, else 5e-6)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:N or auto (default: FACEADAPT_DEVICE)."),
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Work dir (default: FACEADAPT_HOME/adapt/NAME); re-running resumes."),
    start: Optional[int] = typer.Option(None, "--start", help="Respaced step the restored image is noised to (default from the prior card: 60 for the bundled prior; else 150)."),
    constrain_until: Optional[int] = typer.Option(None, "--constrain-until", help="Low frequencies are replaced in steps t >= this (default from the prior card: 20 for the bundled prior; else 90)."),
    down_n: Optional[int] = typer.Option(None, "--down-n", help="Low-pass factor N of the pseudo targets (default from the prior card: 2 for the bundled prior, 16 for difface-iddpm-ffhq512; else 16)."),
    schedule: Optional[str] = typer.Option(None, "--schedule", help="ancestral (paper) or ddim (fast; default from the prior card: ddim for the bundled prior)."),
    fast_steps: Optional[int] = typer.Option(None, "--fast-steps", min=1, help="Network calls of the ddim schedule (default from the prior card: 15 for the bundled prior, else 25)."),
    color_correction: Optional[float] = typer.Option(None, "--color-correction", min=0.0, max=1.0, help="Strength of the domain white balance of the pseudo targets: a colour cast shared by all images is measured against clean faces and taken out (1 = full, the default; 0 = off)."),
    eval_fraction: float = typer.Option(0.1, "--eval-fraction", min=0.0, max=0.9, help="Share of images held out for evaluation."),
    hq_dir: Optional[Path] = typer.Option(None, "--hq-dir", help="Clean HQ faces for the discriminator (default: the UTKFace training split)."),
    no_prior: bool = typer.Option(False, "--no-prior", help="Ablation: pseudo target = the base model's output (no diffusion prior)."),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing zoo model of that name."),
    no_quality_gate: bool = typer.Option(False, "--no-quality-gate", help="Register the adapted model even when the held-out evaluation judges it worse than the base."),
):
    """Adapt a restorer to your images: pseudo targets from a diffusion prior, then fine-tuning; registers NAME."""
    settings = get_settings()
    base = base or settings.default_restorer
    prior = prior or settings.default_prior
    zoo = Zoo()
    # everything is checked before any stage runs (a bad --name used to fail after the whole run)
    check_new_model_name(zoo, name, overwrite)
    check_zoo_model(zoo, base, "restorer", "--base")
    if not no_prior:
        check_zoo_model(zoo, prior, "prior", "--prior")
    check_image_folder(data, "--data")
    device = check_device(device)
    if aligned is not True:
        check_detector(None)
    if hq_dir is not None:
        check_image_folder(hq_dir, "--hq-dir")
    if workdir is not None and workdir.exists() and not workdir.is_dir():
        fail(f"--workdir {workdir}: exists and is not a folder", 2)
    try:  # the options first, then the data: too few images are refused before any work, with the number
        check_min_images(len(list_images(data)))
    except ValueError as exc:
        fail(f"--data {data}: {exc}", 2)
    pseudo = {"start": start, "constrain_until": constrain_until, "down_N": down_n, "schedule": schedule,
              "fast_steps": fast_steps, "color_correction": color_correction}
    ft = {"steps": steps, "batch_size": batch_size, "lr": lr, "lr_min": lr_min}
    params = {"pseudo": {k: v for k, v in pseudo.items() if v is not None},
              "finetune": {k: v for k, v in ft.items() if v is not None}}
    try:
        # the same configuration the service's worker and bench/adaptation.py build: AdaptConfig defaults, the prior
        # card's pseudo-target defaults, the base card's fine-tuning defaults, then what was given here
        cfg = default_config(zoo, base, None if no_prior else prior, params, eval_fraction=eval_fraction,
                             aligned=aligned, seed=seed, use_prior=not no_prior,
                             hq_dir=str(hq_dir) if hq_dir else None, device=device,
                             quality_gate=not no_quality_gate)
    except (ZooError, ValueError) as exc:
        fail(f"{exc}", 2)

    p = cfg.pseudo
    typer.echo(f"adapting {base} with prior {prior if not no_prior else '(none: self-training)'} -> {name}")
    typer.echo(f"  pseudo targets: start {p.start}/{p.respacing}, constrain until {p.constrain_until}, "
               f"down_N {p.down_N}, schedule {p.schedule}" + (f" ({p.fast_steps} steps)" if p.schedule == "ddim" else ""))
    f = cfg.finetune
    typer.echo(f"  fine-tuning: {f.steps} steps x batch {f.batch_size}, lr {f.lr} -> {f.lr_min}, EMA {f.ema_decay}, "
               f"L1 {f.l1} + perceptual {f.lpips} + GAN {f.gan}"
               + ("; fitted to the number of faces (fewer steps and a lower lr for small sets, early stopping on the "
                  "held-out faces)" if cfg.auto_schedule else ""))
    typer.echo("  images: " + ("all aligned face crops" if aligned else "all photos" if aligned is False else
                               "each an aligned face crop or a photo, from its detection"))
    bars = _Bars()
    try:
        res = run_adaptation(data, base=base, prior=prior, name=name, config=cfg, workdir=workdir, progress=bars,
                             zoo=zoo, overwrite=overwrite)
    except (ZooError, ValueError, FileNotFoundError, RuntimeError) as exc:
        bars.close()
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)
    except (Cancelled, KeyboardInterrupt):
        bars.close()
        typer.secho("interrupted: run the same command again to resume", err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(130)
    bars.close()

    ev = res["evaluation"]
    typer.echo("")
    if res.get("refused"):
        typer.secho(f"not registered: {name}", fg=typer.colors.RED, bold=True)
    else:
        typer.secho(f"registered {res['name']}", fg=typer.colors.GREEN, bold=True)
    typer.echo(f"  faces: {res['faces']['train']} train, {res['faces']['eval']} held out "
               f"({res['skipped_images']} images skipped)")
    use = res.get("usage") or {}
    if use:
        typer.echo("  images used as: " + ", ".join(f"{n} {k}{'s' if n != 1 else ''}" for k, n in use.items())
                   + f" (per image: {Path(res['workdir']) / 'prepare' / 'manifest.json'})")
    es = res["finetune"].get("early_stopping")
    if isinstance(es, dict):
        typer.echo(f"  early stopping: best held-out pseudo-target PSNR {es['psnr']:.2f} dB at step {es['step']} "
                   f"(base {es['base_psnr']:.2f} dB){', stopped early' if es['stopped_early'] else ''}")
    typer.echo(f"  losses: {json.dumps(res['finetune']['losses'])}")
    typer.echo(f"  discriminator real images: {res['finetune']['hq_source']}")
    cc = ev.get("color_correction") or {}
    if cc.get("gains"):
        typer.echo(f"  domain colour cast removed from the targets: gains R, G, B {cc['gains']} (reference: "
                   f"{cc['reference']}; pseudo.color_correction=0 turns it off)")
    elif cc:
        typer.echo("  domain colour cast: none to remove" if cc.get("strength") else "  domain colour correction: off")
    if ev.get("count"):
        m = ev["metrics"]
        cols = [c for c in ("target_psnr", "consistency_psnr", "naturalness", "sharpness", "psnr", "ssim")
                if any(c in m[r] for r in ("input", "base", "adapted"))]
        typer.echo(f"  held-out evaluation ({ev['count']} faces, before = base, after = adapted; no ground truth "
                   f"needed):")
        typer.echo("    " + f"{'':10}" + "".join(f"{c:>18}" for c in cols))
        for row in ("input", "base", "adapted"):
            typer.echo("    " + f"{row:10}" + "".join(f"{m[row][c]:>18.4f}" if c in m[row] else f"{'-':>18}" for c in cols))
        typer.echo(f"  before/after grid: {Path(res['workdir']) / ev['grid']} (columns: {', '.join(ev['grid_columns'])})")
    else:
        typer.echo(f"  evaluation: {ev.get('note')}")
    gate = ev.get("gate") or {}
    typer.echo(f"  quality gate: {gate.get('verdict', '-')}" + (f" ({'; '.join(gate['reasons'])})" if gate.get("reasons") else ""))
    typer.echo("  time: " + ", ".join(f"{k} {v:.1f}s" for k, v in res["timings"].items()) + f" (total {res['seconds']:.1f}s)")
    typer.echo(f"  work dir: {res['workdir']}")
    if res.get("refused"):
        fail(res["refused"], 1)
