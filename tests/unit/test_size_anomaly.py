"""SPEC §13's size anomaly: a success much smaller than the median of the job's previous 7 is
recorded as SUCCESS with a warning and raises SUSPICIOUS through the outbox (both databases)."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text
from support import World, database, drop, job_block, report, stage, utc

from backupwatch.alerting import Routing
from backupwatch.enums import BackupEntryStatus
from backupwatch.store import AlertDelivery, AlertEvent, BackupEntry
from backupwatch.verdict import size_anomaly

AGENT = "ACME_Lyon_Part-Dieu"
JOBS = job_block("ACME", "Lyon", "Part-Dieu", "sales")
ACTIVATED = utc(2026, 11, 1, 0, 0)


def at(day: int) -> datetime:
    return utc(2026, 11, day, 13, 0)


@pytest.mark.parametrize(
    ("size", "previous", "ratio", "warns"),
    [
        (499, [1000] * 7, 0.5, True),
        (500, [1000] * 7, 0.5, False),  # exactly half is not smaller than half
        (10, [], 0.5, False),  # nothing to compare with
        (10, [1000], 0.5, True),
        (0, [1000] * 3, 0.0, False),  # a ratio of 0 never warns
        (400, [100, 100, 100, 100, 1000, 1000, 1000, 9999999], 0.5, False),  # the 8th is ignored
        (499, [10, 10, 10, 1000, 1000, 1000, 1000], 0.5, True),  # the median, not the mean
        (None, [1000], 0.5, False),
    ],
)
def test_size_anomaly_is_a_pure_rule(
    size: int | None, previous: list[int], ratio: float, warns: bool
) -> None:
    warning = size_anomaly(size, previous, ratio)
    assert (warning is not None) is warns
    if warning is not None:
        assert warning.startswith("; WARNING: ")
        assert "median" in warning


def send(w: World, day: int, size: int) -> BackupEntry:
    site = w.site(AGENT)
    content = (f"day {day:02d} ".encode() * size)[:size]
    staged = f"sales-{day:02d}.sql.gz"
    stage(site, staged, content)
    path = drop(
        site, report(AGENT, at(day) + timedelta(minutes=5), {"sales": database(staged, content)})
    )
    w.process(path, at(day) + timedelta(minutes=10))
    with w.store.reading() as session:
        newest = session.scalars(select(BackupEntry).order_by(BackupEntry.id.desc())).first()
    assert newest is not None
    return newest


def test_a_small_success_is_suspicious_once(tmp_path: Path, database_url: str) -> None:
    w = World.create(
        tmp_path,
        database_url,
        JOBS,
        ACTIVATED,
        max_status_file_age_days=40,
        extra_toml='[alerts]\nurls = ["json://127.0.0.1:9/x"]\n',
    )
    w.store.routing = Routing(channels=frozenset({"default"}))
    for day in range(1, 8):
        assert send(w, day, 1000 + day).status is BackupEntryStatus.SUCCESS
    fine = send(w, 8, 600)
    assert not fine.suspicious
    assert "WARNING" not in fine.message
    small = send(w, 9, 400)
    assert small.status is BackupEntryStatus.SUCCESS
    assert small.suspicious
    assert "WARNING: 400 bytes is less than 0.5 times the median size (1004 bytes)" in small.message
    with w.store.reading() as session:
        rows = session.execute(
            select(
                AlertEvent.kind, AlertEvent.cycle, AlertEvent.message, AlertDelivery.channel
            ).join(AlertDelivery, AlertDelivery.event_id == AlertEvent.id)
        ).all()
    assert [(r.kind, r.cycle, r.channel) for r in rows] == [("SUSPICIOUS", at(9), "default")]
    assert "400 bytes" in rows[0].message
    assert w.status("ACME/Lyon/Part-Dieu/sales", at(9)).value == "OK"
    # SPEC §11: `check` warns about a SUSPICIOUS latest success.
    from backupwatch.check import WARNING, Filters, judge

    views = [view.as_json() for view in w.store.job_views(at(9))]
    assert views[0]["suspicious"] is True
    verdict = judge(views, True, [], Filters())
    assert verdict.code == WARNING
    assert "SUSPICIOUS" in verdict.line
    assert "suspicious=1" in verdict.line


def test_previous_sizes_come_from_one_indexed_range(tmp_path: Path) -> None:
    """SQLite's plan for the query: a search of migration 0007's (job_id, status, cycle)."""
    w = World.create(tmp_path, f"sqlite:///{tmp_path}/b.db", JOBS, ACTIVATED)
    with w.store.engine.connect() as connection:
        plan = connection.execute(
            text(
                "EXPLAIN QUERY PLAN SELECT server_sha256, server_size FROM backup_entries "
                "WHERE job_id = 1 AND status = 'SUCCESS' ORDER BY cycle DESC, id DESC LIMIT 7"
            )
        ).all()
    details = " ".join(str(row[-1]) for row in plan)
    assert "ix_backup_entries_job_status_cycle" in details
