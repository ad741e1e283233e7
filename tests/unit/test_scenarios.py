"""The seed's six test scenarios (seed §4.1), through the pipeline and the timer, clock injected."""

from __future__ import annotations

import json
from pathlib import Path

from support import World, database, drop, job_block, report, stage, utc

from backupwatch.enums import BackupEntryStatus, JobStatus
from backupwatch.pipeline import Outcome

ACTIVATED = utc(2026, 11, 24, 0, 0)
PART_DIEU = "ACME_Lyon_Part-Dieu"
SALES, HR = "ACME/Lyon/Part-Dieu/sales", "ACME/Lyon/Part-Dieu/hr"
JOBS = job_block("ACME", "Lyon", "Part-Dieu", "sales") + job_block(
    "ACME", "Lyon", "Part-Dieu", "hr"
)


def world(tmp_path: Path, url: str, jobs: str = JOBS) -> World:
    return World.create(tmp_path, url, jobs, ACTIVATED)


def test_scenario_1_two_databases_ok(tmp_path: Path, database_url: str) -> None:
    w = world(tmp_path, database_url)
    site = w.site(PART_DIEU)
    stage(site, "database/sales.sql.gz", b"sales dump")
    stage(site, "database/hr.sql.gz", b"hr dump")
    path = drop(
        site,
        report(
            PART_DIEU,
            utc(2026, 11, 24, 13, 10),
            {
                "sales": database("database/sales.sql.gz", b"sales dump"),
                "hr": database("database/hr.sql.gz", b"hr dump"),
            },
        ),
    )

    result = w.process(path, utc(2026, 11, 24, 13, 15))

    assert result.outcome is Outcome.ACCEPTED
    assert [e.status for e in result.entries] == [BackupEntryStatus.SUCCESS] * 2
    assert w.status(SALES, utc(2026, 11, 24, 13, 15)) is JobStatus.OK
    assert w.status(HR, utc(2026, 11, 24, 13, 15)) is JobStatus.OK
    final = w.validated / "ACME/Lyon/Part-Dieu/sales/20261124T1300Z_sales.sql.gz"
    assert final.read_bytes() == b"sales dump"
    assert not (site / "database/sales.sql.gz").exists()
    assert not path.exists()
    assert (site / "_archive" / "STATUS.json").exists()
    assert w.tick(utc(2026, 11, 24, 14, 1)) == []  # both cycles have entries: nothing MISSING


def test_scenario_2_whole_site_missing(tmp_path: Path, database_url: str) -> None:
    w = world(tmp_path, database_url)

    assert w.tick(utc(2026, 11, 24, 13, 59, 59)) == []  # deadline 14:00 not yet passed
    flagged = w.tick(utc(2026, 11, 24, 14, 0, 1))

    assert sorted(f.label for f in flagged) == [HR, SALES]
    assert {f.cycle for f in flagged} == {utc(2026, 11, 24, 13, 0)}
    assert w.status(SALES, utc(2026, 11, 24, 14, 0, 1)) is JobStatus.MISSING
    assert w.status(HR, utc(2026, 11, 24, 14, 0, 1)) is JobStatus.MISSING
    assert w.tick(utc(2026, 11, 24, 14, 0, 2)) == []  # never twice for one cycle
    assert [e.status for e in w.history(SALES)] == [BackupEntryStatus.MISSING]


def test_scenario_3_failed_and_success_in_one_report(tmp_path: Path, database_url: str) -> None:
    w = world(tmp_path, database_url)
    site = w.site(PART_DIEU)
    stage(site, "database/sales.sql.gz", b"sales dump")
    stage(site, "database/hr.sql.gz", b"partial")
    path = drop(
        site,
        report(
            PART_DIEU,
            utc(2026, 11, 24, 13, 5),
            {
                "sales": database("database/sales.sql.gz", b"sales dump"),
                "hr": database("database/hr.sql.gz", b"partial", backup=False),
            },
        ),
    )

    result = w.process(path, utc(2026, 11, 24, 13, 6))

    statuses = {e.job_id: e.status for e in result.entries}
    assert sorted(statuses.values()) == [BackupEntryStatus.FAILED, BackupEntryStatus.SUCCESS]
    assert w.status(SALES, utc(2026, 11, 24, 13, 6)) is JobStatus.OK
    assert w.status(HR, utc(2026, 11, 24, 13, 6)) is JobStatus.FAILED
    assert (site / "database/hr.sql.gz").exists()  # a failed database's file stays in place
    assert "backup" in w.history(HR)[0].message


def test_scenario_4_status_file_too_old(tmp_path: Path, database_url: str) -> None:
    w = world(tmp_path, database_url)
    site = w.site(PART_DIEU)
    stage(site, "database/sales.sql.gz", b"old dump")
    path = drop(
        site,
        report(
            PART_DIEU,
            utc(2026, 11, 22, 13, 0),
            {
                "sales": database("database/sales.sql.gz", b"old dump"),
            },
        ),
    )

    result = w.process(path, utc(2026, 11, 24, 13, 30))

    assert result.outcome is Outcome.REJECTED
    assert "older than" in (result.reason or "")
    rejected = site / "_rejected" / "STATUS.json"
    assert rejected.exists()
    assert "older than" in (site / "_rejected" / "STATUS.json.reason.txt").read_text()
    assert w.history(SALES) == []
    flagged = w.tick(utc(2026, 11, 24, 14, 0, 1))
    assert {f.label for f in flagged} == {SALES, HR}  # the stale report does not count


def test_scenario_5_20h_job_scanned_early(tmp_path: Path, database_url: str) -> None:
    jobs = job_block("ACME", "Lyon", "Part-Dieu", "sales", expected_hour_utc=20)
    w = world(tmp_path, database_url, jobs)

    assert w.tick(utc(2026, 11, 24, 15, 0)) == []
    assert w.status(SALES, utc(2026, 11, 24, 15, 0)) is JobStatus.UNKNOWN
    (view,) = w.store.job_views(utc(2026, 11, 24, 15, 0))
    assert view.next_deadline == utc(2026, 11, 24, 21, 0)
    assert w.tick(utc(2026, 11, 24, 20, 59, 59)) == []
    assert len(w.tick(utc(2026, 11, 24, 21, 0, 0))) == 1


def test_scenario_6_report_outside_window_not_relevant(tmp_path: Path, database_url: str) -> None:
    w = world(tmp_path, database_url)
    site = w.site(PART_DIEU)
    stage(site, "database/sales.sql.gz", b"late dump")
    path = drop(
        site,
        report(
            PART_DIEU,
            utc(2026, 11, 24, 17, 0),
            {
                "sales": database("database/sales.sql.gz", b"late dump"),
            },
        ),
    )

    result = w.process(path, utc(2026, 11, 24, 17, 5))

    assert result.outcome is Outcome.ACCEPTED
    assert result.entries == []
    assert result.not_relevant == ["sales"]
    assert w.history(SALES) == []
    assert (site / "database/sales.sql.gz").exists()  # nothing done with an irrelevant file
    assert json.loads((site / "_archive" / "STATUS.json").read_text())["agent_id"] == PART_DIEU
    flagged = w.tick(utc(2026, 11, 24, 17, 6))
    assert {f.label for f in flagged} == {SALES, HR}
