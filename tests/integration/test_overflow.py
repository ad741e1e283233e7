"""The real daemon after a real inotify queue overflow (SPEC §7): the loss is logged once, the
watches are checked, and the rescan that follows finds the report whose events were lost."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
from daemonkit import Daemon, wait_for
from support import drop
from test_daemon import AGENT, SALES, good_report, hourly_jobs, statuses

pytestmark = pytest.mark.integration


def flood(folder: Path, events: int) -> None:
    """`events` IN_CLOSE_WRITE events, alternating two names so the kernel merges none."""
    files = [folder / "a.bin", folder / "b.bin"]
    for f in files:
        f.touch()
    for i in range(events):
        os.close(os.open(files[i % 2], os.O_WRONLY))


def stopped(task: Path) -> bool:
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return True  # a thread that ended runs no more either


def test_overflow_in_a_stopped_daemon_is_logged_once_and_rescanned(
    make_daemon: Callable[..., Daemon],
) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 1_000_000:
        pytest.skip(f"max_queued_events={limit}: too large to overflow quickly")
    daemon = make_daemon("sqlite:///db.sqlite", hourly_jobs("sales"))
    site = daemon.deposit / AGENT
    site.mkdir()
    (daemon.deposit / "flood").mkdir()
    daemon.start()
    body = good_report(site)
    assert daemon.process is not None

    daemon.process.send_signal(signal.SIGSTOP)  # asynchronous: wait until every thread stops
    tasks = Path(f"/proc/{daemon.process.pid}/task")
    wait_for(lambda: all(stopped(task) for task in tasks.iterdir()), what="SIGSTOP")
    try:
        flood(daemon.deposit / "flood", limit + 1000)
        drop(site, body)  # the kernel queue is full: these events are lost
    finally:
        daemon.process.send_signal(signal.SIGCONT)

    wait_for(lambda: statuses(daemon, SALES) == ["SUCCESS"], timeout=30, what="the lost report")
    events = [entry.get("event") for entry in daemon.logs()]
    assert events.count("inotify_events_lost") == 1
    lost = events.index("inotify_events_lost")
    assert "inotify_watches_checked" in events[lost:]
    assert "rescan.done" in events[events.index("inotify_watches_checked") :]
    assert daemon.stop() == 0
