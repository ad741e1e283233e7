"""SPEC §7's systemd contract, through its protocol: a NOTIFY_SOCKET bound by the test."""

from __future__ import annotations

import itertools
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from daemonkit import Daemon, wait_for
from support import database, drop, job_block, report

from backupwatch.timeutil import utc_now

pytestmark = pytest.mark.integration

MakeDaemon = Callable[..., Daemon]
JOBS = job_block("ACME", "Lyon", "Part-Dieu", "sales")


def test_ready_carries_a_status_line(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon("sqlite:///db.sqlite", JOBS)
    daemon.start(wait_ready=False)
    assert daemon.notify is not None

    ready = daemon.notify.expect("READY=1")

    status = next(line for line in ready.splitlines() if line.startswith("STATUS="))
    assert "1 sites, 1 jobs" in status
    assert daemon.stop() == 0


def test_watchdog_pings_at_about_half_the_interval(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon("sqlite:///db.sqlite", JOBS)
    daemon.env["WATCHDOG_USEC"] = "2000000"
    daemon.start()
    assert daemon.notify is not None

    stamps = []
    for _ in range(4):
        daemon.notify.expect("WATCHDOG=1", timeout=5)
        stamps.append(time.monotonic())

    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert all(0.5 <= gap <= 1.6 for gap in gaps), gaps
    assert daemon.stop() == 0


def test_no_watchdog_pings_unless_systemd_asks(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon("sqlite:///db.sqlite", JOBS)
    daemon.start()
    assert daemon.notify is not None
    assert daemon.ctl("rescan").returncode == 0  # a full pass of the main loop at least

    assert not [m for m in daemon.notify.collect(2.0) if "WATCHDOG=1" in m]
    assert daemon.stop() == 0


def test_an_unreachable_notify_socket_is_logged_not_fatal(
    make_daemon: MakeDaemon, short_dir: Path
) -> None:
    daemon = make_daemon("sqlite:///db.sqlite", JOBS)
    daemon.env["NOTIFY_SOCKET"] = str(short_dir / "no-systemd-here.sock")

    daemon.start(wait_ready=False, notify=False)

    wait_for(lambda: daemon.ctl("status").returncode == 0, timeout=20, what="a running daemon")
    failures = [e for e in daemon.logs() if e.get("event") == "notify.failed"]
    assert failures
    assert daemon.stop() == 0


def test_no_watchdog_pings_while_a_worker_is_wedged(make_daemon: MakeDaemon) -> None:
    """The test holds SQLite's write lock: the worker blocks in its commit; the pings stop
    once it has been unseen for the stale limit (15 s here), and resume when it recovers."""
    daemon = make_daemon("sqlite:///db.sqlite", JOBS)
    daemon.env["WATCHDOG_USEC"] = "2000000"
    daemon.start()
    notify = daemon.notify
    assert notify is not None
    notify.expect("WATCHDOG=1", timeout=5)
    site = daemon.deposit / "ACME_Lyon_Part-Dieu"
    lock = sqlite3.connect(daemon.base / "db.sqlite", timeout=0)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        drop(site, report("ACME_Lyon_Part-Dieu", utc_now(), {"sales": database("x.gz", b"x")}))
        wait_for(lambda: not notify.collect(2.5), timeout=25, what="the pings to stop")
        assert not notify.collect(2.5)
    finally:
        lock.rollback()
        lock.close()
    notify.expect("WATCHDOG=1", timeout=40)
    wait_for(lambda: (site / "_archive" / "STATUS.json").exists(), what="the report processed")
    assert daemon.stop() == 0
