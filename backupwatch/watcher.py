"""Inotify adapter (SPEC §3, §7): turns kernel events into paths for the daemon.

Nothing here knows what a report is. `DepositWatcher` maps each kernel event to an `EventKind`
and a path and hands it to the daemon's callback; the daemon decides what the path means and
what to put on the `WorkQueue`. Everything the kernel can lose (queue overflow, watches over
`max_user_watches`) is turned into a rescan request, because the periodic reconciliation scan,
not inotify, is what guarantees that nothing is missed.

Of watchdog only the lower layer is used: `InotifyFD` (the ctypes binding and its reader
thread), fed by our own `WatchCallback`. Recursion and the overflow rebuild are ours, because
watchdog's recursive watch group rebuilds after an overflow by removing every watch and adding
it again: each removal queues an IN_IGNORED, so with more folders than `max_queued_events` the
rebuild overflows the queue again, and again (18,001 folders: 36 overflows and 29 full rescans
a minute). Ours only adds the watches that are missing, which queues nothing.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import heapq
import itertools
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from backupwatch.watches import Key, RebuildPacer, WatchTable, key_of

if TYPE_CHECKING:
    from watchdog.observers.inotify_c import InotifyEvent, InotifyFD, WatchDescriptor

__all__ = [
    "DepositWatcher",
    "EventKind",
    "WorkQueue",
    "check_inotify_limits",
    "count_folders",
]

_log = structlog.get_logger(__name__)

# From <sys/inotify.h> (kernel ABI). What each folder's watch asks for, and why not more:
# no IN_MODIFY (one event per write(): a big transfer would flood the queue), no IN_OPEN,
# IN_ACCESS or IN_CLOSE_NOWRITE (every read, including our own walks, would be queued).
IN_ATTRIB, IN_CLOSE_WRITE, IN_MOVED_FROM, IN_MOVED_TO = 0x4, 0x8, 0x40, 0x80
IN_CREATE = 0x100
IN_ONLYDIR, IN_DONT_FOLLOW, IN_EXCL_UNLINK = 0x01000000, 0x02000000, 0x04000000
WATCH_MASK = (
    IN_CREATE
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_ATTRIB
    | IN_ONLYDIR  # a folder replaced by a file in between is not watched
    | IN_DONT_FOLLOW  # nor one replaced by a symlink: nothing outside the root is watched
    | IN_EXCL_UNLINK  # no events from files already unlinked but still open
)

_INOTIFY_PROC = Path("/proc/sys/fs/inotify")
_PERSIST = " (and the setting in a file under /etc/sysctl.d/ to keep it after a reboot)"
_STOP_TIMEOUT = 5.0


class EventKind(enum.StrEnum):
    """What the kernel said about a path; the daemon maps it to "read now" or "let it settle"."""

    CREATED = "created"  # IN_CREATE of a file: a writer may still hold it open, or a hard link
    CLOSED = "closed"  # IN_CLOSE_WRITE: a writer closed it
    MOVED = "moved"  # IN_MOVED_TO of a file: a complete file renamed or moved into place
    ATTRIB = "attrib"  # IN_ATTRIB of a file: mode, owner, times or link count changed
    FOUND = "found"  # already in a folder that was just created or moved in: no writer seen
    DIR_CREATED = "dir_created"  # a folder created or moved in, reported once it is watched


# --------------------------------------------------------------------------- work queue


class WorkQueue:
    """Thread-safe, de-duplicating (by path) queue of report paths with a not-before time, bounded.

    One entry per path, because inotify repeats itself ("created" twice or three times, then
    "closed") and a report must be read once it has settled, not once per event. Bounded,
    because the producer is the inotify reader thread: blocking it would only let the
    kernel queue overflow, so a full queue drops the path and sets `needs_rescan` for the
    reconciliation scan to pick it up instead.

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

    def get_many(self, limit: int, timeout: float | None) -> list[Path]:
        """`get`, then up to `limit` - 1 more paths that are due now, without waiting for them:
        a worker's group when many reports wait at once (a burst); [] as `get`'s None."""
        first = self.get(timeout)
        if first is None:
            return []
        taken = [first]
        with self._cond:
            while len(taken) < limit and not self._closed:
                path = self._take_or_wait_time()
                if not isinstance(path, Path):
                    break
                taken.append(path)
        return taken

    def waiting(self) -> int:
        """Paths queued, due or not (not those in hand)."""
        with self._cond:
            return len(self._queued)

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


# --------------------------------------------------------------------------- watcher


