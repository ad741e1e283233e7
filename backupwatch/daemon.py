"""SPEC §7: `backupwatchd`, the long-running daemon.

Threads: the watchdog observer (classifies a path and queues it, nothing more), N workers (run the
pipeline on one report at a time), the MISSING timer, the control socket, and the main thread,
which owns every state change: signals and control requests only set flags or post requests that
the main loop carries out, so a reload never races a rescan or a shutdown.
"""

from __future__ import annotations

import argparse
import collections
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import structlog
from sqlalchemy.exc import SQLAlchemyError

from backupwatch import __version__
from backupwatch.config import ConfigError, Settings, default_config_path, load_settings
from backupwatch.control import ControlError, ControlServer
from backupwatch.jobs import JobSpec, load_jobs
from backupwatch.logsetup import LogTarget, configure_logging, resolve_target
from backupwatch.notify import Notifier
from backupwatch.pipeline import Context, Outcome, build_registry, process_path, reject
from backupwatch.scan import pending_reports
from backupwatch.sites import PathKind, Registry
from backupwatch.store import ExpectedBackupJob, Store
from backupwatch.timer import MissingTimer
from backupwatch.timeutil import utc_now
from backupwatch.watcher import (
    DepositWatcher,
    EventKind,
    WorkQueue,
)

log = structlog.get_logger(__name__)

SETTLE_SECONDS = 1.0  # a file seen only as "created" is read after this quiet time
RETRY_SECONDS = 5.0  # how long not-yet-valid JSON is retried after its last change
RETRY_DELAY = 0.5
DATABASE_BACKOFF = 5.0
MAX_FAILURES = 5  # internal errors on one report before it is rejected with the error
STOP_TIMEOUT = 8.0  # SPEC §7: stop within 10 s
REQUEST_TIMEOUT = 60.0  # a control request waits this long for the main thread
STALE_MIN = 15.0  # a loop unseen this long is wedged (above the timer's longest sleep)
WORKERS = max(2, min(4, os.cpu_count() or 2))
# Settings that a reload cannot change under a running daemon: a restart applies them.
RESTART_KEYS = ("backup_storage_root", "database_url", "control_socket")


@dataclass
class Worker:
    thread: threading.Thread
    heartbeat: float = field(default_factory=time.monotonic)  # each loop pass and progress beat
    current: Path | None = None  # the report in hand


