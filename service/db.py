"""Database engine and sessions (SQLAlchemy 2), and `migrate()` = `alembic upgrade head`.

PostgreSQL in production and tests, SQLite (WAL) for the embedded mode. The URL is `settings.db_url`;
`existing_url()` says whether this home has a service database at all (for the CLI, which must not create one).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.settings import ServiceSettings, get_settings

REPO = Path(__file__).resolve().parents[1]
_lock = threading.Lock()
_engines: dict[str, Engine] = {}


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record):  # pragma: no cover - exercised in embedded mode
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def get_engine(url: str | None = None) -> Engine:
    url = url or get_settings().db_url
    with _lock:
        if url not in _engines:
            _engines[url] = make_engine(url)
        return _engines[url]


def dispose_engines() -> None:
    """Drop pooled connections (after a fork: each process must open its own)."""
    with _lock:
        for e in _engines.values():
            e.dispose(close=False)
        _engines.clear()


def session_factory(url: str | None = None) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


def session() -> Session:
    """A new session of the configured database (the caller closes it: `with session() as s:`)."""
    return session_factory()()


def for_update(s: Session, model, *where):
    """The one row of `model` matching `where`, locked until `s` commits: `SELECT ... FOR UPDATE` on PostgreSQL. On
    SQLite, where that is a plain read outside any transaction, a no-op UPDATE of the row comes first: it begins the
    write transaction, so nothing changes the database between this read and the commit (another process's locking
    read waits, `busy_timeout`). Without it a worker could claim a step between a reaper's read and its write, and
    the reaper's write would undo the claim."""
    if s.get_bind().dialect.name == "sqlite":
        table = model.__table__
        same = [next(iter(table.primary_key.columns)), *(c for c in table.columns if c.onupdate is not None)]
        s.execute(table.update().where(*where).values({c.name: c for c in same}))  # changes nothing, not updated_at
    return s.scalar(select(model).where(*where).with_for_update())


def existing_url(settings: ServiceSettings) -> str | None:
    """The service database of this home, when there is one: FACEADAPT_DATABASE_URL, or the embedded SQLite file if
    it exists (None otherwise; nothing is created)."""
    if settings.database_url:
        return settings.database_url
    return settings.db_url if settings.embedded_db_path.is_file() else None


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    s = session_factory()()
    try:
        yield s
        s.commit()
    except BaseException:
        s.rollback()
        raise
    finally:
        s.close()


def migrations_dir() -> Path:
    """The project's alembic/ folder: beside service/ in a checkout or an editable install (the Dockerfile's)."""
    for base in (REPO, Path.cwd()):
        if (base / "alembic" / "env.py").is_file() and (base / "alembic.ini").is_file():
            return base
    raise RuntimeError(f"alembic migrations not found beside {REPO} or in {Path.cwd()}; install FaceAdapt "
                       "editable (pip install -e .) from its source tree")


def alembic_config(url: str | None = None) -> Config:
    base = migrations_dir()
    cfg = Config(str(base / "alembic.ini"))
    cfg.set_main_option("script_location", str(base / "alembic"))
    cfg.set_main_option("sqlalchemy.url", (url or get_settings().db_url).replace("%", "%%"))
    return cfg


def migrate(url: str | None = None) -> None:
    """`alembic upgrade head`; concurrent starts are serialised by a PostgreSQL advisory lock (see alembic/env.py)."""
    command.upgrade(alembic_config(url), "head")


def ping(url: str | None = None) -> None:
    with get_engine(url).connect() as conn:
        conn.execute(text("SELECT 1"))


STARTUP_LOCK = 7340772


@contextmanager
def startup_lock(session: Session) -> Iterator[None]:
    """Serialise start-up work of several API processes: a PostgreSQL transaction-level advisory lock held until
    the commit at the end of the block (SQLite needs none: the embedded mode has one API process)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": STARTUP_LOCK})
    yield
    session.commit()