class DepositWatcher:
    """Recursive inotify watches on the storage root; new folders are watched as they appear
    (and what they already hold is reported as created), so no restart is needed for a new
    site. After a kernel queue overflow the missing watches are added and `on_overflow` is
    called once they are back, so that a rescan started then misses nothing."""

    def __init__(
        self,
        root: Path,
        on_event: Callable[[EventKind, Path], None],
        on_overflow: Callable[[], None],
    ) -> None:
        self._root = root
        self._on_event = on_event
        self._on_overflow = on_overflow
        self._session: _Session | None = None
        self.folder_count = 0
        self.limit_warnings: list[str] = []

    def start(self, listed: Callable[[bytes], bool] | None = None) -> list[Path]:
        """Add every watch (synchronously: when this returns, events are flowing), and
        return the files the walk listed whose names `listed` accepts (none without it): each
        folder is listed after its watch is added, so these and the events after them are all
        that the tree holds, and the caller need not list the folders again.

        Raises OSError when the root itself cannot be watched; folders below it that cannot
        be watched are logged (rate-limited) and left to the periodic rescan.
        """
        session = _Session(self._root, self._on_event, self._on_overflow)
        try:
            walked = session.start(listed)
        except BaseException:
            session.stop(_STOP_TIMEOUT)
            raise
        self._session = session
        self.folder_count = walked.folders
        self.limit_warnings = check_inotify_limits(self.folder_count)
        for warning in self.limit_warnings:
            _log.error("inotify_limit_low", detail=warning)
        self._log_watching()
        return [Path(os.fsdecode(path)) for path in walked.files]

    def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        """Remove the watches and end both threads; idempotent, so the daemon can call it
        from any exit."""
        session, self._session = self._session, None
        if session is not None:
            session.stop(timeout)

    def is_alive(self) -> bool:
        """The inotify reader and the rebuild thread run and the root is still watched: if
        either thread died, events or overflows would go unseen."""
        session = self._session
        return session is not None and session.is_alive()

    def watch_count(self) -> int | None:
        """Folders watched now: below `folder_count` means some are only covered by the
        periodic rescan (None before start)."""
        session = self._session
        return session.watch_count() if session is not None else None

    @property
    def overflows(self) -> int:
        """Kernel queue overflows (IN_Q_OVERFLOW) seen since start."""
        return self._session.overflows if self._session is not None else 0

    @property
    def rebuilds(self) -> int:
        """Walks of the tree after overflows, finished since start (one per burst)."""
        return self._session.rebuilds if self._session is not None else 0

    def _log_watching(self) -> None:
        watches = self.watch_count()
        _log.info("watching", root=str(self._root), folders=self.folder_count, watches=watches)
        if watches is not None and watches < self.folder_count:
            _log.error(
                "inotify_watches_missing",
                folders=self.folder_count,
                watches=watches,
                hint="see inotify_watch_failed; until fixed only the periodic rescan sees them",
            )


@dataclass(frozen=True)
class _Walked:
    folders: int  # folders found (watched or not)
    added: int  # watches added by this walk
    files: list[bytes]  # the files listed that the walk was asked for


class _Added(enum.Enum):
    NEW = "new"  # the walk added its watch
    KNOWN = "known"  # it was watched already, at this path
    RELOCATED = "relocated"  # it was watched already, under another path (a lost rename)
    FAILED = "failed"  # gone, not a folder, or the kernel refused the watch


