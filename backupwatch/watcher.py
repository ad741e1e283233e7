"""Inotify adapter (SPEC §3, §7): turns kernel events into paths on a bounded work queue.

Nothing here knows what a report is. The watchdog handler only maps an event to an
`EventKind` and a path and hands it to the daemon's callback; the daemon decides what the
path means and what to put on the `WorkQueue`. Everything the kernel can lose (queue
overflow, watches over `max_user_watches`) is turned into a rescan request, because the
periodic reconciliation scan, not inotify, is what guarantees that nothing is missed.
"""

from __future__ import annotations

import contextlib
import enum
import heapq
import itertools
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import structlog
from watchdog.events import (
    DirCreatedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

__all__ = [
    "DepositWatcher",
    "EventKind",
    "WorkQueue",
    "check_inotify_limits",
    "count_folders",
]

_log = structlog.get_logger(__name__)

# Only these events reach us. The filter also narrows the kernel mask (watchdog derives it in
# InotifyEmitter.get_event_mask_from_filter) to IN_CREATE|IN_MOVED_FROM|IN_MOVED_TO|
# IN_CLOSE_WRITE|IN_DELETE_SELF: without it every open/read/close of every file and folder
# (including watchdog's own os.walk while adding watches) is queued, and above ~4,000 folders
# the 16,384-event kernel queue overflows for good.
EVENT_FILTER: tuple[type[FileSystemEvent], ...] = (
    FileCreatedEvent,
    FileClosedEvent,
    FileMovedEvent,
    DirCreatedEvent,
)

# Where watchdog 7.1.0 reports lost events, and nowhere else: the kernel's IN_Q_OVERFLOW is
# logged by InotifyFD.handle_event ("Inotify queue overflowed; filesystem events were lost"),
# then each recursive watch group logs "Inotify queue overflowed; reconciling recursive
# watches below %r" and, if re-adding its watches fails, "Unable to rebuild recursive inotify
# watches below %r". Matching "overflow" rather than the whole sentence survives rewording.
OVERFLOW_LOGGERS: tuple[str, ...] = ("watchdog.observers.inotify_c", "watchdog.observers.inotify")
_LOST_WATCHES_PREFIX = "Unable to rebuild recursive inotify watches"
_RECONCILING = "reconciling recursive watches"
_REBUILD_WAIT = 120.0  # seconds; 90,000 watches take about 2.5 s to add

_INOTIFY_PROC = Path("/proc/sys/fs/inotify")
_DOUBLE_WATCH_WARNING = r"Callback with id .* already exists for watch"


class EventKind(enum.StrEnum):
    """What the kernel said about a path; the daemon maps it to "read now" or "let it settle"."""

    CLOSED = "closed"
    MOVED = "moved"
    CREATED = "created"
    DIR_CREATED = "dir_created"


# --------------------------------------------------------------------------- work queue


class WorkQueue:
    """Thread-safe, de-duplicating (by path) queue of report paths with a not-before time, bounded.

    One entry per path, because inotify repeats itself ("created" twice or three times, then
    "closed") and a report must be read once it has settled, not once per event. Bounded,
    because the producer is watchdog's dispatch thread: blocking it would only move the
    backlog into watchdog's unbounded queue, so a full queue drops the path and sets
    `needs_rescan` for the reconciliation scan to pick it up instead.

    `clock` drives the not-before times only; `get`/`wait_idle` timeouts use real monotonic
    time so that a test clock cannot make them block forever.
    """

    def __init__(self, maxsize: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self._maxsize = maxsize
        self._clock = clock
        self._cond = threading.Condition()
        self._queued: dict[Path, tuple[float, int]] = {}  # path -> (not_before, sequence)
        self._heap: list[tuple[float, int, Path]] = []  # may hold stale entries (lazy deletion)
        self._in_progress: set[Path] = set()
        self._again: dict[Path, float] = {}  # put while in progress: requeued by done()
        self._seq = itertools.count()
        self._closed = False
        self.needs_rescan = threading.Event()

    def put(self, path: Path, delay: float = 0.0) -> bool:
        """Queue `path`, readable from now + `delay`; False (and `needs_rescan`) when full.

        A path already waiting keeps one entry and the earlier not-before, so a "closed"
        (delay 0) overtakes a settling "created". A path being processed is not handed to a
        second worker: it is queued again when `done` is called.
        """
        not_before = self._clock() + max(delay, 0.0)
        with self._cond:
            if self._closed:
                return False
            if path in self._in_progress:
                return self._put_again(path, not_before)
            if path in self._queued:
                self._lower_not_before(path, not_before)
                return True
            if not self._has_room():
                return self._overflow(path)
            self._push(path, not_before)
            return True

    def get(self, timeout: float | None) -> Path | None:
        """Take the path whose not-before has come first; None on timeout or once closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._closed:
                wait = self._take_or_wait_time()
                if isinstance(wait, Path):
                    return wait
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(_min_timeout(wait, remaining))
            return None

    def done(self, path: Path) -> None:
        """Release `path`; requeue it if it was put again while it was being processed."""
        with self._cond:
            self._in_progress.discard(path)
            not_before = self._again.pop(path, None)
            if not_before is not None and not self._closed:
                self._push(path, not_before)
            self._cond.notify_all()

    def in_progress_or_queued(self) -> int:
        """Distinct paths waiting or being processed (`pending_reports` in `status`)."""
        with self._cond:
            return len(self._queued) + len(self._in_progress)

    def pending_under(self, folder: Path) -> bool:
        """Is a report inside `folder` still waiting or in hand? The MISSING timer asks first."""
        with self._cond:
            paths = itertools.chain(self._queued, self._in_progress)
            return any(p.is_relative_to(folder) for p in paths)

    def wait_idle(self, timeout: float) -> bool:
        """Block until nothing is queued or in progress; False if `timeout` passes first.

        At start the daemon processes the waiting reports before it flags missed deadlines,
        otherwise a report sitting in the queue would be flagged MISSING.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queued or self._in_progress:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def close(self) -> None:
        """Wake every getter with None: at shutdown the start scan re-finds what was queued."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # Internals: all called with self._cond held.

    def _has_room(self) -> bool:
        return len(self._queued) + len(self._again) < self._maxsize

    def _overflow(self, path: Path) -> bool:
        if not self.needs_rescan.is_set():
            _log.warning("work_queue_full", path=str(path), maxsize=self._maxsize)
        self.needs_rescan.set()
        return False

    def _put_again(self, path: Path, not_before: float) -> bool:
        previous = self._again.get(path)
        if previous is None and not self._has_room():
            return self._overflow(path)
        self._again[path] = not_before if previous is None else min(previous, not_before)
        return True

    def _push(self, path: Path, not_before: float) -> None:
        seq = next(self._seq)
        self._queued[path] = (not_before, seq)
        heapq.heappush(self._heap, (not_before, seq, path))
        self._cond.notify_all()

    def _lower_not_before(self, path: Path, not_before: float) -> None:
        current, _ = self._queued[path]
        if not_before < current:
            self._push(path, not_before)  # the old heap entry becomes stale
            self._compact()

    def _compact(self) -> None:
        """Drop stale heap entries once they outnumber live ones, so memory stays bounded."""
        if len(self._heap) > 2 * len(self._queued) + 64:
            self._heap = [(nb, seq, p) for p, (nb, seq) in self._queued.items()]
            heapq.heapify(self._heap)

    def _take_or_wait_time(self) -> Path | float | None:
        """The path to hand out now, else seconds until the next is due (None: queue empty)."""
        while self._heap:
            not_before, seq, path = self._heap[0]
            if self._queued.get(path) != (not_before, seq):
                heapq.heappop(self._heap)
                continue
            wait = not_before - self._clock()
            if wait > 0:
                return wait
            heapq.heappop(self._heap)
            del self._queued[path]
            self._in_progress.add(path)
            return path
        return None


def _min_timeout(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


# --------------------------------------------------------------------------- event handler


def classify(event: FileSystemEvent) -> tuple[EventKind, Path] | None:
    """Map a watchdog event to what the daemon needs; None for anything it does not use.

    A move reports its destination: that is where the finished file now is.
    """
    if isinstance(event, FileMovedEvent):
        return EventKind.MOVED, Path(os.fsdecode(event.dest_path))
    if isinstance(event, FileClosedEvent):
        return EventKind.CLOSED, Path(os.fsdecode(event.src_path))
    if isinstance(event, DirCreatedEvent):
        return EventKind.DIR_CREATED, Path(os.fsdecode(event.src_path))
    if isinstance(event, FileCreatedEvent):
        return EventKind.CREATED, Path(os.fsdecode(event.src_path))
    return None


class _Handler(FileSystemEventHandler):
    """Runs in watchdog's only dispatch thread: one exception escaping here ends that thread
    for good and events pile up unseen in watchdog's unbounded queue, so nothing escapes."""

    def __init__(self, on_event: Callable[[EventKind, Path], None]) -> None:
        super().__init__()
        self._on_event = on_event

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            item = classify(event)
            if item is not None:
                self._on_event(*item)
        except BaseException:  # a SystemExit here would end the dispatch thread too
            with contextlib.suppress(BaseException):
                _log.exception("watch_event_failed", event=repr(event))


# --------------------------------------------------------------------------- overflow hook


@runtime_checkable
class _Lock(Protocol):
    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...
    def release(self) -> None: ...


class _OverflowHook(logging.Handler):
    """Watchdog reports a kernel queue overflow only through its logger, so we listen there.

    On an overflow watchdog removes and re-adds every watch; a file written in between is
    seen by no event. So `on_overflow` is called twice: at once (start the rescan early), and
    again once the watches are back, so that a rescan starting then misses nothing. The
    "reconciling" record is logged while watchdog holds the watch group's lock for the
    rebuild, so a helper thread that takes that lock wakes exactly when the rebuild is done.
    """

    def __init__(
        self, on_overflow: Callable[[], None], rebuild_locks: Callable[[], list[_Lock]]
    ) -> None:
        super().__init__(level=logging.WARNING)
        self._on_overflow = on_overflow
        self._rebuild_locks = rebuild_locks
        self._saved_levels: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._react(record)
        except BaseException:  # runs in watchdog's inotify reader thread: never kill it
            with contextlib.suppress(BaseException):
                _log.exception("overflow_hook_failed")

    def _react(self, record: logging.LogRecord) -> None:
        if not _means_lost_events(record):
            return
        message = record.getMessage()
        _log.warning("inotify_events_lost", watchdog_message=message)
        locks = self._rebuild_locks() if _RECONCILING in message else []
        if not locks:
            self._on_overflow()
            return
        threading.Thread(
            target=self._notify_after_rebuild, args=(locks,), name="watch-rebuild", daemon=True
        ).start()

    def _notify_after_rebuild(self, locks: list[_Lock]) -> None:
        try:
            for lock in locks:
                if lock.acquire(timeout=_REBUILD_WAIT):
                    lock.release()
            _log.info("inotify_watches_rebuilt")
            self._on_overflow()
        except BaseException:
            with contextlib.suppress(BaseException):
                _log.exception("overflow_hook_failed")

    def install(self) -> None:
        """Attach to watchdog's loggers, lowering them to WARNING if someone silenced them:
        a level above WARNING would drop the record before any handler sees it."""
        for name in OVERFLOW_LOGGERS:
            logger = logging.getLogger(name)
            if logger.getEffectiveLevel() > logging.WARNING:
                self._saved_levels[name] = logger.level
                logger.setLevel(logging.WARNING)
            logger.addHandler(self)

    def uninstall(self) -> None:
        for name in OVERFLOW_LOGGERS:
            logger = logging.getLogger(name)
            logger.removeHandler(self)
            if name in self._saved_levels:
                logger.setLevel(self._saved_levels.pop(name))


def _means_lost_events(record: logging.LogRecord) -> bool:
    if record.name not in OVERFLOW_LOGGERS or record.levelno < logging.WARNING:
        return False
    message = record.getMessage()
    return "overflow" in message.lower() or message.startswith(_LOST_WATCHES_PREFIX)


# --------------------------------------------------------------------------- watcher


class DepositWatcher:
    """One recursive inotify observer on the storage root; new folders are watched as they
    appear (watchdog adds the watch on IN_CREATE and synthesises "created" for what is
    already inside), so no restart is ever needed for a new site."""

    def __init__(
        self,
        root: Path,
        on_event: Callable[[EventKind, Path], None],
        on_overflow: Callable[[], None],
    ) -> None:
        self._root = root
        self._handler = _Handler(on_event)
        self._hook = _OverflowHook(on_overflow, self._rebuild_locks)
        self._observer: BaseObserver | None = None
        self.folder_count = 0
        self.limit_warnings: list[str] = []

    def start(self) -> None:
        """Add every watch (synchronously: when this returns, events are flowing).

        Raises OSError when the root itself cannot be watched; watches that fail below the
        root are only counted and logged, since watchdog drops those errors silently.
        """
        self.folder_count = count_folders(self._root)
        self.limit_warnings = check_inotify_limits(self.folder_count)
        for warning in self.limit_warnings:
            _log.warning("inotify_limit_low", detail=warning)
        # watchdog warns (stderr, full repr of its state) whenever `mkdir -p` makes it add a
        # watch twice; harmless, and noise in the journal
        warnings.filterwarnings("ignore", _DOUBLE_WATCH_WARNING, RuntimeWarning)
        self._hook.install()  # before start: the initial walk can already overflow
        try:
            self._observer = self._start_observer()
        except BaseException:
            self._hook.uninstall()
            raise
        self._check_watch_count()

    def stop(self, timeout: float = 5) -> None:
        """Stop the observer threads; idempotent, so the daemon can call it from any exit."""
        observer, self._observer = self._observer, None
        self._hook.uninstall()
        if observer is None:
            return
        observer.stop()
        observer.join(timeout)
        if observer.is_alive():
            _log.warning("watcher_stop_timeout", timeout=timeout)

    def is_alive(self) -> bool:
        """All three watchdog threads (inotify reader, emitter, dispatcher) are running:
        if any one dies, events stop silently, so the health check asks for all of them."""
        observer = self._observer
        if observer is None or not observer.is_alive():
            return False
        threads: list[threading.Thread] = list(observer.emitters)
        reader = getattr(observer, "_inotify_fd", None)
        if isinstance(reader, threading.Thread):
            threads.append(reader)
        return bool(threads) and all(t.is_alive() for t in threads)

    def watch_count(self) -> int | None:
        """Kernel watches held now (None if watchdog's internals moved): below the folder
        count means some folders are only covered by the periodic rescan."""
        reader = getattr(self._observer, "_inotify_fd", None)
        watches = getattr(reader, "_watch_for_wd", None)
        return len(watches) if isinstance(watches, dict) else None

    def _rebuild_locks(self) -> list[_Lock]:
        """The locks watchdog (7.1.0) holds while it re-adds watches after an overflow;
        [] if its internals moved, and the hook then notifies at once instead."""
        observer = self._observer
        groups = [getattr(e, "_inotify", None) for e in observer.emitters] if observer else []
        locks = [getattr(g, "_lock", None) for g in groups]
        return [lock for lock in locks if isinstance(lock, _Lock)]

    def _start_observer(self) -> BaseObserver:
        # Imported here so that the rest of this module (WorkQueue) imports on any platform.
        from watchdog.observers.inotify import InotifyObserver

        observer = InotifyObserver()  # starts its inotify reader thread already
        try:
            observer.schedule(
                self._handler, str(self._root), recursive=True, event_filter=list(EVENT_FILTER)
            )
            observer.start()
        except BaseException:
            with contextlib.suppress(Exception):
                observer.stop()  # else the reader thread and its inotify fd leak
            raise
        return observer

    def _check_watch_count(self) -> None:
        watches = self.watch_count()
        _log.info("watching", root=str(self._root), folders=self.folder_count, watches=watches)
        if watches is not None and watches < self.folder_count:
            _log.error(
                "inotify_watches_missing",
                folders=self.folder_count,
                watches=watches,
                hint="raise fs.inotify.max_user_watches; until then only the rescan sees them",
            )


# --------------------------------------------------------------------------- limits


def count_folders(root: Path) -> int:
    """Folders under `root`, itself included: one inotify watch each (symlinks not followed,
    as watchdog does not follow them either). Unreadable folders are skipped."""
    return sum(1 for _ in _walk_dirs(os.fspath(root)))


def _walk_dirs(root: str) -> Iterator[str]:
    if not os.path.isdir(root) or os.path.islink(root):
        return
    stack = [root]
    while stack:
        folder = stack.pop()
        yield folder
        with contextlib.suppress(OSError), os.scandir(folder) as entries:
            stack.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))


