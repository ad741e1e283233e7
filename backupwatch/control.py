"""The Unix control socket between `backupwatchctl` and `backupwatchd` (SPEC §8, §9), both ends.

A Unix socket rather than TCP so that only local users can reach the daemon, and file permissions
(mode 0660, the daemon's group) decide who may: fail2ban's split, without a network surface.

The protocol is one JSON object per line each way, then close: trivial to debug with `socat`, no
framing state to get wrong, and a request never outlives its connection. Request:
`{"command": "status", ...args}`. Response: `{"ok": true, ...}` or `{"ok": false, "error": "..."}`.

AF_UNIX paths are limited to 107 bytes (108 with the NUL). `ControlServer.start()` and `call()`
check that up front and raise `ControlError` naming the path, because the kernel's own
"AF_UNIX path too long" does not say which setting to fix.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["ControlError", "ControlServer", "DaemonUnreachable", "Handler", "call"]

Handler = Callable[[dict[str, Any]], dict[str, Any]]

MAX_REQUEST_BYTES = 64 * 1024  # requests are a command and a few arguments
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # `status` lists every job: allow large fleets
READ_TIMEOUT = 5.0  # a client that connects and goes quiet gives its thread back after this
PROBE_TIMEOUT = 1.0  # a live daemon accepts at once; waiting longer only delays a stale restart
MAX_CONNECTIONS = 16  # requests are rare: this caps threads, not throughput
SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) minus the terminating NUL
PRIVATE_NAME_EXTRA = 9  # "." + name + "." + a pid of up to 7 digits: see ControlServer._bind
CONTROL_SOCKET_MAX = SUN_PATH_MAX - PRIVATE_NAME_EXTRA
BIND_UMASK = 0o177  # the socket file is born 0600, then widened to `mode` by chmod


class _Log:
    """structlog, imported on first use: only the server side logs, and importing structlog
    would cost `backupwatchctl status` a fifth of a second (SPEC §11: well under a second)."""

    def __getattr__(self, name: str) -> Any:
        import structlog

        return getattr(structlog.get_logger(__name__), name)


log = _Log()


class ControlError(Exception):
    """The control socket could not be set up or spoke something other than the protocol."""


class DaemonUnreachable(ControlError):
    """Nobody answered: `backupwatchctl` reports the daemon as down (exit 3)."""


class _LineTooLong(Exception):
    """The peer sent more than the limit without a newline."""


# --- framing shared by both ends -------------------------------------------------------------


class _Stalled(TimeoutError):
    """An answer started, then no byte came for the idle time."""


def _read_line(
    sock: socket.socket, limit: int, deadline: float, idle: float | None = None
) -> bytes | None:
    """Read one newline-terminated line, or None if the peer closed before sending anything.

    The deadline is for the whole line, not per recv(), so a peer trickling one byte at a time
    cannot hold the connection beyond it (the server reading a request). With `idle` (the
    client reading its daemon's answer) the deadline is for the first bytes, then each chunk
    may take `idle`: a `status` of 100,000 jobs streams for longer than the tool's timeout.
    Bytes after the newline are ignored: one request per connection. A last line without a
    newline is accepted, for `printf ... | socat` users.
    """
    buffer = bytearray()
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise (_Stalled if buffer else TimeoutError)("timed out reading a line")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise (_Stalled if buffer else TimeoutError)("timed out reading a line") from None
        if not chunk:
            return bytes(buffer) if buffer else None
        if idle is not None:
            deadline = time.monotonic() + idle
        newline = chunk.find(b"\n")
        if newline >= 0:
            buffer += chunk[:newline]
        else:
            buffer += chunk
        if len(buffer) > limit:
            raise _LineTooLong(f"line longer than {limit} bytes")
        if newline >= 0:
            return bytes(buffer)


def _encode(message: Mapping[str, Any]) -> bytes:
    """One compact JSON line; ASCII-only so that no byte inside a value can be a newline."""
    return _dumps(message).encode("ascii") + b"\n"


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=True)


class JsonArray:
    """A top-level value of an answer that is a JSON array written to the client a batch at
    a time: `status --json` of 100,000 jobs built as one list of dicts, then one string, then
    its bytes, was ~400 MiB inside the daemon. The batches are made while the answer is sent."""

    def __init__(self, batches: Iterator[list[Any]]) -> None:
        self.batches = batches

    def pieces(self) -> Iterator[str]:
        yield "["
        first = True
        for batch in self.batches:
            if batch:
                yield ("" if first else ",") + _dumps(batch)[1:-1]
                first = False
        yield "]"


def _encode_pieces(message: Mapping[str, Any]) -> Iterator[bytes]:
    """`_encode`, with each `JsonArray` value streamed in place of a unique placeholder."""
    arrays = {key: value for key, value in message.items() if isinstance(value, JsonArray)}
    if not arrays:
        yield _encode(message)
        return
    tokens = {key: f"stream-{uuid.uuid4().hex}" for key in arrays}
    text = _dumps({**message, **tokens})
    for key, array in arrays.items():
        before, text = text.split(_dumps(tokens[key]), 1)
        yield before.encode("ascii")
        for piece in array.pieces():
            yield piece.encode("ascii")
    yield text.encode("ascii") + b"\n"


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}


def _check_path_length(path: Path, limit: int = SUN_PATH_MAX) -> None:
    """Fail with the path in the message before the kernel fails without it."""
    size = len(os.fsencode(path))
    if size > limit:
        room = (
            "" if limit == SUN_PATH_MAX else f" less the {PRIVATE_NAME_EXTRA} its first name needs"
        )
        raise ControlError(
            f"control socket path {path} is {size} bytes long; AF_UNIX allows at most "
            f"{SUN_PATH_MAX}{room}: choose a shorter control_socket"
        )


# --- server ----------------------------------------------------------------------------------


class ControlServer:
    """Serves `handlers` on a Unix socket, one short-lived thread per connection.

    Handlers receive the whole request object (including "command") and return the response
    object; `"ok": true` is added unless the handler sets `ok` itself, so a handler can refuse
    with `{"ok": False, "error": ...}` (reload of an invalid config) without raising. A handler
    that raises becomes `{"ok": false, "error": "Class: message"}` and the server carries on.
    Handlers run concurrently, each on its connection's thread: they must be thread-safe.
    """

    def __init__(
        self,
        path: Path,
        handlers: Mapping[str, Handler],
        mode: int = 0o660,
        *,
        read_timeout: float = READ_TIMEOUT,
    ) -> None:
        self.path = path
        self.mode = mode
        self._handlers = dict(handlers)
        self._read_timeout = read_timeout
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we bound
        self._wake_r = self._wake_w = -1
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ControlServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- lifecycle --

    def start(self) -> None:
        """Bind and serve; refuses (ControlError) rather than steal a live daemon's socket."""
        if self._listener is not None:
            raise ControlError(f"control server on {self.path} already started")
        _check_path_length(self.path, CONTROL_SOCKET_MAX)
        self._ensure_parent()
        self._clear_stale_socket()
        listener = self._bind()
        try:
            self._wake_r, self._wake_w = os.pipe()
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._stopping.clear()
        self._thread = threading.Thread(
            target=self._accept_loop, args=(listener,), name="control-accept", daemon=True
        )
        self._thread.start()
        log.info("control.listening", path=str(self.path), mode=f"{self.mode:04o}")

    def stop(self) -> None:
        """Stop accepting and remove the socket file, unless another process has replaced it.

        Connections already being served finish on their own threads (bounded by the read
        timeout, and by whatever their handler does); stop() does not wait for them, so that
        SIGTERM handling is not held up by a slow `reload`.
        """
        if self._listener is None:
            return
        self._stopping.set()
        os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._unlink_if_ours()
        self._listener.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._listener = None
        self._thread = None

    def is_alive(self) -> bool:
        """For the daemon's watchdog: true while the accept loop runs."""
        thread = self._thread
        return thread is not None and thread.is_alive() and not self._stopping.is_set()

    # -- setup helpers --

    def _ensure_parent(self) -> None:
        """/run/backupwatch may not exist outside systemd's RuntimeDirectory=; 0755 so the
        operators' group can traverse it (the socket's own mode does the access control)."""
        parent = self.path.parent
        if parent.is_dir():
            return
        parent.mkdir(parents=True, exist_ok=True)
        os.chmod(parent, 0o755)  # noqa: S103  world-traversable by design, see docstring

    def _clear_stale_socket(self) -> None:
        """Remove a socket left by a daemon that died; refuse anything else at the path."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket: refusing to replace it")
        if _socket_answers(self.path):
            raise ControlError(f"another backupwatchd is already listening on {self.path}")
        log.warning("control.stale_socket_removed", path=str(self.path))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _bind(self) -> socket.socket:
        """Bind a private name under a restrictive umask, chmod, listen, then link it into
        place: the path never exists with wider access than `mode`, whatever umask the daemon
        was started with, and never exists without a listener (a client that found it between
        bind() and listen() was refused and told the daemon was not running).

        os.umask is process-wide: a file created by another thread during these few
        microseconds gets 0600 at most. Start the control server before worker threads.
        """
        private = self.path.with_name(f".{self.path.name}.{os.getpid()}")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(private)  # left by a daemon with this pid that died while starting
            old_umask = os.umask(BIND_UMASK)
            try:
                listener.bind(os.fspath(private))
            finally:
                os.umask(old_umask)
            try:
                self._publish(listener, private)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(private)
        except OSError as exc:
            listener.close()
            raise ControlError(f"cannot listen on {self.path}: {exc}") from exc
        except BaseException:
            listener.close()
            raise
        return listener

    def _publish(self, listener: socket.socket, private: Path) -> None:
        """link(), unlike rename(), fails rather than replace a socket another daemon has
        published since _clear_stale_socket looked."""
        os.chmod(private, self.mode)
        listener.listen(MAX_CONNECTIONS)
        listener.setblocking(False)
        try:
            os.link(private, self.path)
        except FileExistsError as exc:
            raise ControlError(f"another backupwatchd is already listening on {self.path}") from exc
        st = os.lstat(self.path)
        self._identity = (st.st_dev, st.st_ino)

    def _unlink_if_ours(self) -> None:
        """A newer daemon may already have replaced the file: removing it would orphan that one."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == self._identity:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        else:
            log.warning("control.socket_replaced", path=str(self.path))

    # -- serving --

    def _accept_loop(self, listener: socket.socket) -> None:
        """Wait on the listener and a wake-up pipe, since close() does not interrupt accept()."""
        with selectors.DefaultSelector() as selector:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in selector.select():
                    if key.fileobj is listener and not self._stopping.is_set():
                        self._accept_one(listener)

    def _accept_one(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return  # the client gave up between readiness and accept()
        except OSError:
            log.exception("control.accept_failed", path=str(self.path))
            self._stopping.wait(0.1)  # e.g. EMFILE: do not spin on a listener that stays ready
            return
        if not self._slots.acquire(blocking=False):
            _send_quietly(conn, _error("busy: too many control connections"))
            conn.close()
            return
        try:
            threading.Thread(
                target=self._serve, args=(conn,), name="control-conn", daemon=True
            ).start()
        except BaseException:
            self._slots.release()
            conn.close()
            raise

    def _serve(self, conn: socket.socket) -> None:
        """Answer one request; never raises, so a bad client costs only its own connection."""
        try:
            with conn:
                response = self._respond(conn)
                if response is not None:
                    _send_quietly(conn, response)
        except Exception:
            log.exception("control.connection_failed")
        finally:
            self._slots.release()

    def _respond(self, conn: socket.socket) -> dict[str, Any] | None:
        deadline = time.monotonic() + self._read_timeout
        try:
            line = _read_line(conn, MAX_REQUEST_BYTES, deadline)
        except _LineTooLong:
            log.warning("control.request_too_long", limit=MAX_REQUEST_BYTES)
            return _error(f"request longer than {MAX_REQUEST_BYTES} bytes")
        except TimeoutError:
            log.warning("control.request_timeout", timeout_s=self._read_timeout)
            return _error(f"no complete request within {self._read_timeout:g} s")
        if line is None:
            return None  # a liveness probe: connect, then close
        return self._dispatch(line)

    def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = _parse_request(line)
        except ValueError as exc:
            log.warning("control.bad_request", error=str(exc))
            return _error(str(exc))
        command = request["command"]
        handler = self._handlers.get(command)
        if handler is None:
            return _error(f"unknown command: {command}")
        try:
            result = handler(request)
        except Exception as exc:
            log.exception("control.handler_failed", command=command)
            return _error(f"{type(exc).__name__}: {exc}")
        if not isinstance(result, dict):
            log.error("control.bad_handler_result", command=command, type=type(result).__name__)
            return _error(f"internal error: handler for {command} returned a non-object")
        return {"ok": True, **result}


def _parse_request(line: bytes) -> dict[str, Any]:
    """Raises ValueError with a message fit to send back to the client."""
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"invalid JSON request: {exc}") from exc
    if not isinstance(request, dict):
        raise ValueError("request must be a JSON object")
    if not isinstance(request.get("command"), str):
        raise ValueError('request must have a string "command"')
    return request


def _send_quietly(conn: socket.socket, response: dict[str, Any]) -> None:
    """A client that hung up or a handler result that is not JSON must not kill the thread.

    A streamed answer (`JsonArray`) that fails half-way is cut short: the client reads an
    incomplete line, which it reports as an invalid answer."""
    pieces = _encode_pieces(response)
    try:
        first = next(pieces)
    except (TypeError, ValueError) as exc:
        log.error("control.unserializable_response", error=str(exc))
        first, pieces = _encode(_error(f"internal error: response is not JSON: {exc}")), iter(())
    try:
        conn.settimeout(READ_TIMEOUT)
        conn.sendall(first)
        for piece in pieces:
            conn.sendall(piece)
    except OSError as exc:
        log.info("control.client_gone", error=str(exc))


def _socket_answers(path: Path) -> bool:
    """True when something accepts connections on `path`; False only when it is certainly stale.

    A timeout or a full backlog means a live but busy daemon, so only ECONNREFUSED (nobody bound)
    and a vanished file count as stale.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(PROBE_TIMEOUT)
        try:
            probe.connect(os.fspath(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as exc:
            raise ControlError(f"cannot tell whether {path} is in use: {exc}") from exc
    return True


# --- client ----------------------------------------------------------------------------------


def call(path: Path, command: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """Send one command and return the daemon's response, whether `ok` is true or false.

    `ok: false` is a real answer (the daemon refused, e.g. an invalid config on reload), so
    backupwatchctl prints its error and picks the exit code. Raises DaemonUnreachable when no
    daemon starts answering within `timeout` (default 10 s because reload can take seconds) or
    an answer stops coming for that long, ControlError when the answer is not the protocol.
    TypeError if `args` is not JSON.
    """
    payload = _encode({"command": command, **args})
    _check_path_length(path)
    deadline = time.monotonic() + timeout
    with _connect(path, timeout) as sock:
        _send_request(sock, payload, deadline)
        line = _receive(sock, path, timeout, deadline)
    return _parse_response(line, path)


@contextlib.contextmanager
def _connect(path: Path, timeout: float) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect(os.fspath(path))
        except FileNotFoundError as exc:
            raise DaemonUnreachable(f"backupwatchd is not running: no socket at {path}") from exc
        except ConnectionRefusedError as exc:
            raise DaemonUnreachable(
                f"backupwatchd is not running: connection refused on {path}"
            ) from exc
        except (TimeoutError, BlockingIOError) as exc:
            raise DaemonUnreachable(f"backupwatchd on {path} is not accepting connections") from exc
        except PermissionError as exc:
            raise ControlError(f"not allowed to connect to {path}: check its group") from exc
        except OSError as exc:
            raise ControlError(f"cannot connect to {path}: {exc}") from exc
        yield sock


def _send_request(sock: socket.socket, payload: bytes, deadline: float) -> None:
    """A reset while sending means the daemon already answered (e.g. 'too long'): read that."""
    sock.settimeout(max(deadline - time.monotonic(), 0.001))
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(payload)


def _receive(sock: socket.socket, path: Path, timeout: float, deadline: float) -> bytes:
    try:
        line = _read_line(sock, MAX_RESPONSE_BYTES, deadline, idle=timeout)
    except _Stalled as exc:
        raise DaemonUnreachable(
            f"backupwatchd on {path} stopped answering for {timeout:g} s in the middle of its "
            "answer"
        ) from exc
    except TimeoutError as exc:
        raise DaemonUnreachable(
            f"no answer from backupwatchd on {path} within {timeout:g} s"
        ) from exc
    except _LineTooLong as exc:
        raise ControlError(f"response from {path} exceeds {MAX_RESPONSE_BYTES} bytes") from exc
    except OSError as exc:
        raise ControlError(f"connection to {path} failed: {exc}") from exc
    if line is None:
        raise ControlError(f"backupwatchd on {path} closed the connection without answering")
    return line


def _parse_response(line: bytes, path: Path) -> dict[str, Any]:
    try:
        response = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlError(f"malformed response from {path}: {exc}") from exc
    if not isinstance(response, dict) or not isinstance(response.get("ok"), bool):
        raise ControlError(f'malformed response from {path}: not an object with a boolean "ok"')
    return response
