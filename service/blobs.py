"""Blob references and garbage collection, race-free against concurrent writers of the same bytes; a job step's
outputs to and from the store (`upload`, `restore_blobs`).

Every blob written by the service has a `blobs` row and one `blob_refs` row per owner ('dataset:<id>',
'job:<id>' for a job's step outputs until the job ends, 'model:<id>'). The protocol:

* a writer (`store`), in ONE transaction: upserts the `blobs` row (this locks it), adds its reference, writes the blob
  to the store, and commits together with the rows that use the key;
* the collector (`collect`), per key: locks the `blobs` row (an UPDATE, waiting for any writer holding it), counts the
  references, and only when there is none deletes the blob from the store and the row.

The row lock orders the two (PostgreSQL row locks; SQLite has one writer at a time): either the writer's reference
is committed before the collector counts (the blob stays), or the collector deletes first and the writer, waiting on
the lock, re-creates the row and writes the blob again (the store's `put` sees it missing). No time window is involved.

Collection runs when a dataset or a model is deleted, when a job ends (its step outputs; `collect_job`), and in a
periodic sweep (`sweep`, every `blob_gc_interval_s` in each worker's reaper): references of owners that are gone or
of jobs that ended, blobs left without a reference, and objects in the store that no row knows (written before this
table existed, or by a writer whose transaction rolled back after the write).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from service.db import for_update, session_factory
from service.rows import FINAL_STATUSES, Blob, BlobRef, Dataset, Job, JobStep, ModelRow, utcnow
from service.storage import content_key, get_storage

log = logging.getLogger("faceadapt.blobs")


def _insert(session: Session):
    """The INSERT with ON CONFLICT of the session's database (PostgreSQL, else SQLite)."""
    return pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


def _touch(session: Session, key: str) -> None:
    insert, now = _insert(session), utcnow()
    session.execute(insert(Blob).values(key=key, created_at=now, touched_at=now)
                    .on_conflict_do_update(index_elements=["key"], set_={"touched_at": now}))


def add_ref(session: Session, key: str, owner: str) -> None:
    """Reference an existing blob (in the caller's transaction; the blob row is locked until it commits)."""
    _touch(session, key)
    session.execute(_insert(session)(BlobRef).values(key=key, owner=owner)
                    .on_conflict_do_nothing(index_elements=["key", "owner"]))


def store(session: Session, data: bytes, owner: str) -> str:
    """Write `data` for `owner` and return its key. The caller commits (with the rows that use the key)."""
    key = content_key(data)
    add_ref(session, key, owner)  # row lock first: no collector can delete the blob until we commit
    get_storage().put(data)
    return key


def store_many(session: Session, items: list, owner: str) -> list[str]:
    """`store` for several blobs: `items` are bytes or callables returning bytes (read when written). The rows are
    locked in key order, so two transactions storing overlapping sets never deadlock."""
    loaded = [(it() if callable(it) else it) for it in items]
    keys = [content_key(d) for d in loaded]
    for key in sorted(set(keys)):
        add_ref(session, key, owner)
    storage = get_storage()
    for d in loaded:
        storage.put(d)
    return keys


def drop_refs(session: Session, owner: str) -> set[str]:
    """Remove `owner`'s references (in the caller's transaction); returns their keys, to `collect` after commit."""
    keys = set(session.scalars(select(BlobRef.key).where(BlobRef.owner == owner)))
    session.execute(delete(BlobRef).where(BlobRef.owner == owner))
    return keys


def collect(keys: Iterable[str]) -> int:
    """Delete the blobs among `keys` that nothing references; returns how many were deleted."""
    storage, n = get_storage(), 0
    for key in sorted(set(keys)):
        if not isinstance(key, str) or len(key) != 64:
            continue
        with session_factory()() as s:
            try:
                s.execute(_insert(s)(Blob).values(key=key, created_at=utcnow(), touched_at=utcnow())
                          .on_conflict_do_nothing(index_elements=["key"]))
                s.execute(update(Blob).where(Blob.key == key).values(touched_at=Blob.touched_at))  # the row lock
                if s.scalar(select(func.count()).select_from(BlobRef).where(BlobRef.key == key)):
                    s.rollback()
                    continue
                storage.delete(key)
                s.execute(delete(Blob).where(Blob.key == key))
                s.commit()
                n += 1
            except Exception:
                s.rollback()
                raise
    return n