class _Session:
    """One inotify instance on the tree and the two threads around it.

    watchdog's reader thread calls `on_event`, `on_watch_deleted` and `on_queue_overflow`
    (its `WatchCallback` protocol); an exception escaping any of them would end that thread
    for good, so none escapes. Overflows are handled by our own rebuild thread, so that the
    reader goes on draining the kernel queue while the tree is walked.

    Lock order: `_lock` (our bookkeeping), then watchdog's own lock inside `add_callback` /
    `remove_callbacks`. watchdog calls us without holding its lock, and we never call the
    daemon's callbacks while holding ours.
    """

    def __init__(
        self,
        root: Path,
        on_event: Callable[[EventKind, Path], None],
        on_overflow: Callable[[], None],
    ) -> None:
        # Imported here so that the rest of this module (WorkQueue) imports on any platform.
        from watchdog.observers.inotify_c import CallbackId, InotifyFD, Mask

        _require_overflow_callback()
        self._root = os.fsencode(root)
        self._on_event = on_event
        self._on_overflow = on_overflow
        self._table = WatchTable()
        self._lock = threading.Lock()
        self._closed = False  # under _lock: no watch is added once stop has begun
        self._stopping = threading.Event()
        self._overflowed = threading.Event()
        self._counts = threading.Lock()
        self._unhandled = 0  # overflows not yet covered by a rebuild
        self.overflows = 0
        self.rebuilds = 0
        self._root_wd: int | None = None
        self._root_lost = False
        self._pacer = RebuildPacer()
        self._failures = _FailureLog()
        self._rebuilder = threading.Thread(
            target=self._rebuild_loop, name="inotify-rebuild", daemon=True
        )
        self._fd: InotifyFD = InotifyFD()
        self._id = CallbackId(id(self))
        self._mask = Mask(WATCH_MASK)
        self._root_mask = Mask(WATCH_MASK & ~IN_DONT_FOLLOW)
        # Started at once: an InotifyFD whose thread never ran leaks its descriptor on stop.
        self._fd.start()

    # ------------------------------------------------------------ lifecycle

    def start(self, listed: Callable[[bytes], bool] | None) -> _Walked:
        self._watch_root()
        walked = self._walk(self._root, new=False, listed=listed)
        self._rebuilder.start()  # an overflow during the walk above is handled now
        return walked

    def stop(self, timeout: float) -> None:
        self._stopping.set()
        self._overflowed.set()  # wakes the rebuild thread, which then returns
        if self._rebuilder.is_alive():
            self._rebuilder.join(timeout)
        with self._lock:
            self._closed = True
        self._fd.stop()  # removes every watch and wakes the reader, which then ends
        self._fd.join(timeout)
        if self._fd.is_alive():
            _log.warning("watcher_stop_timeout", timeout=timeout)

    def is_alive(self) -> bool:
        return (
            self._fd.is_alive()
            and self._rebuilder.is_alive()
            and not self._stopping.is_set()
            and not self._root_lost
        )

    def watch_count(self) -> int:
        with self._lock:
            return len(self._table)

    def _watch_root(self) -> None:
        """The root is the operator's: a symlink there is followed (below it, none is)."""
        st = os.stat(self._root)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", os.fsdecode(self._root))
        wd = self._fd.add_callback(self._root, self._root_mask, self, self._id)
        if wd < 0:  # watchdog (7.1) returns -1 on EACCES instead of raising
            raise PermissionError(errno.EACCES, "cannot watch", os.fsdecode(self._root))
        with self._lock:
            self._root_wd = wd
            self._table.record(wd, self._root, key_of(st.st_dev, st.st_ino))

    # ------------------------------------------------- WatchCallback (reader thread)

    def on_event(self, event: InotifyEvent) -> None:
        try:
            self._dispatch(event)
        except BaseException:  # a SystemExit here would end the reader thread too
            with contextlib.suppress(BaseException):
                _log.exception("watch_event_failed", event=repr(event))

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        """The kernel removed a watch (IN_IGNORED): its folder was deleted or unmounted."""
        try:
            if not self._stopping.is_set():
                with self._lock:
                    self._forget(wd)
        except BaseException:
            with contextlib.suppress(BaseException):
                _log.exception("watch_delete_failed", wd=wd)

    def on_queue_overflow(self) -> None:
        """IN_Q_OVERFLOW: count it and wake the rebuild thread; never work here, where the
        reader should be draining the kernel queue."""
        try:
            with self._counts:
                self.overflows += 1
                self._unhandled += 1
            self._overflowed.set()
        except BaseException:
            with contextlib.suppress(BaseException):
                _log.exception("overflow_hook_failed")

    def _dispatch(self, event: InotifyEvent) -> None:
        if self._stopping.is_set() or not event.name:
            return  # events on a watched folder itself (IN_UNMOUNT) carry no name
        with self._lock:
            parent = self._table.path_of(event.wd)
        if parent is None:
            return  # a watch removed since the kernel queued this event
        path = os.path.join(parent, event.name)
        if not event.is_directory:
            kind = _file_kind(event)
            if kind is not None:
                self._emit(kind, path)
        elif event.is_moved_from:
            self._unwatch(path)
        elif event.is_create or event.is_moved_to:
            self._walk(path, new=True)

    def _unwatch(self, path: bytes) -> None:
        """A folder moved away: its watches would report the new place under the old name.
        If it moved within the tree, its IN_MOVED_TO watches it again, under the new one."""
        with self._lock:
            gone = [f.wd for f in self._table.subtree(path) if f.wd != self._root_wd]
            for wd in gone:
                self._table.forget(wd)
            self._remove_watches(gone)

    def _emit(self, kind: EventKind, path: bytes) -> None:
        """One event to the daemon; its failure costs that event, not the ones after it."""
        try:
            self._on_event(kind, Path(os.fsdecode(path)))
        except BaseException:
            with contextlib.suppress(BaseException):
                _log.exception("watch_event_failed", kind=str(kind), path=os.fsdecode(path))

    # ---------------------------------------------------------------- walking

    def _walk(
        self, top: bytes, *, new: bool, listed: Callable[[bytes], bool] | None = None
    ) -> _Walked:
        """Watch every folder from `top` down, each before it is listed, so that anything
        created after the listing has an event.

        `new` (a folder created or moved in, on the reader thread): stop at folders already
        watched at that path and report what the others hold as FOUND (`mkdir -p a/b/c;
        touch a/b/c/f` is over before the first event is read; whether a writer still holds
        such a file open cannot be seen). Otherwise (start, rebuild): visit every folder and
        report nothing; the files whose names `listed` accepts are returned (the start's scan).
        """
        stack = [top]
        folders = added = 0
        found: list[bytes] = []
        wanted = _any_name if new else listed
        while stack and not self._stopping.is_set():
            folder = stack.pop()
            state = self._ensure_watched(folder)
            folders += 1
            if new and (state in (_Added.NEW, _Added.RELOCATED) or folder == top):
                self._emit(EventKind.DIR_CREATED, folder)  # once watched, if it can be
            if state is _Added.FAILED or (new and state is _Added.KNOWN):
                continue
            added += state is _Added.NEW
            subfolders, files = _list(folder, files=wanted)
            stack.extend(subfolders)
            if new:
                for path in files:
                    self._emit(EventKind.FOUND, path)  # its creation came before our watch
            else:
                found += files
        return _Walked(folders, added, found)

    def _ensure_watched(self, folder: bytes) -> _Added:
        try:
            st = os.stat(folder, follow_symlinks=folder == self._root)
        except OSError:
            return _Added.FAILED
        if not stat.S_ISDIR(st.st_mode):
            return _Added.FAILED
        key = key_of(st.st_dev, st.st_ino)
        with self._lock:
            if self._closed:
                return _Added.FAILED
            known = self._table.at_key(key)
            if known is not None:  # watched: inotify_add_watch would return the same wd
                moved = known.path != folder
                self._remove_watches(self._table.record(known.wd, folder, key))
                return _Added.RELOCATED if moved else _Added.KNOWN
            wd = self._add_watch(folder)
            if wd is None:
                return _Added.FAILED
            self._remove_watches(self._table.record(wd, folder, key))
            return _Added.NEW

    def _add_watch(self, folder: bytes) -> int | None:
        """Called with `_lock` held."""
        try:
            wd = int(self._fd.add_callback(folder, self._mask, self, self._id))
        except OSError as exc:
            self._failures.record(folder, exc)
            return None
        if wd < 0:  # watchdog (7.1) returns -1 on EACCES and keeps a watch under -1: undo it
            self._remove_watches([wd])
            self._failures.record(folder, PermissionError(errno.EACCES, "permission denied"))
            return None
        return wd

    def _remove_watches(self, wds: list[int]) -> None:
        """Called with `_lock` held. A watch already gone (EINVAL) is fine."""
        if not wds:
            return
        from watchdog.observers.inotify_c import WatchDescriptor

        with contextlib.suppress(OSError):
            self._fd.remove_callbacks([(WatchDescriptor(wd), self._id) for wd in wds])

    def _forget(self, wd: int) -> None:
        """Called with `_lock` held."""
        if self._table.forget(wd) is not None and wd == self._root_wd:
            self._root_lost = True
            _log.error("watch_root_lost", root=os.fsdecode(self._root))

    # --------------------------------------------------------------- overflow

    def _rebuild_loop(self) -> None:
        """One rebuild at a time; overflows during one just ask for one more, paced."""
        while True:
            self._overflowed.wait()
            if self._stopping.is_set():
                return
            start_at = self._pacer.plan(time.monotonic())
            if self._stopping.wait(max(0.0, start_at - time.monotonic())):
                return
            self._overflowed.clear()
            try:
                self._rebuild()
            except BaseException:
                with contextlib.suppress(BaseException):
                    _log.exception("inotify_rebuild_failed")
            self._pacer.finished(time.monotonic())
            if self._stopping.is_set():
                return
            try:
                self._on_overflow()
            except BaseException:
                with contextlib.suppress(BaseException):
                    _log.exception("overflow_hook_failed")

    def _rebuild(self) -> None:
        """Add the watches of folders whose IN_CREATE was lost, drop those of folders whose
        IN_IGNORED was lost. Adding a watch on a watched folder is skipped (the kernel
        would return the same wd), and nothing is removed that still exists: so the
        rebuild itself queues no event and cannot cause the next overflow."""
        with self._counts:
            lost, self._unhandled = self._unhandled, 0
        _log.warning(
            "inotify_events_lost",
            overflows=lost,
            action="adding the missing watches, then a rescan",
        )
        started = time.monotonic()
        with self._lock:
            generation = self._table.begin_walk()
        walked = self._walk(self._root, new=False)
        removed = self._prune(generation)
        with self._counts:
            self.rebuilds += 1
        _log.info(
            "inotify_watches_checked",
            folders=walked.folders,
            added=walked.added,
            removed=removed,
            watches=self.watch_count(),
            seconds=round(time.monotonic() - started, 3),
        )

    def _prune(self, generation: int) -> int:
        """Forget watches the walk did not see whose folder is gone or is another one now
        (an unreadable parent hides folders that are still there: those stay)."""
        with self._lock:
            unseen = [(f.wd, f.path, f.key) for f in self._table.unseen(generation)]
        stale = [wd for wd, path, key in unseen if _key_at(path) != key]
        with self._lock:
            still = [wd for wd in stale if (f := self._table.get(wd)) and f.seen < generation]
            for wd in still:
                self._forget(wd)
            self._remove_watches(still)
        return len(still)


