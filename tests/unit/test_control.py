"""SPEC §8/§9: the control socket, with real Unix sockets.

Sockets live in a short directory under /tmp rather than tmp_path: pytest's tmp_path can exceed
the 107 bytes AF_UNIX allows, which is exactly the failure `start()` must report by name.
Waits are bounded by explicit timeouts and synchronisation (barriers, events), never by sleeping.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from backupwatch import control
from backupwatch.control import (
    CONTROL_SOCKET_MAX,
    MAX_REQUEST_BYTES,
    ControlError,
    ControlServer,
    DaemonUnreachable,
    Handler,
    call,
)


def echo(request: dict[str, Any]) -> dict[str, Any]:
    return {"request": request}


def boom(request: dict[str, Any]) -> dict[str, Any]:
    raise ValueError("boom")


HANDLERS: dict[str, Handler] = {"echo": echo, "boom": boom}


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bw-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sock_path(sock_dir: Path) -> Path:
    return sock_dir / "control.sock"


@pytest.fixture
def server(sock_path: Path) -> Iterator[ControlServer]:
    with ControlServer(sock_path, HANDLERS) as srv:
        yield srv


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def raw_exchange(path: Path, data: bytes) -> dict[str, Any]:
    """Bypass `call` to send what a buggy or hostile client would."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(path))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        with sock.makefile("rb") as reader:
            answer: dict[str, Any] = json.loads(reader.readline())
            return answer


def stale_socket(path: Path) -> None:
    """A socket file nobody listens on: what a killed daemon leaves behind."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))


@contextlib.contextmanager
def fake_daemon(path: Path, reply: Callable[[socket.socket], None]) -> Iterator[None]:
    """A listener that answers one connection with `reply`, for client-side protocol errors."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                reply(conn)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield
        thread.join(timeout=5)


# --- round trip ------------------------------------------------------------------------------


def test_round_trip_passes_arguments_and_adds_ok(server: ControlServer, sock_path: Path) -> None:
    response = call(sock_path, "echo", limit=3, name="café")
    assert response == {"ok": True, "request": {"command": "echo", "limit": 3, "name": "café"}}
    assert server.is_alive()


def test_handler_refusal_is_returned_not_raised(sock_path: Path) -> None:
    def reload(request: dict[str, Any]) -> dict[str, Any]:
        return {"ok": False, "error": "jobs.toml: job[2]: bad frequency"}

    with ControlServer(sock_path, {"reload": reload}):
        assert call(sock_path, "reload") == {
            "ok": False,
            "error": "jobs.toml: job[2]: bad frequency",
        }


@pytest.mark.parametrize(("mode", "process_umask"), [(0o660, 0o000), (0o660, 0o077), (0o600, 0)])
def test_socket_mode_ignores_umask(sock_path: Path, mode: int, process_umask: int) -> None:
    with umask(process_umask), ControlServer(sock_path, HANDLERS, mode=mode):
        st = os.stat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == mode
        assert os.umask(process_umask) == process_umask  # start() put the umask back


