"""Issue 10's group commit: several queued reports judged together, committed in one transaction.

`pipeline.process_group` on real files and both databases. Each report keeps its own outcome:
a duplicate, a report committed meanwhile by another daemon, a report whose commit fails, or
two reports of one site in one group end as they would one at a time, and nothing is promoted
without its committed entry (SPEC §5).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, OperationalError
from support import World, database, drop, job_block, report, stage, utc

import backupwatch.pipeline as pipeline
from backupwatch.enums import BackupEntryStatus
from backupwatch.pipeline import Outcome, Result, process_group, process_path
from backupwatch.store import BackupEntry, NewEntry, ProcessedReportRecord, Store

ACTIVATED = utc(2026, 11, 24, 0, 0)
SITES = ("North", "South", "East", "West")
JOBS = "".join(job_block("ACME", "Lyon", site, "sales") for site in SITES)
WHEN = utc(2026, 11, 24, 13, 10)
NOW = utc(2026, 11, 24, 13, 15)
FINAL = "ACME/Lyon/{site}/sales/20261124T{hour}00Z_sales-{hour}.sql.gz"


@pytest.fixture
def w(tmp_path: Path, database_url: str) -> World:
    return World.create(tmp_path, database_url, JOBS, ACTIVATED)


def agent(site: str) -> str:
    return f"ACME_Lyon_{site}"


def dump(site: str, hour: int = 13) -> bytes:
    return f"-- {site} dump of {hour}h\n".encode() * 200


def drop_report(w: World, site: str, hour: int = 13, name: str = "STATUS.json") -> Path:
    folder = w.site(agent(site))
    staged = f"database/sales-{hour}.sql.gz"
    stage(folder, staged, dump(site, hour))
    when = WHEN.replace(hour=hour)
    return drop(
        folder, report(agent(site), when, {"sales": database(staged, dump(site, hour))}), name
    )


def entries(w: World) -> list[BackupEntry]:
    with w.store.session() as session:
        return list(session.scalars(select(BackupEntry).order_by(BackupEntry.id)))


def final(w: World, site: str, hour: int = 13) -> Path:
    return w.validated / FINAL.format(site=site, hour=hour)


def archived(w: World, site: str) -> list[str]:
    folder = w.site(agent(site)) / "_archive"
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def outcome_of(item: Result | Exception) -> Outcome:
    assert isinstance(item, Result), item
    return item.outcome


class Calls:
    """Counts the Store's commits while letting them run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.groups: list[int] = []
        self.singles = 0
        real_group, real_single = Store.record_reports, Store.record_report

        def group(store: Store, reports: Any, now: Any) -> set[str]:
            self.groups.append(len(reports))
            return real_group(store, reports, now)

        def single(store: Store, record: Any, found: Any, now: Any) -> bool:
            self.singles += 1
            return real_single(store, record, found, now)

        monkeypatch.setattr(Store, "record_reports", group)
        monkeypatch.setattr(Store, "record_report", single)


