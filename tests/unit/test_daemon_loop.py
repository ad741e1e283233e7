"""The daemon's main-loop step, in-process with real parts: inotify, SQLite, a notify socket."""

from __future__ import annotations

import itertools
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import (
    TcpProxy,
    database,
    drop,
    job_block,
    report,
    require_postgres,
    stage,
    write_config,
)

from backupwatch import daemon as daemon_module
from backupwatch import timer as timer_module
from backupwatch.config import load_settings
from backupwatch.control import call
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


AGENT = "ACME_Lyon_Part-Dieu"
JOBS = job_block("ACME", "Lyon", "Part-Dieu", "sales", frequency="HOURLY", expected_hour_utc=None)


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


# ------------------------------------------------------------------ issue 6 items 5, 7, 8, 9


def make(tmp_path: Path, notify: socket.socket, database_url: str, jobs: str = JOBS) -> Daemon:
    config = write_config(tmp_path, database_url, jobs, control_socket=str(tmp_path / "c.sock"))
    settings = load_settings(config, {})
    return Daemon(settings, load_jobs(settings), {"NOTIFY_SOCKET": notify.getsockname()})


@pytest.fixture
def stopper() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for instance in started:
        instance.request_stop()
        instance.shutdown()


def test_status_answers_starting_while_the_start_sequence_runs(
    tmp_path: Path, notify: socket.socket, stopper: list[Daemon]
) -> None:
    """Issue 6 item 7: `status` during start-up exited 1 with AttributeError ('timer')."""
    instance = make(tmp_path, notify, f"sqlite:///{tmp_path}/db.sqlite")
    stopper.append(instance)
    instance.store.migrate()
    lock = sqlite3.connect(tmp_path / "db.sqlite", timeout=0)
    lock.execute("BEGIN EXCLUSIVE")  # the start sequence waits for the database meanwhile
    starting = threading.Thread(target=instance.start)
    try:
        starting.start()
        socket_path = instance.settings.control_socket
        assert poll(lambda: socket_path.exists())
        migrating = "starting: migrating the database"
        assert poll(lambda: call(socket_path, "status")["phase"] == migrating)
        answer = call(socket_path, "status")
        assert answer["ok"] is True
        assert answer["state"] == "starting"
        assert answer["healthy"] is False
        refused = call(socket_path, "reload")
        assert refused["ok"] is False
        assert "still starting" in refused["error"]
    finally:
        lock.rollback()
        lock.close()
    starting.join(30)
    assert call(instance.settings.control_socket, "status")["state"] == "running"