def test_the_socket_appears_only_once_it_listens(
    sock_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CI: a client that saw the path between bind() and listen() was refused and told the
    daemon was not running, while it was starting. The path now appears already listening."""
    seen_at_listen: list[bool] = []

    class Watched(socket.socket):
        def listen(self, backlog: int = 0) -> None:
            seen_at_listen.append(os.path.lexists(sock_path))
            super().listen(backlog)

    monkeypatch.setattr(socket, "socket", Watched)
    with ControlServer(sock_path, HANDLERS):
        assert seen_at_listen == [False]
        assert call(sock_path, "echo")["ok"] is True
        assert sorted(p.name for p in sock_path.parent.iterdir()) == [sock_path.name]
    assert not os.path.lexists(sock_path)


def test_missing_parent_is_created_0755(sock_dir: Path) -> None:
    path = sock_dir / "run" / "backupwatch" / "control.sock"
    with umask(0o077), ControlServer(path, HANDLERS):
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o755
        assert call(path, "echo")["ok"] is True


# --- errors answered by the server -----------------------------------------------------------


def test_unknown_command(server: ControlServer, sock_path: Path) -> None:
    assert call(sock_path, "frobnicate") == {"ok": False, "error": "unknown command: frobnicate"}


def test_handler_exception_is_reported_logged_and_survived(
    server: ControlServer, sock_path: Path
) -> None:
    with capture_logs() as logs:
        assert call(sock_path, "boom") == {"ok": False, "error": "ValueError: boom"}
    failures = [e for e in logs if e["event"] == "control.handler_failed"]
    assert failures
    assert failures[0]["command"] == "boom"
    assert failures[0]["exc_info"] is True
    assert call(sock_path, "echo")["ok"] is True
    assert server.is_alive()


def test_unserializable_handler_result_is_an_error(sock_path: Path) -> None:
    with ControlServer(sock_path, {"bad": lambda request: {"when": object()}}):
        response = call(sock_path, "bad")
        assert response["ok"] is False
        assert "not JSON" in response["error"]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"{not json\n", "invalid JSON request"),
        (b"\xff\xfe\n", "invalid JSON request"),
        (b"[1, 2]\n", "must be a JSON object"),
        (b'{"args": 1}\n', 'string "command"'),
        (b'{"command": 7}\n', 'string "command"'),
    ],
)
def test_malformed_request_gets_an_error(
    server: ControlServer, sock_path: Path, line: bytes, message: str
) -> None:
    response = raw_exchange(sock_path, line)
    assert response["ok"] is False
    assert message in response["error"]
    assert call(sock_path, "echo")["ok"] is True


def test_request_without_trailing_newline_is_accepted(
    server: ControlServer, sock_path: Path
) -> None:
    """`printf '{"command":"status"}' | socat - UNIX:...` sends no newline, then half-closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(sock_path))
        sock.sendall(b'{"command": "echo"}')
        sock.shutdown(socket.SHUT_WR)
        assert json.loads(sock.makefile("rb").readline())["ok"] is True


def padded_request(total: int) -> bytes:
    """A valid request line of exactly `total` bytes before its newline."""
    skeleton = b'{"command":"echo","pad":""}'
    return skeleton[:-2] + b"x" * (total - len(skeleton)) + b'"}\n'


def test_request_at_the_limit_is_served(server: ControlServer, sock_path: Path) -> None:
    line = padded_request(MAX_REQUEST_BYTES)
    assert len(line) == MAX_REQUEST_BYTES + 1
    assert raw_exchange(sock_path, line)["ok"] is True


def test_oversized_request_is_refused(server: ControlServer, sock_path: Path) -> None:
    response = raw_exchange(sock_path, padded_request(MAX_REQUEST_BYTES + 1))
    assert response == {"ok": False, "error": f"request longer than {MAX_REQUEST_BYTES} bytes"}
    endless = raw_exchange(sock_path, b"x" * (4 * MAX_REQUEST_BYTES))
    assert endless["ok"] is False
    assert call(sock_path, "echo")["ok"] is True


def test_oversized_request_through_call(server: ControlServer, sock_path: Path) -> None:
    response = call(sock_path, "echo", pad="x" * (2 * MAX_REQUEST_BYTES))
    assert response["ok"] is False
    assert "longer than" in response["error"]


def test_silent_client_is_cut_off_without_blocking_others(sock_path: Path) -> None:
    with (
        ControlServer(sock_path, HANDLERS, read_timeout=0.3),
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stuck,
    ):
        stuck.settimeout(5)
        stuck.connect(str(sock_path))
        stuck.sendall(b'{"command": "ec')  # and nothing more
        assert call(sock_path, "echo")["ok"] is True  # served while `stuck` is pending
        answer = json.loads(stuck.makefile("rb").readline())
        assert answer["ok"] is False
        assert "no complete request" in answer["error"]
        assert stuck.recv(1) == b""  # and the server closed it


def test_connection_cap_answers_busy(monkeypatch: pytest.MonkeyPatch, sock_path: Path) -> None:
    monkeypatch.setattr(control, "MAX_CONNECTIONS", 1)
    with (
        ControlServer(sock_path, HANDLERS) as srv,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as holder,
    ):
        holder.connect(str(sock_path))
        response = call(sock_path, "echo")
        assert response["ok"] is False
        assert response["error"].startswith("busy")
        holder.close()
        assert srv.is_alive()


# --- start safety ----------------------------------------------------------------------------


