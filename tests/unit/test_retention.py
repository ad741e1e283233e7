"""SPEC §14: retention. The GFS rule as a pure function (hypothesis), then the pruning adapter
against real files and both databases with an injected clock: only files the daemon placed and
recorded, never one that changed, never a symlink, nothing outside the roots, each once even
with several pruners; entries by age in batches; `_archive/` and `_rejected/` by age; stale
uploads listed; the daemon's hourly step; `backupwatchctl prune`."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, update
from support import World, database, drop, job_block, report, stage, utc

from backupwatch import pruning
from backupwatch.enums import BackupEntryStatus
from backupwatch.pruning import Pruner
from backupwatch.retention import Backup, Keep, cutoffs, gfs_keep, gfs_prune, newest_first
from backupwatch.store import (
    AlertDelivery,
    AlertEvent,
    BackupEntry,
    ExpectedBackupJob,
    NewEntry,
    ProcessedReportRecord,
    Store,
)

# ----------------------------------------------------------------------- the pure rule

START = datetime(2024, 1, 1, tzinfo=UTC)
backups = st.lists(
    st.integers(min_value=0, max_value=3 * 366 * 24).map(lambda h: START + timedelta(hours=h)),
    max_size=60,
).map(lambda cycles: [Backup(n, cycle) for n, cycle in enumerate(cycles)])
keeps = st.builds(
    Keep,
    st.integers(min_value=0, max_value=10),
    st.integers(min_value=0, max_value=6),
    st.integers(min_value=0, max_value=6),
)


@settings(max_examples=120, deadline=None)
@given(backups, keeps)
def test_gfs_never_prunes_the_newest_nor_keeps_more_than_asked(
    listed: list[Backup], keep: Keep
) -> None:
    kept = gfs_keep(listed, keep)
    pruned = gfs_prune(listed, keep)
    assert {b.id for b in pruned} | kept == {b.id for b in listed}
    assert not {b.id for b in pruned} & kept
    if listed:
        assert newest_first(listed)[0].id in kept
        assert len(kept) <= max(1, keep.daily + keep.weekly + keep.monthly) + 1
        assert len(kept) <= keep.daily + keep.weekly + keep.monthly + 1


@settings(max_examples=120, deadline=None)
@given(backups, keeps)
def test_gfs_is_idempotent(listed: list[Backup], keep: Keep) -> None:
    kept = [b for b in listed if b.id in gfs_keep(listed, keep)]
    assert gfs_prune(kept, keep) == []


@settings(max_examples=120, deadline=None)
@given(backups, keeps)
def test_gfs_keeps_the_newest_of_each_asked_period(listed: list[Backup], keep: Keep) -> None:
    """Never more pruned than asked: the newest of each of the `daily` most recent days that
    have a backup is kept (and likewise for weeks and months)."""
    kept = gfs_keep(listed, keep)
    ordered = newest_first(listed)
    periods = (
        (keep.daily, lambda b: b.cycle.date()),
        (keep.weekly, lambda b: b.cycle.isocalendar()[:2]),
        (keep.monthly, lambda b: (b.cycle.year, b.cycle.month)),
    )
    for count, period in periods:
        newest: dict[object, int] = {}
        for b in ordered:
            newest.setdefault(period(b), b.id)
        for key in list(newest)[:count]:
            assert newest[key] in kept


def test_keep_resolves_the_jobs_counts_over_the_configs() -> None:
    assert Keep.resolve((None, None, None), (None, None, None)) is None
    assert Keep.resolve((7, None, None), (None, 4, None)) == Keep(7, 4, 0)
    assert Keep.resolve((None, None, None), (1, 2, 3)) == Keep(1, 2, 3)
    assert Keep.resolve((0, None, None), (1, 2, 3)) == Keep(0, 2, 3)


def test_report_keys_outlive_the_freshness_limit() -> None:
    now = utc(2026, 12, 1, 0, 0)
    limits = cutoffs(
        now, history_days=0.5, archive_days=30, stale_upload_hours=24, max_report_age_days=3
    )
    assert limits.reports == now - timedelta(days=4)
    assert limits.entries == now - timedelta(hours=12)


# --------------------------------------------------------------- against real files

AGENT = "ACME_Lyon_Part-Dieu"
SALES = "ACME/Lyon/Part-Dieu/sales"
ACTIVATED = utc(2026, 9, 30, 0, 0)
DAYS = 16


def day(n: int) -> datetime:
    return utc(2026, 10, 1, 13, 0) + timedelta(days=n)


def world(tmp_path: Path, url: str, **keys: object) -> World:
    jobs = job_block("ACME", "Lyon", "Part-Dieu", "sales", **keys)
    return World.create(tmp_path, url, jobs, ACTIVATED, size_drop_ratio=0)


def send(w: World, n: int) -> None:
    site = w.site(AGENT)
    content = f"dump of day {n}\n".encode() * 50
    name = f"sales-{n:02d}.sql.gz"
    stage(site, name, content)
    path = drop(
        site, report(AGENT, day(n) + timedelta(minutes=5), {"sales": database(name, content)})
    )
    w.process(path, day(n) + timedelta(minutes=10))


def successes(w: World) -> list[BackupEntry]:
    with w.store.reading() as session:
        query = (
            select(BackupEntry)
            .where(BackupEntry.status == BackupEntryStatus.SUCCESS)
            .order_by(BackupEntry.cycle)
        )
        return list(session.scalars(query))


def placed(entry: BackupEntry) -> str:
    """Where a success's file was placed (every success of these tests has one)."""
    assert entry.final_path is not None
    return entry.final_path