def test_one_agents_symlinked_rejected_folder_blinds_no_other_site(
    tmp_path: Path, notify: socket.socket, stopper: list[Daemon]
) -> None:
    """Issue 6 item 5: `ln -s /tmp D/_rejected` and two reports to reject killed both workers,
    and every other site's reports waited forever while `status` said running."""
    jobs = JOBS + job_block(
        "ACME", "Paris", "Louvre", "sales", frequency="HOURLY", expected_hour_utc=None
    )
    instance = make(tmp_path, notify, f"sqlite:///{tmp_path}/db.sqlite", jobs)
    stopper.append(instance)
    hostile = instance.settings.backup_storage_root / AGENT
    outside = tmp_path / "outside"
    outside.mkdir()
    hostile.mkdir(parents=True)
    (hostile / "_rejected").symlink_to(outside)
    instance.start()

    for name in ("one.json", "two.json", "three.json"):
        drop(hostile, b"[not, json", name)
    other = instance.settings.backup_storage_root / "ACME_Paris_Louvre"
    good = report("ACME_Paris_Louvre", utc_now(), {"sales": database("x.gz", b"x")})
    stage(other, "x.gz", b"x")
    drop(other, good)

    assert poll(lambda: (other / "_archive" / "STATUS.json").exists()), "the other site starved"
    assert poll(lambda: instance.tick() and len(instance.handler.parked()) == 3)
    assert os.listdir(outside) == []
    assert sorted(p.name for p in hostile.glob("*.json")) == ["one.json", "three.json", "two.json"]
    assert all(w.thread.is_alive() for w in instance.pool.active())
    assert instance.pool.retired() == []
    status = call(instance.settings.control_socket, "status")
    assert len(status["left_in_place"]) == 3
    assert instance.tick() is True


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_worker_that_dies_is_replaced(daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing escapes `handle`; a bug in the loop around it kills the thread anyway."""
    real_done = daemon.queue.done
    calls = itertools.count()  # next() on it is atomic: two workers cannot both be first

    def explode(path: Path) -> None:
        real_done(path)
        if next(calls) == 0:  # once: the rejection's own events must not kill a second worker
            raise RuntimeError("a bug in the worker loop")

    monkeypatch.setattr(daemon.queue, "done", explode)
    site = daemon.settings.backup_storage_root / AGENT
    drop(site, b"{}", "boom.json")
    assert poll(lambda: any(not w.thread.is_alive() for w in daemon.pool.active()))
    monkeypatch.undo()

    daemon.tick()

    assert [w.retired for w in daemon.pool.retired()] == ["died"]
    assert len(daemon.pool.active()) == daemon_module.WORKERS
    assert all(w.thread.is_alive() for w in daemon.pool.active())


@pytest.fixture
def proxy() -> Iterator[TcpProxy]:
    require_postgres()
    forwarder = TcpProxy(("127.0.0.1", 5432))
    yield forwarder
    forwarder.close()


def test_reload_while_the_database_is_unreachable_keeps_the_old_configuration(
    tmp_path: Path,
    notify: socket.socket,
    postgres_url: str,
    proxy: TcpProxy,
    stopper: list[Daemon],
) -> None:
    """Issue 6 item 8: the reload's OperationalError killed the daemon (no STOPPING=1)."""
    instance = make(tmp_path, notify, proxy.url_for(postgres_url))
    stopper.append(instance)
    instance.start()
    jobs_file = tmp_path / "jobs.d" / "jobs.toml"
    jobs_file.write_text(JOBS + job_block("ACME", "Lyon", "Part-Dieu", "hr"))
    proxy.cut()

    answer = instance.reload()

    assert answer["ok"] is False
    assert "cannot reach the database" in answer["error"]
    assert "keeps its previous configuration" in answer["error"]
    assert [j.database_name for s in instance.ctx.registry.sites.values() for j in s.jobs] == [
        "sales"
    ]
    instance.tick()  # the main loop goes on
    proxy.restore()
    answer = instance.reload()
    assert answer["ok"] is True
    assert answer["added"] == 1


def test_reload_says_which_changed_keys_need_a_restart(daemon: Daemon, tmp_path: Path) -> None:
    """Issue 6 item 9: after changing database_url, reload said '0 added…' and exit 0."""
    config = daemon.settings.config_path
    text = config.read_text().replace("db.sqlite", "other.sqlite")
    config.write_text(text.replace('"c.sock"', '"c2.sock"').replace("c.sock", "c2.sock"))

    answer = daemon.reload()

    assert answer["ok"] is True
    keys = {change["key"]: change for change in answer["needs_restart"]}
    assert set(keys) == {"database_url", "control_socket"}
    assert keys["database_url"]["running"].endswith("db.sqlite")
    assert keys["database_url"]["file"].endswith("other.sqlite")
    assert str(daemon.settings.database_url).endswith("db.sqlite")  # still the running one
    assert daemon.settings.control_socket == tmp_path / "c.sock"


def test_silent_mistakes_show_in_status(
    tmp_path: Path, notify: socket.socket, stopper: list[Daemon]
) -> None:
    """Issue 6 item 10: a root created from nothing, a `.JSON` report, a job file never read,
    a database no job expects: each was at most one log line."""
    instance = make(tmp_path, notify, f"sqlite:///{tmp_path}/db.sqlite")
    stopper.append(instance)
    (tmp_path / "jobs.d" / "paris.tml").write_text("# meant as a job file")
    instance.settings.backup_storage_root.rmdir()
    instance.start()
    site = instance.settings.backup_storage_root / AGENT
    site.mkdir()
    drop(site, b"{}", "STATUS.JSON")
    stage(site, "x.gz", b"x")
    body = report(AGENT, utc_now(), {"sales": database("x.gz", b"x"), "ghost": database("g", b"g")})
    drop(site, body)
    assert poll(lambda: (site / "_archive" / "STATUS.json").exists())

    warnings = call(instance.settings.control_socket, "status")["warnings"]

    assert any("backup_storage_root" in w and "did not exist" in w for w in warnings)
    assert any("paris.tml: not read" in w for w in warnings)
    assert any("STATUS.JSON is never read" in w and "lower-case '.json'" in w for w in warnings)
    assert any("'ghost', which no job of this site expects" in w for w in warnings)


def test_status_pages_give_every_job_once_in_order(
    tmp_path: Path, notify: socket.socket, stopper: list[Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control socket's `status` is read and sent a page at a time (100,000 jobs at once
    were ~400 MiB): with pages of 2, the same rows as the unpaged answer, in job order."""
    jobs = "".join(
        job_block("ACME", city, "Centre", name, frequency="HOURLY", expected_hour_utc=None)
        for city in ("Lyon", "Paris")
        for name in ("a", "b", "c")
    )
    instance = make(tmp_path, notify, f"sqlite:///{tmp_path}/db.sqlite", jobs)
    stopper.append(instance)
    instance.start()
    monkeypatch.setattr(daemon_module, "STATUS_PAGE", 2)
    answer = call(instance.settings.control_socket, "status", jobs=True)
    whole = [view.as_json() for view in instance.store.job_views(instance.clock())]
    assert len(whole) == 6
    assert [row["id"] for row in answer["jobs"]] == [row["id"] for row in whole]
    assert [row["city"] for row in answer["jobs"]] == ["Lyon"] * 3 + ["Paris"] * 3
