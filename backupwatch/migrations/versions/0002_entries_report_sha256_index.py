"""Index backup_entries.report_sha256: looking up a report's entries must not scan the table.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_backup_entries_report_sha256", "backup_entries", ["report_sha256"])


def downgrade() -> None:
    op.drop_index("ix_backup_entries_report_sha256", table_name="backup_entries")
