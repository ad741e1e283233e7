"""Keep the schedules replaced while their cycles were still owed (issue 11, item 1).

`previous_schedules` holds `missing.Era` values as JSON (schedule, first owed cycle, replaced at);
`schedule_changed_at` is when the current schedule took effect. Both stay NULL except between a
schedule change that leaves cycles owed and the timer step that settles them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("expected_backup_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("previous_schedules", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("schedule_changed_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("expected_backup_jobs", schema=None) as batch_op:
        batch_op.drop_column("schedule_changed_at")
        batch_op.drop_column("previous_schedules")
