"""SPEC §2, §4, §6, §8: the SQL store on real SQLite and PostgreSQL, every instant injected.

`database_url` runs each test on both databases (each PostgreSQL test in a schema of its own).
MISSING is driven through `MissingTimer.run_once`, the very step the daemon runs, with `now` given.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, insert, inspect, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from support import utc

from backupwatch.enums import BackupEntryStatus, BackupFrequency, JobStatus
from backupwatch.jobs import JobSpec
from backupwatch.missing import Due
from backupwatch.store import (
    MIGRATION_LOCK_KEY,
    MIGRATIONS_DIR,
    BackupEntry,
    Base,
    DueJob,
    ExpectedBackupJob,
    JobView,
    NewEntry,
    ProcessedReport,
    ProcessedReportRecord,
    ReportHistory,
    Store,
    _Missing,
)
from backupwatch.timer import MissingTimer

T0 = utc(2026, 11, 24, 0, 0)  # a Tuesday; the DAILY jobs below expect 13:00, deadline 14:00
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
SECOND = timedelta(seconds=1)
MAX_AGE = timedelta(days=7)  # max_status_file_age_days; the catch-up limit has its own test
SALES = "ACME/Lyon/Part-Dieu/sales"
HR = "ACME/Lyon/Part-Dieu/hr"
TABLES = {"expected_backup_jobs", "backup_entries", "processed_reports"}


# --------------------------------------------------------------------------- builders


def spec(database: str = "sales", **keys: Any) -> JobSpec:
    """A job of the ACME Lyon Part-Dieu site; DAILY at 13:00 unless told otherwise."""
    keys.setdefault("frequency", "DAILY")
    if str(keys["frequency"]).upper() != "HOURLY":
        keys.setdefault("expected_hour_utc", 13)
    return JobSpec(
        company_name="ACME", city="Lyon", neighborhood="Part-Dieu", database_name=database, **keys
    )


def open_store(url: str) -> Store:
    store = Store(url)
    store.migrate()
    return store


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    store = open_store(database_url)
    yield store
    store.dispose()


def job(store: Store, label: str = SALES) -> ExpectedBackupJob:
    found = store.find_job(label)
    assert found is not None, label
    return found


def tick(store: Store, now: datetime, max_age: timedelta = MAX_AGE) -> list[tuple[str, datetime]]:
    """One step of the MISSING timer at `now`: (job label, cycle) of each entry it recorded."""
    flagged = MissingTimer(store, lambda: now, max_age).run_once(now)
    return sorted((f.label, f.cycle) for f in flagged)


def entries(store: Store, label: str = SALES) -> list[tuple[datetime, BackupEntryStatus]]:
    """A job's history, newest first, as (cycle, status)."""
    return [(e.cycle, e.status) for e in store.history(job(store, label).id, None)]


def count_missing(store: Store, job_id: int, cycle: datetime) -> int:
    with store.session() as session:
        return session.execute(
            select(func.count())
            .select_from(BackupEntry)
            .where(
                BackupEntry.job_id == job_id,
                BackupEntry.cycle == cycle,
                BackupEntry.status == BackupEntryStatus.MISSING,
            )
        ).scalar_one()


def outcome(
    job_id: int,
    cycle: datetime,
    sha: str,
    status: BackupEntryStatus = BackupEntryStatus.SUCCESS,
    at: datetime | None = None,
) -> NewEntry:
    """An entry as the pipeline would decide it for a report whose bytes hash to `sha`."""
    return NewEntry(
        job_id=job_id,
        cycle=cycle,
        status=status,
        message=f"{status.value} for the {cycle:%H:%M}Z cycle",
        report_name="STATUS.json",
        report_sha256=sha,
        operation_timestamp=at or cycle + timedelta(minutes=10),
        server_sha256="f" * 64 if status is BackupEntryStatus.SUCCESS else None,
        server_size=12345,
    )


def processed(sha: str) -> ProcessedReportRecord:
    return ProcessedReportRecord(sha, "ACME_Lyon_Part-Dieu", "STATUS.json", "accepted")


def sha(n: int) -> str:
    return f"{n:064x}"


def view(store: Store, now: datetime, label: str = SALES) -> JobView:
    for row in store.job_views(now):
        if f"{row.company_name}/{row.city}/{row.neighborhood}/{row.database_name}" == label:
            return row
    raise KeyError(label)


# --------------------------------------------------------------------------- migrations


