"""Route dependencies: the calling tenant (`CurrentPrincipal`) and a database session per request (`DB`)."""
from __future__ import annotations

from typing import Iterator

from fastapi import Depends
from sqlalchemy.orm import Session

from app.auth import Principal, principal_dependency
from service.db import session_factory


def db_session() -> Iterator[Session]:
    s = session_factory()()
    try:
        yield s
    finally:
        s.close()


CurrentPrincipal = Depends(principal_dependency)
DB = Depends(db_session)
__all__ = ["Principal", "CurrentPrincipal", "DB"]
