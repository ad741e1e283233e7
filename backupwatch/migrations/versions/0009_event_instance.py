"""SPEC §15: alerts marked by instance (`alert_events.instance`).

With several hosts on one database, an on-call person must know which host an alert is about
(which deposit root, which daemon to look at). Events written before this revision have NULL
and are shown without an instance.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("alert_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("instance", sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("alert_events", schema=None) as batch_op:
        batch_op.drop_column("instance")
