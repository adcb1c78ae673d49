"""`faceadapt models ...`: list, show, pull, import and delete zoo models; `list` and `show` also cover the models
the service registered on this home (its database: FACEADAPT_DATABASE_URL, or HOME/faceadapt.db when it exists)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Optional

import typer
from sqlalchemy.exc import SQLAlchemyError
from tqdm import tqdm

from cli.app import app
from cli.errors import fail
from restoration.models import CheckpointError, KNOWN_CHECKPOINTS, ModelNotFound, Zoo, ZooError
from service.db import existing_url, session_factory
from service.errors import ServiceError
from service.registry import open_zoo, resolve_for_tenant, service_models
from service.rows import ModelRow
from service.settings import get_settings

models_app = typer.Typer(help="Manage the model zoo (bundled defaults + FACEADAPT_HOME/models).", no_args_is_help=True)
app.add_typer(models_app, name="models")


def _zoo() -> Zoo:
    return Zoo()


def registered(session_url: str | None = None) -> list[tuple[ModelRow, str | None]] | None:
    """The models the service registered on this home, with their tenants; None when there is no service database
    (or it cannot be read: a warning says why)."""
    url = session_url or existing_url(get_settings())
    if url is None:
        return None
    try:
        with session_factory(url)() as s:
            return service_models(s)
    except SQLAlchemyError as exc:
        typer.secho(f"warning: the service's models are not listed: cannot read its database: "
                    f"{type(exc).__name__}: {str(exc).splitlines()[0]}", err=True, fg=typer.colors.YELLOW)
        return None


def service_model(name: str, tenant: str, option: str = "--model") -> ModelRow:
    """Tenant `tenant`'s model `name` (its own, else a public one: the API's rules), from the service database; exits
    with one line when there is none."""
    url = existing_url(get_settings())
    if url is None:
        fail(f"--tenant {tenant}: there is no service database on this home (FACEADAPT_DATABASE_URL, or "
             f"{get_settings().embedded_db_path}); tenants exist only where `faceadapt serve` ran", 1)
    try:
        with session_factory(url)() as s:
            return resolve_for_tenant(s, tenant, name, kind=None)
    except ServiceError as exc:
        if exc.code == "model_not_found":
            fail(f"{option} {name}: tenant {tenant} has no model of that name, and no public one has it "
                 "(`faceadapt models list` shows the service's models and their tenants)", 1)
        fail(f"--tenant {tenant}: {exc.detail}", 1)
    except SQLAlchemyError as exc:
        fail(f"cannot read the service database: {type(exc).__name__}: {str(exc).splitlines()[0]}", 1)


@models_app.command("list")
def list_models(as_json: bool = typer.Option(False, "--json", help="Print the model cards as JSON.")):
    """List every model in the zoo, the models the service registered on this home (with their tenant), and the
    public checkpoints `pull` can fetch."""
    cards = _zoo().list()
    service = registered()
    if as_json:
        out = [c.to_json() | {"builtin": c.builtin} for c in cards]
        out += [row.card | {"builtin": False, "tenant": tenant, "model_id": row.id} for row, tenant in service or []]
        typer.echo(json.dumps(out, indent=1))
        return
    typer.echo(f"{'NAME':32} {'KIND':9} {'ARCH':12} {'SIZE':>5}  NOTE")
    for c in cards:
        note = "bundled" if c.builtin else "local"
        if c.random_init:
            note += ", RANDOM WEIGHTS (untrained stand-in)"
        typer.echo(f"{c.name:32} {c.kind:9} {c.arch:12} {c.input_size:>5}  {note}")
    for row, tenant in service or []:
        size = row.card.get("input_size", "")
        typer.echo(f"{row.name:32} {row.kind:9} {row.arch:12} {size:>5}  service, tenant {tenant or '(public)'}")
    have = {c.name for c in cards}
    missing = [k for k in KNOWN_CHECKPOINTS.values() if k.name not in have]
    if missing:
        typer.echo("\nAvailable with `faceadapt models pull NAME`:")
        for k in missing:
            typer.echo(f"  {k.name:30} {k.kind:9} {k.arch:12} {k.file_name}")
    if service:
        typer.echo("\nService models: `faceadapt models show NAME --tenant TENANT`, "
                   "`faceadapt restore ... --model NAME --tenant TENANT`.")


def _wrap(text: str, lines: int | None = None, width: int = 100) -> str:
    """``text`` on lines of ``width`` under a 15-column label; at most ``lines`` of them (the last ending '...')."""
    out = textwrap.wrap(" ".join(str(text).split()), width - 15) or [""]
    if lines is not None and len(out) > lines:
        out = out[:lines]
        out[-1] = out[-1][: width - 18].rstrip() + "..."
    return ("\n" + " " * 15).join(out)


def card_lines(card: dict, where: str) -> list[str]:
    """A short readable card: what the model is, its licence and where it comes from (one line each)."""
    lines = [f"{card['name']}  ({where})",
             f"  kind:        {card['kind']} ({card['arch']}, {card['input_size']} px input"
             + (f", restores at {card['serve_size']} px)" if card.get("serve_size") else ")")]
    if card.get("description"):
        lines.append(f"  what:        {_wrap(card['description'], 2)}")
    if card.get("random_init"):
        lines.append("  weights:     RANDOM (an untrained stand-in)")
    lines.append(f"  licence:     {_wrap(card.get('license') or 'unknown')}")
    if card.get("provenance"):
        lines.append(f"  provenance:  {_wrap(card['provenance'], 2)}")
    extra = card.get("extra") or {}
    for key, label in (("pseudo_target_defaults", "adapt uses"), ("finetune_defaults", "fine-tuning")):
        if extra.get(key):
            lines.append(f"  {label + ':':12} " + ", ".join(f"{k} {v}" for k, v in extra[key].items()))
    if card.get("sha256"):
        lines.append(f"  sha256:      {card['sha256']}")
    return lines


@models_app.command("show")
def show(
    name: str = typer.Argument(..., help="A name `faceadapt models list` prints: a zoo model, or a public checkpoint "
                               "`faceadapt models pull` can fetch."),
    tenant: Optional[str] = typer.Option(None, "--tenant", help="A tenant of the service on this home: its model NAME "
                                         "(its own, else a public one), from the service's registry."),
    as_json: bool = typer.Option(False, "--json", help="Print the whole card and config as JSON."),
):
    """Show a model: a short card (what it is, its licence, where it comes from; --json for all of it)."""
    if tenant is not None:
        _show_service(service_model(name, tenant, option="models show"), tenant, as_json)
        return
    zoo = _zoo()
    try:
        card = zoo.get(name)
        cfg = zoo.config(name)
    except ModelNotFound as exc:
        known = KNOWN_CHECKPOINTS.get(name)
        if known is not None:  # a public checkpoint that is not pulled yet
            _show_pullable(known, as_json)
            return
        others = [t for row, t in registered() or [] if name in (row.name, row.id)]
        if others:  # a service model: shown for its tenant only (`models list` prints the tenant beside it)
            fail(f"{exc}; the service has a model {name!r} of tenant(s) {', '.join(sorted(set(map(str, others))))}: "
                  "give --tenant", 2)
        fail(str(exc), 2)
    except ZooError as exc:
        fail(str(exc))
    out = {"card": card.to_json() | {"builtin": card.builtin, "path": card.path}, "config": cfg}
    if as_json:
        typer.echo(json.dumps(out, indent=1))
        return
    where = "bundled" if card.builtin else f"local, {Path(card.path).parent if card.path else zoo.root}"
    for line in card_lines(out["card"], where):
        typer.echo(line)
    typer.echo(f"  files:       {card.path}")
    typer.echo("  all of it:   faceadapt models show " + name + " --json")


def _show_service(row: ModelRow, tenant: str | None, as_json: bool) -> None:
    zoo, zoo_name = open_zoo(row)
    card = zoo.get(zoo_name)
    out = {"card": card.to_json() | {"builtin": card.builtin, "path": card.path, "tenant": tenant,
                                     "model_id": row.id}, "config": zoo.config(zoo_name)}
    if as_json:
        typer.echo(json.dumps(out, indent=1))
        return
    for line in card_lines(out["card"], f"service model {row.id}, tenant {tenant or '(public)'}"):
        typer.echo(line)
    if tenant:
        typer.echo(f"  use:         faceadapt restore ... --model {row.name} --tenant {tenant}")


def _show_pullable(known, as_json: bool) -> None:
    card = {"name": known.name, "kind": known.kind, "arch": known.arch, "input_size": known.input_size,
            "value_range": list(known.value_range), "license": known.license, "provenance": known.provenance,
            "url": known.url, "file_name": known.file_name, "sha256": known.sha256, "extra": dict(known.extra),
            "pulled": False, "pull": f"faceadapt models pull {known.name}"}
    if as_json:
        typer.echo(json.dumps({"card": card, "config": known.config}, indent=1))
        return
    for line in card_lines(card, "public checkpoint, not pulled yet"):
        typer.echo(line)
    typer.echo(f"  download:    {known.url}")
    typer.echo(f"  pull:        faceadapt models pull {known.name}   (needs internet; converted to safetensors and "
               "checked key by key)")


@models_app.command("pull")
def pull(
    name: str = typer.Argument(..., help="A public checkpoint name, e.g. swinir-face-dtbfr or difface-iddpm-ffhq512."),
    url: Optional[str] = typer.Option(None, help="Download from this address instead of the official one (a mirror)."),
):
    """Download a known public checkpoint, check it, convert it to safetensors and register it."""
    bar = tqdm(unit="B", unit_scale=True, desc=f"pull {name}")

    def progress(done: int, total: int):
        bar.total = total or None
        bar.n = done
        bar.refresh()

    try:
        card = _zoo().pull(name, url=url, progress=progress)
    except ZooError as exc:
        bar.close()
        fail(str(exc))
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
    for given, option in ((path, "PATH"), (config, "--config")):
        if given is not None and not given.is_file():
            fail(f"{option} {given}: no such file", 2)
    try:
        cfg = json.loads(config.read_text()) if config else None
    except (OSError, ValueError) as exc:
        fail(f"--config {config}: not a JSON file: {exc}", 2)
    try:
        card = _zoo().import_checkpoint(path, arch=arch, name=name, config=cfg, kind=kind, input_size=input_size)
    except (ZooError, CheckpointError, ValueError, TypeError) as exc:
        fail(str(exc))
    typer.echo(f"registered {card.name} ({card.arch}, sha256 {card.sha256[:16]})")


@models_app.command("delete")
def delete(name: str = typer.Argument(..., help="Model name.")):
    """Delete a local model (bundled models cannot be deleted)."""
    try:
        _zoo().delete(name)
    except ModelNotFound as exc:
        fail(str(exc), 2)
    except ZooError as exc:
        fail(str(exc))
    typer.echo(f"deleted {name}")
