"""Route dependencies: the calling tenant (`CurrentPrincipal`, rate-limited per tenant: app.limits) and a database
session per request (`DB`)."""
from __future__ import annotations

from typing import Iterator

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.auth import Principal, principal_dependency
from app.limits import rate_limiter
from service.db import session_factory


def db_session() -> Iterator[Session]:
    s = session_factory()()
    try:
        yield s
    finally:
        s.close()


def limited_principal(request: Request) -> Principal:
    """The calling tenant, after taking one request of its rate limit (429 `rate_limited` with Retry-After)."""
    principal = principal_dependency(request)
    rate_limiter().check(principal.tenant_id)
    return principal


CurrentPrincipal = Depends(limited_principal)
DB = Depends(db_session)
__all__ = ["Principal", "CurrentPrincipal", "DB"]
