"""Tenants and their API keys: create, revoke, list, and find the tenant of a key.

A key is `fa_<43 url-safe chars>` (256 random bits); only its sha256 is stored (a fast hash is right for a
high-entropy secret: there is nothing to brute-force).
"""
from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.rows import ApiKey, Tenant, utcnow

KEY_PREFIX = "fa_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


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


def find_tenant(session: Session, name: str) -> Tenant | None:
    """The tenant called `name`, or None."""
    return session.scalar(select(Tenant).where(Tenant.name == name))


def create_key(session: Session, tenant_name: str) -> str:
    """Create a key for `tenant_name` (creating the tenant when new); returns the key, shown once."""
    if not tenant_name or len(tenant_name) > 128:
        raise ValueError("tenant name must be 1-128 characters")
    tenant = get_or_create_tenant(session, tenant_name)
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:10]))
    session.flush()
    return key


def key_row(session: Session, key: str) -> ApiKey | None:
    """The live (not revoked) key row of `key`, or None."""
    return session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)))


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


def list_keys(session: Session, tenant: str | None = None) -> list[tuple[ApiKey, str]]:
    """Every key with its tenant's name, oldest first (only `tenant`'s when given)."""
    q = select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id).order_by(ApiKey.created_at)
    if tenant:
        q = q.where(Tenant.name == tenant)
    return [(k, name) for k, name in session.execute(q).all()]
