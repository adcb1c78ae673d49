"""`faceadapt serve` (the HTTP service, embedded mode by default, with its supervised worker) and
`faceadapt keys create / revoke / list`.

The CLI is the top layer: it imports the web app (`app`) and uvicorn here; nothing below imports `cli`.
"""
from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Optional

import typer
import uvicorn

from app.main import create_app, startup
from cli.app import app
from cli.checks import check_detector, check_device
from cli.errors import fail
from service.db import migrate, session_scope
from service.leases import worker_died
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


def lock_home(home: Path) -> IO:
    """Hold HOME/serve.lock (flock) for the life of this process; exit with one line when another `faceadapt serve`
    holds it (two servers, and two embedded workers, on one home)."""
    path = home / "serve.lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        other = f.read().strip() or "?"
        f.close()
        fail(f"another `faceadapt serve` (pid {other}) is already running on FACEADAPT_HOME={home}; stop it first, or "
             "give this one its own FACEADAPT_HOME", 1)
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


class WorkerSupervisor:
    """Runs the embedded Celery worker and restarts it when it dies, waiting 1 s, 2 s, 4 s ... up to
    `worker_restart_max_s` between restarts (back to 1 s after a worker that ran a minute). The worker dies with this
    process (worker.supervised: prctl PR_SET_PDEATHSIG, tied to the supervisor thread that starts it, and a parent-pid
    watchdog). A dead worker's stages are released at once (`service.leases.worker_died`)."""

    STABLE_S = 60.0

    def __init__(self, settings):
        self.settings = settings
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="faceadapt-worker-supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _spawn(self) -> subprocess.Popen:
        env = dict(os.environ, FACEADAPT_SERVE_PID=str(os.getpid()))
        return subprocess.Popen(worker_command(self.settings), env=env)

    def _run(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            with self._lock:
                if self._stop.is_set():
                    return
                self.proc = proc = self._spawn()
            t0 = time.monotonic()
            rc = proc.wait()
            if self._stop.is_set():
                return
            how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
            try:
                released = worker_died(f"{socket.gethostname()}:{proc.pid}", how)
            except Exception as exc:  # the database is down: the reaper's lease TTL takes over
                released = 0
                typer.echo(f"worker: could not release its stages: {exc}", err=True)
            if time.monotonic() - t0 >= self.STABLE_S:
                delay = 1.0
            typer.secho(f"worker (pid {proc.pid}) died ({how}); {released} running stage(s) released; restarting "
                        f"in {delay:g}s", err=True, fg=typer.colors.YELLOW)
            if self._stop.wait(delay):
                return
            delay = min(delay * 2, self.settings.worker_restart_max_s)
            self.restarts += 1

    def stop(self, timeout: float = 30.0) -> None:
        """Warm shutdown of the worker (SIGTERM: the running step stops at its next batch), killed after `timeout`."""
        with self._lock:
            self._stop.set()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._thread.join(timeout=5)


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
    local storage under FACEADAPT_HOME, a serverless broker and one local worker process, restarted (with backoff)
    when it dies and stopped with this one. A second `serve` on the same FACEADAPT_HOME is refused."""
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
    home_lock = lock_home(settings.home_dir)  # noqa: F841 - held until this process ends
    startup()  # migrations before the worker touches the database
    if worker is None:
        worker = settings.broker_url is None
    supervisor = None
    if worker:
        supervisor = WorkerSupervisor(settings)
        supervisor.start()
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
        if supervisor is not None:
            supervisor.stop()  # warm shutdown: the running step stops at its next batch or finishes
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
