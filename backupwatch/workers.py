"""The worker threads: each takes a group of report paths off the queue and runs the pipeline.

A group is one path when the queue is short, and the worker's share of a deep queue (a burst):
their history is read in one transaction and their entries committed in one (issue 10), but
each path's outcome is handled below as if it had been alone.

No exception from one report may end a worker (an agent's symlinked `_rejected/` once killed
them all and blinded the daemon for every site). What a worker does with each outcome:
- WAIT: the report goes to `Waiting` until an event or its recheck time (SPEC §3, §5);
- a database error: retried after a pause, logged through `OutageLog` (one line per outage);
- an unexpected error: retried 2, 4, 8, 16 s later, then rejected with the error;
- a report that cannot be archived or rejected (PARKED): logged, left in place, and not looked
  at again until it, or its folder's `_rejected/` and `_archive/`, change.
The pool replaces a worker that died or stays wedged on one report, and says so in `status`.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import structlog
from sqlalchemy.exc import SQLAlchemyError

from backupwatch.arrivals import Arrivals, Waiting
from backupwatch.fsutil import Identity
from backupwatch.names import display_name, visible
from backupwatch.notices import Notices
from backupwatch.outage import OutageLog
from backupwatch.pipeline import Context, Outcome, Result, process_group, reject
from backupwatch.sites import ARCHIVE_DIR, REJECTED_DIR
from backupwatch.watcher import WorkQueue

log = structlog.get_logger(__name__)

DATABASE_BACKOFF = 5.0
MAX_FAILURES = 5  # unexpected errors on one report before it is rejected with the error
# Reports a worker takes off the queue at once in a burst: their history is read in one
# transaction and their entries committed in one (issue 10). Each promotion waits for the
# group's commit, so a group is also what a crash may leave promoted and uncommitted: it is
# redone by the retry (SPEC §5), bounded by this size.
GROUP_MAX = 32


@dataclass(frozen=True)
class Snapshot:
    """A report's file and its folder's two destinations, as they were when it was parked."""

    report: tuple[int, int, int] | None
    rejected: Identity | None
    archive: Identity | None

    @classmethod
    def of(cls, path: Path, folder: Path) -> Snapshot:
        return cls(
            _file_state(path), _dir_state(folder / REJECTED_DIR), _dir_state(folder / ARCHIVE_DIR)
        )


def _file_state(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_ctime_ns)


def _dir_state(path: Path) -> Identity | None:
    try:
        return Identity.of(os.lstat(path))
    except OSError:
        return None


class ReportHandler:
    """What a worker does with one path; shared by all workers (thread-safe)."""

    def __init__(
        self,
        context: Callable[[], Context],
        clock: Callable[[], datetime],
        work: WorkQueue,
        arrivals: Arrivals,
        waiting: Waiting,
        outage: OutageLog,
        notices: Notices | None = None,
    ) -> None:
        self._context = context
        self._notices = notices or Notices()
        self._clock = clock
        self._queue = work
        self._arrivals = arrivals
        self._waiting = waiting
        self._outage = outage
        self._lock = threading.Lock()
        self._failures: collections.Counter[Path] = collections.Counter()
        self._parked: dict[Path, Snapshot] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        # SPEC §12's metrics: bytes of staged files hashed, and each report's processing time.
        self.hashed_bytes = 0
        self.observe: Callable[[float], None] = lambda _seconds: None

    def handle(self, path: Path) -> None:
        """Never raises: every failure ends in a retry, a wait, a rejection or a parking."""
        self.handle_group([path])

    def handle_group(self, paths: Sequence[Path]) -> None:
        """`handle` of several paths taken off the queue at once: their history read in one
        transaction and their entries committed in one (`pipeline.process_group`); each path's
        outcome is acted on as if it had been alone. Never raises."""
        ctx = self._context()
        paths = [path for path in paths if not self._still_parked(ctx, path)]
        if not paths:
            return
        started = time.monotonic()
        try:
            outcomes = process_group(ctx, paths, self._clock())
        except Exception as exc:  # a bug around the per-report handling: retry each one
            outcomes = [exc] * len(paths)
        elapsed = time.monotonic() - started
        for path, outcome in zip(paths, outcomes, strict=True):
            if isinstance(outcome, SQLAlchemyError):
                self._outage.failed(outcome, report=str(path))
                self._queue.put(path, DATABASE_BACKOFF)
            elif isinstance(outcome, Exception):
                self._unexpected(ctx, path, outcome)
            else:
                self._outage.ok()
                self.observe(elapsed)  # what this report waited for: its group's time
                self._after(ctx, path, outcome)

    def _after(self, ctx: Context, path: Path, result: Result) -> None:
        with self._lock:
            self._failures.pop(path, None)
            self.counters[result.outcome.value] += 1
            self.counters["unexpected_databases"] += len(result.unexpected)
            self.counters["not_relevant_databases"] += len(result.not_relevant)
            self.hashed_bytes += sum(
                e.server_size or 0 for e in result.entries if e.server_sha256 is not None
            )
        for database in result.unexpected:
            self._note_unexpected(ctx, path, database)
        if result.outcome is Outcome.WAIT:
            assert result.wait is not None
            folder = self._folder(ctx, path)
            self._waiting.park(path, folder, result.wait.recheck_in, result.wait.why)
            return
        self._waiting.remove(path)
        self._arrivals.done(path)
        if result.outcome is Outcome.PARKED or result.left_in_place:
            self._park(ctx, path, result.left_in_place or result.reason or "")

    def _note_unexpected(self, ctx: Context, path: Path, database: str) -> None:
        """SPEC §5: a database no job of the site expects; its staged file stays in D."""
        folder = self._folder(ctx, path)
        self._notices.add(
            f"unexpected:{folder}:{database}",
            f"{display_name(str(folder))}: reports name the database {visible(database)!r}, "
            "which no job of this site expects: its staged files stay in the folder (add a "
            "job for it, or stop the agent from sending it)",
            site=str(folder),
            database=database,
        )

    def _unexpected(self, ctx: Context, path: Path, exc: Exception) -> None:
        with self._lock:
            self._failures[path] += 1
            attempts = self._failures[path]
        log.error(
            "worker.internal_error",
            report=str(path),
            attempt=attempts,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        if attempts < MAX_FAILURES:
            self._queue.put(path, float(2**attempts))
            return
        with self._lock:
            self._failures.pop(path, None)
        try:
            result = reject(ctx, path, self._folder(ctx, path), f"internal error: {exc!r}")
        except Exception:  # even the rejection failed: leave it where it is, said so
            log.exception("worker.cannot_reject", report=str(path))
            self._park(ctx, path, "internal error, and it could not be rejected")
            return
        self._after(ctx, path, result)

    def _folder(self, ctx: Context, path: Path) -> Path:
        site = ctx.registry.classify(path).site
        return site.folder if site is not None else path.parent

    def _park(self, ctx: Context, path: Path, why: str) -> None:
        snapshot = Snapshot.of(path, self._folder(ctx, path))
        if snapshot.report is None:
            return
        with self._lock:
            self._parked[path] = snapshot
        log.warning("report.left_in_place", report=str(path), reason=why)

    def _still_parked(self, ctx: Context, path: Path) -> bool:
        """A parked report is skipped until it or its folder's destinations change."""
        with self._lock:
            snapshot = self._parked.get(path)
        if snapshot is None:
            return False
        if Snapshot.of(path, self._folder(ctx, path)) == snapshot:
            return True
        with self._lock:
            self._parked.pop(path, None)
        return False

    def parked(self) -> list[str]:
        with self._lock:
            return sorted(str(p) for p in self._parked)


