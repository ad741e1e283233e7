"""The daemon's main-loop step, in-process with real parts: inotify, SQLite, a notify socket."""

from __future__ import annotations

import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import database, drop, job_block, report, write_config

from backupwatch import daemon as daemon_module
from backupwatch import timer as timer_module
from backupwatch.config import load_settings
from backupwatch.daemon import Daemon
from backupwatch.jobs import load_jobs
from backupwatch.timeutil import utc_now


def poll(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Wait for `condition` with a deadline (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            return False
        pause.wait(0.05)
    return True


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(5)
    yield sock
    sock.close()


@pytest.fixture
def daemon(tmp_path: Path, notify: socket.socket) -> Iterator[Daemon]:
    config = write_config(
        tmp_path,
        f"sqlite:///{tmp_path}/db.sqlite",
        job_block("ACME", "Lyon", "Part-Dieu", "sales"),
        control_socket=str(tmp_path / "c.sock"),
    )
    settings = load_settings(config, {})
    environ = {"NOTIFY_SOCKET": notify.getsockname(), "WATCHDOG_USEC": "2000000"}
    instance = Daemon(settings, load_jobs(settings), environ)
    instance.start()
    yield instance
    instance.request_stop()
    instance.shutdown()


def received(sock: socket.socket) -> list[str]:
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(5)
    return messages


def test_ready_then_a_healthy_tick_pings_the_watchdog(
    daemon: Daemon, notify: socket.socket
) -> None:
    assert any("READY=1" in m for m in received(notify))
    assert daemon.tick() is True
    assert "WATCHDOG=1" in received(notify)


def test_a_wedged_worker_stops_the_pings_until_it_recovers(
    daemon: Daemon, notify: socket.socket, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real wedge: the test holds SQLite's write lock, so the worker's commit blocks."""
    monkeypatch.setattr(daemon_module, "STALE_MIN", 2.0)
    monkeypatch.setattr(timer_module, "MAX_SLEEP", 0.5)
    daemon.timer.wake()
    site = daemon.settings.backup_storage_root / "ACME_Lyon_Part-Dieu"
    lock = sqlite3.connect(tmp_path / "db.sqlite", timeout=0)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        drop(site, report("ACME_Lyon_Part-Dieu", utc_now(), {"sales": database("x.gz", b"x")}))
        assert poll(lambda: not daemon.healthy()), "the wedge was never noticed"
        received(notify)
        assert daemon.tick() is False
        assert "WATCHDOG=1" not in received(notify)
    finally:
        lock.rollback()
        lock.close()
    assert poll(daemon.healthy, timeout=40), "the worker never recovered"
    assert daemon.tick() is True
    assert "WATCHDOG=1" in received(notify)


def test_a_dead_observer_is_restarted_and_a_rescan_follows(daemon: Daemon) -> None:
    daemon.watcher.stop()
    assert not daemon.watcher.is_alive()
    rescans = daemon.last_rescan

    daemon.tick()

    assert daemon.watcher.is_alive()
    assert daemon.last_rescan > rescans


def test_status_line_is_sent_when_it_changes(daemon: Daemon, notify: socket.socket) -> None:
    received(notify)
    daemon.last_status = ""
    daemon.tick()
    statuses = [m for m in received(notify) if m.startswith("STATUS=")]
    assert statuses == ["STATUS=" + daemon.status_line()]
    daemon.tick()
    assert not [m for m in received(notify) if m.startswith("STATUS=")]
