"""The database rows of the service (SQLAlchemy 2): tenants, api_keys, datasets, images, jobs, job_steps, job_events,
models (the registry), blobs and blob_refs, webhook_secrets and webhook_deliveries (the webhook outbox),
worker_heartbeats.

Ids are random hex strings (nothing to enumerate). The schema is created by alembic (alembic/versions); never by
`create_all` outside tests.
"""
from __future__ import annotations

import uuid
from datetime import datetime, timezone

from sqlalchemy import (JSON, Boolean, CheckConstraint, DateTime, ForeignKey, Index, Integer, String, Text, TypeDecorator,
                        UniqueConstraint, text)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value, dialect):
        return value.replace(tzinfo=timezone.utc) if value is not None and value.tzinfo is None else value


class Base(DeclarativeBase):
    type_annotation_map = {dict: JSON, list: JSON, datetime: UTCDateTime}


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the key; the key itself is never stored
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, to tell keys apart in listings
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    tenant: Mapped[Tenant] = relationship()


DATASET_NAME_MAX = 256  # characters of a dataset's name (the API schema, the service and a database CHECK)


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (CheckConstraint(f"length(name) <= {DATASET_NAME_MAX}", name="ck_datasets_name_length"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(256), default="")
    image_count: Mapped[int] = mapped_column(Integer, default=0)
    face_count: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[list] = mapped_column(default=list)  # [{"file": ..., "reason": ...}]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    images: Mapped[list["ImageRow"]] = relationship(
        back_populates="dataset", cascade="all, delete-orphan", passive_deletes=True, order_by="ImageRow.position"
    )


class ImageRow(Base):
    __tablename__ = "images"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer, default=0)
    filename: Mapped[str] = mapped_column(String(512))
    blob_key: Mapped[str] = mapped_column(String(128))  # the upload, by content hash
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    faces: Mapped[list] = mapped_column(default=list)  # [{"box": [...], "score": s, "crop_key": key}]
    dataset: Mapped[Dataset] = relationship(back_populates="images")


JOB_STATUSES = ("queued", "preparing", "generating_targets", "finetuning", "evaluating", "succeeded", "failed", "cancelled")
FINAL_STATUSES = ("succeeded", "failed", "cancelled")  # a job in one of these is over
ACTIVE_JOB = "status NOT IN ('succeeded', 'failed', 'cancelled')"  # not FINAL_STATUSES: the index's SQL text