@dataclass
class Worker:
    thread: threading.Thread
    heartbeat: float = field(default_factory=time.monotonic)  # each loop pass and progress beat
    group: tuple[Path, ...] = ()  # every report in hand (`handle_group`)
    retired: str | None = None  # why it was replaced: "died" or "wedged on …"

    @property
    def current(self) -> Path | None:
        """The report in hand (the first of its group)."""
        return self.group[0] if self.group else None


class WorkerPool:
    """`size` workers; a dead or wedged one is replaced so that other sites keep flowing."""

    def __init__(self, work: WorkQueue, handler: ReportHandler, size: int) -> None:
        self._queue = work
        self._handler = handler
        self._size = size
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.workers: list[Worker] = []
        self._by_thread: dict[int, Worker] = {}
        self._serial = 0

    def start(self) -> None:
        for _ in range(self._size):
            self._spawn()

    def stop(self) -> None:
        self._stopping.set()

    def _spawn(self) -> None:
        with self._lock:
            self._serial += 1
            name = f"worker-{self._serial}"
        # daemon=True: a report still in hand at the stop deadline (a huge file being hashed)
        # is abandoned, not waited for; it stays in place and is done at the next start.
        worker = Worker(threading.Thread(name=name, daemon=True))
        worker.thread = threading.Thread(target=self._run, args=(worker,), name=name, daemon=True)
        with self._lock:
            self.workers.append(worker)
        worker.thread.start()

    def _run(self, worker: Worker) -> None:
        with self._lock:
            self._by_thread[threading.get_ident()] = worker  # idents are reused: set, not looked up
        while not self._stopping.is_set() and worker.retired is None:
            worker.heartbeat = time.monotonic()
            paths = self._queue.get_many(self._group_size(), timeout=1.0)
            if not paths:
                continue
            worker.group = tuple(paths)
            try:
                self._handler.handle_group(paths)
            except BaseException:  # handle_group() never raises; the last line of defence
                log.exception("worker.failed", report=str(paths[0]), reports=len(paths))
            finally:
                worker.group = ()
                for path in paths:
                    self._queue.done(path)

    def _group_size(self) -> int:
        """How many reports a worker takes at once: its share of those waiting, at most
        GROUP_MAX; one when the queue is short, so a lone report is never held for others."""
        return max(1, min(GROUP_MAX, self._queue.waiting() // self._size))

    def beat(self) -> None:
        """Progress from inside long work (hashing, copying): this worker is alive."""
        worker = self._by_thread.get(threading.get_ident())
        if worker is not None:
            worker.heartbeat = time.monotonic()

    def supervise(self, stale_after: float) -> None:
        """Replace workers that died or have sat on one report longer than `stale_after`."""
        now = time.monotonic()
        for worker in self.active():
            if not worker.thread.is_alive():
                worker.retired = "died"
            elif worker.current is not None and now - worker.heartbeat > stale_after:
                worker.retired = f"wedged on {worker.current} for {now - worker.heartbeat:.0f} s"
            else:
                continue
            log.error("worker.replaced", worker=worker.thread.name, reason=worker.retired)
            self._spawn()

    def active(self) -> list[Worker]:
        with self._lock:
            return [w for w in self.workers if w.retired is None]

    def retired(self) -> list[Worker]:
        with self._lock:
            return [w for w in self.workers if w.retired is not None]

    def healthy(self, stale_after: float) -> bool:
        """Every active worker alive and recently seen, and no replaced worker still stuck.

        A wedged worker is replaced at once, so that other sites keep flowing, but the daemon
        stays unhealthy (no systemd watchdog ping) while the wedged thread has not come back:
        a worker stuck on a local file means something is wrong with the daemon or the host,
        and a restart is the remedy systemd applies.
        """
        now = time.monotonic()
        stuck = any(w.thread.is_alive() for w in self.retired())
        active = self.active()
        fresh = all(w.thread.is_alive() and now - w.heartbeat < stale_after for w in active)
        return bool(active) and fresh and not stuck

    def in_hand(self) -> list[str]:
        return [str(path) for w in self.active() for path in w.group]

    def join(self, deadline: float) -> None:
        for worker in list(self.workers):
            worker.thread.join(max(0.0, deadline - time.monotonic()))
