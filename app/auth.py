"""Who is calling: the API key of a request (`Authorization: Bearer <key>`) and the tenant it acts for.

Keys and tenants themselves live in `service/tenants.py`. When keys are not required (embedded mode on a loopback
address) a request without a key acts as the `settings.public_tenant` tenant; a request that does send a key is
still checked.
"""
from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy.orm import Session
from starlette.datastructures import Headers

from service.db import session_factory
from service.errors import ServiceError
from service.settings import get_settings
from service.tenants import get_or_create_tenant, key_row


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    tenant_name: str


def _loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host == "localhost"


def keys_required(scope) -> bool:
    """Keys are required when `settings.require_keys` is on, and always for a connection that is not loopback on both
    ends (the server address the client reached and the client's own): the app enforces this itself, whatever server
    runs it (`faceadapt serve`, plain `uvicorn --factory app.main:create_app --host 0.0.0.0`, gunicorn)."""
    if get_settings().require_keys:
        return True
    server, client = scope.get("server"), scope.get("client")
    return not (server and client and _loopback(server[0]) and _loopback(client[0]))


def resolve_principal(session: Session, authorization: str | None, required: bool | None = None) -> Principal:
    settings = get_settings()
    required = settings.require_keys if required is None else required
    if authorization:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ServiceError(401, "unauthorized", "use 'Authorization: Bearer <api key>'")
        row = key_row(session, token.strip())
        if row is None:
            raise ServiceError(401, "unauthorized", "unknown or revoked API key")
        return Principal(row.tenant_id, row.tenant.name)
    if required:
        raise ServiceError(401, "unauthorized", "an API key is required: 'Authorization: Bearer <api key>' "
                           "(create one with `faceadapt keys create --tenant NAME`)")
    tenant = get_or_create_tenant(session, settings.public_tenant)
    session.commit()
    return Principal(tenant.id, tenant.name)


#: the public tenant's principal per (database, tenant name), once it exists: tenants are never deleted, so a request
#: without a key needs no database round trip after the first
_PUBLIC: dict[tuple[str, str], Principal] = {}


def public_principal_if_known(request: Request) -> Principal | None:
    """The public tenant's principal, without touching the database, for a request that sends no key where none is
    required and once the tenant is known; else None (`principal_dependency` decides)."""
    if request.headers.get("authorization") or keys_required(request.scope):
        return None
    settings = get_settings()
    return _PUBLIC.get((settings.db_url, settings.public_tenant))


def principal_dependency(request: Request) -> Principal:
    authorization, required = request.headers.get("authorization"), keys_required(request.scope)
    with session_factory()() as session:
        principal = resolve_principal(session, authorization, required)
    if not authorization and not required:  # the public tenant: known from now on (`public_principal_if_known`)
        settings = get_settings()
        _PUBLIC[(settings.db_url, settings.public_tenant)] = principal
    return principal


class PrivateRoutesMiddleware:
    """ASGI middleware: /metrics and the API docs are not open when API keys are required (`private_route_error`);
    other requests pass straight through (plain ASGI: no extra task or body stream per request)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("GET", "HEAD"):  # others: the router's 405
            return await self.app(scope, receive, send)
        path = scope["path"]
        if (path == "/metrics" or path in DOC_PATHS) and keys_required(scope):
            authorization = Headers(scope=scope).get("authorization")
            err = await run_in_threadpool(private_route_error, path, authorization)
            if err is not None:
                response = JSONResponse(err.body(), status_code=err.status, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


DOC_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def private_route_error(path: str, authorization: str | None) -> ServiceError | None:
    """When keys are required: `/metrics` takes only `Bearer <settings.metrics_token>` (closed when no token is set:
    its labels name every tenant's models), and the API documentation (`/docs`, `/redoc`, `/openapi.json`) takes a
    valid API key unless `settings.public_docs`. None when the request may go on."""
    settings = get_settings()
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    if path == "/metrics":
        if settings.metrics_token and token and hmac.compare_digest(token.encode(), settings.metrics_token.encode()):
            return None
        no_token = "" if settings.metrics_token else " (no metrics token is set)"
        return ServiceError(401, "unauthorized", "/metrics needs 'Authorization: Bearer <FACEADAPT_METRICS_TOKEN>' "
                            "when API keys are required" + no_token)
    if path in DOC_PATHS and not settings.public_docs:
        try:
            with session_factory()() as session:
                resolve_principal(session, authorization, required=True)
        except ServiceError as exc:
            return exc
    return None