class Job(Base):
    __tablename__ = "jobs"
    # one queued or running job per (tenant, name): concurrent POSTs with one name cannot both create a job
    __table_args__ = (Index("uq_jobs_tenant_name_active", "tenant_id", "name", unique=True,
                            postgresql_where=text(ACTIVE_JOB), sqlite_where=text(ACTIVE_JOB)),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    dataset_id: Mapped[str | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), index=True)
    base_model: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(128))  # the name the adapted model is registered under
    params: Mapped[dict] = mapped_column(default=dict)  # engine parameters (AdaptConfig fields)
    status: Mapped[str] = mapped_column(String(32), default="queued", index=True)
    stage: Mapped[str | None] = mapped_column(String(32), default=None)
    progress_done: Mapped[int] = mapped_column(Integer, default=0)
    progress_total: Mapped[int] = mapped_column(Integer, default=0)
    num_shards: Mapped[int] = mapped_column(Integer, default=1)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    metrics: Mapped[dict] = mapped_column(default=dict)
    model_id: Mapped[str | None] = mapped_column(String(32), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    blobs_collected_at: Mapped[datetime | None] = mapped_column(default=None)  # its step blobs were collected (final)
    webhook_url: Mapped[str | None] = mapped_column(Text, default=None)  # called back on `webhook_events` (webhooks.py)
    webhook_events: Mapped[list | None] = mapped_column(default=None)
    events: Mapped[list["JobEvent"]] = relationship(cascade="all, delete-orphan", passive_deletes=True, order_by="JobEvent.id")


class JobStep(Base):
    """One unit of a job's work (a stage, or one shard of the target stage) and who holds it.

    A worker takes a step by setting `lease_owner` and renewing `heartbeat_at`; a step whose heartbeat is older than
    `lease_ttl_s` belongs to a dead worker and may be taken over. `attempts` bounds redelivery.
    """
    __tablename__ = "job_steps"
    __table_args__ = (UniqueConstraint("job_id", "stage", "shard", name="uq_job_steps_job_stage_shard"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    stage: Mapped[str] = mapped_column(String(32))
    shard: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | running | done
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    done_count: Mapped[int] = mapped_column(Integer, default=0)
    total_count: Mapped[int] = mapped_column(Integer, default=0)
    result: Mapped[dict] = mapped_column(default=dict)  # the stage's summary and {"blobs": {work-dir path: key}}
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class JobEvent(Base):
    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    ts: Mapped[datetime] = mapped_column(default=utcnow)
    stage: Mapped[str | None] = mapped_column(String(32), default=None)
    kind: Mapped[str] = mapped_column(String(16), default="info")  # info | progress | warning | error
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict] = mapped_column(default=dict)


class WebhookSecret(Base):
    """A tenant's webhook signing secret; after a rotation the previous one also signs until `previous_until`."""
    __tablename__ = "webhook_secrets"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True)
    secret: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    previous_secret: Mapped[str | None] = mapped_column(String(128), default=None)
    previous_until: Mapped[datetime | None] = mapped_column(default=None)


class WebhookDelivery(Base):
    """The webhook outbox: one call to make, written in the transaction of the job change it reports
    (service/webhooks.py), sent and retried by the workers' delivery loop (worker/webhooks.py)."""
    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)  # the receiver's idempotency key
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text)
    event: Mapped[str] = mapped_column(String(16))  # start | stage | logs | completed
    payload: Mapped[dict] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(default=None)


class ModelRow(Base):
    """The model registry. `tenant_id` NULL means public (shared with every tenant); bundled models are public."""
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_models_tenant_name"),)
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant_id: Mapped[str | None] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"), default=None)
    name: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(16))
    arch: Mapped[str] = mapped_column(String(64))
    builtin: Mapped[bool] = mapped_column(Boolean, default=False)  # loaded from the bundled zoo, not from storage
    job_id: Mapped[str | None] = mapped_column(String(32), unique=True, default=None)  # one model per job, at most
    sha256: Mapped[str] = mapped_column(String(64), default="")
    card: Mapped[dict] = mapped_column(default=dict)
    files: Mapped[dict] = mapped_column(default=dict)  # zoo file name -> storage key
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Blob(Base):
    """A blob of the store (by content key). Writers insert (or touch) this row and their `BlobRef` in the transaction
    that writes the blob; the collector locks the row, and deletes the blob only when no reference is left. The row
    lock orders a writer and the collector, so a blob is never deleted under a concurrent upload of the same bytes."""
    __tablename__ = "blobs"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    touched_at: Mapped[datetime] = mapped_column(default=utcnow)


class BlobRef(Base):
    """Who needs a blob: `owner` is 'dataset:<id>', 'job:<id>' (its step outputs, until the job ends) or 'model:<id>'."""
    __tablename__ = "blob_refs"
    __table_args__ = (UniqueConstraint("key", "owner", name="uq_blob_refs_key_owner"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(64), index=True)
    owner: Mapped[str] = mapped_column(String(48), index=True)


class WorkerBeat(Base):
    """A live worker process: its row is written at start and every `heartbeat_s`, deleted at a clean stop. /readyz
    counts the rows with a fresh `heartbeat_at` (a worker killed with SIGKILL leaves a row that goes stale)."""
    __tablename__ = "worker_heartbeats"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)  # service.leases.WORKER_ID (host:pid)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


def owned(session: Session, row_type: type, row_id: str, tenant_id: str):
    """The row `row_id` of `row_type` when it belongs to the tenant, else None (another tenant's is never found)."""
    row = session.get(row_type, row_id)
    return row if row is not None and row.tenant_id == tenant_id else None
