"""Initial schema: jobs, entries (one MISSING per cycle), processed reports.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "expected_backup_jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("company_name", sa.String(length=255), nullable=False),
        sa.Column("city", sa.String(length=255), nullable=False),
        sa.Column("neighborhood", sa.String(length=255), nullable=False),
        sa.Column("database_name", sa.String(length=255), nullable=False),
        sa.Column(
            "frequency",
            sa.Enum(
                "DAILY",
                "WEEKLY",
                "MONTHLY",
                "HOURLY",
                "ONCE",
                name="backup_frequency",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("expected_hour_utc", sa.Integer(), nullable=True),
        sa.Column("expected_minute_utc", sa.Integer(), nullable=False),
        sa.Column("days_of_week", sa.String(length=32), nullable=True),
        sa.Column("day_of_month", sa.Integer(), nullable=True),
        sa.Column("expected_date", sa.Date(), nullable=True),
        sa.Column("collection_window_minutes", sa.Integer(), nullable=True),
        sa.Column("window_minutes", sa.Integer(), nullable=False),
        sa.Column("agent_id", sa.String(length=255), nullable=False),
        sa.Column("deposit_path", sa.String(length=1024), nullable=False),
        sa.Column("agent_deposit_path_template", sa.String(length=1024), nullable=False),
        sa.Column("final_storage_path_template", sa.String(length=1024), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("activated_at", sa.DateTime(), nullable=False),
        sa.Column("deactivated_at", sa.DateTime(), nullable=True),
        sa.Column("config_source", sa.String(length=1024), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.Column("next_cycle_at", sa.DateTime(), nullable=True),
        sa.Column("next_deadline_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_expected_backup_jobs")),
        sa.UniqueConstraint(
            "company_name",
            "city",
            "neighborhood",
            "database_name",
            name=op.f("uq_expected_backup_jobs_company_name_city_neighborhood_database_name"),
        ),
    )
    with op.batch_alter_table("expected_backup_jobs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_expected_backup_jobs_deposit_path"), ["deposit_path"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_expected_backup_jobs_next_deadline_at"),
            ["next_deadline_at"],
            unique=False,
        )

    op.create_table(
        "processed_reports",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("site", sa.String(length=4096), nullable=False),
        sa.Column("report_name", sa.String(length=1024), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("processed_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_processed_reports")),
    )
    with op.batch_alter_table("processed_reports", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_processed_reports_processed_at"), ["processed_at"], unique=False
        )

    op.create_table(
        "backup_entries",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("cycle", sa.DateTime(), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "SUCCESS",
                "FAILED",
                "MISSING",
                "HASH_MISMATCH",
                "TRANSFER_INTEGRITY_FAILED",
                name="entry_status",
                native_enum=False,
                length=32,
            ),
            nullable=False,
        ),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(), nullable=False),
        sa.Column("report_name", sa.String(length=1024), nullable=True),
        sa.Column("report_sha256", sa.String(length=64), nullable=True),
        sa.Column("operation_start_time", sa.DateTime(), nullable=True),
        sa.Column("operation_timestamp", sa.DateTime(), nullable=True),
        sa.Column("backup_ok", sa.Boolean(), nullable=True),
        sa.Column("compress_ok", sa.Boolean(), nullable=True),
        sa.Column("transfer_ok", sa.Boolean(), nullable=True),
        sa.Column("agent_sha256", sa.String(length=64), nullable=True),
        sa.Column("agent_size", sa.BigInteger(), nullable=True),
        sa.Column("server_sha256", sa.String(length=64), nullable=True),
        sa.Column("server_size", sa.BigInteger(), nullable=True),
        sa.Column("staged_path", sa.String(length=4096), nullable=True),
        sa.Column("final_path", sa.String(length=4096), nullable=True),
        sa.Column("unchanged_since_last_success", sa.Boolean(), nullable=False),
        sa.Column("details", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["expected_backup_jobs.id"],
            name=op.f("fk_backup_entries_job_id_expected_backup_jobs"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_backup_entries")),
        sa.UniqueConstraint(
            "job_id", "report_sha256", name=op.f("uq_backup_entries_job_id_report_sha256")
        ),
    )
    with op.batch_alter_table("backup_entries", schema=None) as batch_op:
        batch_op.create_index("ix_backup_entries_job_cycle", ["job_id", "cycle"], unique=False)
        batch_op.create_index(
            "uq_backup_entries_missing_once",
            ["job_id", "cycle"],
            unique=True,
            sqlite_where=sa.text("status = 'MISSING'"),
            postgresql_where=sa.text("status = 'MISSING'"),
        )


def downgrade() -> None:
    with op.batch_alter_table("backup_entries", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_backup_entries_missing_once",
            sqlite_where=sa.text("status = 'MISSING'"),
            postgresql_where=sa.text("status = 'MISSING'"),
        )
        batch_op.drop_index("ix_backup_entries_job_cycle")

    op.drop_table("backup_entries")
    with op.batch_alter_table("processed_reports", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_processed_reports_processed_at"))

    op.drop_table("processed_reports")
    with op.batch_alter_table("expected_backup_jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_expected_backup_jobs_next_deadline_at"))
        batch_op.drop_index(batch_op.f("ix_expected_backup_jobs_deposit_path"))

    op.drop_table("expected_backup_jobs")
