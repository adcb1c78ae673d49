"""Health routes: /healthz (the process is up), /readyz (database, broker, storage, default model, a live worker) and
/metrics.

When API keys are required, /readyz names each failing check but shows its error text only to a caller with a valid
API key or the metrics token (internal host names, paths and drivers' messages are not for anonymous callers)."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.auth import keys_required, private_route_error, resolve_principal
from app.metrics import BROKER, REGISTRY
from service.db import ping, session_factory
from service.errors import ServiceError
from service.leases import live_workers
from service.registry import check_files, resolve_model
from service.settings import get_settings
from service.storage import get_storage

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz():
    """The process is up."""
    return {"status": "ok"}


def _checks() -> dict[str, str]:
    checks: dict[str, str] = {}

    def run(name, fn):
        try:
            fn()
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"error: {type(exc).__name__}: {exc}"[:300]

    def default_model():
        with session_factory()() as s:
            row = resolve_model(s, "", get_settings().default_restorer)
        check_files(row)

    def broker():
        error = BROKER.get()[0]  # bounded wait (broker_probe_timeout_s)
        if error is not None:
            raise RuntimeError(error)

    def worker():
        n = live_workers()
        if n == 0:
            raise RuntimeError(f"no worker is alive (none sent a heartbeat in the last {settings.worker_ttl_s:g}s); "
                               "jobs would stay queued")

    settings = get_settings()
    run("database", ping)
    run("broker", broker)
    run("storage", lambda: get_storage().ping())
    run("default_model", default_model)
    if settings.ready_requires_worker:
        run("worker", worker)
    return checks


def _may_see_details(request: Request) -> bool:
    """Error texts are shown when keys are not required, or to a caller with a valid API key or the metrics token."""
    if not keys_required(request.scope):
        return True
    authorization = request.headers.get("authorization")
    if not authorization:
        return False
    if private_route_error("/metrics", authorization) is None:
        return True
    try:
        with session_factory()() as s:
            resolve_principal(s, authorization, required=True)
        return True
    except ServiceError:
        return False


@router.get("/readyz")
async def readyz(request: Request):
    """Ready to serve: database, broker, storage and the default model are reachable and a worker is alive. When API
    keys are required, error texts need a key (or the metrics token); without one a failing check reads 'error'."""
    checks = await run_in_threadpool(_checks)
    ok = all(v == "ok" for v in checks.values())
    if not ok and not await run_in_threadpool(_may_see_details, request):
        checks = {k: ("ok" if v == "ok" else "error") for k, v in checks.items()}
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics():
    data = await run_in_threadpool(generate_latest, REGISTRY)
    return Response(data, media_type=CONTENT_TYPE_LATEST)
