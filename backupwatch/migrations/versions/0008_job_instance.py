"""SPEC §15: which daemon's jobs these are (`expected_backup_jobs.instance`).

Rows written before this revision have NULL: the first daemon that syncs with the new version
adopts them (`Store.sync_jobs`: one conditional UPDATE ... WHERE instance IS NULL), which is
what a database with one host has always meant.

Downgrade drops the column only while at most one instance owns jobs: with two, the older
schema would let either host's sync deactivate the other's jobs, so it is refused with what
to do instead (stop all but one host, or remove the other hosts' jobs first).

Self-contained on purpose: it touches no table or column of another revision, so that its
`down_revision` can be re-chained at merge.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("expected_backup_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("instance", sa.String(length=255), nullable=True))
        batch_op.create_index(
            "ix_expected_backup_jobs_instance_deadline",
            ["instance", "active", "next_deadline_at"],
        )


def downgrade() -> None:
    owners = op.get_bind().execute(
        sa.text("SELECT DISTINCT instance FROM expected_backup_jobs WHERE instance IS NOT NULL")
    )
    names = sorted(str(row[0]) for row in owners)
    if len(names) > 1:
        raise RuntimeError(
            "cannot downgrade below revision 0008: jobs of several instances share this "
            f"database ({', '.join(names)}), and the older schema would let each host's sync "
            "deactivate the others' jobs. Stop all hosts but one and delete the other "
            "instances' jobs first (or keep this version)."
        )
    with op.batch_alter_table("expected_backup_jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_expected_backup_jobs_instance_deadline")
        batch_op.drop_column("instance")
