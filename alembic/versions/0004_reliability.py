"""reliability: the dataset name bound and the worker heartbeats

* `ck_datasets_name_length`: a dataset name is at most 256 characters (SQLite never enforced the VARCHAR length);
  longer names already stored are cut first;
* `worker_heartbeats`: one row per live worker process (`/readyz` needs a fresh one).

Revision ID: 0004
Revises: 0003 (the webhooks)
Create Date: 2026-12-06 22:00:00
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: Union[str, Sequence[str], None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.execute("UPDATE datasets SET name = substr(name, 1, 256) WHERE length(name) > 256")
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.create_check_constraint('ck_datasets_name_length', 'length(name) <= 256')
    op.create_table('worker_heartbeats',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index('ix_worker_heartbeats_heartbeat_at', 'worker_heartbeats', ['heartbeat_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_worker_heartbeats_heartbeat_at', table_name='worker_heartbeats')
    op.drop_table('worker_heartbeats')
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_constraint('ck_datasets_name_length', type_='check')
