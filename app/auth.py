"""API keys and tenants.

A key is `fa_<43 url-safe chars>` (256 random bits); only its sha256 is stored (a fast hash is right for a
high-entropy secret: there is nothing to brute-force). Requests carry it as `Authorization: Bearer <key>`.
When keys are not required (embedded mode on a loopback address) a request without a key acts as the
`settings.public_tenant` tenant; a request that does send a key is still checked.
"""
from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import ApiError
from app.models import ApiKey, Tenant
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


def resolve_principal(session: Session, authorization: str | None) -> Principal:
    settings = get_settings()
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
    if settings.require_keys:
        raise ApiError(401, "unauthorized", "an API key is required: 'Authorization: Bearer <api key>' "
                       "(create one with `faceadapt keys create --tenant NAME`)")
    tenant = get_or_create_tenant(session, settings.public_tenant)
    session.commit()
    return Principal(tenant.id, tenant.name)


def principal_dependency(request: Request) -> Principal:
    from app.db import session_factory

    with session_factory()() as session:
        return resolve_principal(session, request.headers.get("authorization"))
