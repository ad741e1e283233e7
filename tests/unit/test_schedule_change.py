"""SPEC §2, §4: a schedule changed while the daemon was down (issue 11, item 1), store + timer.

The rule (`backupwatch/missing.py`): the change takes effect at the sync; the replaced schedule's
cycles whose deadline passed before it are still owed (MISSING after the waiting reports, unless a
report counts for them); the new schedule counts from its first cycle with a deadline after it.
Every test runs on SQLite and PostgreSQL, with the clock injected.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from alembic import command
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import inspect
from strategies import closed, downtimes, first_open, gaps, job_spec, moments, schedules
from structlog.testing import capture_logs
from support import World, database, drop, job_block, report, run_alembic, stage, utc

from backupwatch.enums import BackupEntryStatus, BackupFrequency, JobStatus
from backupwatch.missing import Cursor, assign_cycle
from backupwatch.pipeline import Outcome
from backupwatch.schedule import Schedule
from backupwatch.store import (
    ExpectedBackupJob,
    JobView,
    NewEntry,
    ProcessedReportRecord,
    Store,
)
from backupwatch.timer import MissingTimer

ACTIVATED = utc(2026, 11, 24, 10, 0)
STOPPED = utc(2026, 11, 24, 10, 0, 10)
RESTARTED = utc(2026, 11, 24, 20, 0)
SITE = "ACME_Lyon_Part-Dieu"
SALES, HR, STOCK = (f"ACME/Lyon/Part-Dieu/{db}" for db in ("sales", "hr", "stock"))
MISSING, SUCCESS = BackupEntryStatus.MISSING, BackupEntryStatus.SUCCESS


def jobs(stock_hour: int) -> str:
    """Three DAILY jobs at 13:00 (W = 60 min); `stock` at `stock_hour`."""
    return "".join(
        job_block("ACME", "Lyon", "Part-Dieu", db, expected_hour_utc=hour)
        for db, hour in (("sales", 13), ("hr", 13), ("stock", stock_hour))
    )


def stopped_at_ten(tmp_path: Path, url: str) -> World:
    """Activated at 10:00, the timer ran once more, then the daemon stopped at 10:00:10.

    Reports stay fresh, and cycles within the catch-up limit, for a week: the limit has its own
    tests (test_store.py, test_missing.py).
    """
    world = World.create(tmp_path, url, jobs(13), ACTIVATED, max_status_file_age_days=7)
    assert world.tick(STOPPED) == []
    return world


def history(world: World, label: str) -> list[tuple[datetime, BackupEntryStatus]]:
    return [(e.cycle, e.status) for e in world.history(label)]


def view(world: World, label: str, now: datetime) -> JobView:
    for row in world.store.job_views(now):
        if f"{row.company_name}/{row.city}/{row.neighborhood}/{row.database_name}" == label:
            return row
    raise KeyError(label)


def flagged(world: World, now: datetime) -> list[tuple[str, datetime]]:
    return sorted((f.label, f.cycle) for f in world.tick(now))


def dumps_of(*names: str) -> dict[str, bytes]:
    return {name: f"{name} dump".encode() for name in names}


def drop_report(world: World, made: datetime, *names: str) -> Path:
    site = world.site(SITE)
    blocks = {}
    for name, content in dumps_of(*names).items():
        stage(site, f"database/{name}.sql.gz", content)
        blocks[name] = database(f"database/{name}.sql.gz", content)
    return drop(site, report(SITE, made, blocks))


def test_the_replaced_schedules_closed_cycle_is_still_flagged(
    tmp_path: Path, database_url: str
) -> None:
    """Issue 11 item 1, as reported: `stock` moved from 13:00 to 11:00 while the daemon was down."""
    world = stopped_at_ten(tmp_path, database_url)

    world.restart(jobs(11), RESTARTED)

    today = utc(2026, 11, 24, 13)
    assert flagged(world, RESTARTED) == [(HR, today), (SALES, today), (STOCK, today)]
    assert history(world, STOCK) == [(today, MISSING)]
    (entry,) = world.history(STOCK)
    assert "previous schedule (DAILY at 13:00, window ±60 min)" in entry.message
    assert "replaced at 2026-11-24 20:00Z" in entry.message
    stock = view(world, STOCK, RESTARTED)
    assert stock.current_status is JobStatus.MISSING
    assert stock.next_deadline == utc(2026, 11, 25, 12)  # the new schedule counts from the change
    # Today's 11:00 of the new schedule closed before the change: never expected, never flagged.
    assert flagged(world, RESTARTED + timedelta(minutes=5)) == []
    assert flagged(world, utc(2026, 11, 25, 12)) == [(STOCK, utc(2026, 11, 25, 11))]
    assert history(world, STOCK) == [(utc(2026, 11, 25, 11), MISSING), (today, MISSING)]


def test_a_report_made_under_the_replaced_schedule_still_counts_for_its_cycle(
    tmp_path: Path, database_url: str
) -> None:
    """A 13:10 report waiting in D: recorded for 13:00 (the owed cycle), and no MISSING."""
    world = stopped_at_ten(tmp_path, database_url)
    path = drop_report(world, utc(2026, 11, 24, 13, 10), "sales", "hr", "stock")

    world.restart(jobs(11), RESTARTED)
    result = world.process(path, RESTARTED)  # the waiting reports come before the catch-up

    today = utc(2026, 11, 24, 13)
    assert result.outcome is Outcome.ACCEPTED
    assert [(e.cycle, e.status) for e in result.entries] == [(today, SUCCESS)] * 3
    assert flagged(world, RESTARTED) == []
    assert history(world, STOCK) == [(today, SUCCESS)]
    assert view(world, STOCK, RESTARTED).current_status is JobStatus.OK
    stored = world.validated / "ACME/Lyon/Part-Dieu/stock/20261124T1300Z_stock.sql.gz"
    assert stored.read_bytes() == b"stock dump"


def test_a_report_made_under_the_new_schedule_counts_for_its_cycle_and_13h_is_still_owed(
    tmp_path: Path, database_url: str
) -> None:
    """An 11:05 report of `stock` alone: 11:00 of the new schedule; 13:00 stays owed: MISSING.

    11:05 lies outside 13:00's window (SPEC §4), and the daemon cannot tell an agent that moved
    early from one that ran an extra backup and then missed 13:00: never skip silently.
    """
    world = stopped_at_ten(tmp_path, database_url)
    path = drop_report(world, utc(2026, 11, 24, 11, 5), "stock")

    world.restart(jobs(11), RESTARTED)
    result = world.process(path, RESTARTED)

    eleven, thirteen = utc(2026, 11, 24, 11), utc(2026, 11, 24, 13)
    assert [(e.cycle, e.status) for e in result.entries] == [(eleven, SUCCESS)]
    assert flagged(world, RESTARTED) == [(HR, thirteen), (SALES, thirteen), (STOCK, thirteen)]
    assert history(world, STOCK) == [(thirteen, MISSING), (eleven, SUCCESS)]
    assert view(world, STOCK, RESTARTED).current_status is JobStatus.MISSING
    assert view(world, STOCK, RESTARTED).last_success_at == utc(2026, 11, 24, 11, 5)


def test_a_later_hour_owes_the_old_cycle_not_the_new_ones_that_closed_before_the_change(
    tmp_path: Path, database_url: str
) -> None:
    """13:00 → 16:00 during the downtime: 13:00 is owed; 16:00 closed before the change."""
    world = stopped_at_ten(tmp_path, database_url)

    world.restart(jobs(16), RESTARTED)

    today = utc(2026, 11, 24, 13)
    assert flagged(world, RESTARTED) == [(HR, today), (SALES, today), (STOCK, today)]
    assert view(world, STOCK, RESTARTED).next_deadline == utc(2026, 11, 25, 17)
    tomorrow = utc(2026, 11, 25, 13)
    assert flagged(world, utc(2026, 11, 25, 17)) == [
        (HR, tomorrow),
        (SALES, tomorrow),
        (STOCK, utc(2026, 11, 25, 16)),
    ]


def test_the_sync_logs_one_line_per_schedule_change(tmp_path: Path, database_url: str) -> None:
    world = stopped_at_ten(tmp_path, database_url)

    with capture_logs() as logs:
        world.restart(jobs(11), RESTARTED)

    changes = [line for line in logs if line["event"] == "job.schedule_changed"]
    assert changes == [
        {
            "event": "job.schedule_changed",
            "log_level": "warning",
            "job": STOCK,
            "old": "DAILY at 13:00, window ±60 min",
            "new": "DAILY at 11:00, window ±60 min",
            "changed_at": "2026-11-24T20:00:00+00:00",
            "owed": 1,
            "first_cycle": "2026-11-25T11:00:00+00:00",
        }
    ]


def test_a_second_change_before_the_catch_up_loses_no_owed_cycle(
    tmp_path: Path, database_url: str
) -> None:
    """13:00 → 11:00 at a start that dies before its catch-up; the next start (the 26th, 08:00)
    brings 11:00 → 06:00. Owed: 13:00 of the 24th (first schedule) and 11:00 of the 25th (second,
    whose report waits in D); the 06:00 schedule counts from the 27th."""
    world = stopped_at_ten(tmp_path, database_url)
    world.restart(jobs(11), RESTARTED)
    path = drop_report(world, utc(2026, 11, 25, 11, 20), "stock")
    again = utc(2026, 11, 26, 8)

    world.restart(jobs(6), again)
    result = world.process(path, again)

    assert [(e.cycle, e.status) for e in result.entries] == [(utc(2026, 11, 25, 11), SUCCESS)]
    thirteen = [utc(2026, 11, 24, 13), utc(2026, 11, 25, 13)]
    assert flagged(world, again) == [
        *((HR, c) for c in thirteen),
        *((SALES, c) for c in thirteen),
        (STOCK, utc(2026, 11, 24, 13)),
    ]
    assert history(world, STOCK) == [
        (utc(2026, 11, 25, 11), SUCCESS),
        (utc(2026, 11, 24, 13), MISSING),
    ]
    stock = world.store.find_job(STOCK)
    assert stock is not None
    assert (stock.next_cycle_at, stock.next_deadline_at) == (
        utc(2026, 11, 27, 6),
        utc(2026, 11, 27, 7),
    )
    assert (stock.previous_schedules, stock.schedule_changed_at) == (None, None)


def test_migration_0003_adds_the_owed_schedule_columns_and_reverts(database_url: str) -> None:
    store = Store(database_url)
    try:
        store.migrate()
        store.sync_jobs([job_spec(jobs_schedule(13), "sales")], 60, ACTIVATED)
        columns = {c["name"] for c in inspect(store.engine).get_columns("expected_backup_jobs")}
        assert {"previous_schedules", "schedule_changed_at"} <= columns

        run_alembic(store, command.downgrade, "0002")
        columns = {c["name"] for c in inspect(store.engine).get_columns("expected_backup_jobs")}
        assert not {"previous_schedules", "schedule_changed_at"} & columns
        store.migrate()  # a 0002 database with its jobs, upgraded at start

        (sales,) = store.active_jobs()
        assert (sales.previous_schedules, sales.schedule_changed_at) == (None, None)
        flagged = MissingTimer(store, lambda: RESTARTED, timedelta(days=7)).run_once(RESTARTED)
        assert [f.cycle for f in flagged] == [utc(2026, 11, 24, 13)]
    finally:
        store.dispose()


def jobs_schedule(hour: int) -> Schedule:
    return Schedule(BackupFrequency.DAILY, hour)


# --------------------------------------------------------------------------- properties

NAMES = (f"db{n}" for n in itertools.count())  # one job per example, in one database per test


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    store = Store(database_url)
    store.migrate()
    yield store
    store.dispose()


def only_job(store: Store) -> ExpectedBackupJob:
    (found,) = store.active_jobs()
    return found


def tick(store: Store, now: datetime) -> list[datetime]:
    return sorted(
        f.cycle for f in MissingTimer(store, lambda: now, timedelta(days=30)).run_once(now)
    )


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    old=schedules(),
    new=schedules(),
    when=moments(2),
    downtime=downtimes(),
    live=st.booleans(),
    lasting=gaps(timedelta(days=2)),
    data=st.data(),
)
def test_random_changes_through_the_store_owe_every_closed_cycle_once(
    store: Store,
    old: Schedule,
    new: Schedule,
    when: list[datetime],
    downtime: timedelta,
    live: bool,
    lasting: timedelta,
    data: st.DataObject,
) -> None:
    """The pure properties of test_missing.py, through SQL, the compare-and-swap and the timer.

    Activation, the daemon runs until it stops (or, `live`, until the reload itself), the job
    file changes, the daemon syncs it at restart, some waiting reports of owed cycles are recorded,
    then the catch-up: every old cycle at or after activation whose deadline passed before the
    change has exactly one entry and nothing else has one; the cursor is the new schedule's first
    cycle with a deadline after the change; then the new schedule's cycles are flagged as usual.
    """
    activated, stopped = when
    restarted = stopped if live else stopped + downtime
    later = restarted + lasting
    name = next(NAMES)
    store.sync_jobs([job_spec(old, name)], 60, activated)
    tick(store, stopped)

    store.sync_jobs([job_spec(new, name)], 60, restarted)
    job = only_job(store)
    owed = sorted({c for era in job.previous_eras for c in era.owed()})
    assert not (live and owed)
    event("cycles owed" if owed else "nothing owed")
    reported = data.draw(st.sets(st.sampled_from(owed)) if owed else st.just(set[datetime]()))
    for n, made in enumerate(sorted(reported)):
        cycle = assign_cycle(job.schedule, job.previous_eras, made)  # JobRef.cycle_for
        assert cycle == made
        sha = hashlib.sha256(f"{name}-{n}".encode()).hexdigest()
        record = ProcessedReportRecord(sha, "ACME_Lyon_Part-Dieu", "STATUS.json", "accepted")
        assert store.record_report(record, [success(job.id, cycle, sha, made)], restarted)
    tick(store, restarted)

    expected = closed(old, activated, None, restarted)
    found = [(e.cycle, e.status) for e in store.history(job.id, None)]
    assert sorted(cycle for cycle, _ in found) == sorted(expected)  # one entry each, no other
    assert {cycle for cycle, status in found if status is SUCCESS} == reported
    job = only_job(store)
    first = first_open(new, restarted, activated)
    assert Cursor(job.next_cycle_at, job.next_deadline_at) == Cursor.at(new, first)
    assert (job.previous_schedules, job.schedule_changed_at) == (None, None)
    assert tick(store, later) == sorted(closed(new, activated, restarted, later) - expected)


def success(job_id: int, cycle: datetime, sha: str, made: datetime) -> NewEntry:
    return NewEntry(job_id, cycle, SUCCESS, "verified", report_sha256=sha, operation_timestamp=made)