def final_files(w: World) -> set[str]:
    return {str(p) for p in w.validated.rglob("*") if p.is_file() and ".backupwatch" not in str(p)}


@pytest.fixture
def filled(tmp_path: Path, database_url: str) -> World:
    w = world(tmp_path, database_url, keep_daily=3, keep_weekly=2, keep_monthly=2)
    for n in range(DAYS):
        send(w, n)
    return w


def test_gfs_prunes_placed_files_once_and_says_so(filled: World) -> None:
    w = filled
    entries = successes(w)
    assert len(entries) == DAYS
    assert all(e.final_ino is not None and e.final_dev is not None for e in entries)
    keep = gfs_keep([Backup(e.id, e.cycle) for e in entries], Keep(3, 2, 2))
    now = day(DAYS)
    with structlog.testing.capture_logs() as logs:
        result = Pruner(w.store, w.settings, pause=0).run_once(now)
    expected = {placed(e) for e in entries if e.id not in keep}
    assert set(result.backups) == expected
    assert final_files(w) == {placed(e) for e in entries if e.id in keep}
    removed = [line for line in logs if line["event"] == "retention.removed"]
    assert sorted(line["path"] for line in removed) == sorted(expected)
    states = {e.id: e.final_removal for e in successes(w)}
    assert {i for i, s in states.items() if s == "removed"} == {
        e.id for e in entries if e.id not in keep
    }
    # Idempotent: a second run, and a dry one, find nothing more.
    assert Pruner(w.store, w.settings, pause=0).run_once(now).backups == []
    assert Pruner(w.store, w.settings, pause=0).run_once(now, dry_run=True).backups == []


