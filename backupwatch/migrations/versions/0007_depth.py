"""Deeper verification and retention (SPEC §13, §14).

On `expected_backup_jobs`: the job's own `archive_test` and GFS counts (`keep_daily`,
`keep_weekly`, `keep_monthly`; NULL: the config's). On `backup_entries`: the promoted file's
device and inode (`final_dev`, `final_ino`; its size and SHA-256 are `server_size` and
`server_sha256`), its removal claim (`final_removal`, `final_removal_at`) and `suspicious`
(SPEC §13's size anomaly), plus two indexes:
(job_id, status, cycle) for a job's newest successes (the size anomaly's one query, the GFS
candidates) and (cycle) for pruning entries by age in batches.

Self-contained on purpose: it touches no table or column of another revision, so that its
`down_revision` can be re-chained at merge.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("expected_backup_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("archive_test", sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column("keep_daily", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("keep_weekly", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("keep_monthly", sa.Integer(), nullable=True))
    with op.batch_alter_table("backup_entries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("final_dev", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("final_ino", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("final_removal", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("final_removal_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("suspicious", sa.Boolean(), nullable=True))
    op.create_index(
        "ix_backup_entries_job_status_cycle", "backup_entries", ["job_id", "status", "cycle"]
    )
    op.create_index("ix_backup_entries_cycle", "backup_entries", ["cycle"])


def downgrade() -> None:
    op.drop_index("ix_backup_entries_cycle", table_name="backup_entries")
    op.drop_index("ix_backup_entries_job_status_cycle", table_name="backup_entries")
    with op.batch_alter_table("backup_entries", schema=None) as batch_op:
        for column in ("suspicious", "final_removal_at", "final_removal", "final_ino", "final_dev"):
            batch_op.drop_column(column)
    with op.batch_alter_table("expected_backup_jobs", schema=None) as batch_op:
        for column in ("keep_monthly", "keep_weekly", "keep_daily", "archive_test"):
            batch_op.drop_column(column)
