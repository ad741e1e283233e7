"""What the daemon has seen of each report file arriving: its writer, and how long it is still.

The watcher thread tells `Arrivals` about each event on a report path; the workers ask it what
`readiness.report_wait` needs. It holds state only for report paths not yet judged (a path is
forgotten once judged or gone), so memory follows the reports in flight, not the tree.

Clocks: `monotonic` for how long the daemon itself has watched something, the wall clock only
to read a file's ctime (set by the kernel, never by an agent, unlike mtime).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from backupwatch.fsutil import newest_change
from backupwatch.readiness import Writer
from backupwatch.sites import NEVER_SCANNED
from backupwatch.watcher import EventKind

WRITER_HORIZON = 3600.0
"""Seconds a file seen opened for writing, and not closed since, keeps its site folder busy."""


@dataclass(frozen=True)
class Signature:
    """A file's identity and last change: when any of it differs, the file has changed."""

    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Signature:
        return cls(st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class _Path:
    writer_open: bool = False
    closed_at: float | None = None
    signature: Signature | None = None
    signature_seen_at: float = 0.0


class Arrivals:
    """Thread-safe; see the module docstring. It is the pipeline's `Observer` in the daemon."""

    def __init__(
        self,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._monotonic = monotonic
        self._wall = wall
        self._lock = threading.Lock()
        self._paths: dict[Path, _Path] = {}
        self._writers: dict[Path, float] = {}  # staged data files open for writing: since when

    def saw(self, kind: EventKind, path: Path, linked: bool = False) -> None:
        """An event on a report path (watcher thread). `linked`: a new name for a file that
        already existed (a hard link), which no writer holds open because of it."""
        with self._lock:
            state = self._paths.setdefault(path, _Path())
            opened = kind is EventKind.CREATED and not linked
            placed = kind in (EventKind.CLOSED, EventKind.MOVED, EventKind.CREATED) and not opened
            if opened:
                state.writer_open, state.closed_at = True, None
            elif placed:
                state.writer_open, state.closed_at = False, self._monotonic()

    def saw_data(self, kind: EventKind, path: Path, linked: bool = False) -> None:
        """An event on a file of a site's tree that is not a report (staged data, a transfer's
        temp file): while one is open for writing, the site's transfer is still in flight.
        rsync writes a small file through a 256 KiB buffer, so its temp file can stay empty
        (its ctime unchanged) for the whole transfer: only its open shows it is coming."""
        with self._lock:
            if kind is EventKind.CREATED and not linked:
                self._writers[path] = self._monotonic()
            elif kind in (EventKind.CLOSED, EventKind.MOVED):
                self._writers.pop(path, None)

    def events_lost(self) -> None:
        """After an inotify overflow nothing observed can be trusted: a close may be lost."""
        with self._lock:
            for state in self._paths.values():
                state.writer_open, state.closed_at = False, None
            self._writers.clear()

    def writer(self, path: Path) -> Writer:
        with self._lock:
            state = self._paths.get(path)
            if state is None:
                return Writer.unobserved()
            closed_for = None
            if state.closed_at is not None:
                closed_for = self._monotonic() - state.closed_at
            return Writer(open=state.writer_open, closed_for=closed_for)

    def unchanged_for(self, path: Path, st: os.stat_result) -> float:
        """Seconds the file has certainly not changed: since its ctime, or since the daemon
        first saw it as it is now, whichever is longer (a ctime ahead of the clock, after a
        clock step, counts for nothing)."""
        signature = Signature.of(st)
        now = self._monotonic()
        with self._lock:
            state = self._paths.setdefault(path, _Path())
            if state.signature != signature:
                state.signature, state.signature_seen_at = signature, now
            watched = now - state.signature_seen_at
        since_ctime = self._wall() - st.st_ctime
        return max(watched, since_ctime if since_ctime >= 0 else 0.0)

    def quiet_for(self, folder: Path) -> float:
        """Seconds since any file under `folder` last changed (its newest ctime), or 0 while
        a file there is open for writing: a transfer writing there, even under a temp name,
        keeps it from being quiet. A writer open longer than WRITER_HORIZON no longer counts
        on its own (a process that keeps a file open for good must not hold verdicts forever);
        its writes still do, through the ctime."""
        if self._writing_under(folder):
            return 0.0
        newest = newest_change(folder, NEVER_SCANNED)
        return float("inf") if newest is None else max(0.0, self._wall() - newest)

    def _writing_under(self, folder: Path) -> bool:
        """A writer whose file is gone no longer counts: the watch asks no close events for
        files unlinked while open (IN_EXCL_UNLINK), nor deletions, so look."""
        horizon = self._monotonic() - WRITER_HORIZON
        with self._lock:
            candidates = [p for p in self._writers if p.is_relative_to(folder)]
        for path in candidates:
            gone = not os.path.lexists(path)
            with self._lock:
                since = self._writers.get(path)
                if since is None:
                    continue
                if gone or since < horizon:
                    del self._writers[path]
                    continue
            return True
        return False

    def done(self, path: Path) -> None:
        """Judged, gone or moved away: the next file at this path is a new arrival."""
        with self._lock:
            self._paths.pop(path, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._paths)


@dataclass
class _Waiter:
    folder: Path  # the site folder: staged data arriving there ends the wait early
    due: float | None  # monotonic time to look again; None: only an event ends the wait
    why: str


class Waiting:
    """Reports that may not be judged yet, kept out of the work queue on purpose.

    In the queue they would hold up the start (READY waits for the queue to drain) and keep the
    MISSING timer deferring their site; here they cost nothing until an event under their site
    folder, or their own recheck time, puts them back on the queue.
    """

    def __init__(
        self,
        monotonic: Callable[[], float] = time.monotonic,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        self._monotonic = monotonic
        self._wake = wake  # the main loop sleeps until the next recheck: tell it of a new one
        self._lock = threading.Lock()
        self._waiters: dict[Path, _Waiter] = {}

    def park(self, path: Path, folder: Path, recheck_in: float | None, why: str) -> None:
        due = None if recheck_in is None else self._monotonic() + max(recheck_in, 0.0)
        with self._lock:
            self._waiters[path] = _Waiter(folder, due, why)
        if due is not None:
            self._wake()

    def remove(self, path: Path) -> None:
        with self._lock:
            self._waiters.pop(path, None)

    def touched(self, path: Path) -> list[Path]:
        """The waiting reports that an event on `path` may unblock: itself, and every report
        waiting in the site folder that holds it (its staged file may just have landed)."""
        with self._lock:
            if not self._waiters:
                return []
            parents = set(path.parents)
            return [p for p, w in self._waiters.items() if p == path or w.folder in parents]

    def due(self) -> list[Path]:
        """Reports whose recheck time has come; they leave the waiting set."""
        now = self._monotonic()
        with self._lock:
            ready = [p for p, w in self._waiters.items() if w.due is not None and w.due <= now]
            for path in ready:
                del self._waiters[path]
            return ready

    def next_due_in(self) -> float | None:
        with self._lock:
            dues = [w.due for w in self._waiters.values() if w.due is not None]
        return None if not dues else max(0.0, min(dues) - self._monotonic())

    def pending_under(self, folder: Path) -> bool:
        with self._lock:
            return any(w.folder == folder for w in self._waiters.values())

    def reasons(self) -> dict[str, int]:
        """How many reports wait, by why: for `status`."""
        counts: dict[str, int] = {}
        with self._lock:
            for waiter in self._waiters.values():
                counts[waiter.why] = counts.get(waiter.why, 0) + 1
        return counts

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiters)