def test_several_pruners_remove_each_file_once(filled: World) -> None:
    w = filled
    now = day(DAYS)
    dry = Pruner(w.store, w.settings).run_once(now, dry_run=True)
    assert dry.backups
    assert final_files(w) >= set(dry.backups)  # a dry run removes nothing
    results: list[list[str]] = []

    def run() -> None:
        store = Store(w.settings.database_url)  # a daemon of its own on the same database
        try:
            results.append(Pruner(store, w.settings, pause=0).run_once(now).backups)
        finally:
            store.dispose()

    threads = [threading.Thread(target=run) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    removed = [path for found in results for path in found]
    assert sorted(removed) == sorted(dry.backups)  # each once, all of them
    first = successes(w)[0]
    assert not w.store.claim_removal(first.id, now, now - timedelta(hours=1))


def test_a_changed_file_a_symlink_and_a_path_outside_are_kept(
    filled: World, tmp_path: Path
) -> None:
    w = filled
    old = successes(w)[:3]
    assert all(e.final_path for e in old)
    changed, linked, _ = (Path(e.final_path or "") for e in old)
    shutil.copy2(changed, changed.with_suffix(".tmp"))
    os.replace(changed.with_suffix(".tmp"), changed)  # same bytes, another inode
    elsewhere = tmp_path / "elsewhere.gz"
    elsewhere.write_bytes(b"not the daemon's")
    linked.unlink()
    linked.symlink_to(elsewhere)
    victim = tmp_path / "victim.gz"
    victim.write_bytes(b"outside every root")
    with w.store.session() as session:
        session.execute(
            update(BackupEntry).where(BackupEntry.id == old[2].id).values(final_path=str(victim))
        )
    with structlog.testing.capture_logs() as logs:
        result = Pruner(w.store, w.settings, pause=0).run_once(day(DAYS))
    assert changed.exists()
    assert linked.is_symlink()
    assert elsewhere.exists()
    assert victim.exists()
    assert sorted(result.kept_changed) == sorted([str(changed), str(linked), str(victim)])
    kept = [line for line in logs if line["event"] == "retention.kept"]
    assert len(kept) == 3
    assert {e.final_removal for e in successes(w)[:3]} == {"changed"}


def test_a_job_that_asks_nothing_prunes_no_backup(tmp_path: Path, database_url: str) -> None:
    w = world(tmp_path, database_url)
    for n in range(3):
        send(w, n)
    before = final_files(w)
    assert Pruner(w.store, w.settings, pause=0).run_once(day(30)).backups == []
    assert final_files(w) == before


# ------------------------------------------------------------------------- entries


def failed_days(w: World, days: int) -> ExpectedBackupJob:
    """SALES FAILED on each of the first `days` days, recorded as one report; the job."""
    job = w.store.find_job(SALES)
    assert job is not None
    old = [
        NewEntry(job.id, day(n), BackupEntryStatus.FAILED, f"day {n}", report_sha256=f"{n:064x}")
        for n in range(days)
    ]
    assert w.store.record_report(ProcessedReportRecord("a" * 64, "s", "r", "accepted"), old, day(0))
    return job


def test_old_entries_go_in_batches_each_job_keeping_its_newest(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pruning, "BATCH", 7)
    w = world(tmp_path, database_url)
    job = failed_days(w, 30)
    placed = NewEntry(
        job.id,
        day(1),
        BackupEntryStatus.SUCCESS,
        "placed",
        report_sha256="b" * 64,
        final_path="/x",
        final_ino=1,
        final_dev=1,
    )
    w.store.record_report(ProcessedReportRecord("b" * 64, "s", "r", "accepted"), [placed], day(1))
    now = day(29) + timedelta(days=w.settings.retention.history_days + 1)
    assert Pruner(w.store, w.settings, pause=0).run_once(now, dry_run=True).entries == 29
    with structlog.testing.capture_logs() as logs:
        result = Pruner(w.store, w.settings, pause=0).run_once(now)
    assert result.entries == 29
    assert result.reports == 2
    batches = [line["count"] for line in logs if line["event"] == "retention.entries_deleted"]
    assert batches == [7, 7, 7, 7, 1]
    left = w.history(SALES)
    assert sorted(e.message for e in left) == ["day 29", "placed"]


def test_old_entries_of_another_instances_jobs_are_left_to_it(
    tmp_path: Path, database_url: str
) -> None:
    """SPEC §14, §15: each host prunes its own jobs' entries, by its own `history_days`."""
    w = world(tmp_path, database_url)
    w.store.instance = "here"
    failed_days(w, 3)
    with w.store.session() as session:
        session.execute(update(ExpectedBackupJob).values(instance="elsewhere"))
    now = day(2) + timedelta(days=w.settings.retention.history_days + 1)

    assert Pruner(w.store, w.settings, pause=0).run_once(now).entries == 0
    assert len(w.history(SALES)) == 3
    w.store.instance = "elsewhere"
    assert Pruner(w.store, w.settings, pause=0).run_once(now).entries == 2


def alert_event(w: World, key: str, age: timedelta, instance: str | None, *states: str) -> None:
    """An alert event written `age` before `day(40)`, with one delivery per state."""
    created = day(40) - age
    with w.store.session() as session:
        event = AlertEvent(
            dedupe_key=key,
            kind="MISSING",
            site="ACME/Lyon/Part-Dieu",
            message=key,
            created_at=created,
            instance=instance,
        )
        session.add(event)
        session.flush()
        for n, state in enumerate(states):
            channel = f"channel-{n}"
            next_attempt = created
            session.add(
                AlertDelivery(
                    event_id=event.id, channel=channel, state=state, next_attempt_at=next_attempt
                )
            )


def alert_keys(w: World) -> set[str]:
    with w.store.reading() as session:
        return set(session.scalars(select(AlertEvent.dedupe_key)))


def test_old_alert_events_go_once_every_delivery_is_done(tmp_path: Path, database_url: str) -> None:
    """The outbox does not grow forever (a wave of 100,000 deadlines is 100,000 events and
    their deliveries): events older than the entries' cutoff go with their deliveries, once
    none of them is still pending or being sent; another instance's are left to it."""
    w = world(tmp_path, database_url)
    w.store.instance = "here"
    old = timedelta(days=w.settings.retention.history_days + 2)
    alert_event(w, "old-sent", old, "here", "sent", "failed")
    alert_event(w, "old-no-channel", old, "here")
    alert_event(w, "old-before-instances", old, None, "sent")
    alert_event(w, "old-pending", old, "here", "sent", "pending")
    alert_event(w, "old-sending", old, "here", "sending")
    alert_event(w, "old-elsewhere", old, "elsewhere", "sent")
    alert_event(w, "recent-sent", timedelta(days=1), "here", "sent")
    pruner = Pruner(w.store, w.settings, pause=0)

    assert pruner.run_once(day(40), dry_run=True).alerts == 3
    assert len(alert_keys(w)) == 7
    with structlog.testing.capture_logs() as logs:
        assert pruner.run_once(day(40)).alerts == 3
    assert alert_keys(w) == {"old-pending", "old-sending", "old-elsewhere", "recent-sent"}
    assert [line["count"] for line in logs if line["event"] == "retention.alerts_deleted"] == [3]
    with w.store.reading() as session:
        assert session.scalar(select(func.count()).select_from(AlertDelivery)) == 5
    assert pruner.run_once(day(40)).alerts == 0


# ------------------------------------------------------- _archive/, _rejected/, stale


def test_moved_files_go_by_age_never_a_symlink_nor_outside(
    tmp_path: Path, database_url: str
) -> None:
    w = world(tmp_path, database_url)
    site = w.site(AGENT)
    archive, rejected = site / "_archive", site / "_rejected"
    archive.mkdir(parents=True)
    rejected.mkdir()
    (archive / "STATUS-1.json").write_text("{}")
    (rejected / "bad.json").write_text("x")
    (rejected / "bad.json.reason.txt").write_text("why")
    outside = tmp_path / "outside.txt"
    outside.write_text("keep me")
    (archive / "link.json").symlink_to(outside)
    (site / "database").mkdir()
    (site / "database" / "forgotten.sql.gz").write_text("an upload nobody reported")
    now = datetime.now(UTC)
    assert Pruner(w.store, w.settings, pause=0).run_once(now).moved == []
    later = now + timedelta(days=31)
    result = Pruner(w.store, w.settings, pause=0).run_once(later)
    assert sorted(Path(p).name for p in result.moved) == [
        "STATUS-1.json",
        "bad.json",
        "bad.json.reason.txt",
    ]
    assert sorted(p.name for p in archive.iterdir()) == ["link.json"]
    assert outside.read_text() == "keep me"
    assert result.stale_uploads == [str(site / "database" / "forgotten.sql.gz")]
    assert (site / "database" / "forgotten.sql.gz").exists()
    # An agent that replaces _archive/ by a symlink out of D loses nothing outside.
    shutil.rmtree(archive)
    target = tmp_path / "target"
    target.mkdir()
    (target / "precious").write_text("x")
    archive.symlink_to(target)
    Pruner(w.store, w.settings, pause=0).run_once(later + timedelta(days=400))
    assert (target / "precious").exists()


# -------------------------------------------------------------- ctl and the daemon


def _three_placed(tmp_path: Path, database_url: str, **overrides: Any) -> World:
    """One job keeping a daily backup, and three days of its backups placed."""
    w = World.create(
        tmp_path,
        database_url,
        job_block("ACME", "Lyon", "Part-Dieu", "sales", keep_daily=1),
        ACTIVATED,
        size_drop_ratio=0,
        **overrides,
    )
    for n in range(3):
        send(w, n)
    return w


def _ctl_prune(w: World, *args: str) -> str:
    """`backupwatchctl prune` in process (exit 0 asserted); what it printed."""
    from backupwatch import ctl

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert ctl.main(["--config", str(w.settings.config_path), "prune", *args]) == 0
    return out.getvalue()


def test_backupwatchctl_prune_end_to_end(tmp_path: Path, database_url: str) -> None:
    w = _three_placed(
        tmp_path,
        database_url,
        extra_toml="[retention]\nhistory_days = 1\narchive_days = 0.000001\n",
    )
    files = final_files(w)
    assert len(files) == 3
    time.sleep(0.1)  # archive_days is 0.0864 s: the archived reports are old enough now
    assert "would remove: 2 validated backups" in _ctl_prune(w, "--dry-run")
    assert final_files(w) == files
    text = _ctl_prune(w)
    assert "removed: 2 validated backups" in text
    assert "Traceback" not in text
    assert len(final_files(w)) == 1
    assert not list((w.site(AGENT) / "_archive").iterdir())
    with w.store.reading() as session:
        assert session.scalar(select(func.count()).select_from(BackupEntry)) == 1


def test_backupwatchctl_prune_leaves_another_instances_backups(
    tmp_path: Path, database_url: str
) -> None:
    """SPEC §15: another host's final files are not under this host's root; judged from here
    they would look gone or changed, and be marked so for good."""
    w = _three_placed(tmp_path, database_url, instance="here")
    files = final_files(w)
    with w.store.session() as session:
        session.execute(update(ExpectedBackupJob).values(instance="elsewhere"))
    _ctl_prune(w)
    assert final_files(w) == files
    with w.store.reading() as session:
        removals = session.scalars(select(BackupEntry.final_removal)).all()
    assert removals == [None, None, None]


def test_the_daemon_prunes_once_an_hour_on_its_own_thread(tmp_path: Path) -> None:
    from support import write_config

    from backupwatch.config import load_settings
    from backupwatch.daemon import Daemon
    from backupwatch.jobs import load_jobs

    config = write_config(
        tmp_path, f"sqlite:///{tmp_path}/db.sqlite", job_block("ACME", "Lyon", "Part-Dieu", "sales")
    )
    settings = load_settings(config, {})
    daemon = Daemon(settings, load_jobs(settings), {})
    daemon.start()
    try:
        old = settings.backup_storage_root / AGENT / "_archive" / "STATUS-old.json"
        old.parent.mkdir(parents=True)
        old.write_text("{}")
        start = datetime.now(UTC) + timedelta(days=31)
        assert not daemon.retention_tick(start)  # the first run waits 10 minutes after READY
        assert not daemon.retention_tick(start + timedelta(minutes=9))
        now = start + timedelta(minutes=10)
        assert daemon.retention_tick(now)
        assert daemon.prune_thread is not None
        daemon.prune_thread.join(10)
        assert not old.exists()
        assert not daemon.retention_tick(now + timedelta(minutes=59))
        assert daemon.retention_tick(now + timedelta(minutes=60))
        daemon.prune_thread.join(10)
    finally:
        daemon.request_stop()
        daemon.shutdown()
