"""Two daemons of a failover pair, started together on one fresh database (issue 11)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy
from daemonkit import Daemon, wait_for
from support import job_block

pytestmark = pytest.mark.integration

WAITING = sqlalchemy.text(
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE application_name LIKE 'bw_pair_%' AND wait_event_type = 'Lock'"
)


def waiting(engine: sqlalchemy.Engine) -> int:
    """Daemon connections waiting for a lock (a transaction of its own: pg_stat_activity is a
    snapshot taken once per transaction)."""
    with engine.connect() as connection:
        return int(connection.execute(WAITING).scalar_one())


def test_two_daemons_started_together_on_a_fresh_postgresql_schema_both_get_ready(
    make_daemon: Callable[..., Daemon], postgres_url: str, tmp_path: Path, short_dir: Path
) -> None:
    """Before the migration lock, the second one died on CREATE TABLE alembic_version.

    The test lines both up at that very statement: its own uncommitted alembic_version holds
    each daemon's CREATE TABLE (or, with the lock, the first one's; the second waits for the
    lock) until both are waiting; then it rolls back and lets them race."""
    jobs = job_block("ACME", "Lyon", "Part-Dieu", "sales")
    pair = [
        make_daemon(
            f"{postgres_url}&application_name=bw_pair_{name}",
            jobs,
            base=tmp_path / name,
            control_socket=str(short_dir / name),
        )
        for name in ("a", "b")
    ]
    gate = sqlalchemy.create_engine(postgres_url)
    try:
        with gate.connect() as held:
            held.execute(sqlalchemy.text("CREATE TABLE alembic_version (version_num text)"))
            for daemon in pair:
                daemon.start(wait_ready=False)
            wait_for(
                lambda: waiting(gate) == 2,
                timeout=60,
                what="both daemons waiting at their migration",
            )
            held.rollback()
    finally:
        gate.dispose()

    for daemon in pair:
        assert daemon.notify is not None
        daemon.notify.expect("READY=1")
    assert [len(daemon.ctl_json("status")["jobs"]) for daemon in pair] == [1, 1]
    assert [daemon.stop() for daemon in pair] == [0, 0]
