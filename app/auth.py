"""API keys and tenants.

A key is `fa_<43 url-safe chars>` (256 random bits); only its sha256 is stored (a fast hash is right for a
high-entropy secret: there is nothing to brute-force). Requests carry it as `Authorization: Bearer <key>`.
When keys are not required (embedded mode on a loopback address) a request without a key acts as the
`settings.public_tenant` tenant; a request that does send a key is still checked.
"""
from __future__ import annotations

import hashlib
import ipaddress
import secrets
from dataclasses import dataclass

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import ApiError
from app.models import ApiKey, Tenant, utcnow
from restoration.settings import get_settings

KEY_PREFIX = "fa_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    tenant_name: str


def get_or_create_tenant(session: Session, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is None:
        try:
            with session.begin_nested():  # two first requests at once: the loser reads the winner's row
                tenant = Tenant(name=name)
                session.add(tenant)
        except IntegrityError:
            tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    return tenant


def create_key(session: Session, tenant_name: str) -> str:
    """Create a key for `tenant_name` (creating the tenant when new); returns the key, shown once."""
    if not tenant_name or len(tenant_name) > 128:
        raise ValueError("tenant name must be 1-128 characters")
    tenant = get_or_create_tenant(session, tenant_name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:10]))
    session.flush()
    return key


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
            raise ApiError(401, "unauthorized", "use 'Authorization: Bearer <api key>'")
        row = session.scalar(
            select(ApiKey).where(ApiKey.key_hash == hash_key(token.strip()), ApiKey.revoked_at.is_(None))
        )
        if row is None:
            raise ApiError(401, "unauthorized", "unknown or revoked API key")
        return Principal(row.tenant_id, row.tenant.name)
    if required:
        raise ApiError(401, "unauthorized", "an API key is required: 'Authorization: Bearer <api key>' "
                       "(create one with `faceadapt keys create --tenant NAME`)")
    tenant = get_or_create_tenant(session, settings.public_tenant)
    session.commit()
    return Principal(tenant.id, tenant.name)


def principal_dependency(request: Request) -> Principal:
    from app.db import session_factory

    with session_factory()() as session:
        return resolve_principal(session, request.headers.get("authorization"), keys_required(request.scope))


def revoke_key(session: Session, key_or_id: str) -> ApiKey:
    """Revoke a key given as the key itself or as its id (`faceadapt keys list`); it answers 401 from then on."""
    row = session.scalar(select(ApiKey).where((ApiKey.key_hash == hash_key(key_or_id.strip()))
                                              | (ApiKey.id == key_or_id.strip())))
    if row is None:
        raise ValueError("no such API key (give the key itself or its id from `faceadapt keys list`)")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    session.flush()
    return row


DOC_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


def private_route_error(path: str, authorization: str | None) -> ApiError | None:
    """When keys are required: `/metrics` takes only `Bearer <settings.metrics_token>` (closed when no token is set:
    its labels name every tenant's models), and the API documentation (`/docs`, `/redoc`, `/openapi.json`) takes a
    valid API key unless `settings.public_docs`. None when the request may go on."""
    import hmac

    settings = get_settings()
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    if path == "/metrics":
        if settings.metrics_token and token and hmac.compare_digest(token.encode(), settings.metrics_token.encode()):
            return None
        return ApiError(401, "unauthorized", "/metrics needs 'Authorization: Bearer <FACEADAPT_METRICS_TOKEN>' when "
                        "API keys are required" + ("" if settings.metrics_token else " (no metrics token is set)"))
    if path in DOC_PATHS and not settings.public_docs:
        from app.db import session_factory

        try:
            with session_factory()() as session:
                resolve_principal(session, authorization, required=True)
        except ApiError as exc:
            return exc
    return None
