"""unique adaptation names per tenant, blob reference tracking, job blob collection mark

* `uq_models_tenant_name`: one model per (tenant, name) (replaces the plain index `ix_models_tenant_name`);
* `uq_jobs_tenant_name_active`: one queued or running job per (tenant, name) (partial unique index);
  duplicates that already exist are renamed `<name>-dup-<id>` first (models: all but the oldest; active jobs: all
  but the oldest);
* `blobs`, `blob_refs`: who references each blob (datasets, active jobs, models), backfilled from the existing rows;
* `jobs.blobs_collected_at`.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 21:10:00
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

ACTIVE = "status NOT IN ('succeeded', 'failed', 'cancelled')"
FINAL = ('succeeded', 'failed', 'cancelled')


def _rename_duplicates(conn, table: str, where: str = "") -> None:
    rows = conn.execute(sa.text(f"SELECT id, tenant_id, name FROM {table} {where} ORDER BY created_at, id")).all()
    seen = set()
    for id_, tenant, name in rows:
        if (tenant, name) in seen:
            new = f"{name[:100]}-dup-{id_[:8]}"
            conn.execute(sa.text(f"UPDATE {table} SET name = :n WHERE id = :i"), {"n": new, "i": id_})
        seen.add((tenant, name))


def upgrade() -> None:
    conn = op.get_bind()
    _rename_duplicates(conn, "models")
    _rename_duplicates(conn, "jobs", f"WHERE {ACTIVE}")
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_index('ix_models_tenant_name')
        batch_op.create_unique_constraint('uq_models_tenant_name', ['tenant_id', 'name'])
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('blobs_collected_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index('uq_jobs_tenant_name_active', 'jobs', ['tenant_id', 'name'], unique=True,
                    postgresql_where=sa.text(ACTIVE), sqlite_where=sa.text(ACTIVE))
    op.create_table('blobs',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('touched_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    op.create_table('blob_refs',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('owner', sa.String(length=48), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key', 'owner', name='uq_blob_refs_key_owner')
    )
    op.create_index('ix_blob_refs_key', 'blob_refs', ['key'], unique=False)
    op.create_index('ix_blob_refs_owner', 'blob_refs', ['owner'], unique=False)

    # backfill: every reference the existing rows hold
    import json
    from datetime import datetime, timezone

    refs = set()
    for key, ds in conn.execute(sa.text("SELECT blob_key, dataset_id FROM images")).all():
        refs.add((key, f"dataset:{ds}"))
    for id_, files in conn.execute(sa.text("SELECT id, files FROM models")).all():
        files = json.loads(files) if isinstance(files, str) else (files or {})
        refs.update((k, f"model:{id_}") for k in files.values())
    active = {j for (j,) in conn.execute(sa.text(f"SELECT id FROM jobs WHERE {ACTIVE}")).all()}
    for job_id, result in conn.execute(sa.text("SELECT job_id, result FROM job_steps")).all():
        if job_id not in active:
            continue
        result = json.loads(result) if isinstance(result, str) else (result or {})
        refs.update((k, f"job:{job_id}") for k in (result.get("blobs") or {}).values())
    now = datetime.now(timezone.utc)
    keys = sorted({k for k, _ in refs if isinstance(k, str) and len(k) == 64})
    if keys:
        op.bulk_insert(sa.table('blobs', sa.column('key'), sa.column('created_at'), sa.column('touched_at')),
                       [{"key": k, "created_at": now, "touched_at": now} for k in keys])
        op.bulk_insert(sa.table('blob_refs', sa.column('key'), sa.column('owner')),
                       [{"key": k, "owner": o} for k, o in sorted(refs) if k in set(keys)])


def downgrade() -> None:
    op.drop_index('ix_blob_refs_owner', table_name='blob_refs')
    op.drop_index('ix_blob_refs_key', table_name='blob_refs')
    op.drop_table('blob_refs')
    op.drop_table('blobs')
    op.drop_index('uq_jobs_tenant_name_active', table_name='jobs')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('blobs_collected_at')
    with op.batch_alter_table('models', schema=None) as batch_op:
        batch_op.drop_constraint('uq_models_tenant_name', type_='unique')
        batch_op.create_index('ix_models_tenant_name', ['tenant_id', 'name'], unique=False)