def _require_overflow_callback() -> None:
    """Overflow detection rests on `WatchCallback.on_queue_overflow` (watchdog 7.1): an
    older watchdog drops IN_Q_OVERFLOW silently, so refuse to run on it."""
    from watchdog.observers.inotify_c import InotifyEvent, WatchCallback

    if not hasattr(WatchCallback, "on_queue_overflow") or not hasattr(
        InotifyEvent, "is_queue_overflow"
    ):
        raise RuntimeError("watchdog >= 7.1 is needed: this one cannot report inotify overflows")


def _file_kind(event: InotifyEvent) -> EventKind | None:
    """IN_MOVED_FROM of a file means it left; where it went, if watched, comes as MOVED."""
    if event.is_close_write:
        return EventKind.CLOSED
    if event.is_moved_to:
        return EventKind.MOVED
    if event.is_create:
        return EventKind.CREATED
    if event.is_attrib:
        return EventKind.ATTRIB
    return None


def _any_name(_name: bytes) -> bool:
    return True


def _list(
    folder: bytes, *, files: Callable[[bytes], bool] | None
) -> tuple[list[bytes], list[bytes]]:
    """Subfolders (never through a symlink) and the other entries of `folder` whose names
    `files` accepts (none without it)."""
    folders: list[bytes] = []
    others: list[bytes] = []
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    is_dir = False
                if is_dir:
                    folders.append(entry.path)
                elif files is not None and files(entry.name):
                    others.append(entry.path)
    except OSError:
        pass
    return folders, others