class Daemon:
    def __init__(
        self,
        settings: Settings,
        specs: list[JobSpec],
        environ: Mapping[str, str],
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.settings = settings
        self.specs = specs
        self.environ = environ
        self.clock = clock
        self.notifier = Notifier(environ)
        self.store = Store(settings.database_url)
        self.queue = WorkQueue()
        self.counters: collections.Counter[str] = collections.Counter()
        self.started = time.monotonic()
        self.stop_requested = threading.Event()
        self.wakeup = threading.Event()
        self.requests: queue.SimpleQueue[tuple[str, Future[dict[str, Any]]]] = queue.SimpleQueue()
        self.reload_signalled = False
        self.workers: list[Worker] = []
        self.worker_of: dict[int, Worker] = {}
        self.first_seen: dict[Path, float] = {}
        self.failures: collections.Counter[Path] = collections.Counter()
        self.ctx: Context
        self.watcher: DepositWatcher
        self.timer: MissingTimer
        self.control: ControlServer
        self.last_rescan = 0.0
        self.last_status = ""

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """SPEC §7's start sequence; READY=1 is sent only once all of it is done."""
        self._prepare_roots()
        self.notifier.status("migrating the database")
        self.store.migrate()
        # The job models are needed for this sync only: release them (30,000 jobs ≈ 110 MiB).
        specs, self.specs = self.specs, []
        result = self.store.sync_jobs(
            specs, self.settings.scanner_report_collection_window_minutes, self.clock()
        )
        del specs
        log.info(
            "jobs.synced",
            added=result.added,
            changed=result.changed,
            deactivated=result.deactivated,
        )
        self.ctx = Context(self.store, self.settings, self._registry(), self.beat)
        self._start_control()
        self._start_watcher()
        self._start_workers()
        self.notifier.status("processing the reports waiting in the deposit folders")
        self.rescan()
        while not self.queue.wait_idle(timeout=1.0):
            if self.stop_requested.is_set():
                return
        self.timer = MissingTimer(self.store, self.clock, self.ctx.max_age, self._site_busy)
        flagged = self.timer.run_once(self.clock())
        log.info("timer.caught_up", flagged=len(flagged))
        self.timer.start()
        self.notifier.ready(self.status_line())
        log.info(
            "daemon.ready", version=__version__, pid=os.getpid(), sites=len(self.ctx.registry.sites)
        )

    def _prepare_roots(self) -> None:
        """Create the two storage roots if absent; a failure names the path, not just errno.

        The deposit root need only be readable (agents own their site folders, which the daemon
        writes through their group); final storage must be writable.
        """
        needs = {
            self.settings.backup_storage_root: (os.R_OK | os.X_OK, "readable"),
            self.settings.validated_backups_base_path: (os.R_OK | os.W_OK | os.X_OK, "writable"),
        }
        for root, (mode, word) in needs.items():
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot create {root}: {exc.strerror}") from exc
            if not os.access(root, mode):
                raise PermissionError(f"{root} is not {word} by this user")

    def _registry(self) -> Registry:
        return build_registry(self.settings, self.store.active_jobs())

    def _start_control(self) -> None:
        handlers = {
            "status": self._handle_status,
            "reload": lambda _req: self._post("reload"),
            "rescan": lambda _req: self._post("rescan"),
        }
        self.control = ControlServer(self.settings.control_socket, handlers)
        self.control.start()

    def _start_watcher(self) -> None:
        """The watcher counts the folders and warns about low kernel limits itself."""
        root = self.settings.backup_storage_root
        self.watcher = DepositWatcher(root, self._on_event, self._on_overflow)
        self.watcher.start()

    def _start_workers(self) -> None:
        for index in range(WORKERS):
            # daemon=True: a report still in hand at the stop deadline (a huge file being
            # hashed) is abandoned, not waited for; it is left in place and done at next start.
            thread = threading.Thread(
                target=self._work, args=(index,), name=f"worker-{index}", daemon=True
            )
            self.workers.append(Worker(thread))
            thread.start()

    # ------------------------------------------------------------- inotify side

    def _on_event(self, kind: EventKind, path: Path) -> None:
        """Runs on the inotify thread: classify and queue, nothing that can block or raise.

        A closed or moved file is complete: read it now. A created one (a writer may still
        hold it open) or one whose mode changed waits the settle time; a close that follows
        overtakes the wait."""
        if kind is EventKind.DIR_CREATED:
            return  # the watcher watches it already; its files arrive as events of their own
        if self.ctx.registry.classify(path).kind is PathKind.IGNORED:
            return
        delay = 0.0 if kind in (EventKind.CLOSED, EventKind.MOVED) else SETTLE_SECONDS
        self.queue.put(path, delay)

    def _on_overflow(self) -> None:
        """The watcher lost events and has its watches back: rescan (it logged the loss)."""
        log.info("watcher.rescan_after_overflow")
        self.queue.needs_rescan.set()
        self.wakeup.set()

    # ---------------------------------------------------------------- workers

    def _work(self, index: int) -> None:
        worker = self.workers[index]
        self.worker_of[threading.get_ident()] = worker
        while True:
            worker.heartbeat = time.monotonic()
            path = self.queue.get(timeout=1.0)
            if path is None:
                if self.queue_closed:
                    return
                continue
            worker.current = path
            try:
                self._handle(path)
            finally:
                worker.current = None
                self.queue.done(path)

    @property
    def queue_closed(self) -> bool:
        return self.stop_requested.is_set()

    def _handle(self, path: Path) -> None:
        first = self.first_seen.setdefault(path, time.monotonic())
        try:
            result = process_path(self.ctx, path, self.clock(), self._may_retry(path, first))
        except SQLAlchemyError as exc:
            log.error(
                "worker.database_error", report=str(path), error=str(exc), retry_in=DATABASE_BACKOFF
            )
            self.queue.put(path, DATABASE_BACKOFF)
            return
        except Exception as exc:
            self._internal_error(path, exc)
            return
        if result.outcome is Outcome.RETRY:
            self.queue.put(path, RETRY_DELAY)
            return
        self.first_seen.pop(path, None)
        self.failures.pop(path, None)
        self.counters[result.outcome.value] += 1
        self.counters["unexpected_databases"] += len(result.unexpected)
        self.counters["not_relevant_databases"] += len(result.not_relevant)

    def _may_retry(self, path: Path, first_seen: float) -> bool:
        """Not-yet-valid JSON is retried while its writer may still be at work (SPEC §3)."""
        if time.monotonic() - first_seen < RETRY_SECONDS:
            return True
        try:
            return time.time() - path.stat().st_mtime < RETRY_SECONDS
        except OSError:
            return False

    def _internal_error(self, path: Path, exc: Exception) -> None:
        self.failures[path] += 1
        attempts = self.failures[path]
        log.exception("worker.internal_error", report=str(path), attempt=attempts)
        if attempts < MAX_FAILURES:
            self.queue.put(path, float(2**attempts))
            return
        self.failures.pop(path, None)
        classified = self.ctx.registry.classify(path)
        folder = classified.site.folder if classified.site else path.parent
        try:
            reject(self.ctx, path, folder, f"internal error while processing it: {exc!r}")
            self.counters[Outcome.REJECTED.value] += 1
        except OSError:
            log.exception("worker.cannot_reject", report=str(path))

    def _site_busy(self, job: ExpectedBackupJob) -> bool:
        folder = self.settings.backup_storage_root / job.deposit_path
        return self.queue.pending_under(folder)

    # --------------------------------------------------------------- main loop

    def run(self) -> int:
        """The main thread's loop: requests, periodic rescans, watchdog pings, shutdown."""
        while not self.stop_requested.is_set():
            self.wakeup.wait(self._next_tick())
            self.wakeup.clear()
            if self.stop_requested.is_set():
                break
            self.tick()
        return self.shutdown()

    def tick(self) -> bool:
        """One pass of the main loop; True when every loop was healthy (and systemd pinged)."""
        self._serve_requests()
        self._revive_watcher()
        if self.reload_signalled:
            self.reload_signalled = False
            self.reload()
        if self.queue.needs_rescan.is_set() or self._rescan_due():
            self.rescan()
        healthy = self.healthy()
        if healthy and self.notifier.watchdog_interval is not None:
            self.notifier.watchdog()
        self._publish_status()
        return healthy

    def _publish_status(self) -> None:
        """Keep `systemctl status` current without flooding the notify socket."""
        line = self.status_line()
        if line != self.last_status:
            self.notifier.status(line)
            self.last_status = line

    def _next_tick(self) -> float:
        interval = self.notifier.watchdog_interval or 5.0
        return max(0.05, min(interval, 5.0))

    def _revive_watcher(self) -> None:
        """The inotify reader can die (a read error), the root can lose its watch: start a
        new watcher, then rescan."""
        if self.watcher.is_alive():
            return
        log.error("watcher.died", action="restart and rescan")
        self.watcher.stop()
        try:
            self._start_watcher()
        except OSError as exc:
            log.error("watcher.restart_failed", error=str(exc))
            return
        self.queue.needs_rescan.set()

    def _rescan_due(self) -> bool:
        period = self.ctx.settings.rescan_interval_minutes * 60
        return time.monotonic() - self.last_rescan >= period

    def _post(self, kind: str) -> dict[str, Any]:
        """Hand a control request to the main thread and wait for its answer."""
        future: Future[dict[str, Any]] = Future()
        self.requests.put((kind, future))
        self.wakeup.set()
        try:
            return future.result(timeout=REQUEST_TIMEOUT)
        except TimeoutError:
            return {
                "ok": False,
                "error": f"the daemon did not finish the {kind} within "
                f"{REQUEST_TIMEOUT:g} s; it goes on in the background",
            }

    def _serve_requests(self) -> None:
        while True:
            try:
                kind, future = self.requests.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(self.reload() if kind == "reload" else self.rescan())
            except Exception as exc:
                future.set_exception(exc)

    @property
    def stale_after(self) -> float:
        """How long a loop may go unseen: two pings' worth, never below the timer's sleep."""
        return max(STALE_MIN, 2 * (self.notifier.watchdog_interval or 0.0))

    def beat(self) -> None:
        """Called by the pipeline during long work (hashing, copying): this worker is alive."""
        worker = self.worker_of.get(threading.get_ident())
        if worker is not None:
            worker.heartbeat = time.monotonic()

    def healthy(self) -> bool:
        """Every loop alive and recently seen: only then does systemd get its ping."""
        now = time.monotonic()
        stale = self.stale_after
        loops_ok = all(w.thread.is_alive() and now - w.heartbeat < stale for w in self.workers)
        timer_ok = self.timer.is_alive() and now - self.timer.heartbeat < stale
        return loops_ok and timer_ok and self.watcher.is_alive() and self.control.is_alive()

    # ------------------------------------------------------------ operations

    def rescan(self) -> dict[str, Any]:
        """Queue every report waiting on disk; returns how many were queued."""
        self.queue.needs_rescan.clear()
        self.last_rescan = time.monotonic()
        queued = 0
        for path in pending_reports(self.ctx.registry):
            if self.queue.put(path):
                queued += 1
        log.info("rescan.done", queued=queued)
        return {"ok": True, "queued": queued}

    def reload(self) -> dict[str, Any]:
        """SIGHUP / `backupwatchctl reload`: all or nothing; an invalid config changes nothing."""
        self.notifier.reloading()
        try:
            settings = load_settings(self.settings.config_path, self.environ)
            specs = load_jobs(settings)
        except ConfigError as exc:
            log.error("reload.invalid_config", errors=exc.errors)
            self.notifier.ready(self.status_line())
            return {"ok": False, "error": str(exc)}
        settings = self._keep_restart_keys(settings)
        result = self.store.sync_jobs(
            specs, settings.scanner_report_collection_window_minutes, self.clock()
        )
        self.settings = settings
        self.ctx = Context(self.store, settings, self._registry(), self.beat)
        self.timer.max_age = self.ctx.max_age
        self.timer.wake()
        self.rescan()
        log.info(
            "reload.done",
            added=result.added,
            changed=result.changed,
            deactivated=result.deactivated,
        )
        self.notifier.ready(self.status_line())
        return {
            "ok": True,
            "added": result.added,
            "changed": result.changed,
            "deactivated": result.deactivated,
        }

    def _keep_restart_keys(self, settings: Settings) -> Settings:
        kept = {key: getattr(self.settings, key) for key in RESTART_KEYS}
        for key, value in kept.items():
            if getattr(settings, key) != value:
                log.warning("reload.needs_restart", key=key)
        return settings.model_copy(update=kept)

    def _handle_status(self, _request: dict[str, Any]) -> dict[str, Any]:
        return {
            "ok": True,
            "pid": os.getpid(),
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started),
            "pending_reports": self.queue.in_progress_or_queued(),
            "in_hand": [str(w.current) for w in self.workers if w.current is not None],
            "counters": dict(self.counters),
            "healthy": self.healthy(),
        }

    def status_line(self) -> str:
        registry = self.ctx.registry
        jobs = sum(len(site.jobs) for site in registry.sites.values())
        return (
            f"watching {len(registry.sites)} sites, {jobs} jobs; "
            f"{self.queue.in_progress_or_queued()} reports pending; since start "
            f"{self.counters['accepted']} accepted, {self.counters['rejected']} rejected"
        )

    # --------------------------------------------------------------- stop

    def request_stop(self) -> None:
        self.stop_requested.set()
        self.wakeup.set()

    def shutdown(self) -> int:
        """Finish the reports in hand, then stop everything; queued ones stay on disk."""
        self.notifier.stopping()
        log.info("daemon.stopping")
        deadline = time.monotonic() + STOP_TIMEOUT
        for component in ("watcher", "control"):
            if hasattr(self, component):
                getattr(self, component).stop()
        self.queue.close()
        for worker in self.workers:
            worker.thread.join(max(0.0, deadline - time.monotonic()))
        if hasattr(self, "timer"):
            self.timer.stop(max(0.0, deadline - time.monotonic()))
        self.store.dispose()
        log.info("daemon.stopped")
        return 0


