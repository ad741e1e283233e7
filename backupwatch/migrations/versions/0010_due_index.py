"""The timer's due jobs by index (issue 10): (instance, next_deadline_at, id) WHERE active.

Migration 0008's (instance, active, next_deadline_at) could not give PostgreSQL the keyset
order (deadline, id) of the timer's pages, nor use `active IS true` as an index condition: each
page of 250 was a scan and a sort of every due job, and a wave of 100,000 deadlines spent most
of its time there. This partial index holds the active jobs only, in page order.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_expected_backup_jobs_due",
        "expected_backup_jobs",
        ["instance", "next_deadline_at", "id"],
        postgresql_where=sa.text("active IS true"),
        sqlite_where=sa.text("active IS 1"),
    )
    op.drop_index("ix_expected_backup_jobs_instance_deadline", table_name="expected_backup_jobs")


def downgrade() -> None:
    op.create_index(
        "ix_expected_backup_jobs_instance_deadline",
        "expected_backup_jobs",
        ["instance", "active", "next_deadline_at"],
    )
    op.drop_index("ix_expected_backup_jobs_due", table_name="expected_backup_jobs")
