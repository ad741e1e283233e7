"""Index backup_entries by cycle: the status page's grid reads the last 14 days of every job in
one range scan (SPEC §12), instead of a pass over all history. The index holds every column the
grid reads (status, the unchanged flag, the id), so the scan never visits the table.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(
        "ix_backup_entries_cycle_job",
        "backup_entries",
        ["cycle", "job_id", "status", "unchanged_since_last_success", "id"],
    )


def downgrade() -> None:
    op.drop_index("ix_backup_entries_cycle_job", table_name="backup_entries")