def collect_job(job_id: str) -> int:
    """A job ended: its step outputs are no longer needed (the model has its own references). Idempotent."""
    with session_factory()() as s:
        job = for_update(s, Job, Job.id == job_id)
        if job is None or job.status not in FINAL_STATUSES:
            return 0
        keys = drop_refs(s, f"job:{job_id}")
        for res in s.scalars(select(JobStep.result).where(JobStep.job_id == job_id)):
            keys.update((res or {}).get("blobs", {}).values())  # also outputs recorded before references existed
        s.commit()
    n = collect(keys)
    with session_factory()() as s:  # marked only once the blobs are gone (a crash before: the reaper does it again)
        s.execute(update(Job).where(Job.id == job_id).values(blobs_collected_at=utcnow()))
        s.commit()
    return n


def collect_finished_jobs(limit: int = 50) -> int:
    with session_factory()() as s:
        ids = s.scalars(select(Job.id).where(Job.status.in_(FINAL_STATUSES), Job.blobs_collected_at.is_(None))
                        .order_by(Job.finished_at).limit(limit)).all()
    return sum(collect_job(j) for j in ids)


def _stale_owners(s: Session) -> list[str]:
    """Owners whose references are left over: datasets and models that are gone, jobs that have ended."""
    owners = s.scalars(select(BlobRef.owner).distinct()).all()
    by_kind: dict[str, set[str]] = {}
    for o in owners:
        kind, _, id_ = o.partition(":")
        by_kind.setdefault(kind, set()).add(id_)
    stale = []
    if by_kind.get("dataset"):
        have = set(s.scalars(select(Dataset.id).where(Dataset.id.in_(by_kind["dataset"]))))
        stale += [f"dataset:{i}" for i in by_kind["dataset"] - have]
    if by_kind.get("model"):
        have = set(s.scalars(select(ModelRow.id).where(ModelRow.id.in_(by_kind["model"]))))
        stale += [f"model:{i}" for i in by_kind["model"] - have]
    if by_kind.get("job"):
        live = set(s.scalars(select(Job.id).where(Job.id.in_(by_kind["job"]), Job.status.not_in(FINAL_STATUSES))))
        stale += [f"job:{i}" for i in by_kind["job"] - live]
    return stale


def sweep(list_store: bool = True) -> int:
    """The periodic collection; returns how many blobs were deleted."""
    n = collect_finished_jobs(limit=1000)
    keys: set[str] = set()
    with session_factory()() as s:
        for owner in _stale_owners(s):
            keys |= drop_refs(s, owner)
        s.commit()
        unreferenced = s.scalars(select(Blob.key).where(~select(BlobRef.id).where(BlobRef.key == Blob.key).exists()))
        keys.update(unreferenced)
        if list_store:
            known = set(s.scalars(select(Blob.key)))
            keys.update(k for k in get_storage().list_keys() if k not in known)  # `collect` adds their rows first
    return n + collect(keys)


def upload(wd: Path, files: list[Path], job_id: str) -> dict[str, str]:
    """Store a job step's outputs, referenced by the job until it ends (blob, reference, one transaction); returns
    {path relative to the work dir `wd`: key} for the files that exist."""
    files = [f for f in files if f.is_file()]
    with session_factory()() as s:
        keys = store_many(s, [f.read_bytes for f in files], f"job:{job_id}")
        s.commit()
    return {str(f.relative_to(wd)): k for f, k in zip(files, keys)}


def restore_blobs(job_id: str, wd: Path) -> int:
    """Fetch the outputs of the job's finished steps that the work dir `wd` lacks; returns how many were fetched."""
    storage, n = get_storage(), 0
    with session_factory()() as s:
        results = s.scalars(select(JobStep.result).where(JobStep.job_id == job_id, JobStep.status == "done")).all()
    for res in results:
        for rel, key in (res or {}).get("blobs", {}).items():
            target = wd / rel
            if not target.is_file():
                storage.fetch_to(key, target)
                n += 1
    return n
