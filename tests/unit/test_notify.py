"""sd_notify: the exact datagrams a real AF_UNIX socket receives, through both senders
(libsystemd via systemd-python, and the built-in datagram protocol), plus the failure paths."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from backupwatch import notify
from backupwatch.notify import Notifier

RECV_TIMEOUT = 2.0  # seconds: datagrams arrive at once; this only bounds a failing test

HAS_LIBSYSTEMD = notify._libsystemd_available()
BACKENDS = [
    pytest.param(
        True,
        id="libsystemd",
        marks=pytest.mark.skipif(not HAS_LIBSYSTEMD, reason="systemd-python not installed"),
    ),
    pytest.param(False, id="datagram"),
]


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A notify socket standing in for systemd's, at a path short enough for sun_path."""
    path = tmp_path / "notify.sock"
    if len(os.fsencode(path)) >= 108:
        path = Path(f"/tmp/bw-notify-{uuid.uuid4().hex[:12]}.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(RECV_TIMEOUT)
        yield str(path), sock
    path.unlink(missing_ok=True)


@pytest.fixture
def abstract_listener() -> Iterator[tuple[str, socket.socket]]:
    name = f"backupwatch-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(RECV_TIMEOUT)
        yield "@" + name, sock


def make_notifier(
    address: str, use_libsystemd: bool, monkeypatch: pytest.MonkeyPatch, **extra: str
) -> Notifier:
    """libsystemd reads NOTIFY_SOCKET from the process environment, so set it there too."""
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    notifier = Notifier({"NOTIFY_SOCKET": address, **extra}, use_libsystemd=use_libsystemd)
    assert notifier.backend == ("libsystemd" if use_libsystemd else "datagram")
    return notifier


def recv(sock: socket.socket) -> str:
    return sock.recv(65536).decode()


def assert_nothing_pending(sock: socket.socket) -> None:
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        sock.recv(65536)


@pytest.mark.parametrize("use_libsystemd", BACKENDS)
def test_each_method_sends_its_exact_datagram(
    listener: tuple[str, socket.socket], use_libsystemd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    address, sock = listener
    notifier = make_notifier(address, use_libsystemd, monkeypatch)
    assert notifier.enabled

    notifier.ready("watching 12 jobs")
    assert recv(sock) == "READY=1\nSTATUS=watching 12 jobs"
    notifier.status("reconciling")
    assert recv(sock) == "STATUS=reconciling"
    notifier.watchdog()
    assert recv(sock) == "WATCHDOG=1"
    notifier.stopping()
    assert recv(sock) == "STOPPING=1"

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, monotonic = recv(sock).split("\n")
    assert reloading == "RELOADING=1"
    key, _, usec = monotonic.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(usec) <= after
    assert_nothing_pending(sock)


@pytest.mark.parametrize("use_libsystemd", BACKENDS)
def test_abstract_namespace_socket(
    abstract_listener: tuple[str, socket.socket],
    use_libsystemd: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    address, sock = abstract_listener
    notifier = make_notifier(address, use_libsystemd, monkeypatch)
    notifier.watchdog()
    assert recv(sock) == "WATCHDOG=1"


@pytest.mark.parametrize("use_libsystemd", BACKENDS)
def test_status_newlines_cannot_inject_assignments(
    listener: tuple[str, socket.socket], use_libsystemd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    address, sock = listener
    notifier = make_notifier(address, use_libsystemd, monkeypatch)
    notifier.ready("ok\nSTOPPING=1")
    assert recv(sock) == "READY=1\nSTATUS=ok STOPPING=1"


@pytest.mark.parametrize("use_libsystemd", BACKENDS)
def test_unreachable_socket_logs_once_and_never_raises(
    tmp_path: Path, use_libsystemd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    notifier = make_notifier(str(tmp_path / "nobody-listens"), use_libsystemd, monkeypatch)
    with capture_logs() as logs:
        notifier.ready("up")
        for _ in range(5):
            notifier.watchdog()
        notifier.stopping()
    assert len(logs) == 1
    assert logs[0]["event"] == "notify.failed"
    assert logs[0]["log_level"] == "warning"
    assert logs[0]["kind"] == "ENOENT"
    assert logs[0]["socket"] == str(tmp_path / "nobody-listens")


@pytest.mark.parametrize("use_libsystemd", BACKENDS)
def test_each_kind_of_failure_is_logged_once(
    tmp_path: Path, use_libsystemd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket file nobody reads (ECONNREFUSED) is another failure than a missing one."""
    dead = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(dead))
    notifier = make_notifier(str(dead), use_libsystemd, monkeypatch)
    with capture_logs() as logs:
        notifier.watchdog()
        notifier.watchdog()
        dead.unlink()
        notifier.watchdog()
        notifier.watchdog()
    assert [entry["kind"] for entry in logs] == ["ECONNREFUSED", "ENOENT"]


@pytest.mark.parametrize("use_libsystemd", BACKENDS)
def test_relative_socket_path_is_refused_quietly(
    use_libsystemd: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    notifier = make_notifier("relative.sock", use_libsystemd, monkeypatch)
    with capture_logs() as logs:
        notifier.ready("up")
        notifier.ready("up")
    assert len(logs) == 1
    assert logs[0]["event"] == "notify.failed"


def test_libsystemd_returning_false_is_a_failure(
    listener: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """daemon.notify() answers False, without raising, when NOTIFY_SOCKET left os.environ."""
    if not HAS_LIBSYSTEMD:
        pytest.skip("systemd-python not installed")
    address, _ = listener
    notifier = make_notifier(address, True, monkeypatch)
    monkeypatch.delenv("NOTIFY_SOCKET")
    with capture_logs() as logs:
        notifier.watchdog()
    assert [entry["kind"] for entry in logs] == ["not-sent"]


def test_libsystemd_used_only_when_process_environment_agrees(
    listener: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """libsystemd would send wherever os.environ points; the mapping given must win."""
    address, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/elsewhere.sock")
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.backend == "datagram"
    notifier.watchdog()
    assert recv(sock) == "WATCHDOG=1"


def test_the_default_is_the_non_blocking_datagram_sender(
    listener: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, _ = listener
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert Notifier({"NOTIFY_SOCKET": address}).backend == "datagram"


def test_fallback_when_systemd_python_missing(
    listener: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, sock = listener
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.setattr(notify, "_libsystemd_available", lambda: False)
    notifier = Notifier({"NOTIFY_SOCKET": address}, use_libsystemd=True)
    assert notifier.backend == "datagram"
    notifier.stopping()
    assert recv(sock) == "STOPPING=1"


def test_disabled_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier({"WATCHDOG_USEC": "30000000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    with capture_logs() as logs:
        notifier.ready("up")
        notifier.reloading()
        notifier.status("x")
        notifier.watchdog()
        notifier.stopping()
    assert logs == []


@pytest.mark.parametrize(
    ("watchdog_env", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "{pid}"}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{other}"}, None),
        ({"WATCHDOG_PID": "{pid}"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(watchdog_env: dict[str, str], expected: float | None) -> None:
    pids = {"pid": str(os.getpid()), "other": str(os.getpid() + 1)}
    environ = {key: value.format(**pids) for key, value in watchdog_env.items()}
    notifier = Notifier({"NOTIFY_SOCKET": "@unused", **environ}, use_libsystemd=False)
    assert notifier.watchdog_interval == expected


def test_a_socket_nobody_reads_never_blocks_the_daemon(
    listener: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    """libsystemd's sd_notify blocks, holding the GIL, once the unread queue is full: every
    thread of the daemon froze. The default sender drops and says so once."""
    address, _sock = listener  # bound, never read
    notifier = Notifier({"NOTIFY_SOCKET": address})
    assert notifier.backend == "datagram"
    done = threading.Event()

    def flood() -> None:
        for index in range(200):
            notifier.status(f"status {index}")
        done.set()

    with structlog.testing.capture_logs() as logs:
        threading.Thread(target=flood, daemon=True).start()
        assert done.wait(10), "the sender blocked on a full notify queue"
    assert [entry["kind"] for entry in logs if entry["event"] == "notify.failed"] == ["EAGAIN"]
