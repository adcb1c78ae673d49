"""`faceadapt serve` (the HTTP service, embedded mode by default) and `faceadapt keys create / revoke / list`.

The CLI is the top layer: it imports the web app (`app`) and uvicorn here; nothing below imports `cli`.
"""
from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import socket
import subprocess
import sys
from typing import Optional

import typer
import uvicorn

from app.main import create_app, startup
from cli.app import app
from cli.checks import check_detector, check_device
from cli.errors import fail
from service.db import migrate, session_scope
from service.settings import get_settings
from service.tenants import create_key, list_keys, revoke_key

keys_app = typer.Typer(help="API keys of the HTTP service.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(a[4][0]).is_loopback for a in socket.getaddrinfo(host, None))
        except OSError:
            return False


def check_port(host: str, port: int) -> None:
    """Exit with one line when `host:port` cannot be listened on (in use, no such address), before anything starts."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as exc:
        fail(f"--host {host}: cannot resolve it: {exc.strerror or exc}", 2)
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as exc:
            fail(f"--port {port}: cannot listen on {host}:{port}: {exc.strerror or exc}", 1)


def worker_command(settings) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "solo",
            "--concurrency", "1", "--prefetch-multiplier", "1", "--loglevel", "INFO",
            "-Q", f"{settings.queue_default},{settings.queue_gpu}", "-n", f"embedded-{os.getpid()}@%h"]


@app.command("serve")
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (non-loopback needs FACEADAPT_REQUIRE_KEYS=true)."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="TCP port."),
    worker: Optional[bool] = typer.Option(
        None, "--worker/--no-worker",
        help="Start a local Celery worker process (default: yes when no FACEADAPT_BROKER_URL is set, i.e. embedded mode)."),
    log_level: str = typer.Option("info", "--log-level"),
):
    """Run the HTTP API. Without FACEADAPT_DATABASE_URL / FACEADAPT_BROKER_URL this is the embedded mode: SQLite and
    local storage under FACEADAPT_HOME, a serverless broker and one local worker process."""
    settings = get_settings()
    if not is_loopback(host) and not settings.require_keys:
        typer.secho(f"error: refusing to bind {host} without API keys; set FACEADAPT_REQUIRE_KEYS=true "
                    "(and create keys with `faceadapt keys create --tenant NAME`) or bind 127.0.0.1",
                    err=True, fg=typer.colors.RED)
        raise typer.Exit(2)
    check_device(None)  # FACEADAPT_DEVICE / FACEADAPT_DETECTOR, before anything starts
    check_detector(None)
    check_port(host, port)
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    startup()  # migrations before the worker touches the database
    if worker is None:
        worker = settings.broker_url is None
    proc = None
    if worker:
        proc = subprocess.Popen(worker_command(settings), env=dict(os.environ))
    config = uvicorn.Config(create_app(run_startup=False), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=settings.shutdown_timeout_s)
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    mode = "embedded" if settings.database_url is None else "service"
    typer.echo(f"FaceAdapt ({mode} mode) serving on http://{shown}:{port}  (API docs: http://{shown}:{port}/docs)", err=True)
    typer.echo(f"http://{shown}:{port}")
    # Ctrl-C / SIGTERM: stop accepting, finish requests in flight, then stop the worker (a second Ctrl-C forces)
    server.capture_signals = contextlib.nullcontext  # uvicorn would re-raise the signal after shutdown

    def on_signal(signum, _frame):
        if server.should_exit:
            server.force_exit = True
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        server.run()
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # warm shutdown: the running step stops at its next batch or finishes
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None:
            typer.echo("worker stopped", err=True)


@keys_app.command("create")
def keys_create(tenant: str = typer.Option(..., "--tenant", help="Tenant name (created when new).")):
    """Create an API key for TENANT and print it (alone, on stdout). Only its hash is stored."""
    migrate()
    try:
        with session_scope() as s:
            key = create_key(s, tenant)
    except ValueError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2)
    typer.echo(key)


@keys_app.command("revoke")
def keys_revoke(key: str = typer.Argument(..., help="The key itself (fa_...) or its id (`faceadapt keys list`).")):
    """Revoke an API key: requests with it answer 401 from now on (every API process checks the database)."""
    migrate()
    try:
        with session_scope() as s:
            row = revoke_key(s, key)
            typer.echo(f"revoked key {row.id} ({row.prefix}...) of tenant {row.tenant.name}")
    except ValueError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        raise typer.Exit(2)


@keys_app.command("list")
def keys_list(tenant: Optional[str] = typer.Option(None, "--tenant", help="Only this tenant's keys.")):
    """List API keys (id, prefix, tenant, created, revoked); keys themselves are never stored."""
    migrate()
    with session_scope() as s:
        typer.echo(f"{'ID':32}  {'PREFIX':10}  {'TENANT':20}  {'CREATED':25}  REVOKED")
        for k, name in list_keys(s, tenant):
            typer.echo(f"{k.id:32}  {k.prefix:10}  {name[:20]:20}  {k.created_at.isoformat(timespec='seconds'):25}  "
                       f"{k.revoked_at.isoformat(timespec='seconds') if k.revoked_at else '-'}")
