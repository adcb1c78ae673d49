"""Embedded mode's SQLite: a locking read (`service.db.for_update`, used by every step transition) holds the database
until its session commits, as `SELECT ... FOR UPDATE` does on PostgreSQL. Without it a worker's claim could slip
between a reaper's read and its write, and the write would undo the claim (the step then looked lost to the worker
that held it and the job hung: tests/test_chaos.py::test_embedded_serve_supervises_its_worker, now and then)."""
from __future__ import annotations

import threading
import time

import pytest

from service.db import for_update, migrate, session
from service.leases import locked
from service.rows import Job, JobStep, Tenant
from service.settings import get_settings


@pytest.fixture
def sqlite_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FACEADAPT_HOME", str(tmp_path))
    monkeypatch.delenv("FACEADAPT_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    migrate(get_settings().db_url)
    yield
    get_settings.cache_clear()


def test_a_locking_read_waits_for_the_holders_commit(sqlite_home):
    with session() as s:
        tenant = Tenant(name="t")
        s.add(tenant)
        s.flush()
        job = Job(tenant_id=tenant.id, base_model="m", name="j", status="finetuning", stage="finetune")
        s.add(job)
        s.flush()
        s.add(JobStep(job_id=job.id, stage="finetune", shard=0, status="running", lease_owner="dead:1"))
        s.commit()
        job_id = job.id
    holding = threading.Event()

    def reaper():  # reads the step, then (a while later) re-queues it and commits
        with session() as s:
            _, step = locked(s, job_id, "finetune", 0)
            holding.set()
            time.sleep(0.6)
            step.status = "queued"
            s.commit()

    t = threading.Thread(target=reaper)
    t.start()
    assert holding.wait(10)
    t0 = time.monotonic()
    with session() as s:  # a worker's claim: must see the reaper's write, not the state before it
        _, step = locked(s, job_id, "finetune", 0)
        waited = time.monotonic() - t0
        status = step.status
        s.commit()
    t.join()
    assert status == "queued" and waited >= 0.4, (status, waited)


def test_the_lock_changes_nothing(sqlite_home):
    with session() as s:
        tenant = Tenant(name="t2")
        s.add(tenant)
        s.flush()
        job = Job(tenant_id=tenant.id, base_model="m", name="j2", status="queued")
        s.add(job)
        s.commit()
        job_id, before = job.id, job.updated_at
    time.sleep(0.05)
    with session() as s:
        assert for_update(s, Job, Job.id == job_id).id == job_id
        s.commit()
    with session() as s:
        assert s.get(Job, job_id).updated_at == before
