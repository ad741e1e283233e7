"""Alembic environment: always run on a connection handed in by `backupwatch.store.migrate`."""

from __future__ import annotations

from alembic import context

from backupwatch.store import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("backupwatch migrations run through backupwatch.store.migrate()")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
