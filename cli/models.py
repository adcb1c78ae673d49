"""`faceadapt models ...`: list, show, pull, import and delete zoo models."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cli.app import app

models_app = typer.Typer(help="Manage the model zoo (bundled defaults + FACEADAPT_HOME/models).", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _zoo():
    from restoration.models.zoo import Zoo

    return Zoo()


def _fail(msg: str, code: int = 1):
    typer.secho(f"error: {msg}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


@models_app.command("list")
def list_models(as_json: bool = typer.Option(False, "--json", help="Print the model cards as JSON.")):
    """List every model in the zoo, and the public checkpoints `pull` can fetch."""
    from restoration.models.checkpoints import KNOWN_CHECKPOINTS

    cards = _zoo().list()
    if as_json:
        typer.echo(json.dumps([c.to_json() | {"builtin": c.builtin} for c in cards], indent=1))
        return
    typer.echo(f"{'NAME':32} {'KIND':9} {'ARCH':12} {'SIZE':>5}  NOTE")
    for c in cards:
        note = "bundled" if c.builtin else "local"
        if c.random_init:
            note += ", RANDOM WEIGHTS (untrained stand-in)"
        typer.echo(f"{c.name:32} {c.kind:9} {c.arch:12} {c.input_size:>5}  {note}")
    have = {c.name for c in cards}
    missing = [k for k in KNOWN_CHECKPOINTS.values() if k.name not in have]
    if missing:
        typer.echo("\nAvailable with `faceadapt models pull NAME`:")
        for k in missing:
            typer.echo(f"  {k.name:30} {k.kind:9} {k.arch:12} {k.file_name}")


@models_app.command("show")
def show(name: str = typer.Argument(..., help="Model name.")):
    """Print a model's card and config as JSON."""
    from restoration.models.zoo import ZooError

    zoo = _zoo()
    try:
        card = zoo.get(name)
        cfg = zoo.config(name)
    except ZooError as exc:
        _fail(str(exc))
    typer.echo(json.dumps({"card": card.to_json() | {"builtin": card.builtin, "path": card.path}, "config": cfg}, indent=1))


@models_app.command("pull")
def pull(
    name: str = typer.Argument(..., help="A public checkpoint name, e.g. swinir-face-dtbfr or difface-iddpm-ffhq512."),
    url: Optional[str] = typer.Option(None, help="Download from this address instead of the official one (a mirror)."),
):
    """Download a known public checkpoint, check it, convert it to safetensors and register it."""
    from tqdm import tqdm

    from restoration.models.zoo import ZooError

    bar = tqdm(unit="B", unit_scale=True, desc=f"pull {name}")

    def progress(done: int, total: int):
        bar.total = total or None
        bar.n = done
        bar.refresh()

    try:
        card = _zoo().pull(name, url=url, progress=progress)
    except ZooError as exc:
        bar.close()
        _fail(str(exc))
    bar.close()
    typer.echo(f"registered {card.name} ({card.arch}, sha256 {card.sha256[:16]}) in {Path(card.path).parent}")


@models_app.command("import")
def import_model(
    path: Path = typer.Argument(..., help="A local .pth (read with weights_only=True) or .safetensors file."),
    arch: str = typer.Option(..., "--arch", help="Architecture: a restoration.models.archs.ARCHS name (swinir_face, iddpm_unet, gfpgan_v1_4, codeformer)."),
    name: str = typer.Option(..., "--name", help="Name for the new zoo model."),
    config: Optional[Path] = typer.Option(
        None, help="JSON file with the constructor config (default: the arch's public full config)."
    ),
    kind: Optional[str] = typer.Option(None, help="restorer or prior (default: from the arch)."),
    input_size: Optional[int] = typer.Option(None, help="Square input size in pixels (default: from the arch)."),
):
    """Convert a local checkpoint into a zoo model (strict key and shape check)."""
    from restoration.models.checkpoints import CheckpointError
    from restoration.models.zoo import ZooError

    cfg = json.loads(config.read_text()) if config else None
    try:
        card = _zoo().import_checkpoint(path, arch=arch, name=name, config=cfg, kind=kind, input_size=input_size)
    except (ZooError, CheckpointError, ValueError, TypeError) as exc:
        _fail(str(exc))
    typer.echo(f"registered {card.name} ({card.arch}, sha256 {card.sha256[:16]})")


@models_app.command("delete")
def delete(name: str = typer.Argument(..., help="Model name.")):
    """Delete a local model (bundled models cannot be deleted)."""
    from restoration.models.zoo import ZooError

    try:
        _zoo().delete(name)
    except ZooError as exc:
        _fail(str(exc))
    typer.echo(f"deleted {name}")
