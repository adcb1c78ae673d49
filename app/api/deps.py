"""Route dependencies: the calling tenant (`CurrentPrincipal`, rate-limited per tenant: app.limits) and a database
session per request (`DB`)."""
from __future__ import annotations

from typing import Iterator

from fastapi import Depends, Request
from fastapi.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from app.auth import Principal, principal_dependency, public_principal_if_known
from app.limits import rate_limiter
from service.db import session_factory


def db_session() -> Iterator[Session]:
    s = session_factory()()
    try:
        yield s
    finally:
        s.close()


async def limited_principal(request: Request) -> Principal:
    """The calling tenant, after taking one request of its rate limit (429 `rate_limited` with Retry-After). The
    public tenant, once known, is answered on the event loop; a key is checked in the database (a worker thread)."""
    principal = public_principal_if_known(request) or await run_in_threadpool(principal_dependency, request)
    rate_limiter().check(principal.tenant_id)
    return principal


CurrentPrincipal = Depends(limited_principal)
DB = Depends(db_session)
__all__ = ["Principal", "CurrentPrincipal", "DB"]