def _key_at(path: bytes) -> Key | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return key_of(st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


class _FailureLog:
    """Folders that cannot be watched: one error line at once, then at most one a minute
    saying how many more failed, since an agent can make any number of unreadable folders."""

    interval = 60.0

    def __init__(self) -> None:
        self.count = 0
        self._unlogged = 0
        self._quiet_until = 0.0

    def record(self, folder: bytes, exc: OSError) -> None:
        self.count += 1
        now = time.monotonic()
        if now < self._quiet_until:
            self._unlogged += 1
            return
        unlogged, self._unlogged = self._unlogged, 0
        self._quiet_until = now + self.interval
        hint = (
            "raise fs.inotify.max_user_watches (see inotify_limit_low)"
            if exc.errno == errno.ENOSPC
            else "the daemon's user needs read and search permission on it"
        )
        _log.error(
            "inotify_watch_failed",
            folder=os.fsdecode(folder),
            error=str(exc),
            not_logged_since_last=unlogged,
            hint=hint + "; until then only the periodic rescan sees it",
        )


# --------------------------------------------------------------------------- limits


def count_folders(root: Path) -> int:
    """Folders under `root`, itself included: one inotify watch each (symlinks not followed,
    as the watcher does not follow them either). Unreadable folders are skipped."""
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
            f"folders over the limit are seen only by the periodic rescan: "
            f"sysctl -w fs.inotify.max_user_watches={_round_up(2 * needed_watches)}{_PERSIST}"
        )
    if queued is not None and queued < folder_count:
        found.append(
            f"fs.inotify.max_queued_events={queued} is below the {folder_count} watched folders: "
            f"a burst of reports can overflow the kernel queue, and each overflow costs a walk "
            f"of the tree and a full rescan: "
            f"sysctl -w fs.inotify.max_queued_events={_round_up(2 * folder_count)}{_PERSIST}"
        )
    return found


def _read_limit(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _round_up(value: int, step: int = 1024) -> int:
    return -(-value // step) * step
