"""SPEC §4: the MISSING timer, on SQLite and PostgreSQL, with a clock the test moves by hand.

No test sleeps to let time pass: `run_once(now)` is driven directly, and the thread's loop reads
an injected clock that the test advances, then waits for the outcome with a bounded poll.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest
import structlog
from sqlalchemy import event, insert, select
from sqlalchemy.exc import OperationalError
from support import utc

from backupwatch import timer as timer_module
from backupwatch.enums import BackupEntryStatus
from backupwatch.jobs import JobSpec
from backupwatch.store import SETTLE_PAGE, AlertEvent, BackupEntry, DueJob, ExpectedBackupJob, Store
from backupwatch.timer import BUSY_POLL, DEFER_LIMIT, MAX_SLEEP, Flagged, MissingTimer

T0 = utc(2026, 11, 24, 0, 0)
CYCLE = utc(2026, 11, 24, 13)  # the DAILY jobs below expect 13:00 with W = 60 min
DEADLINE = utc(2026, 11, 24, 14)
SECOND = timedelta(seconds=1)
MAX_AGE = timedelta(days=1)
SALES = "ACME/Lyon/Part-Dieu/sales"
BUSY_SITE, CALM_SITE = "ACME_Lyon_Part-Dieu", "ACME_Lyon_Vaise"


def spec(neighborhood: str = "Part-Dieu", database: str = "sales", **keys: Any) -> JobSpec:
    keys.setdefault("expected_hour_utc", 13)
    return JobSpec(
        company_name="ACME", city="Lyon", neighborhood=neighborhood, database_name=database, **keys
    )


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    store = Store(database_url)
    store.migrate()
    yield store
    store.dispose()


class Clock:
    """The injected clock: the test sets the time; the timer's reads are counted."""

    def __init__(self, now: datetime) -> None:
        self._now = now
        self._lock = threading.Lock()
        self.reads = 0

    def __call__(self) -> datetime:
        with self._lock:
            self.reads += 1
            return self._now

    def set(self, now: datetime) -> None:
        with self._lock:
            self._now = now


def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll `condition` until it holds or `timeout` real seconds have passed."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            return False
        pause.wait(0.01)
    return True


def missing_cycles(store: Store, label: str = SALES) -> list[datetime]:
    found = store.find_job(label)
    assert found is not None
    return [e.cycle for e in store.history(found.id, None) if e.status is BackupEntryStatus.MISSING]


# --------------------------------------------------------------------------- run_once


def test_run_once_flags_due_jobs_and_reports_them(store: Store) -> None:
    store.sync_jobs([spec(), spec("Vaise")], 60, T0)
    timer = MissingTimer(store, lambda: DEADLINE, MAX_AGE)

    assert timer.run_once(DEADLINE - SECOND) == []
    flagged = timer.run_once(DEADLINE)

    ids = {job.agent_id: job.id for job in store.active_jobs()}
    assert sorted(flagged, key=lambda f: f.site) == [
        Flagged(ids[BUSY_SITE], SALES, BUSY_SITE, CYCLE),
        Flagged(ids[CALM_SITE], "ACME/Lyon/Vaise/sales", CALM_SITE, CYCLE),
    ]
    assert timer.run_once(DEADLINE + SECOND) == []


def test_a_busy_site_defers_its_deadline_until_the_defer_limit(store: Store) -> None:
    store.sync_jobs([spec(), spec("Vaise")], 60, T0)
    asked: list[str] = []

    def site_busy(job: DueJob) -> bool:
        asked.append(job.deposit_path)
        return job.agent_id == BUSY_SITE  # a report of that site is queued: maybe the awaited one

    timer = MissingTimer(store, lambda: DEADLINE, MAX_AGE, site_busy)

    flagged = timer.run_once(DEADLINE + SECOND)
    assert [f.site for f in flagged] == [CALM_SITE]  # the other site is not held back
    assert missing_cycles(store) == []
    assert BUSY_SITE in asked
    assert timer.seconds_until_next(DEADLINE + SECOND) == BUSY_POLL  # poll the busy site soon

    assert timer.run_once(DEADLINE + DEFER_LIMIT) == []
    assert missing_cycles(store) == []

    flagged = timer.run_once(DEADLINE + DEFER_LIMIT + SECOND)
    assert [(f.label, f.cycle) for f in flagged] == [(SALES, CYCLE)]
    assert missing_cycles(store) == [CYCLE]
    assert timer.seconds_until_next(DEADLINE + DEFER_LIMIT + SECOND) == MAX_SLEEP