def test_a_group_is_committed_in_one_transaction(w: World, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [drop_report(w, site) for site in SITES]
    calls = Calls(monkeypatch)

    outcomes = process_group(w.ctx, paths, NOW)

    assert [outcome_of(o) for o in outcomes] == [Outcome.ACCEPTED] * len(SITES)
    assert calls.groups == [len(SITES)]  # record_report's own group of one is not called
    assert [e.status for e in entries(w)] == [BackupEntryStatus.SUCCESS] * len(SITES)
    for site, path in zip(SITES, paths, strict=True):
        assert final(w, site).read_bytes() == dump(site)
        assert not path.exists()
        assert archived(w, site) == ["STATUS.json"]
        assert not (w.site(agent(site)) / "database/sales-13.sql.gz").exists()


def test_a_duplicate_in_a_group_is_finished_and_the_others_recorded(w: World) -> None:
    first = drop_report(w, "North")
    data = first.read_bytes()
    assert outcome_of(process_group(w.ctx, [first], NOW)[0]) is Outcome.ACCEPTED
    again = w.site(agent("North")) / "STATUS.json"
    again.write_bytes(data)  # the same bytes sent twice
    others = [drop_report(w, site) for site in SITES[1:]]

    outcomes = process_group(w.ctx, [again, *others], NOW)

    assert [outcome_of(o) for o in outcomes] == [Outcome.DUPLICATE] + [Outcome.ACCEPTED] * 3
    assert len(entries(w)) == len(SITES)  # the duplicate recorded nothing new
    assert not again.exists()
    assert len(archived(w, "North")) == 2


def test_a_report_committed_meanwhile_by_another_daemon_keeps_only_its_entries(
    w: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the group's history read and its commit another daemon records one report's
    bytes: that report becomes a duplicate, its own promotion taken back; the rest commit."""
    paths = [drop_report(w, site) for site in SITES]
    other = Store(w.settings.database_url)
    real = Store.record_reports

    def racing(store: Store, reports: Any, now: Any) -> set[str]:
        if len(reports) == 1:  # the other daemon's own commit
            return real(store, reports, now)
        record, _found = reports[1]
        raced = ProcessedReportRecord(record.sha256, record.site, record.report_name, "accepted")
        assert other.record_report(raced, [], now)  # its entries: none (a failed judgement)
        return real(store, reports, now)

    monkeypatch.setattr(Store, "record_reports", racing)
    try:
        outcomes = process_group(w.ctx, paths, NOW)
    finally:
        other.dispose()

    assert [outcome_of(o) for o in outcomes] == [
        Outcome.ACCEPTED,
        Outcome.DUPLICATE,
        Outcome.ACCEPTED,
        Outcome.ACCEPTED,
    ]
    assert sorted(e.final_path or "" for e in entries(w)) == sorted(
        str(final(w, site)) for site in SITES if site != SITES[1]
    )
    assert not final(w, SITES[1]).exists()  # no promoted file without its entry
    assert (w.site(agent(SITES[1])) / "database/sales-13.sql.gz").exists()  # left in D


def test_a_failed_group_commit_is_retried_per_report_and_one_failure_loses_no_other(
    w: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real IntegrityError (an entry naming no job) fails the group's transaction; each
    report is then committed alone: the bad one fails again and is taken back, the others
    are recorded once, and the bad one goes through when retried."""
    paths = [drop_report(w, site) for site in SITES]
    bad = agent(SITES[2])
    real_judge = pipeline._judge

    def judge(ctx: Any, site: Any, *args: Any) -> pipeline.Judged:
        judged = real_judge(ctx, site, *args)
        if site.folder.name == bad:
            entry: NewEntry = dataclasses.replace(judged.entry, job_id=987654321)
            return pipeline.Judged(entry, judged.promoted)
        return judged

    monkeypatch.setattr(pipeline, "_judge", judge)
    calls = Calls(monkeypatch)

    outcomes = process_group(w.ctx, paths, NOW)

    assert calls.groups == [len(SITES)] + [1] * len(SITES)  # record_report: a group of one
    assert calls.singles == len(SITES)
    assert isinstance(outcomes[2], IntegrityError)
    assert [outcome_of(o) for i, o in enumerate(outcomes) if i != 2] == [Outcome.ACCEPTED] * 3
    assert sorted(e.final_path or "" for e in entries(w)) == sorted(
        str(final(w, site)) for site in SITES if site != SITES[2]
    )
    assert not final(w, SITES[2]).exists()  # undone: no promoted file without its entry
    assert paths[2].exists()
    assert (w.site(bad) / "database/sales-13.sql.gz").exists()

    monkeypatch.setattr(pipeline, "_judge", real_judge)
    assert process_path(w.ctx, paths[2], NOW).outcome is Outcome.ACCEPTED
    assert len(entries(w)) == len(SITES)
    assert final(w, SITES[2]).read_bytes() == dump(SITES[2])


def test_two_reports_of_one_site_in_a_group_are_judged_one_after_the_other(w: World) -> None:
    """The second reads the first's entry as its previous success (SPEC §5's unchanged
    check), as it would one at a time: it waits for a later round of the group."""
    folder = w.site(agent("North"))
    first = drop_report(w, "North", hour=12)
    stage(folder, "database/sales-13.sql.gz", dump("North", 12))  # the same bytes again
    body = report(
        agent("North"), WHEN, {"sales": database("database/sales-13.sql.gz", dump("North", 12))}
    )
    second = drop(folder / "log", body, "STATUS.json")
    other = drop_report(w, "South")

    outcomes = process_group(w.ctx, [first, second, other], NOW)

    assert [outcome_of(o) for o in outcomes] == [Outcome.ACCEPTED] * 3
    north = [e for e in entries(w) if e.report_name and e.report_name.startswith(agent("North"))]
    assert [e.report_name for e in north] == [
        f"{agent('North')}/STATUS.json",
        f"{agent('North')}/log/STATUS.json",
    ]
    assert [e.unchanged_since_last_success for e in north] == [False, True]


def test_a_database_error_before_the_group_commit_takes_back_every_promotion(
    w: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database gone at commit time: each report gets the error (retried later by the
    handler), none keeps a promoted file, nothing is recorded."""
    paths = [drop_report(w, site) for site in SITES]

    def gone(store: Store, reports: Any, now: Any) -> set[str]:
        raise OperationalError("COMMIT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(Store, "record_reports", gone)

    outcomes = process_group(w.ctx, paths, NOW)

    assert all(isinstance(o, OperationalError) for o in outcomes)
    assert entries(w) == []
    assert not any(final(w, site).exists() for site in SITES)
    assert all(path.exists() for path in paths)
