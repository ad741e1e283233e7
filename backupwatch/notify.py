"""sd_notify for backupwatchd (SPEC §7): READY/RELOADING/STOPPING, STATUS and watchdog pings.

The datagram protocol of sd_notify(3) is spoken directly (a few lines), without blocking: when
nobody reads the socket and its queue is full, libsystemd's sd_notify (systemd-python) blocks,
and it does so holding the GIL, which froze every thread of the daemon (seen with 10 unread
datagrams, net.unix.max_dgram_qlen). A notification that cannot be sent at once is dropped and
logged once. systemd-python's sender is kept for tests that compare the two. A broken
NOTIFY_SOCKET must never take the daemon down: failures are logged once per kind and swallowed.

NOTIFY_SOCKET is deliberately left in the environment: the daemon sends notifications for its
whole life (RELOADING, STOPPING, watchdog pings), it starts no children that could mistake the
variable for theirs, and systemd ignores other PIDs anyway under the default NotifyAccess=main.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger(__name__)

Sender = Callable[[str, str], None]  # (NOTIFY_SOCKET address, message)


class NotifyError(Exception):
    """A notification that did not reach systemd; `kind` groups repeats for one log line."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class Notifier:
    """Tells systemd about our lifecycle; every method is a no-op outside `Type=notify`."""

    def __init__(self, environ: Mapping[str, str], *, use_libsystemd: bool | None = None) -> None:
        """Read the notify environment once.

        `use_libsystemd`: None and False use the built-in, non-blocking protocol; True asks for
        systemd-python (it may block, see the module docstring) but falls back if it is not
        installed.
        libsystemd reads NOTIFY_SOCKET from the real process environment, so it is only used
        when `environ` agrees with os.environ about the socket.
        """
        self.socket_address = environ.get("NOTIFY_SOCKET", "")
        self.enabled = bool(self.socket_address)
        self.watchdog_interval = _watchdog_interval(environ) if self.enabled else None
        self._send = self._choose_sender(use_libsystemd)
        self._failed_kinds: set[str] = set()
        self._lock = threading.Lock()

    @property
    def backend(self) -> str:
        """Which implementation sends, for the start-up log line and tests."""
        return "libsystemd" if self._send is _libsystemd_send else "datagram"

    def ready(self, status: str) -> None:
        """Start-up or reload done: systemd moves the unit to active (Type=notify)."""
        self._notify(f"READY=1\nSTATUS={_one_line(status)}")

    def reloading(self) -> None:
        """Entering SIGHUP reload; systemd ≥ 253 wants the monotonic time alongside it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """Shutdown begun, so systemd does not take the quiet for a hang."""
        self._notify("STOPPING=1")

    def status(self, text: str) -> None:
        """Free text shown by `systemctl status`."""
        self._notify(f"STATUS={_one_line(text)}")

    def watchdog(self) -> None:
        """Keep-alive; callers ping only while their loops are healthy (SPEC §7)."""
        self._notify("WATCHDOG=1")

    def _notify(self, message: str) -> None:
        if not self.enabled:
            return
        try:
            self._send(self.socket_address, message)
        except NotifyError as exc:
            self._report(exc)
        except Exception as exc:  # never let a notification take the daemon down
            self._report(NotifyError(type(exc).__name__, str(exc)))

    def _report(self, exc: NotifyError) -> None:
        """Log the first failure of each kind: a dead socket would otherwise log every ping."""
        with self._lock:
            if exc.kind in self._failed_kinds:
                return
            self._failed_kinds.add(exc.kind)
        log.warning("notify.failed", socket=self.socket_address, kind=exc.kind, error=exc.detail)

    def _choose_sender(self, use_libsystemd: bool | None) -> Sender:
        if not use_libsystemd or not _libsystemd_available():
            return _send_datagram
        if os.environ.get("NOTIFY_SOCKET", "") != self.socket_address:
            return _send_datagram
        return _libsystemd_send


def _libsystemd_available() -> bool:
    try:
        import systemd.daemon  # noqa: F401
    except ImportError:
        return False
    return True


def _libsystemd_send(_address: str, message: str) -> None:
    """sd_notify through systemd-python: it raises OSError on errors, returns False if unset.

    libsystemd finds the address in the process environment itself (checked equal before).
    """
    import systemd.daemon as daemon

    try:
        sent = daemon.notify(message)
    except OSError as exc:
        raise NotifyError(_errno_kind(exc), str(exc)) from exc
    if not sent:
        raise NotifyError("not-sent", "NOTIFY_SOCKET missing from the process environment")


def _send_datagram(address: str, message: str) -> None:
    """One AF_UNIX datagram, as sd_notify(3) does it; '@' names the abstract namespace."""
    target = _socket_address(address)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)  # a full queue: drop this one, never wait for systemd
            sock.sendto(message.encode(), target)
    except OSError as exc:
        raise NotifyError(_errno_kind(exc), str(exc)) from exc


def _socket_address(address: str) -> str | bytes:
    if address.startswith("@"):
        return b"\0" + address[1:].encode()
    if address.startswith("/"):
        return address
    # Relative paths are refused by sd_notify too; vsock: (systemd ≥ 254 in VMs) is not needed.
    raise NotifyError("unsupported-address", f"cannot send to {address!r}")


def _errno_kind(exc: OSError) -> str:
    """Group failures by errno (ENOENT, ECONNREFUSED…) so each is logged once."""
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises, when the watchdog is ours.

    WATCHDOG_PID names the process systemd expects pings from; a child that inherited the
    variables must not ping for its parent.
    """
    raw_usec = environ.get("WATCHDOG_USEC", "")
    raw_pid = environ.get("WATCHDOG_PID", "")
    try:
        usec = int(raw_usec) if raw_usec else 0
        pid = int(raw_pid) if raw_pid else os.getpid()
    except ValueError:
        log.warning("notify.bad_watchdog_env", watchdog_usec=raw_usec, watchdog_pid=raw_pid)
        return None
    if usec <= 0 or pid != os.getpid():
        return None
    return usec / 2 / 1e6


def _one_line(text: str) -> str:
    """A newline in STATUS would start a new (possibly meaningful) assignment."""
    return " ".join(text.splitlines())
