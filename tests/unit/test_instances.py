"""SPEC §1, §15: jobs belong to an instance; a sync touches only its own instance's jobs.

On the store, both databases (PostgreSQL for what only it allows: several instances), every
instant injected. The daemons themselves are in tests/integration/test_instances_daemon.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import select, update
from support import run_alembic, utc

from backupwatch.alerting import digest, grouped, single
from backupwatch.config import load_settings
from backupwatch.jobs import JobSpec
from backupwatch.locate import ConfigError
from backupwatch.outbox import Outbox
from backupwatch.store import ExpectedBackupJob, InstanceConflict, Store
from backupwatch.timer import MissingTimer

T0 = utc(2026, 11, 24, 0, 0)
DAY = 86400


def spec(site: str, database: str = "sales", **keys: Any) -> JobSpec:
    keys.setdefault("frequency", "DAILY")
    keys.setdefault("expected_hour_utc", 13)
    return JobSpec(
        company_name="ACME", city=site, neighborhood="Centre", database_name=database, **keys
    )


def open_store(url: str, instance: str | None) -> Store:
    store = Store(url)
    store.migrate()
    store.instance = instance
    return store


@pytest.fixture
def pair(postgres_url: str) -> Iterator[tuple[Store, Store]]:
    a, b = open_store(postgres_url, "a"), open_store(postgres_url, "b")
    yield a, b
    a.dispose()
    b.dispose()


def owners(store: Store) -> dict[str, tuple[str | None, bool]]:
    return {f"{v.city}/{v.database_name}": (v.instance, v.active) for v in store.job_views(T0)}


def test_each_instance_syncs_only_its_own_jobs(pair: tuple[Store, Store]) -> None:
    a, b = pair
    assert a.sync_jobs([spec("Lyon"), spec("Lyon", "hr")], 60, T0).added == 2
    assert b.sync_jobs([spec("Paris")], 60, T0).added == 1
    # a reload on b with no job at all deactivates b's, never a's
    result = b.sync_jobs([], 60, T0)
    assert (result.added, result.changed, result.deactivated) == (0, 0, 1)
    assert owners(a) == {
        "Lyon/sales": ("a", True),
        "Lyon/hr": ("a", True),
        "Paris/sales": ("b", False),
    }
    # the registry and the timer of each see their own jobs only; status sees all
    assert {j.city for j in a.active_jobs()} == {"Lyon"}
    assert b.active_jobs() == []
    assert [v.instance for v in a.job_views(T0, instance="b")] == ["b"]
    assert b.earliest_deadline() is None
    assert a.earliest_deadline() is not None
    late = utc(2026, 11, 25, 0, 0)
    assert {j.instance for j in a.due_jobs(late)} == {"a"}
    assert b.due_jobs(late) == []


def test_a_job_another_instance_owns_is_a_conflict_while_active_there(
    pair: tuple[Store, Store],
) -> None:
    a, b = pair
    a.sync_jobs([spec("Lyon")], 60, T0)
    result = b.sync_jobs([spec("Lyon"), spec("Paris")], 60, T0)
    assert result.added == 1
    assert len(result.conflicts) == 1
    assert "'a'" in result.conflicts[0]
    assert "ACME/Lyon/Centre/sales" in result.conflicts[0]
    assert owners(a)["Lyon/sales"] == ("a", True)
    # once a drops it, b takes it over (the site moved hosts); its history stays with the job
    a.sync_jobs([], 60, T0)
    result = b.sync_jobs([spec("Lyon"), spec("Paris")], 60, T0)
    assert (result.changed, result.conflicts) == (1, [])
    assert owners(a)["Lyon/sales"] == ("b", True)
    assert a.active_jobs() == []


def test_two_daemons_of_one_instance_share_its_jobs(postgres_url: str) -> None:
    """A failover pair: the same instance, the same job files; neither deactivates anything."""
    first, second = open_store(postgres_url, "pair"), open_store(postgres_url, "pair")
    try:
        assert first.sync_jobs([spec("Lyon")], 60, T0).added == 1
        result = second.sync_jobs([spec("Lyon")], 60, T0)
        assert (result.added, result.changed, result.deactivated) == (0, 0, 0)
        assert len(second.active_jobs()) == 1
    finally:
        first.dispose()
        second.dispose()


def test_jobs_of_an_older_version_are_adopted_by_the_first_sync(database_url: str) -> None:
    legacy = open_store(database_url, None)
    legacy.sync_jobs([spec("Lyon"), spec("Paris")], 60, T0)
    with legacy.session() as session:  # as migration 0008 leaves them
        session.execute(update(ExpectedBackupJob).values(instance=None))
    legacy.dispose()
    store = open_store(database_url, "host1")
    try:
        result = store.sync_jobs([spec("Lyon"), spec("Paris")], 60, T0)
        assert (result.added, result.changed, result.deactivated) == (0, 0, 0)
        assert set(owners(store).values()) == {("host1", True)}
    finally:
        store.dispose()


def test_sqlite_refuses_a_second_instance(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/one.db"
    first = open_store(url, "host1")
    first.sync_jobs([spec("Lyon")], 60, T0)
    second = open_store(url, "host2")
    try:
        with pytest.raises(InstanceConflict, match=r"'host1'.*'host2'.*one host"):
            second.sync_jobs([spec("Paris")], 60, T0)
        assert owners(first) == {"Lyon/sales": ("host1", True)}  # nothing changed
    finally:
        first.dispose()
        second.dispose()


def test_migration_0008_adds_the_column_and_its_downgrade_refuses_two_instances(
    postgres_url: str,
) -> None:
    store = Store(postgres_url)
    try:
        run_alembic(store, command.upgrade, "0005")
        run_alembic(store, command.upgrade, "0008")
        store.instance = "a"
        store.sync_jobs([spec("Lyon")], 60, T0)
        store.instance = "b"
        store.sync_jobs([spec("Paris")], 60, T0)
        with pytest.raises(RuntimeError, match="several instances share this database"):
            run_alembic(store, command.downgrade, "0005")
        store.instance = None
        with store.session() as session:
            session.execute(
                update(ExpectedBackupJob)
                .where(ExpectedBackupJob.city == "Paris")
                .values(instance="a")
            )
        run_alembic(store, command.downgrade, "0005")
        with store.engine.connect() as connection:
            rows = connection.exec_driver_sql("SELECT * FROM expected_backup_jobs").keys()
            assert "instance" not in list(rows)
        run_alembic(store, command.upgrade, "0008")
        with store.reading() as session:
            assert set(session.scalars(select(ExpectedBackupJob.instance))) == {None}
    finally:
        store.dispose()


def test_instance_defaults_to_the_host_name_and_is_checked(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "backupwatch.toml"
    path.write_text("")
    assert load_settings(path, {}).instance == socket.gethostname()
    assert load_settings(path, {"BACKUPWATCH_INSTANCE": "store-2"}).instance == "store-2"
    path.write_text('instance = "two words"\n')
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert caught.value.errors[0].startswith(f"{path}: instance: 'two words' is not")
    path.write_text("instance = 3\n")
    with pytest.raises(ConfigError, match="instance: expected a string"):
        load_settings(path, {})


def test_alerts_are_marked_by_instance(pair: tuple[Store, Store]) -> None:
    """SPEC §15: the alerts of any daemon cover all instances, marked by instance."""
    a, b = pair
    a.sync_jobs([spec("Lyon")], 60, T0)
    b.sync_jobs([spec("Paris")], 60, T0)
    due = utc(2026, 11, 24, 14, 1)
    for store in (a, b):
        assert MissingTimer(store, lambda: due, timedelta(days=1)).run_once(due)
    assert a.record_rejection("ACME_Lyon_Centre", "STATUS.json", "not valid JSON", due)

    texts = {(t.kind.value, t.site): t for t in (e.text for e in Outbox(b).recent(10))}

    assert {key: t.instance for key, t in texts.items()} == {
        ("MISSING", "ACME/Lyon/Centre"): "a",
        ("MISSING", "ACME/Paris/Centre"): "b",
        ("REJECTED", "ACME/Lyon/Centre"): "a",
    }
    assert "Instance: b" in single(texts["MISSING", "ACME/Paris/Centre"]).body
    body = grouped(list(texts.values())).body
    assert "ACME/Lyon/Centre [a]: 1 MISSING, 1 REJECTED" in body
    assert "ACME/Paris/Centre [b]: 1 MISSING" in body
    summary = digest(Outbox(a).digest_jobs(due), due).body
    assert "ACME/Paris/Centre/sales [b]: MISSING" in summary