def test_stale_socket_is_replaced(sock_path: Path) -> None:
    stale_socket(sock_path)
    with pytest.raises(DaemonUnreachable, match="refused"):
        call(sock_path, "echo")
    with capture_logs() as logs, ControlServer(sock_path, HANDLERS):
        assert call(sock_path, "echo")["ok"] is True
    assert any(e["event"] == "control.stale_socket_removed" for e in logs)


def test_live_socket_is_not_stolen(server: ControlServer, sock_path: Path) -> None:
    inode = os.stat(sock_path).st_ino
    second = ControlServer(sock_path, HANDLERS)
    with pytest.raises(ControlError, match=re.escape(f"already listening on {sock_path}")):
        second.start()
    assert not second.is_alive()
    second.stop()  # never started: must not touch the first one's file
    assert os.stat(sock_path).st_ino == inode
    assert call(sock_path, "echo")["ok"] is True


@pytest.mark.parametrize("kind", ["file", "directory", "symlink"])
def test_non_socket_at_path_is_refused_and_kept(sock_dir: Path, sock_path: Path, kind: str) -> None:
    if kind == "file":
        sock_path.write_text("precious")
    elif kind == "directory":
        sock_path.mkdir()
    else:
        target = sock_dir / "real.sock"
        stale_socket(target)
        sock_path.symlink_to(target)
    before = os.lstat(sock_path)
    with pytest.raises(ControlError, match="is not a socket"):
        ControlServer(sock_path, HANDLERS).start()
    after = os.lstat(sock_path)
    assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)


def test_too_long_path_names_the_path(sock_dir: Path) -> None:
    path = sock_dir / ("d" * 60) / ("s" * 60 + ".sock")
    with pytest.raises(ControlError, match="AF_UNIX") as excinfo:
        ControlServer(path, HANDLERS).start()
    assert str(path) in str(excinfo.value)
    assert not path.parent.exists()  # checked before anything is created
    with pytest.raises(ControlError, match="AF_UNIX"):
        call(path, "echo")


def test_the_longest_accepted_path_leaves_room_for_the_private_name(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket is bound first as `.NAME.PID` beside its path: the config's limit keeps that
    name within AF_UNIX's too, whatever the pid."""
    monkeypatch.setattr(os, "getpid", lambda: 4_194_304)  # pid_max's ceiling on Linux
    filler = CONTROL_SOCKET_MAX - len(os.fsencode(sock_dir)) - len("/.sock")
    path = sock_dir / ("s" * filler + ".sock")
    assert len(os.fsencode(path)) == CONTROL_SOCKET_MAX
    with ControlServer(path, HANDLERS):
        assert call(path, "echo")["ok"] is True


def test_start_twice_is_refused(server: ControlServer) -> None:
    with pytest.raises(ControlError, match="already started"):
        server.start()


# --- stop ------------------------------------------------------------------------------------


def test_stop_unlinks_and_is_idempotent(sock_path: Path) -> None:
    srv = ControlServer(sock_path, HANDLERS)
    srv.start()
    assert srv.is_alive()
    srv.stop()
    assert not srv.is_alive()
    assert not sock_path.exists()
    srv.stop()
    with pytest.raises(DaemonUnreachable, match="no socket"):
        call(sock_path, "echo")


def test_server_can_restart_after_stop(sock_path: Path) -> None:
    srv = ControlServer(sock_path, HANDLERS)
    srv.start()
    srv.stop()
    srv.start()
    try:
        assert call(sock_path, "echo")["ok"] is True
    finally:
        srv.stop()


def test_stop_leaves_a_replacement_socket_alone(sock_path: Path) -> None:
    srv = ControlServer(sock_path, HANDLERS)
    srv.start()
    os.unlink(sock_path)
    stale_socket(sock_path)  # a newer daemon's socket, as far as we can tell
    inode = os.lstat(sock_path).st_ino
    srv.stop()
    assert os.lstat(sock_path).st_ino == inode


# --- client ----------------------------------------------------------------------------------


def test_missing_socket_is_unreachable(sock_dir: Path) -> None:
    with pytest.raises(DaemonUnreachable, match="no socket"):
        call(sock_dir / "absent.sock", "status")
    with pytest.raises(DaemonUnreachable):
        call(sock_dir / "no-such-dir" / "control.sock", "status")


def test_slow_handler_times_out_as_unreachable(sock_path: Path) -> None:
    release = threading.Event()

    def stuck(request: dict[str, Any]) -> dict[str, Any]:
        release.wait(timeout=10)
        return {}

    with ControlServer(sock_path, {"stuck": stuck}):
        try:
            with pytest.raises(DaemonUnreachable, match=r"within 0\.2 s"):
                call(sock_path, "stuck", timeout=0.2)
        finally:
            release.set()


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (b"garbage\n", "malformed response"),
        (b"[true]\n", 'boolean "ok"'),
        (b'{"result": 1}\n', 'boolean "ok"'),
        (b"", "without answering"),
    ],
)
def test_protocol_violations_raise_control_error(
    sock_path: Path, reply: bytes, message: str
) -> None:
    with fake_daemon(sock_path, lambda conn: conn.sendall(reply)):
        with pytest.raises(ControlError, match=message) as excinfo:
            call(sock_path, "status")
        assert not isinstance(excinfo.value, DaemonUnreachable)


