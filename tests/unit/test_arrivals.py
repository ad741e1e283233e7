"""What the daemon remembers of writers (issue 6 items 1 and 3), with real files."""

from __future__ import annotations

from pathlib import Path

from backupwatch.arrivals import WRITER_HORIZON, Arrivals
from backupwatch.readiness import Writer
from backupwatch.watcher import EventKind


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_report_created_under_watch_is_open_until_closed_or_renamed(tmp_path: Path) -> None:
    clock = Clock()
    arrivals = Arrivals(monotonic=clock)
    report = tmp_path / "STATUS.json"
    assert arrivals.writer(report) == Writer.unobserved()
    arrivals.saw(EventKind.CREATED, report)
    assert arrivals.writer(report) == Writer(open=True)
    clock.now += 2
    arrivals.saw(EventKind.ATTRIB, report)  # a chmod is no close
    assert arrivals.writer(report).open
    arrivals.saw(EventKind.CLOSED, report)
    clock.now += 3
    assert arrivals.writer(report) == Writer(open=False, closed_for=3.0)
    arrivals.saw(EventKind.CREATED, report, linked=True)  # a hard link: a whole file
    assert not arrivals.writer(report).open
    arrivals.events_lost()
    assert arrivals.writer(report) == Writer.unobserved()


def test_a_staged_file_open_for_writing_keeps_its_folder_busy(tmp_path: Path) -> None:
    """rsync's temp file stays empty for its whole transfer: only its open says it is coming."""
    clock = Clock()
    arrivals = Arrivals(monotonic=clock, wall=lambda: 1e12)  # every ctime is long ago
    site = tmp_path / "site"
    temp = site / "database" / ".sales.sql.gz.Xy12"
    temp.parent.mkdir(parents=True)
    temp.touch()
    assert arrivals.quiet_for(site) > 1e9
    arrivals.saw_data(EventKind.CREATED, temp)
    assert arrivals.quiet_for(site) == 0.0
    assert arrivals.quiet_for(tmp_path / "other") > 1e9
    arrivals.saw_data(EventKind.CLOSED, temp)
    assert arrivals.quiet_for(site) > 1e9


def test_a_writer_whose_file_is_gone_or_too_old_no_longer_counts(tmp_path: Path) -> None:
    """No close comes for a file unlinked while open (IN_EXCL_UNLINK); nor for a process that
    keeps a file open for good: neither may hold verdicts back forever."""
    clock = Clock()
    arrivals = Arrivals(monotonic=clock, wall=lambda: 1e12)
    site = tmp_path / "site"
    site.mkdir()
    deleted, forever = site / "aborted.tmp", site / "held.log"
    deleted.touch()
    forever.touch()
    arrivals.saw_data(EventKind.CREATED, deleted)
    deleted.unlink()
    assert arrivals.quiet_for(site) > 1e9
    arrivals.saw_data(EventKind.CREATED, forever)
    assert arrivals.quiet_for(site) == 0.0
    clock.now += WRITER_HORIZON + 1
    assert arrivals.quiet_for(site) > 1e9
