"""Alerts (SPEC §10, §11): the outbox, its deliveries, and each job's routing, pause and ack.

`alert_events` holds one row per event, unique by `dedupe_key`, written in the transaction that
changes the job's state; `alert_deliveries` one row per (event, channel), claimed by the
delivery loop with a conditional UPDATE. On `expected_backup_jobs`: `alert_channels` (JSON list,
NULL: the unnamed channel), `paused_at`/`paused_until`/`pause_reason`, `acked_at`/`ack_reason`.

Self-contained on purpose: it touches no table or column of another revision, so that its
`down_revision` can be re-chained at merge.

Revision ID: 0005
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("expected_backup_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("alert_channels", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("paused_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("paused_until", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("pause_reason", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("acked_at", sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column("ack_reason", sa.Text(), nullable=True))
    op.create_table(
        "alert_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("dedupe_key", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=True),
        sa.Column("company", sa.String(length=255), nullable=True),
        sa.Column("site", sa.String(length=4096), nullable=False),
        sa.Column("job_label", sa.String(length=1024), nullable=True),
        sa.Column("agent_id", sa.String(length=255), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=True),
        sa.Column("cycle", sa.DateTime(), nullable=True),
        sa.Column("since", sa.DateTime(), nullable=True),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["expected_backup_jobs.id"],
            name=op.f("fk_alert_events_job_id_expected_backup_jobs"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_events")),
        sa.UniqueConstraint("dedupe_key", name=op.f("uq_alert_events_dedupe_key")),
    )
    op.create_index(op.f("ix_alert_events_job_id"), "alert_events", ["job_id"])
    op.create_index(op.f("ix_alert_events_created_at"), "alert_events", ["created_at"])
    op.create_table(
        "alert_deliveries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("event_id", sa.Integer(), nullable=False),
        sa.Column("channel", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("claimed_by", sa.String(length=255), nullable=True),
        sa.Column("claimed_until", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.Column("done_urls", sa.JSON(), nullable=True),
        sa.Column("batch", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["alert_events.id"],
            name=op.f("fk_alert_deliveries_event_id_alert_events"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_alert_deliveries")),
        sa.UniqueConstraint(
            "event_id", "channel", name=op.f("uq_alert_deliveries_event_id_channel")
        ),
    )
    op.create_index("ix_alert_deliveries_due", "alert_deliveries", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_alert_deliveries_due", table_name="alert_deliveries")
    op.drop_table("alert_deliveries")
    op.drop_index(op.f("ix_alert_events_created_at"), table_name="alert_events")
    op.drop_index(op.f("ix_alert_events_job_id"), table_name="alert_events")
    op.drop_table("alert_events")
    with op.batch_alter_table("expected_backup_jobs", schema=None) as batch_op:
        batch_op.drop_column("ack_reason")
        batch_op.drop_column("acked_at")
        batch_op.drop_column("pause_reason")
        batch_op.drop_column("paused_until")
        batch_op.drop_column("paused_at")
        batch_op.drop_column("alert_channels")
