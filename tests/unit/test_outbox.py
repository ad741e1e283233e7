"""SPEC §10's outbox: an event row written in the transaction that changes a job's state."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from support import World, database, drop, job_block, report, stage, utc

from backupwatch.alerting import Routing, transition
from backupwatch.enums import BackupEntryStatus, JobStatus
from backupwatch.pipeline import Outcome
from backupwatch.store import AlertDelivery, AlertEvent, NewEntry, ProcessedReportRecord, Store

ACTIVATED = utc(2026, 11, 24, 0, 0)
AGENT = "ACME_Lyon_Part-Dieu"
SALES = "ACME/Lyon/Part-Dieu/sales"
DAY = timedelta(days=1)
JOBS = job_block("ACME", "Lyon", "Part-Dieu", "sales") + job_block(
    "ACME", "Lyon", "Part-Dieu", "hr", alert_channels=["ops"]
)


CHANNELS = """
[alerts]
urls = ["json://127.0.0.1:9/default"]
[alerts.channels.ops]
urls = ["json://127.0.0.1:9/ops"]
"""


def world(tmp_path: Path, url: str, jobs: str = JOBS) -> World:
    w = World.create(
        tmp_path, url, jobs, ACTIVATED, extra_toml=CHANNELS, max_status_file_age_days=5
    )
    w.store.routing = Routing(channels=frozenset({"default", "ops"}))
    return w


def events(store: Store) -> list[tuple[str, str | None, datetime | None]]:
    with store.reading() as session:
        rows = session.scalars(select(AlertEvent).order_by(AlertEvent.id))
        return [(e.kind, e.job_label, e.cycle) for e in rows]


def deliveries(store: Store) -> list[tuple[str, str, str]]:
    with store.reading() as session:
        query = (
            select(AlertEvent.kind, AlertEvent.job_label, AlertDelivery.channel)
            .join(AlertDelivery, AlertDelivery.event_id == AlertEvent.id)
            .order_by(AlertDelivery.id)
        )
        return [(k, j or "", c) for k, j, c in session.execute(query)]


def send(w: World, when: datetime, content: bytes | None, *, name: str = "STATUS.json") -> Outcome:
    """A report for `sales` at `when`: a good one for `content`, a failed transfer for None."""
    site = w.site(AGENT)
    if content is None:
        db = database(None, None, transfer=False, error="disk full")
    else:
        staged = f"database/sales-{when:%d%H%M}.sql.gz"
        stage(site, staged, content)
        db = database(staged, content)
    path = drop(site, report(AGENT, when, {"sales": db}), name)
    return w.process(path, when + timedelta(minutes=5)).outcome


def at(day: int, hour: int = 13, minute: int = 0) -> datetime:
    return utc(2026, 11, 24 + day, hour, minute)


def test_state_changes_write_one_event_each(tmp_path: Path, database_url: str) -> None:
    w = world(tmp_path, database_url)

    assert send(w, at(0), b"day 0") is Outcome.ACCEPTED  # UNKNOWN -> OK: no event
    assert events(w.store) == []
    send(w, at(1), None)  # OK -> FAILED
    send(w, at(2), None)  # FAILED -> FAILED: no event
    send(w, at(3), b"day 3")  # FAILED -> OK: RECOVERED
    send(w, at(1, 13, 10), b"late", name="late.json")  # a late report for an older cycle

    assert events(w.store) == [("FAILED", SALES, at(1)), ("RECOVERED", SALES, at(3))]
    assert deliveries(w.store) == [("FAILED", SALES, "default"), ("RECOVERED", SALES, "default")]
    with w.store.reading() as session:
        failed, recovered = session.scalars(select(AlertEvent).order_by(AlertEvent.id))
    assert failed.since == at(1)
    assert "disk full" in failed.message
    assert recovered.since == at(1)  # not OK since the cycle of day 1


def test_a_late_success_for_a_missing_cycle_is_a_recovery(
    tmp_path: Path, database_url: str
) -> None:
    """The job's state after a report is worked out from its state before and the new entry
    (no second read): a success for the very cycle flagged MISSING is newer than the flag."""
    w = world(tmp_path, database_url)
    send(w, at(0), b"day 0")
    w.tick(at(1, 14, 1))  # day 1 flagged MISSING
    assert send(w, at(1, 13, 40), b"late day 1", name="late.json") is Outcome.ACCEPTED
    send(w, at(0, 13, 5), None, name="older.json")  # an older cycle: the state stays OK

    assert [e for e in events(w.store) if e[1] == SALES] == [
        ("MISSING", SALES, at(1)),
        ("RECOVERED", SALES, at(1)),
    ]


def test_an_unchanged_success_is_an_event(tmp_path: Path, database_url: str) -> None:
    w = world(tmp_path, database_url)
    send(w, at(0), b"same bytes")
    send(w, at(1), b"same bytes")
    assert events(w.store) == [("UNCHANGED", SALES, at(1))]


def test_missing_is_one_event_per_job_even_for_a_catch_up(
    tmp_path: Path, database_url: str
) -> None:
    w = world(tmp_path, database_url)
    flagged = w.tick(at(3, 14, 1))  # three days down: three MISSING cycles per job
    assert len(flagged) == 8
    assert sorted(events(w.store)) == [
        ("MISSING", "ACME/Lyon/Part-Dieu/hr", at(3)),
        ("MISSING", SALES, at(3)),
    ]
    # per the job's routing: sales has none (the default channel), hr goes to `ops`
    assert sorted(c for _, _, c in deliveries(w.store)) == ["default", "ops"]


def test_a_kind_that_is_not_on_is_written_without_deliveries(
    tmp_path: Path, database_url: str
) -> None:
    w = world(tmp_path, database_url)
    w.store.routing = Routing(channels=frozenset({"default"}), on=frozenset())
    w.tick(at(0, 14, 1))
    assert len(events(w.store)) == 2
    assert deliveries(w.store) == []


def test_a_paused_job_is_never_missing_and_sends_nothing(tmp_path: Path, database_url: str) -> None:
    w = world(tmp_path, database_url)
    job = w.store.find_job(SALES)
    assert job is not None
    w.store.pause([job.id], at(0, 12), at(2, 12), "maintenance")

    assert send(w, at(1, 13, 10), None) is Outcome.ACCEPTED  # recorded, even while paused
    w.tick(at(1, 14, 1))  # day 0's deadline lies inside the pause
    assert [e.status for e in w.history(SALES)] == [BackupEntryStatus.FAILED]
    assert all(label != SALES for _, label, _ in events(w.store))

    w.tick(at(2, 14, 1))  # the pause ended at 12:00: this deadline counts again
    assert [e.cycle for e in w.history(SALES) if e.status is BackupEntryStatus.MISSING] == [at(2)]
    assert ("MISSING", SALES, at(2)) in events(w.store)


def test_resume_ends_a_pause_and_the_paused_cycles_stay_unexpected(
    tmp_path: Path, database_url: str
) -> None:
    w = world(tmp_path, database_url)
    job = w.store.find_job(SALES)
    assert job is not None
    w.store.pause([job.id], at(0, 12), None, None)  # until resumed
    assert w.store.resume([job.id], at(1, 12)) == 1
    assert w.store.resume([job.id], at(1, 12)) == 0  # not paused any more

    w.tick(at(1, 14, 1))  # catch-up: day 0 was paused, day 1 was not
    missing = [e.cycle for e in w.history(SALES) if e.status is BackupEntryStatus.MISSING]
    assert missing == [at(1)]


def test_an_ack_holds_until_the_state_changes(tmp_path: Path, database_url: str) -> None:
    w = world(tmp_path, database_url)
    job = w.store.find_job(SALES)
    assert job is not None
    assert w.store.acknowledge(job.id, at(0), "nothing yet") is JobStatus.UNKNOWN
    w.tick(at(0, 14, 1))
    assert w.store.acknowledge(job.id, at(0, 15), "on it") is JobStatus.MISSING
    w.tick(at(1, 14, 1))  # MISSING -> MISSING: still acknowledged
    assert acked(w.store) == "on it"
    send(w, at(2), None)  # MISSING -> FAILED: a new state, the ack is gone
    assert acked(w.store) is None


def acked(store: Store) -> str | None:
    view = next(v for v in store.job_views(at(5)) if v.database_name == "sales")
    return view.ack_reason


def test_a_rejection_is_one_event_per_site_and_hour_written_before_the_move(
    tmp_path: Path, database_url: str
) -> None:
    w = world(tmp_path, database_url)
    site = w.site(AGENT)
    first = drop(site, b"not json", "a.json")
    assert w.process(first, at(0, 10, 1)).outcome is Outcome.REJECTED
    second = drop(site, b"not json either", "b.json")
    assert w.process(second, at(0, 10, 59)).outcome is Outcome.REJECTED
    (site / "_rejected").rename(site / "_rejected.old")
    (site / "_rejected").write_text("not a folder: the move fails")
    third = drop(site, b"{", "c.json")
    assert w.process(third, at(0, 11, 0)).outcome is Outcome.PARKED

    assert events(w.store) == [("REJECTED", None, None), ("REJECTED", None, None)]
    with w.store.reading() as session:
        rows = list(session.scalars(select(AlertEvent).order_by(AlertEvent.id)))
    assert rows[0].site == "ACME/Lyon/Part-Dieu"
    assert "a.json" in rows[0].message
    assert "c.json" in rows[1].message  # committed although the report could not be moved
    assert sorted(c for _, _, c in deliveries(w.store)) == ["default", "default", "ops", "ops"]


def test_the_same_transition_raced_by_two_stores_is_one_event(
    tmp_path: Path, postgres_url: str
) -> None:
    """Two daemons record failing reports for one cycle at once: one FAILED event."""
    w = world(tmp_path, postgres_url)
    job = w.store.find_job(SALES)
    assert job is not None
    stores = [w.store, Store(postgres_url)]
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def record(n: int) -> None:
        sha = f"{n:064x}"
        entry = NewEntry(job.id, at(1), BackupEntryStatus.FAILED, f"fail {n}", report_sha256=sha)
        record = ProcessedReportRecord(sha, AGENT, f"r{n}.json", "accepted")
        try:
            barrier.wait(timeout=10)
            stores[n % 2].record_report(record, [entry], at(1))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=record, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    stores[1].dispose()
    assert errors == []
    assert len(w.history(SALES)) == 8
    assert events(w.store) == [("FAILED", SALES, at(1))]


@pytest.mark.parametrize(
    ("before", "after", "kind"),
    [
        (JobStatus.UNKNOWN, JobStatus.OK, None),
        (JobStatus.UNKNOWN, JobStatus.MISSING, "MISSING"),
        (JobStatus.OK, JobStatus.FAILED, "FAILED"),
        (JobStatus.FAILED, JobStatus.MISSING, "MISSING"),
        (JobStatus.MISSING, JobStatus.MISSING, None),
        (JobStatus.HASH_MISMATCH, JobStatus.OK, "RECOVERED"),
        (JobStatus.OK, JobStatus.OK, None),
    ],
)
def test_transitions(before: JobStatus, after: JobStatus, kind: str | None) -> None:
    found = transition(before, after)
    assert (found.value if found else None) == kind