def test_arguments_must_be_json(sock_path: Path) -> None:
    with pytest.raises(TypeError):
        call(sock_path, "echo", when=object())


def test_concurrent_calls_are_served_in_parallel(sock_path: Path) -> None:
    """The barrier only opens if all handlers run at once: a serialising server fails it."""
    clients = 8
    barrier = threading.Barrier(clients)

    def meet(request: dict[str, Any]) -> dict[str, Any]:
        barrier.wait(timeout=5)
        return {"n": request["n"]}

    results: dict[int, dict[str, Any]] = {}
    errors: list[BaseException] = []

    def client(n: int) -> None:
        try:
            results[n] = call(sock_path, "meet", n=n)
        except BaseException as exc:
            errors.append(exc)

    with ControlServer(sock_path, {"meet": meet}):
        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
    assert errors == []
    assert results == {n: {"ok": True, "n": n} for n in range(clients)}


def test_a_streamed_array_arrives_as_one_json_answer(sock_path: Path) -> None:
    """`status` of 100,000 jobs is sent a page at a time (`JsonArray`), never held whole."""
    made: list[int] = []

    def pages() -> Iterator[list[Any]]:
        for page in ([1, "é"], [], [{"a": None}], [3]):
            made.append(len(page))
            yield page

    def status(request: dict[str, Any]) -> dict[str, Any]:
        empty = control.JsonArray(iter(()))
        return {"before": 1, "jobs": control.JsonArray(pages()), "empty": empty, "after": [2]}

    with ControlServer(sock_path, {"status": status}):
        assert call(sock_path, "status") == {
            "ok": True,
            "before": 1,
            "jobs": [1, "é", {"a": None}, 3],
            "empty": [],
            "after": [2],
        }
    assert made == [2, 0, 1, 1]


def test_a_streamed_answer_may_take_longer_than_the_timeout_while_it_keeps_coming(
    sock_path: Path,
) -> None:
    """`status` of 100,000 jobs streams for longer than the tool's 10 s: an answer that has
    started and keeps coming is a daemon at work, not an unreachable one."""

    def pages() -> Iterator[list[Any]]:
        for n in range(5):
            time.sleep(0.1)  # each page well within the timeout, all of them beyond it
            yield [n]

    def status(request: dict[str, Any]) -> dict[str, Any]:
        return {"jobs": control.JsonArray(pages())}

    with ControlServer(sock_path, {"status": status}):
        assert call(sock_path, "status", timeout=0.3) == {"ok": True, "jobs": [0, 1, 2, 3, 4]}


def test_a_streamed_answer_that_stalls_longer_than_the_timeout_is_given_up(
    sock_path: Path,
) -> None:
    release = threading.Event()

    def pages() -> Iterator[list[Any]]:
        yield [0]
        release.wait(5)  # a wedged daemon, mid-answer
        yield [1]

    def status(request: dict[str, Any]) -> dict[str, Any]:
        return {"jobs": control.JsonArray(pages())}

    with ControlServer(sock_path, {"status": status}):
        try:
            with pytest.raises(DaemonUnreachable, match=r"stopped answering for 0\.2 s"):
                call(sock_path, "status", timeout=0.2)
        finally:
            release.set()