def test_a_site_that_is_no_longer_busy_is_flagged_at_once(store: Store) -> None:
    store.sync_jobs([spec()], 60, T0)
    busy = True
    timer = MissingTimer(store, lambda: DEADLINE, MAX_AGE, lambda _job: busy)

    assert timer.run_once(DEADLINE + SECOND) == []
    busy = False
    assert [f.cycle for f in timer.run_once(DEADLINE + 2 * SECOND)] == [CYCLE]


def test_seconds_until_next_is_the_time_to_the_earliest_deadline_capped(store: Store) -> None:
    timer = MissingTimer(store, lambda: T0, MAX_AGE)
    assert timer.seconds_until_next(T0) == MAX_SLEEP  # no job at all

    store.sync_jobs([spec(), spec("Vaise", expected_hour_utc=12)], 60, T0)
    earliest = utc(2026, 11, 24, 13)  # Vaise: 12:00 + W

    assert timer.seconds_until_next(earliest - 3 * SECOND) == 3.0
    assert timer.seconds_until_next(earliest - timedelta(milliseconds=250)) == 0.25
    assert timer.seconds_until_next(T0) == MAX_SLEEP  # hours away: capped, to re-read the index
    assert timer.seconds_until_next(earliest + SECOND) == 0.0  # overdue: no negative sleep
    timer.run_once(earliest)
    assert timer.seconds_until_next(DEADLINE - 2 * SECOND) == 2.0  # now Part-Dieu's is next


# --------------------------------------------------------------------------- the thread


def test_the_thread_flags_a_deadline_that_passes_while_it_runs(store: Store) -> None:
    store.sync_jobs([spec()], 60, T0)
    clock = Clock(DEADLINE - timedelta(minutes=30))  # half an hour ahead: it sleeps MAX_SLEEP
    timer = MissingTimer(store, clock, MAX_AGE)
    timer.start()
    try:
        assert timer.is_alive()
        assert eventually(lambda: clock.reads >= 1)
        assert missing_cycles(store) == []

        clock.set(DEADLINE + SECOND)
        timer.wake()  # as after a reload; the deadline passed while it slept

        assert eventually(lambda: missing_cycles(store) == [CYCLE])
        reads = clock.reads
        clock.set(DEADLINE + 2 * SECOND)
        timer.wake()
        assert eventually(lambda: clock.reads > reads)
        assert missing_cycles(store) == [CYCLE]  # once only
    finally:
        started = time.monotonic()
        timer.stop()
        stopped_in = time.monotonic() - started
    assert not timer.is_alive()
    assert stopped_in < 2.0  # it was asleep for up to MAX_SLEEP: stop() wakes it


def test_the_thread_sleeps_only_until_the_next_deadline(store: Store) -> None:
    store.sync_jobs([spec()], 60, T0)
    clock = Clock(DEADLINE - timedelta(milliseconds=200))  # due in 0.2 s by the injected clock
    timer = MissingTimer(store, clock, MAX_AGE)
    timer.start()
    try:
        assert eventually(lambda: clock.reads >= 1)
        clock.set(DEADLINE)  # no wake(): the loop comes back by itself when its sleep ends

        assert eventually(lambda: missing_cycles(store) == [CYCLE], timeout=MAX_SLEEP / 2)
    finally:
        timer.stop()
    assert not timer.is_alive()


