"""The FastAPI application factory: `uvicorn --factory app.main:create_app` (or `faceadapt serve`)."""
from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount

from app import web
from app.api import adaptations, datasets, health, models, restore
from app.auth import PrivateRoutesMiddleware
from app.errors import UnexpectedErrorMiddleware, document_errors
from app.limits import BodyLimitMiddleware
from app.metrics import ObserveMiddleware
from app.schemas import ErrorBody, params_schema
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
    """Log once per process when the default restorer is a bundled demo model under 256 px, with how to pull a 512 px one."""
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
    app.add_middleware(ObserveMiddleware)
    app.add_middleware(PrivateRoutesMiddleware)  # /metrics and the API docs when API keys are required

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=getattr(exc, "headers", None))  # Retry-After

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errs = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errs)
        return JSONResponse({"error": "invalid_request", "detail": detail, "errors": errs}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        headers = getattr(exc, "headers", None)
        methods = _path_methods(request) if exc.status_code == 405 else None
        if methods:  # Allow: every method of the path, not only those of the first route that matched
            headers = {**(headers or {}), "Allow": ", ".join(methods)}
        return JSONResponse({"error": "http_error", "detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=headers)

    for module in (health, restore, datasets, adaptations, models):
        app.include_router(module.router)
    web.install(app)  # the page at / and the API docs with their assets served by the app
    app.openapi = _openapi_with_error_bodies(app)
    # outermost: any other error is the documented JSON error (Starlette's own would be plain text, and it re-raises
    # to the server, which then drops the connection)
    app.add_middleware(UnexpectedErrorMiddleware)
    return app


def _path_methods(request: Request) -> list[str]:
    """The methods some route (not a mount) of the app fully matches for this request's path."""
    out = []
    for method in ("DELETE", "GET", "PATCH", "POST", "PUT"):
        scope = {**request.scope, "method": method}
        if any(not isinstance(r, Mount) and r.matches(scope)[0] == Match.FULL for r in request.app.router.routes):
            out.append(method)
    return out


TEXT = {"schema": {"type": "string"}}
HEALTH_SCHEMAS = {
    ("/healthz", "200"): {"description": "the process is up", "content": {"application/json": {"schema": {
        "type": "object", "required": ["status"], "properties": {"status": {"type": "string", "enum": ["ok"]}}}}}},
    ("/readyz", "200"): {"description": "ready: every check is ok", "content": {"application/json": {"schema": {
        "$ref": "#/components/schemas/Readiness"}}}},
    ("/readyz", "503"): {"description": "not ready: `checks` says which check failed", "content": {
        "application/json": {"schema": {"$ref": "#/components/schemas/Readiness"}}}},
    ("/metrics", "200"): {"description": "Prometheus metrics (text exposition format)",
                          "content": {"text/plain": TEXT}},
    ("/metrics", "401"): {"description": "keys are required and the metrics token is missing or wrong",
                          "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}},
}
READINESS = {"title": "Readiness", "type": "object", "required": ["status", "checks"], "properties": {
    "status": {"type": "string", "enum": ["ready", "not ready"]},
    "checks": {"type": "object", "additionalProperties": {"type": "string"},
               "description": "database, broker, storage, default_model: 'ok' or the error"}}}


def _strict_forms(schema: dict) -> None:
    """Multipart forms as strict as the server: a form field is never null (leave it out for its default), and a
    file part is never empty."""
    for name, comp in schema.get("components", {}).get("schemas", {}).items():
        if not name.startswith("Body_"):
            continue
        for prop in comp.get("properties", {}).values():
            options = prop.get("anyOf")
            if options and {"type": "null"} in options:
                rest = [o for o in options if o != {"type": "null"}]
                prop.pop("anyOf")
                prop.update(rest[0] if len(rest) == 1 else {"anyOf": rest})
            for part in (prop, prop.get("items") or {}):
                if part.get("type") == "string" and (part.get("format") == "binary" or "contentMediaType" in part):
                    part["minLength"] = 1
            if prop.get("type") == "array":
                prop["minItems"] = 1


#: OpenAPI links: where an answer's id goes next (generated clients and stateful testers follow them)
LINKS = {
    ("/v1/datasets", "post", "201"): {
        "GetDataset": ("get", "/v1/datasets/{dataset_id}", {"dataset_id": "$response.body#/id"}, None),
        "DeleteDataset": ("delete", "/v1/datasets/{dataset_id}", {"dataset_id": "$response.body#/id"}, None),
        "AdaptToDataset": ("post", "/v1/adaptations", None, {"dataset_id": "$response.body#/id", "name": "adapted"}),
    },
    ("/v1/adaptations", "post", "202"): {
        "GetAdaptation": ("get", "/v1/adaptations/{job_id}", {"job_id": "$response.body#/id"}, None),
        "ListEvents": ("get", "/v1/adaptations/{job_id}/events", {"job_id": "$response.body#/id"}, None),
        "GetGrid": ("get", "/v1/adaptations/{job_id}/grid", {"job_id": "$response.body#/id"}, None),
        "CancelAdaptation": ("post", "/v1/adaptations/{job_id}/cancel", {"job_id": "$response.body#/id"}, None),
    },
    ("/v1/models", "get", "200"): {
        "GetModel": ("get", "/v1/models/{model_id}", {"model_id": "$response.body#/0/id"}, None),
    },
}


def _add_links(schema: dict) -> None:
    for (path, method, code), links in LINKS.items():
        resp = schema["paths"].get(path, {}).get(method, {}).get("responses", {}).get(code)
        if resp is None:
            continue
        out = resp.setdefault("links", {})
        for name, (to_method, to_path, params, body) in links.items():
            op_id = schema["paths"][to_path][to_method]["operationId"]
            link = {"operationId": op_id}
            if params:
                link["parameters"] = params
            if body:
                link["requestBody"] = body
            out[name] = link


def _openapi_with_error_bodies(app: FastAPI):
    """The spec tells what the API really answers: the 422 body of `validation_error` above (not FastAPI's default),
    every error status of each operation with its JSON body (app.errors.document_errors), /metrics as text, the
    health answers, and multipart forms as strict as the server."""
    base = app.openapi

    made: list[dict] = []

    def openapi() -> dict:
        if made:
            return made[0]
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
        document_errors(schema, ErrorBody.model_json_schema(), keys_always=get_settings().require_keys)
        schema["components"]["schemas"]["Readiness"] = READINESS
        schema["components"]["schemas"]["AdaptationIn"]["properties"]["params"] = params_schema(get_settings())
        for (path, code), resp in HEALTH_SCHEMAS.items():
            op = schema["paths"].get(path, {}).get("get")
            if op is not None:
                op["responses"][code] = resp
        _strict_forms(schema)
        _add_links(schema)
        made.append(schema)
        return schema

    return openapi
