"""Health routes: /healthz (the process is up), /readyz (database, broker, storage, default model) and /metrics."""
from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.metrics import REGISTRY
from service.db import ping, session_factory
from service.queue import ping_broker
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

    run("database", ping)
    run("broker", ping_broker)
    run("storage", lambda: get_storage().ping())
    run("default_model", default_model)
    return checks


@router.get("/readyz")
async def readyz():
    """Ready to serve: database, broker, storage and the default model are reachable."""
    checks = await run_in_threadpool(_checks)
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics():
    data = await run_in_threadpool(generate_latest, REGISTRY)
    return Response(data, media_type=CONTENT_TYPE_LATEST)