# ------------------------------------------------------------------ entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="backupwatchd", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        type=Path,
        help="backupwatch.toml (default: $BACKUPWATCH_CONFIG or /etc/backupwatch/backupwatch.toml)",
    )
    parser.add_argument(
        "--log-target", type=LogTarget, choices=list(LogTarget), default=LogTarget.AUTO
    )
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--version", action="version", version=f"backupwatchd {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    environ = dict(os.environ)
    configure_logging(resolve_target(args.log_target, environ), args.log_level)
    try:
        settings = load_settings(default_config_path(args.config, environ), environ)
        specs = load_jobs(settings)
    except ConfigError as exc:
        print(f"backupwatchd: invalid configuration:\n{exc}", file=sys.stderr)
        return 1
    daemon = Daemon(settings, specs, environ)
    del specs  # the daemon drops them after its first sync; nothing else may keep them alive
    _install_signals(daemon)
    try:
        daemon.start()
    except (ControlError, OSError, SQLAlchemyError) as exc:
        log.error("daemon.start_failed", error=str(exc))
        print(f"backupwatchd: cannot start: {exc}", file=sys.stderr)
        daemon.request_stop()
        daemon.shutdown()
        return 1
    return daemon.run()


def _install_signals(daemon: Daemon) -> None:
    """Handlers only set flags: the main loop does the work (no locks taken in a handler)."""

    def stop(_signum: int, _frame: FrameType | None) -> None:
        daemon.request_stop()

    def hup(_signum: int, _frame: FrameType | None) -> None:
        daemon.reload_signalled = True
        daemon.wakeup.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, hup)


if __name__ == "__main__":
    sys.exit(main())