def test_migrate_creates_the_schema_and_is_idempotent(database_url: str) -> None:
    store = Store(database_url)
    try:
        assert not TABLES & set(inspect(store.engine).get_table_names())

        store.migrate()
        store.migrate()  # a restart on an up-to-date database changes nothing

        assert TABLES | {"alembic_version"} <= set(inspect(store.engine).get_table_names())
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        head = ScriptDirectory.from_config(config).get_current_head()
        with store.engine.connect() as connection:
            assert MigrationContext.configure(connection).get_current_revision() == head
            versions = connection.execute(text("SELECT version_num FROM alembic_version"))
            assert [row[0] for row in versions] == [head]
        store.sync_jobs([spec()], 60, T0)  # and the schema is usable
        assert job(store).activated_at == T0
    finally:
        store.dispose()


# A daemon's start, up to its migration: imported, connected, then held until every process is
# ready, so that all of them reach `migrate()` together (what two daemons of a failover pair do).
MIGRATING_PROCESS = """
import sys
import alembic.command
from backupwatch.store import Store
store = Store(sys.argv[1])
with store.engine.connect():
    pass
print("ready", flush=True)
sys.stdin.readline()
store.migrate()
store.dispose()
"""


def migrate_in_processes(url: str, count: int) -> list[str]:
    """`count` real processes migrating one fresh database at the same moment; the stderr of
    each one that failed."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATING_PROCESS, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    for process in processes:
        assert process.stdout is not None
        assert process.stdout.readline() == "ready\n", process.communicate(timeout=30)[1]
    for process in processes:
        assert process.stdin is not None
        process.stdin.write("go\n")  # the barrier: every process is imported and connected
        process.stdin.flush()
    outcomes = [(p.communicate(timeout=120)[1], p.returncode) for p in processes]
    return [stderr for stderr, code in outcomes if code != 0]


def test_processes_migrating_a_fresh_database_together_all_succeed(database_url: str) -> None:
    """Issue 11: the second daemon of a pair died on CREATE TABLE alembic_version. Each must wait
    for the one migrating, then find the schema at head."""
    failures = migrate_in_processes(database_url, count=4)

    assert not failures, "\n".join(failures)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    head = ScriptDirectory.from_config(config).get_current_head()
    store = Store(database_url)
    try:
        with store.engine.connect() as connection:
            versions = connection.execute(text("SELECT version_num FROM alembic_version"))
            assert [row[0] for row in versions] == [head]
    finally:
        store.dispose()


def test_a_migration_waits_for_the_lock_of_its_own_schema_only(postgres_url: str) -> None:
    """Installations (and test runs) in other schemas of one database never wait for each
    other. The lock is held throughout; lock_timeout turns a wait into an error."""
    other_schema = f"{postgres_url.rpartition('%3D')[2]}_other"
    other_url = f"{postgres_url.rpartition('%3D')[0]}%3D{other_schema}"
    holder = Store(postgres_url)
    with holder.engine.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {other_schema}"))
    try:
        with holder.engine.begin() as connection:
            connection.execute(
                text("SELECT pg_advisory_xact_lock(hashtextextended(current_schema(), :key))"),
                {"key": MIGRATION_LOCK_KEY},
            )
            other = Store(f"{other_url}%20-clock_timeout%3D10s")
            other.migrate()  # not blocked
            other.dispose()
            same = Store(f"{postgres_url}%20-clock_timeout%3D200ms")
            with pytest.raises(OperationalError, match="lock timeout"):
                same.migrate()
            same.dispose()
    finally:
        with holder.engine.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {other_schema} CASCADE"))
        holder.dispose()


def test_orm_metadata_matches_the_migrated_schema(store: Store) -> None:
    with store.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        indexes = {ix["name"]: ix for ix in inspect(connection).get_indexes("backup_entries")}
    missing_once = indexes["uq_backup_entries_missing_once"]
    assert missing_once["unique"]
    assert missing_once["column_names"] == ["job_id", "cycle"]


def test_sqlite_runs_in_wal_mode_with_a_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "state" / "backupwatch.db"  # the folder is created on demand
    store = open_store(f"sqlite:///{path}")
    try:
        with store.engine.connect() as connection:
            assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar_one() >= 5000
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        store.dispose()
    plain = sqlite3.connect(path)  # WAL is a property of the file, seen by any other reader
    try:
        assert plain.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        plain.close()


# --------------------------------------------------------------------------- sync_jobs (§2)


def test_new_jobs_are_added_activated_now(store: Store) -> None:
    result = store.sync_jobs([spec("sales"), spec("hr", expected_hour_utc=20)], 60, T0)

    assert (result.added, result.changed, result.deactivated) == (2, 0, 0)
    sales, hr = job(store, SALES), job(store, HR)
    assert sales.active
    assert hr.active
    assert sales.activated_at == hr.activated_at == T0
    assert sales.deactivated_at is None
    assert (sales.next_cycle_at, sales.next_deadline_at) == (
        utc(2026, 11, 24, 13),
        utc(2026, 11, 24, 14),
    )
    assert (hr.next_cycle_at, hr.next_deadline_at) == (utc(2026, 11, 24, 20), utc(2026, 11, 24, 21))
    assert sales.window_minutes == 60
    assert sales.deposit_path == "ACME_Lyon_Part-Dieu"
    assert sales.schedule == spec("sales").schedule(60)


def test_unchanged_jobs_are_not_counted(store: Store) -> None:
    store.sync_jobs([spec("sales"), spec("hr")], 60, T0)
    before = job(store)

    result = store.sync_jobs([spec("sales"), spec("hr")], 60, T0 + HOUR)

    assert (result.added, result.changed, result.deactivated) == (0, 0, 0)
    after = job(store)
    assert after.id == before.id
    assert after.activated_at == T0
    assert after.updated_at == T0
    assert after.next_cycle_at == before.next_cycle_at


def test_a_changed_schedule_updates_in_place_keeps_history_and_recomputes_the_cursor(
    store: Store,
) -> None:
    store.sync_jobs([spec("sales"), spec("hr")], 60, T0)
    tick(store, utc(2026, 11, 24, 14, 0, 1))  # 24th 13:00 MISSING for both jobs
    before = job(store)
    now = utc(2026, 11, 24, 15)

    result = store.sync_jobs([spec("sales", expected_hour_utc=18), spec("hr")], 60, now)

    assert (result.added, result.changed, result.deactivated) == (0, 1, 0)
    after = job(store)
    assert after.id == before.id
    assert after.expected_hour_utc == 18
    assert after.activated_at == T0  # not a new job: its activation and history stay
    assert after.updated_at == now
    assert entries(store) == [(utc(2026, 11, 24, 13), BackupEntryStatus.MISSING)]
    assert (after.next_cycle_at, after.next_deadline_at) == (
        utc(2026, 11, 24, 18),
        utc(2026, 11, 24, 19),
    )
    assert tick(store, utc(2026, 11, 24, 19, 0, 1)) == [(SALES, utc(2026, 11, 24, 18))]


def test_a_changed_agent_or_path_counts_as_changed_and_keeps_the_cursor(store: Store) -> None:
    store.sync_jobs([spec("sales"), spec("hr")], 60, T0)
    before = job(store)
    later = utc(2026, 11, 24, 14, 30)  # 13:00's deadline passed, the timer has not run yet

    result = store.sync_jobs(
        [
            spec("sales", agent_id="acme-lyon-1", agent_deposit_path_template="lyon/{agent_id}"),
            spec("hr", final_storage_path_template="{database_name}/{cycle}_{staged_file_name}"),
        ],
        60,
        later,
    )

    assert (result.added, result.changed, result.deactivated) == (0, 2, 0)
    after = job(store)
    assert (after.agent_id, after.deposit_path) == ("acme-lyon-1", "lyon/acme-lyon-1")
    assert job(store, HR).final_storage_path_template.startswith("{database_name}/")
    assert after.next_cycle_at == before.next_cycle_at == utc(2026, 11, 24, 13)
    assert tick(store, later) == [(HR, utc(2026, 11, 24, 13)), (SALES, utc(2026, 11, 24, 13))]


def test_an_unlisted_job_becomes_inactive_keeps_its_history_and_is_never_missing_again(
    store: Store,
) -> None:
    store.sync_jobs([spec("sales"), spec("hr")], 60, T0)
    tick(store, utc(2026, 11, 24, 14, 0, 1))
    gone = utc(2026, 11, 24, 15)

    result = store.sync_jobs([spec("hr")], 60, gone)

    assert (result.added, result.changed, result.deactivated) == (0, 0, 1)
    sales = job(store)
    assert not sales.active
    assert sales.deactivated_at == gone
    assert (sales.next_cycle_at, sales.next_deadline_at) == (None, None)
    assert entries(store) == [(utc(2026, 11, 24, 13), BackupEntryStatus.MISSING)]
    assert tick(store, utc(2026, 11, 27, 14, 0, 1)) == [
        (HR, utc(2026, 11, 25, 13)),
        (HR, utc(2026, 11, 26, 13)),
        (HR, utc(2026, 11, 27, 13)),
    ]
    assert entries(store) == [(utc(2026, 11, 24, 13), BackupEntryStatus.MISSING)]
    # Still unlisted at the next reload: nothing to count, the deactivation time stays.
    again = store.sync_jobs([spec("hr")], 60, utc(2026, 11, 28))
    assert (again.added, again.changed, again.deactivated) == (0, 0, 0)
    assert job(store).deactivated_at == gone


def test_a_relisted_job_is_reactivated_fresh(store: Store) -> None:
    store.sync_jobs([spec("sales")], 60, T0)
    tick(store, utc(2026, 11, 24, 14, 0, 1))
    store.sync_jobs([], 60, utc(2026, 11, 24, 15))
    back = utc(2026, 11, 26, 13, 30)  # after the 26th's cycle, before its deadline

    result = store.sync_jobs([spec("sales")], 60, back)

    assert (result.added, result.changed, result.deactivated) == (0, 1, 0)
    sales = job(store)
    assert sales.active
    assert (sales.activated_at, sales.deactivated_at) == (back, None)
    assert sales.next_cycle_at == utc(2026, 11, 27, 13)
    # The 25th and 26th were before the reactivation: never MISSING, even on a late catch-up.
    assert tick(store, utc(2026, 11, 27, 14, 0, 1)) == [(SALES, utc(2026, 11, 27, 13))]
    assert [cycle for cycle, _ in entries(store)] == [utc(2026, 11, 27, 13), utc(2026, 11, 24, 13)]


def test_active_false_in_the_config_makes_a_job_inactive(store: Store) -> None:
    store.sync_jobs([spec("sales"), spec("hr", active=False)], 60, T0)
    assert not job(store, HR).active
    assert job(store, HR).next_deadline_at is None
    now = utc(2026, 11, 24, 12)

    result = store.sync_jobs([spec("sales", active=False), spec("hr", active=False)], 60, now)

    assert result.added == 0
    assert result.changed + result.deactivated == 1
    sales = job(store)
    assert not sales.active
    assert sales.deactivated_at == now
    assert (sales.next_cycle_at, sales.next_deadline_at) == (None, None)
    assert tick(store, utc(2026, 11, 26)) == []
    assert not any(v.active for v in store.job_views(now))
    assert store.active_jobs() == []


def test_a_default_window_change_reaches_jobs_without_an_override(store: Store) -> None:
    store.sync_jobs([spec("sales"), spec("hr", collection_window_minutes=15)], 60, T0)

    result = store.sync_jobs([spec("sales"), spec("hr", collection_window_minutes=15)], 30, T0)

    assert (result.added, result.changed, result.deactivated) == (0, 1, 0)
    sales, hr = job(store, SALES), job(store, HR)
    assert (sales.collection_window_minutes, sales.window_minutes) == (None, 30)
    assert (hr.collection_window_minutes, hr.window_minutes) == (15, 15)
    assert sales.next_deadline_at == utc(2026, 11, 24, 13, 30)
    assert hr.next_deadline_at == utc(2026, 11, 24, 13, 15)
    assert tick(store, utc(2026, 11, 24, 13, 29)) == [(HR, utc(2026, 11, 24, 13))]
    assert tick(store, utc(2026, 11, 24, 13, 30)) == [(SALES, utc(2026, 11, 24, 13))]


# --------------------------------------------------------------------------- MISSING (§4)


@pytest.mark.parametrize(
    ("activated", "first_flagged"),
    [
        (utc(2026, 11, 24, 13, 0), utc(2026, 11, 24, 13)),  # activated at the cycle: it counts
        (utc(2026, 11, 24, 13, 0, 1), utc(2026, 11, 25, 13)),  # a second later: it does not
    ],
)
def test_only_cycles_at_or_after_activation_count(
    store: Store, activated: datetime, first_flagged: datetime
) -> None:
    store.sync_jobs([spec()], 60, activated)

    flagged = tick(store, utc(2026, 11, 25, 14, 0, 1))

    assert flagged[0] == (SALES, first_flagged)
    assert [cycle for _, cycle in flagged][-1] == utc(2026, 11, 25, 13)


def test_nothing_before_the_deadline_then_missing_exactly_at_it(store: Store) -> None:
    store.sync_jobs([spec()], 60, T0)
    deadline = utc(2026, 11, 24, 14)

    assert tick(store, utc(2026, 11, 24, 13, 0)) == []
    assert tick(store, deadline - timedelta(microseconds=1)) == []
    assert entries(store) == []
    assert tick(store, deadline) == [(SALES, utc(2026, 11, 24, 13))]
    assert tick(store, deadline + SECOND) == []  # never twice
    (entry,) = store.history(job(store).id, None)
    assert entry.status is BackupEntryStatus.MISSING
    assert entry.recorded_at == deadline
    assert "2026-11-24 13:00" in entry.message
    assert "ACME_Lyon_Part-Dieu" in entry.message
    assert job(store).next_deadline_at == utc(2026, 11, 25, 14)


def test_catch_up_after_downtime_flags_each_missed_cycle_once(store: Store) -> None:
    hourly = spec(frequency="HOURLY", collection_window_minutes=10)
    store.sync_jobs([hourly], 60, T0)
    assert tick(store, utc(2026, 11, 24, 0, 10, 1)) == [(SALES, T0)]

    # The daemon is down from 00:11 to 05:11; on start it catches up, cycle by cycle.
    restart = utc(2026, 11, 24, 5, 11)
    store.sync_jobs([hourly], 60, restart)  # the start sequence syncs first: nothing changed

    assert tick(store, restart) == [(SALES, T0 + n * HOUR) for n in range(1, 6)]
    assert tick(store, restart) == []
    assert tick(store, restart + timedelta(minutes=30)) == []
    assert len(entries(store)) == 6
    assert job(store).next_deadline_at == utc(2026, 11, 24, 6, 10)


def test_catch_up_is_limited_to_max_status_file_age(store: Store) -> None:
    store.sync_jobs([spec(frequency="HOURLY", collection_window_minutes=10)], 60, T0)
    restart = utc(2026, 11, 27, 0, 30)  # down three days, reports older than one day are stale

    flagged = tick(store, restart, max_age=timedelta(days=1))

    # Deadlines (cycle + 10 min) within [26th 00:30, 27th 00:30]: cycles 26th 01:00 .. 27th 00:00.
    assert flagged == [(SALES, utc(2026, 11, 26, 1) + n * HOUR) for n in range(24)]
    assert tick(store, restart + timedelta(minutes=1), max_age=timedelta(days=30)) == []
    assert job(store).next_cycle_at == utc(2026, 11, 27, 1)


def test_a_cycle_that_has_an_entry_is_not_flagged(store: Store) -> None:
    store.sync_jobs([spec("sales"), spec("hr")], 60, T0)
    cycle = utc(2026, 11, 24, 13)
    sales = job(store).id
    assert store.record_report(processed(sha(1)), [outcome(sales, cycle, sha(1))], cycle)

    assert tick(store, utc(2026, 11, 24, 14, 0, 1)) == [(HR, cycle)]
    assert entries(store) == [(cycle, BackupEntryStatus.SUCCESS)]


def test_a_once_job_is_flagged_once_then_has_no_next_deadline(store: Store) -> None:
    store.sync_jobs([spec(frequency="ONCE", expected_date=date(2026, 11, 25))], 60, T0)
    assert view(store, T0).next_deadline == utc(2026, 11, 25, 14)

    assert tick(store, utc(2026, 11, 25, 14, 0, 1)) == [(SALES, utc(2026, 11, 25, 13))]
    assert tick(store, utc(2026, 12, 25)) == []
    once = job(store)
    assert (once.next_cycle_at, once.next_deadline_at) == (None, None)
    assert store.earliest_deadline() is None
    assert view(store, utc(2026, 11, 25, 14, 0, 1)).next_deadline is None
    assert view(store, utc(2026, 11, 25, 14, 0, 1)).current_status is JobStatus.MISSING


# --------------------------------------------------------------------------- the race (§4, §6)


def test_the_same_missing_raced_by_two_store_sessions_yields_one_entry(database_url: str) -> None:
    """Two daemons (two engines) and their threads race to flag the same cycles: one wins."""
    first, second = open_store(database_url), Store(database_url)
    try:
        first.sync_jobs([spec()], 60, T0)
        for day in range(3):
            cycle = utc(2026, 11, 24, 13) + day * DAY
            now = cycle + HOUR + SECOND
            racer = job(first)  # both daemons read the same cursor before racing
            assert racer.next_cycle_at == cycle
            wins = race(first, second, racer, cycle, now)
            assert sorted(wins) == [0] * 7 + [1]
            assert count_missing(second, racer.id, cycle) == 1
        assert [status for _, status in entries(first)] == [BackupEntryStatus.MISSING] * 3
    finally:
        first.dispose()
        second.dispose()


def race(
    first: Store, second: Store, racer: ExpectedBackupJob, cycle: datetime, now: datetime
) -> list[int]:
    """Eight threads, started together: half settle the job, half insert the MISSING row."""
    due_job = DueJob.of(racer)  # what the timer reads of it
    barrier = threading.Barrier(8)
    wins: list[int] = []
    errors: list[BaseException] = []

    def settle(store: Store) -> int:
        return sum(map(len, store.settle_jobs([due_job], now, now - MAX_AGE).values()))

    def insert(store: Store) -> int:
        with store.engine.begin() as connection:
            wanted = [_Missing(due_job, Due(cycle, racer.schedule), now)]
            return sum(map(len, store._flag_missing(connection, wanted).values()))

    def run(attempt: Callable[[Store], int], store: Store) -> None:
        try:
            barrier.wait(timeout=10)
            wins.append(attempt(store))
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(attempt, store))
        for attempt in (settle, insert)
        for store in (first, second)
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    return wins


def test_the_partial_unique_index_allows_one_missing_per_cycle(store: Store) -> None:
    store.sync_jobs([spec()], 60, T0)
    cycle = utc(2026, 11, 24, 13)
    row = {
        "job_id": job(store).id,
        "cycle": cycle,
        "status": "MISSING",
        "message": "inserted by hand",
        "recorded_at": cycle + HOUR,
        "unchanged_since_last_success": False,
    }
    with store.engine.begin() as connection:
        connection.execute(insert(BackupEntry).values(**row))

    with pytest.raises(IntegrityError), store.engine.begin() as connection:
        connection.execute(insert(BackupEntry).values(**row))

    with store.engine.begin() as connection:  # a real outcome may join the MISSING of its cycle
        connection.execute(insert(BackupEntry).values(**{**row, "status": "SUCCESS"}))
        connection.execute(insert(BackupEntry).values(**{**row, "status": "FAILED"}))
        connection.execute(insert(BackupEntry).values(**{**row, "cycle": cycle + DAY}))
    assert sorted(status for c, status in entries(store) if c == cycle) == sorted(
        [BackupEntryStatus.SUCCESS, BackupEntryStatus.FAILED, BackupEntryStatus.MISSING]
    )


# --------------------------------------------------------------------------- record_report (§5)


def test_the_same_report_bytes_record_once(store: Store) -> None:
    store.sync_jobs([spec()], 60, T0)
    sales, cycle = job(store).id, utc(2026, 11, 24, 13)
    entry = outcome(sales, cycle, sha(1))

    assert store.record_report(processed(sha(1)), [entry], utc(2026, 11, 24, 13, 15))
    assert not store.record_report(processed(sha(1)), [entry], utc(2026, 11, 24, 13, 20))

    assert entries(store) == [(cycle, BackupEntryStatus.SUCCESS)]
    (recorded,) = store.history(sales, None)
    assert recorded.recorded_at == utc(2026, 11, 24, 13, 15)
    assert store.report_processed(sha(1)) is True
    with store.reading() as session:
        done = session.get(ProcessedReport, sha(1))
        assert done is not None
        assert (done.outcome, done.processed_at) == ("accepted", utc(2026, 11, 24, 13, 15))
    assert [e.id for e in store.successes_of_report(sha(1))] == [recorded.id]
    assert store.recent_successes([sales]) == {sales: [("f" * 64, 12345)]}


def test_a_report_records_its_entries_and_its_processed_row_atomically(store: Store) -> None:
    store.sync_jobs([spec("sales"), spec("hr")], 60, T0)
    sales, hr, cycle = job(store, SALES).id, job(store, HR).id, utc(2026, 11, 24, 13)
    broken = [
        outcome(hr, cycle, sha(2)),
        outcome(sales, cycle, sha(2)),
        outcome(sales, cycle, sha(2), BackupEntryStatus.FAILED),  # (job, sha) twice: refused
    ]

    with pytest.raises(IntegrityError):
        store.record_report(processed(sha(2)), broken, utc(2026, 11, 24, 13, 15))

    assert store.report_processed(sha(2)) is False
    assert entries(store, SALES) == []
    assert entries(store, HR) == []
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(ProcessedReport)) == 0
    # Nothing half-done blocks the retry of the same bytes.
    assert store.record_report(processed(sha(2)), broken[:2], utc(2026, 11, 24, 13, 16))
    assert entries(store, SALES) == entries(store, HR) == [(cycle, BackupEntryStatus.SUCCESS)]


# --------------------------------------------------------------------------- queries (§4, §8)


def test_current_status_follows_the_newest_cycle_with_entries(store: Store) -> None:
    store.sync_jobs([spec("sales"), spec("hr")], 60, T0)
    sales, hr = job(store, SALES).id, job(store, HR).id
    day1, day2 = utc(2026, 11, 24, 13), utc(2026, 11, 25, 13)

    def status(label: str = SALES) -> JobStatus:
        return view(store, utc(2026, 11, 26), label).current_status

    assert status() is JobStatus.UNKNOWN  # no entries yet
    tick(store, day1 + HOUR)
    assert status() is JobStatus.MISSING
    # A late report still records its outcome; a real outcome outranks MISSING in its cycle.
    store.record_report(processed(sha(1)), [outcome(sales, day1, sha(1))], day1 + 2 * HOUR)
    assert status() is JobStatus.OK
    assert status(HR) is JobStatus.MISSING  # one job's entries are not another's
    tick(store, day2 + HOUR)
    assert status() is JobStatus.MISSING  # the older cycle's SUCCESS does not mask it
    # The newest cycle's latest entry decides.
    failed = outcome(sales, day2, sha(2), BackupEntryStatus.FAILED)
    store.record_report(processed(sha(2)), [failed], day2 + 2 * HOUR)
    assert status() is JobStatus.FAILED
    mismatch = outcome(sales, day2, sha(3), BackupEntryStatus.HASH_MISMATCH)
    store.record_report(processed(sha(3)), [mismatch], day2 + 3 * HOUR)
    assert status() is JobStatus.HASH_MISMATCH
    store.record_report(processed(sha(4)), [outcome(sales, day1, sha(4))], day2 + 4 * HOUR)
    assert status() is JobStatus.HASH_MISMATCH  # an old cycle's late entry changes nothing
    integrity = outcome(hr, day2, sha(5), BackupEntryStatus.TRANSFER_INTEGRITY_FAILED)
    store.record_report(processed(sha(5)), [integrity], day2 + 4 * HOUR)
    assert status(HR) is JobStatus.TRANSFER_INTEGRITY_FAILED


def test_last_success_and_next_deadline(store: Store) -> None:
    store.sync_jobs([spec("sales"), spec("hr", expected_hour_utc=20)], 60, T0)
    sales = job(store).id
    done = utc(2026, 11, 24, 13, 7)
    store.record_report(
        processed(sha(1)), [outcome(sales, utc(2026, 11, 24, 13), sha(1), at=done)], done
    )
    failed = outcome(sales, utc(2026, 11, 25, 13), sha(2), BackupEntryStatus.FAILED)
    store.record_report(processed(sha(2)), [failed], utc(2026, 11, 25, 13, 5))

    now = utc(2026, 11, 25, 15)
    assert view(store, now).last_success_at == done  # a later failure is not a success
    assert view(store, now, HR).last_success_at is None
    assert view(store, now).next_deadline == utc(2026, 11, 26, 14)
    assert view(store, now, HR).next_deadline == utc(2026, 11, 25, 21)
    # A deadline exactly at `now` is no longer ahead; one a microsecond later is.
    assert view(store, utc(2026, 11, 25, 21), HR).next_deadline == utc(2026, 11, 26, 21)
    tiny = utc(2026, 11, 25, 21) - timedelta(microseconds=1)
    assert view(store, tiny, HR).next_deadline == utc(2026, 11, 25, 21)
    assert view(store, T0).next_deadline == utc(2026, 11, 24, 14)
    assert view(store, T0).frequency is BackupFrequency.DAILY
    assert [v.database_name for v in store.job_views(now)] == ["hr", "sales"]


def test_next_deadline_is_none_for_inactive_and_finished_once_jobs(store: Store) -> None:
    once = spec("once", frequency="ONCE", expected_date=date(2026, 11, 24))
    store.sync_jobs([spec("sales"), spec("hr"), once], 60, T0)
    store.sync_jobs([spec("hr"), once], 60, T0 + HOUR)  # sales is no longer listed
    once_label = "ACME/Lyon/Part-Dieu/once"

    assert view(store, T0 + HOUR).next_deadline is None
    assert not view(store, T0 + HOUR).active
    assert view(store, T0 + HOUR, once_label).next_deadline == utc(2026, 11, 24, 14)
    assert view(store, utc(2026, 11, 24, 14), once_label).next_deadline is None
    assert view(store, utc(2026, 11, 24, 14), HR).next_deadline == utc(2026, 11, 25, 14)


def test_history_is_newest_first_with_a_limit(store: Store) -> None:
    store.sync_jobs([spec()], 60, T0)
    sales = job(store).id
    tick(store, utc(2026, 11, 26, 14, 0, 1))  # three MISSING: 24th, 25th, 26th
    store.record_report(
        processed(sha(1)), [outcome(sales, utc(2026, 11, 25, 13), sha(1))], utc(2026, 11, 27)
    )

    assert entries(store) == [
        (utc(2026, 11, 26, 13), BackupEntryStatus.MISSING),
        (utc(2026, 11, 25, 13), BackupEntryStatus.SUCCESS),
        (utc(2026, 11, 25, 13), BackupEntryStatus.MISSING),
        (utc(2026, 11, 24, 13), BackupEntryStatus.MISSING),
    ]
    limited = store.history(sales, 2)
    assert [(e.cycle, e.status) for e in limited] == entries(store)[:2]
    assert store.history(sales + 1000, None) == []


def test_find_job_by_id_or_by_company_city_neighborhood_database(store: Store) -> None:
    store.sync_jobs([spec("sales"), spec("hr")], 60, T0)
    sales = job(store, SALES)

    by_id = store.find_job(str(sales.id))
    assert by_id is not None
    assert (by_id.id, by_id.label) == (sales.id, SALES)
    hr = store.find_job(HR)
    assert hr is not None
    assert (hr.database_name, hr.id != sales.id) == ("hr", True)
    assert store.find_job(str(sales.id + 1000)) is None
    assert store.find_job("ACME/Lyon/Part-Dieu/nope") is None
    assert store.find_job("ACME/Lyon/Part-Dieu") is None
    assert store.find_job("ACME/Lyon/Part-Dieu/sales/extra") is None
    # A mistyped id is an unknown job (`backupwatchctl history` exits 1), never a crash.
    assert store.find_job("99999999999999999999") is None  # beyond a 64-bit INTEGER
    assert store.find_job("\u00b2") is None  # "²".isdigit() is True, but it is no id
    assert [j.label for j in store.all_jobs()] == [HR, SALES]


def test_a_schedule_changed_while_the_daemon_was_down_flags_the_old_schedules_owed_cycles(
    store: Store,
) -> None:
    """Down from before Tuesday's 14:00 deadline until Thursday 09:00; 13:00 became 06:00 meanwhile.

    The change takes effect at the sync (Thursday 09:00): the 13:00 cycles whose deadline passed
    before it are owed; the 06:00 schedule counts from its first cycle with a deadline after it.
    """
    store.sync_jobs([spec()], 60, T0)
    back = utc(2026, 11, 26, 9, 0)

    store.sync_jobs([spec(expected_hour_utc=6)], 60, back)  # synced at start, before catch-up
    flagged = MissingTimer(store, lambda: back, MAX_AGE).run_once(back)

    assert [f.cycle for f in flagged] == [utc(2026, 11, 24, 13, 0), utc(2026, 11, 25, 13, 0)]
    after = job(store)
    assert after.next_cycle_at == utc(2026, 11, 27, 6, 0)
    assert (after.previous_schedules, after.schedule_changed_at) == (None, None)


def test_a_schedule_changed_while_running_is_not_retroactive(store: Store) -> None:
    store.sync_jobs([spec()], 60, T0)
    now = utc(2026, 11, 24, 9, 30)

    store.sync_jobs([spec(expected_hour_utc=9)], 60, now)  # 09:00 today: its window is open

    assert MissingTimer(store, lambda: now, MAX_AGE).run_once(now) == []
    assert job(store).next_cycle_at == utc(2026, 11, 24, 9, 0)


def test_two_stores_syncing_the_same_new_jobs_at_once_both_succeed(database_url: str) -> None:
    stores = [open_store(database_url), open_store(database_url)]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def sync(store: Store) -> None:
        barrier.wait()
        try:
            store.sync_jobs([spec(), spec("hr")], 60, T0)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sync, args=(s,)) for s in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert len(stores[0].all_jobs()) == 2
    for store in stores:
        store.dispose()


def test_recent_successes_are_each_jobs_newest_first(store: Store) -> None:
    store.sync_jobs([spec(), spec("hr")], 60, T0)
    sales, hr = job(store).id, job(store, HR).id

    def success(job_id: int, cycle: datetime, sha: str, key: str) -> None:
        entry = NewEntry(
            job_id=job_id,
            cycle=cycle,
            status=BackupEntryStatus.SUCCESS,
            message="ok",
            report_sha256=key,
            server_sha256=sha,
        )
        assert store.record_report(
            ProcessedReportRecord(key, "site", "r.json", "accepted"), [entry], T0
        )

    success(sales, utc(2026, 11, 24, 13), "a" * 64, "1" * 64)
    success(sales, utc(2026, 11, 25, 13), "b" * 64, "2" * 64)

    assert store.recent_successes([sales, hr]) == {
        sales: [("b" * 64, None), ("a" * 64, None)],
        hr: [],
    }
    assert store.recent_successes([sales], limit=1) == {sales: [("b" * 64, None)]}
    assert store.recent_successes([]) == {}
    # What a report's judgement reads, in one transaction: its duplicate check, then these.
    assert store.report_history("9" * 64, [sales, hr], 1) == ReportHistory(
        False, {sales: [("b" * 64, None)], hr: []}
    )
    assert store.report_history("2" * 64, [sales]) == ReportHistory(True, {})


def test_sqlite_readers_do_not_wait_for_a_writer(tmp_path: Path) -> None:
    """A status query or a duplicate check must not queue behind a long write on SQLite."""
    store = open_store(f"sqlite:///{tmp_path}/db.sqlite")
    store.sync_jobs([spec()], 60, T0)
    writer = sqlite3.connect(tmp_path / "db.sqlite", timeout=0)
    writer.execute("BEGIN IMMEDIATE")
    try:
        assert [v.database_name for v in store.job_views(T0)] == ["sales"]
        assert store.report_processed("0" * 64) is False
    finally:
        writer.rollback()
        writer.close()
        store.dispose()


@pytest.mark.parametrize(
    "keys",
    [
        {"archive_test": False},
        {"keep_daily": 7},
        {"keep_weekly": 4},
        {"keep_monthly": 12},
        {"alert_channels": ["ops"]},
    ],
)
def test_a_sync_applies_a_change_of_any_job_key(store: Store, keys: dict[str, Any]) -> None:
    """Every configured column is compared: a key the comparison left out was never synced."""
    store.sync_jobs([spec()], 60, T0)
    result = store.sync_jobs([spec(**keys)], 60, T0 + DAY)
    assert result.changed == 1
    synced = job(store)
    for key, value in keys.items():
        assert getattr(synced, key) == value