def check_inotify_limits(folder_count: int, *, proc_dir: Path = _INOTIFY_PROC) -> list[str]:
    """Warnings when the kernel limits look too low for `folder_count` watched folders.

    Watches: one per folder plus headroom for new sites (max_user_watches is shared by every
    process of this uid). Queue: a burst of one event per folder (agents tend to report at
    the same minute) should fit; an overflow is recovered by a rescan, but costs one.
    Returns [] when /proc cannot be read (not Linux, sandbox).
    """
    watches = _read_limit(proc_dir / "max_user_watches")
    queued = _read_limit(proc_dir / "max_queued_events")
    found: list[str] = []
    needed_watches = folder_count + max(1024, folder_count // 10)
    if watches is not None and watches < needed_watches:
        found.append(
            f"fs.inotify.max_user_watches={watches} is too low for {folder_count} folders "
            f"(one watch each, shared with every inotify user of this uid, plus headroom); "
            f"folders over the limit are silently unwatched: "
            f"sysctl -w fs.inotify.max_user_watches={_round_up(2 * needed_watches)}"
        )
    if queued is not None and queued < folder_count:
        found.append(
            f"fs.inotify.max_queued_events={queued} is below the {folder_count} watched folders: "
            f"a burst of reports can overflow the kernel queue and force a full rescan: "
            f"sysctl -w fs.inotify.max_queued_events={_round_up(2 * folder_count)}"
        )
    return found


def _read_limit(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _round_up(value: int, step: int = 1024) -> int:
    return -(-value // step) * step