@pytest.mark.parametrize(
    "failure",
    [
        OperationalError("SELECT", {}, Exception("server closed the connection")),
        RuntimeError("a bug"),
    ],
    ids=["database-error", "unexpected-error"],
)
def test_the_thread_survives_a_failing_step(
    store: Store, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    """A dead timer would never flag MISSING again: one failing pass must not stop it."""
    store.sync_jobs([spec()], 60, T0)
    monkeypatch.setattr(timer_module, "ERROR_BACKOFF", 0.01)
    real_due_jobs = store.due_jobs
    failures = iter([failure])

    def failing_once(
        now: datetime, limit: int = 500, after: tuple[datetime, int] | None = None
    ) -> list[DueJob]:
        pending = next(failures, None)
        if pending is not None:
            raise pending
        return real_due_jobs(now, limit, after)

    monkeypatch.setattr(store, "due_jobs", failing_once)
    clock = Clock(DEADLINE + SECOND)
    timer = MissingTimer(store, clock, MAX_AGE)
    timer.start()
    try:
        assert eventually(lambda: missing_cycles(store) == [CYCLE])
        assert timer.is_alive()
        assert clock.reads >= 2
    finally:
        timer.stop()


def test_busy_sites_filling_a_whole_page_do_not_hide_the_jobs_behind_them(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    busy = [spec(neighborhood=f"busy-{n}") for n in range(4)]
    store.sync_jobs([*busy, spec(neighborhood="calm", expected_hour_utc=12)], 60, T0)
    real_due_jobs = store.due_jobs

    def small_pages(
        now: datetime, limit: int = 500, after: tuple[datetime, int] | None = None
    ) -> list[DueJob]:
        return real_due_jobs(now, 2, after)  # pages of 2: the busy jobs fill two whole pages

    monkeypatch.setattr(store, "due_jobs", small_pages)
    timer = MissingTimer(store, lambda: DEADLINE, MAX_AGE, lambda j: "/calm/" not in j.label)

    flagged = timer.run_once(DEADLINE + SECOND)

    assert [f.label for f in flagged] == ["ACME/Lyon/calm/sales"]


# --------------------------------------------------------------------------- a wave of deadlines


def entry(store: Store, label: str, cycle: datetime, status: BackupEntryStatus) -> None:
    """An entry as a report (or an earlier MISSING) would have left it."""
    found = store.find_job(label)
    assert found is not None
    with store.engine.begin() as connection:
        connection.execute(
            insert(BackupEntry),
            {
                "job_id": found.id,
                "cycle": cycle,
                "status": status,
                "message": f"{status.value} by hand",
                "recorded_at": cycle,
                "unchanged_since_last_success": False,
            },
        )


def events(store: Store) -> dict[str, tuple[str, datetime | None]]:
    """The MISSING alert events by job label: (kind, since)."""
    with store.engine.connect() as connection:
        rows = connection.execute(select(AlertEvent.job_label, AlertEvent.kind, AlertEvent.since))
        return {row.job_label: (row.kind, row.since) for row in rows}


def test_one_page_settles_each_job_as_it_needs_in_one_call(store: Store) -> None:
    """Flagged, already reported, paused, acknowledged after a failure, changed since read:
    one `settle_jobs` call does the right thing for each (SPEC §4, §10, §11)."""
    names = ["plain", "reported", "paused", "acked", "changed"]
    specs = [spec(name) for name in names]
    store.sync_jobs(specs, 60, T0)
    label = {name: f"ACME/Lyon/{name}/sales" for name in names}
    entry(store, label["reported"], CYCLE, BackupEntryStatus.SUCCESS)
    entry(store, label["acked"], CYCLE - timedelta(days=1), BackupEntryStatus.FAILED)
    ids = {job.neighborhood: job.id for job in store.active_jobs()}
    assert store.acknowledge(ids["acked"], T0, "known") is not None
    store.pause([ids["paused"]], T0, None, "works")
    page = store.due_jobs(DEADLINE)
    assert len(page) == 5
    specs[-1] = spec("changed", collection_window_minutes=30)  # after the page was read
    store.sync_jobs(specs, 60, DEADLINE - SECOND)

    flagged = store.settle_jobs(page, DEADLINE, DEADLINE - MAX_AGE)

    assert flagged == {ids["plain"]: [CYCLE], ids["acked"]: [CYCLE]}
    assert events(store) == {
        label["plain"]: ("MISSING", CYCLE),
        label["acked"]: ("MISSING", CYCLE - timedelta(days=1)),  # the streak began then
    }
    acked = store.find_job(label["acked"])
    assert acked is not None
    assert acked.acked_at is None  # its state changed: the ack is done
    moved = {job.neighborhood: job.next_cycle_at for job in store.active_jobs()}
    assert moved == {
        "plain": CYCLE + timedelta(days=1),
        "reported": CYCLE + timedelta(days=1),
        "paused": CYCLE + timedelta(days=1),
        "acked": CYCLE + timedelta(days=1),
        "changed": moved["changed"],
    }
    assert missing_cycles(store, label["changed"]) == []  # the next pass plans it afresh
    assert store.settle_jobs(page, DEADLINE, DEADLINE - MAX_AGE) == {}  # each once


def test_a_wave_is_settled_a_page_at_a_time_in_a_few_statements(store: Store) -> None:
    """Two pages and one job more: every job flagged once, with its event, and the number of
    SQL statements bounded per page, not per job (issue 10: 100,000 deadlines in 60 s)."""
    jobs = 2 * SETTLE_PAGE + 1
    store.sync_jobs([spec(f"site-{n}") for n in range(jobs)], 60, T0)
    statements: list[str] = []
    event.listen(store.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))

    with structlog.testing.capture_logs() as logs:
        flagged = MissingTimer(store, lambda: DEADLINE, MAX_AGE).run_once(DEADLINE)

    assert sorted(f.job_id for f in flagged) == sorted(j.id for j in store.active_jobs())
    assert len(events(store)) == jobs
    # a page of 250 MISSING is one line (journald would drop most of a wave's lines)
    lines = [(line["event"], line.get("count")) for line in logs]
    many, single = ("entry.recorded_many", 250), ("entry.recorded", None)
    assert lines == [many, many, single]
    pages = 4  # the last one empty
    assert len(statements) <= pages * 14, statements[:60]  # one job at a time: over 4,000
    assert MissingTimer(store, lambda: DEADLINE, MAX_AGE).run_once(DEADLINE) == []


def test_a_job_locked_by_another_transaction_is_skipped_then_settled(postgres_url: str) -> None:
    """PostgreSQL: a row held by another transaction (another daemon of this instance settling
    it, a report being recorded) is skipped, not waited for; the next pass settles it."""
    store = Store(postgres_url)
    store.migrate()
    holder = Store(postgres_url)
    try:
        store.sync_jobs([spec(), spec("Vaise")], 60, T0)
        timer = MissingTimer(store, lambda: DEADLINE, MAX_AGE)
        held = store.find_job(SALES)
        assert held is not None
        with holder.engine.begin() as connection:
            connection.execute(
                select(ExpectedBackupJob.id)
                .where(ExpectedBackupJob.id == held.id)
                .with_for_update()
            )
            done: list[list[Flagged]] = []
            thread = threading.Thread(target=lambda: done.append(timer.run_once(DEADLINE)))
            thread.start()
            thread.join(timeout=30)
            finished = not thread.is_alive()
        thread.join()
        assert finished, "the timer waited for the held row"
        assert [f.label for f in done[0]] == ["ACME/Lyon/Vaise/sales"]
        assert store.earliest_deadline() == DEADLINE  # still due
        assert [f.label for f in timer.run_once(DEADLINE + SECOND)] == [SALES]
    finally:
        holder.dispose()
        store.dispose()


def test_a_long_wave_beats_the_heart_at_every_page(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wave of 100,000 deadlines takes a minute: each page is progress, not a wedge (the
    daemon stops its systemd pings when the timer's heart is stale)."""
    store.sync_jobs([spec(f"site-{n}") for n in range(SETTLE_PAGE + 1)], 60, T0)
    timer = MissingTimer(store, lambda: DEADLINE, MAX_AGE)
    seen: list[float] = []
    real_settle = store.settle_jobs

    def settle(
        jobs: Sequence[DueJob], now: datetime, oldest: datetime
    ) -> dict[int, list[datetime]]:
        seen.append(timer.heartbeat)
        return real_settle(jobs, now, oldest)

    monkeypatch.setattr(store, "settle_jobs", settle)
    timer.heartbeat = 0.0

    assert len(timer.run_once(DEADLINE)) == SETTLE_PAGE + 1

    assert len(seen) == 2
    assert seen[0] > 0.0
    assert seen[1] >= seen[0]
