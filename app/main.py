"""The FastAPI application factory: `uvicorn --factory app.main:create_app` (or `faceadapt serve`)."""
from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import web
from app.api import adaptations, datasets, health, models, restore
from app.auth import DOC_PATHS, keys_required, private_route_error
from app.errors import UnexpectedErrorMiddleware
from app.limits import BodyLimitMiddleware
from app.metrics import LATENCY, REQUESTS
from app.serving import get_cache, preload_default
from restoration.faces import demo_model_warning
from restoration.models import Zoo
from service.db import migrate, session_factory, startup_lock
from service.errors import ServiceError
from service.registry import sync_zoo_models
from service.settings import get_settings
from service.storage import get_storage

log = logging.getLogger("faceadapt.api")


def startup() -> None:
    """`alembic upgrade head`, then publish the zoo's models in the registry (both under one lock)."""
    migrate()
    get_storage().setup()
    with session_factory()() as s, startup_lock(s):
        sync_zoo_models(s)
    warn_demo_model()


_demo_warned = False


def warn_demo_model() -> None:
    """Log once per process when the default restorer is the bundled 64 px demo model (and how to pull a 512 px one)."""
    global _demo_warned
    if _demo_warned:
        return
    _demo_warned = True
    try:
        card = Zoo().get(get_settings().default_restorer)
    except Exception:  # noqa: BLE001 - a missing default restorer is reported by the requests that need it
        return
    msg = demo_model_warning(card)
    if msg:
        log.warning("%s (FACEADAPT_DEFAULT_RESTORER selects the default)", msg)


def create_app(run_startup: bool = True) -> FastAPI:
    settings = get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if run_startup:
            await run_in_threadpool(startup)
        await run_in_threadpool(preload_default)  # FACEADAPT_SERVE_PRELOAD (off by default)
        yield
        get_cache().clear()

    app = FastAPI(
        title="FaceAdapt", version="1.0", lifespan=lifespan, docs_url=None, redoc_url=None,  # offline: app.web
        description="Blind face restoration that adapts to a customer's own images with a diffusion prior.",
    )

    app.add_middleware(BodyLimitMiddleware, limit=settings.max_upload_bytes)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        t0 = time.perf_counter()
        status = 500  # an unhandled error: answered by `unexpected_error` below
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            REQUESTS.labels(label, request.method, str(status)).inc()
            LATENCY.labels(label, request.method).observe(time.perf_counter() - t0)

    @app.middleware("http")
    async def guard_private_routes(request: Request, call_next):
        """/metrics and the API docs are not open when API keys are required (app.auth.private_route_error)."""
        path = request.url.path
        if (path == "/metrics" or path in DOC_PATHS) and keys_required(request.scope):
            err = await run_in_threadpool(private_route_error, path, request.headers.get("authorization"))
            if err is not None:
                return JSONResponse(err.body(), status_code=err.status, headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errs = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errs)
        return JSONResponse({"error": "invalid_request", "detail": detail, "errors": errs}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": "http_error", "detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    for module in (health, restore, datasets, adaptations, models):
        app.include_router(module.router)
    web.install(app)  # the page at / and the API docs with their assets served by the app
    app.openapi = _openapi_with_error_bodies(app)
    # outermost: any other error is the documented JSON error (Starlette's own would be plain text, and it re-raises
    # to the server, which then drops the connection)
    app.add_middleware(UnexpectedErrorMiddleware)
    return app


def _openapi_with_error_bodies(app: FastAPI):
    """The spec documents the 422 body the API really sends (`validation_error` above), not FastAPI's default."""
    base = app.openapi

    def openapi() -> dict:
        schema = base()
        comps = schema.get("components", {}).get("schemas", {})
        if "HTTPValidationError" in comps:
            comps["HTTPValidationError"] = {
                "title": "HTTPValidationError", "type": "object", "required": ["error", "detail"],
                "properties": {
                    "error": {"type": "string", "title": "Error", "example": "invalid_request"},
                    "detail": {"type": "string", "title": "Detail"},
                    "errors": {"type": "array", "title": "Errors", "items": {
                        "type": "object", "properties": {"loc": {"type": "array", "items": {}}, "msg": {"type": "string"}}}},
                },
            }
        return schema

    return openapi
