"""SPEC §7: `backupwatchd`, the long-running daemon.

Threads: the inotify reader and its rebuild thread (classify a path and queue it, nothing more),
N workers (run the pipeline on one report at a time), the MISSING timer, the control socket, and
the main thread,
which owns every state change: signals and control requests only set flags or post requests that
the main loop carries out, so a reload never races a rescan or a shutdown.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import queue
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from backupwatch import __version__, heap
from backupwatch.arrivals import Arrivals, Waiting
from backupwatch.config import (
    ConfigError,
    Settings,
    default_config_path,
    load_settings,
    load_settings_lenient,
)
from backupwatch.control import ControlError, ControlServer, Handler, JsonArray
from backupwatch.delivery import DeliveryLoop
from backupwatch.jobdelta import Synced, resync, synced
from backupwatch.jobfiles import JobReader
from backupwatch.jobrecord import JobRecord
from backupwatch.jobs import JobSpec, unread_job_files
from backupwatch.logsetup import LogTarget, configure_logging, resolve_target
from backupwatch.metrics import Instruments, Runtime
from backupwatch.names import display_name
from backupwatch.notices import Notices
from backupwatch.notify import Notifier
from backupwatch.outage import OutageLog
from backupwatch.pipeline import Context, registry_after_sync
from backupwatch.promotion import clean_temps
from backupwatch.pruning import INTERVAL as PRUNE_INTERVAL
from backupwatch.pruning import Pruner
from backupwatch.rejected import repair
from backupwatch.scan import (
    misplaced_reports,
    pending_among,
    pending_reports,
    report_name,
    reports_in,
)
from backupwatch.sites import PathKind, Registry, normalize
from backupwatch.store import DueJob, ExpectedBackupJob, InstanceConflict, JobView, Store
from backupwatch.timer import MissingTimer
from backupwatch.timeutil import utc_now
from backupwatch.watcher import DepositWatcher, EventKind, WorkQueue
from backupwatch.workers import ReportHandler, WorkerPool

if TYPE_CHECKING:
    from backupwatch.web import WebServer

log = structlog.get_logger(__name__)

STAGED_RECHECK = 0.2  # a waiting report is looked at again this soon after an event in D
STOP_TIMEOUT = 8.0  # SPEC §7: stop within 10 s
REQUEST_TIMEOUT = 60.0  # a control request waits this long for the main thread
STALE_MIN = 15.0  # a loop unseen this long is wedged (above the timer's longest sleep)
WORKERS = max(2, min(4, os.cpu_count() or 2))
# Settings that a reload cannot change under a running daemon: a restart applies them.
RESTART_KEYS = (
    "backup_storage_root",
    "database_url",
    "control_socket",
    "http_listen",
    "instance",
)
FIRST_PRUNE_DELAY = timedelta(minutes=10)  # SPEC §14: the first retention run after READY
REJECTED_WINDOW = timedelta(hours=24)  # `check` warns about rejections this recent (SPEC §11)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Daemon:
    def __init__(
        self,
        settings: Settings,
        specs: Sequence[JobSpec | JobRecord],
        environ: Mapping[str, str],
        clock: Callable[[], datetime] = utc_now,
        reader: JobReader | None = None,
    ) -> None:
        self.settings = settings
        self.specs = specs
        # What read `specs`: a reload reads again only the files and tables that changed,
        # and syncs only the jobs that differ from those of the last sync.
        self.reader = reader or JobReader()
        self.synced: Synced | None = None
        self.environ = environ
        self.clock = clock
        self.notifier = Notifier(environ)
        self.store = Store(settings.database_url)
        self.store.routing = settings.alerts.routing()
        self.store.instance = settings.instance  # SPEC §15: this daemon's jobs only
        self.queue = WorkQueue()
        self.arrivals = Arrivals()
        self.outage = OutageLog()
        self.notices = Notices()
        self.started = time.monotonic()
        self.stopping = False  # set by a signal handler: a plain flag, no lock
        self.wakeup = Wakeup()
        self.waiting = Waiting(wake=self.wakeup.set)
        self.requests: queue.SimpleQueue[tuple[str, Future[dict[str, Any]]]] = queue.SimpleQueue()
        self.reload_signalled = False
        self.phase = "starting"
        self.ready = False
        self.last_rescan = 0.0
        self.last_status = ""
        self.repairs_done = False
        # Every component exists before the control socket serves (`status` during the start
        # sequence must not find half a daemon); threads start in `start()`.
        empty = Registry(normalize(settings.backup_storage_root))
        self.ctx = Context(self.store, settings, empty, self.beat, observer=self.arrivals)
        self.handler = ReportHandler(
            lambda: self.ctx,
            clock,
            self.queue,
            self.arrivals,
            self.waiting,
            self.outage,
            self.notices,
        )
        self.pool = WorkerPool(self.queue, self.handler, WORKERS)
        self.timer = MissingTimer(
            self.store, clock, self.ctx.max_age, self._site_busy, outage=self.outage
        )
        self.watcher = DepositWatcher(
            settings.backup_storage_root, self._on_event, self._on_overflow
        )
        self.delivery = DeliveryLoop(self.store, clock, settings.alerts, outage=self.outage)
        self.control = ControlServer(settings.control_socket, self._handlers())
        # SPEC §12: the HTTP listener, built in `start` (its engine is its own).
        self.instruments = Instruments()
        self.handler.observe = self.instruments.observe_processing
        self.web: WebServer | None = None
        self.rescans = 0
        self.last_tick = time.monotonic()
        # SPEC §14: retention, once an hour on a thread of its own (see `retention_tick`).
        self.next_prune: datetime | None = None
        self.prune_thread: threading.Thread | None = None

    @property
    def counters(self) -> collections.Counter[str]:
        return self.handler.counters

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """SPEC §7's start sequence; READY=1 is sent only once all of it is done."""
        self.control.start()
        self._start_web()
        self._set_phase("preparing the storage roots")
        self._prepare_roots()
        self._set_phase("migrating the database")
        self.store.migrate()
        self._set_phase("syncing the jobs")
        self._note_unread_job_files(self.settings)
        # The specs are needed for this sync only: release them (the reader keeps its records).
        specs, self.specs = self.specs, []
        window = self.settings.scanner_report_collection_window_minutes
        with heap.collector_paused():
            result = self.store.sync_jobs(specs, window, self.clock())
            self.synced = synced(specs, window, self.settings.archive_test, result.conflict_keys)
            registry = registry_after_sync(self.settings, self.store, specs, result.unchanged)
            del specs
            result.unchanged.clear()
        log.info(
            "jobs.synced",
            instance=self.settings.instance,
            added=result.added,
            changed=result.changed,
            deactivated=result.deactivated,
        )
        self._note_conflicts(result.conflicts)
        self.ctx = Context(self.store, self.settings, registry, self.beat, self.arrivals)
        self._set_phase("watching the deposit folders")
        listed = self.watcher.start(report_name)
        self.pool.start()
        self._set_phase("processing the reports waiting in the deposit folders")
        # SPEC §7 wants the waiting reports processed before READY: those the watcher's walk
        # listed (each folder after its watch was added: what came later is an event). The
        # warnings about files that are never read (misplaced) are not part of that, and come
        # with the first tick.
        self.rescan(misplaced=False, listed=listed)
        while not self.queue.wait_idle(timeout=1.0):
            if self.stopping:
                return
        self._set_phase("flagging the deadlines missed while stopped")
        flagged = self.timer.run_once(self.clock())
        log.info("timer.caught_up", flagged=len(flagged))
        self.timer.start()
        # After the catch-up: what it flagged is in the outbox together, one grouped message.
        self.delivery.start()
        self.last_tick = time.monotonic()
        self.phase, self.ready = "running", True
        self.notifier.ready(self.status_line())
        log.info(
            "daemon.ready", version=__version__, pid=os.getpid(), sites=len(self.ctx.registry.sites)
        )

    def _start_web(self) -> None:
        """SPEC §12: listen now, so that a port already taken stops the start at once, with
        the key named; pages read the store through an engine of their own."""
        if not self.settings.http_listen:
            return
        # Imported here: a daemon without pages never loads Jinja2 and the WSGI server
        # (~40 ms and ~1 MiB of its start).
        from backupwatch.web import WebApp, WebServer

        app = WebApp(
            Store(self.settings.database_url, create=False),
            self,
            self.clock,
            lambda: self.settings.metrics_per_job,
            self.instruments,
        )
        self.web = WebServer(self.settings.http_listen, app)
        self.web.start()

    def _set_phase(self, phase: str) -> None:
        """Said to systemd (STATUS=) and logged: where a slow start spends its time."""
        self.phase = f"starting: {phase}"
        self.notifier.status(phase)
        log.info("daemon.phase", phase=phase)

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
            existed = root.is_dir()
            try:
                root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot create {root}: {exc.strerror}") from exc
            if not existed:
                self._note_created_root(root)
            if not os.access(root, mode):
                raise PermissionError(f"{root} is not {word} by this user")

    def _note_created_root(self, root: Path) -> None:
        """A root that did not exist is created, but said loudly (issue 6 item 10): a relative
        path resolved somewhere new would otherwise quietly watch an empty folder."""
        key = next(
            k
            for k in ("backup_storage_root", "validated_backups_base_path")
            if getattr(self.settings, k) == root
        )
        self.notices.add(
            f"created:{key}",
            f"{key} {root} did not exist and was created empty: if agents deposit (or backups "
            f"belong) elsewhere, fix {key} in {self.settings.config_path} (relative paths are "
            "resolved against the config file's folder)",
        )

    def _note_unread_job_files(self, settings: Settings) -> None:
        for text in unread_job_files(settings):
            self.notices.add(f"unread:{text}", text)

    def _note_conflicts(self, conflicts: list[str]) -> None:
        """SPEC §15: a job another instance owns is not synced here; `status` says so."""
        self.notices.discard_prefix("instance:")
        for text in conflicts:
            self.notices.add(f"instance:{text}", text)

    def _handlers(self) -> dict[str, Handler]:
        return {
            "status": self._handle_status,
            "reload": lambda _req: self._post("reload"),
            "rescan": lambda _req: self._post("rescan"),
        }

    # ------------------------------------------------------------- inotify side

    def _on_event(self, kind: EventKind, path: Path) -> None:
        """Runs on the inotify thread: classify, tell `Arrivals`, queue; nothing that can block
        or raise. Every report event is read at once: a report that is not whole yet waits (see
        `readiness`) until its close, its rename or its settle time."""
        if kind is EventKind.DIR_CREATED:
            return  # the watcher watches it already; its files arrive as events of their own
        for waiting in self.waiting.touched(path):
            if waiting != path:
                self.queue.put(waiting, STAGED_RECHECK)  # its staged file may have landed
        classified = self.ctx.registry.classify(path)
        if classified.kind is PathKind.MISPLACED:
            self._note_misplaced(path, classified.why or "")
            return
        linked = kind is EventKind.CREATED and _has_links(path)
        if classified.kind is PathKind.IGNORED:
            if self.ctx.registry.site_containing(path) is not None:
                self.arrivals.saw_data(kind, path, linked)  # a transfer in flight, or done
            return
        self.arrivals.saw(kind, path, linked)
        self.waiting.remove(path)
        self.queue.put(path)

    def _note_misplaced(self, path: Path, why: str) -> None:
        name = display_name(str(path))
        self.notices.add(f"misplaced:{path}", f"{name} is never read: {why}", report=name)

    def _on_overflow(self) -> None:
        """The watcher lost events and has its watches back: rescan (it logged the loss).
        What was seen of writers before may be stale now: a close may have been lost."""
        log.info("watcher.rescan_after_overflow")
        self.arrivals.events_lost()
        self.queue.needs_rescan.set()
        self.wakeup.set()

    def _site_busy(self, job: DueJob) -> bool:
        """A report of this site is queued, in hand or waiting: it may be the one the deadline
        waits for, so the timer defers the job a little (see `timer.DEFER_LIMIT`)."""
        folder = normalize(self.settings.backup_storage_root / job.deposit_path)
        return self.queue.pending_under(folder) or self.waiting.pending_under(folder)

    # --------------------------------------------------------------- main loop

    def run(self) -> int:
        """The main thread's loop: requests, periodic rescans, watchdog pings, shutdown."""
        while not self.stopping:
            self.wakeup.wait(self._next_tick())
            if self.stopping:
                break
            try:
                self.tick()
            except Exception:  # the main loop must outlive any one of its steps
                log.exception("daemon.tick_failed")
        return self.shutdown()

    def tick(self) -> bool:
        """One pass of the main loop; True when every loop was healthy (and systemd pinged)."""
        self.last_tick = time.monotonic()
        self._serve_requests()
        self._revive_watcher()
        self.pool.supervise(self.stale_after)
        if self.reload_signalled:
            self.reload_signalled = False
            self.reload()
        if self.queue.needs_rescan.is_set() or self._rescan_due():
            self.rescan()
        for path in self.waiting.due():
            self.queue.put(path)
        if not self.repairs_done:
            self._repair_after_crash()
        self.retention_tick(self.clock())
        healthy = self.healthy()
        if healthy and self.notifier.watchdog_interval is not None:
            self.notifier.watchdog()
        self._publish_status()
        return healthy

    def _repair_after_crash(self) -> None:
        """Once, after READY: what a crash can leave half-done that nothing else revisits,
        and the start's warnings about misplaced reports (its scan left them for now)."""
        self.repairs_done = True
        self._note_all_misplaced()
        temps = clean_temps(self.ctx.temp_root, self.store.report_processed)
        folders = {site.folder for site in self.ctx.registry.sites.values()}
        fixed = [repair(folder) for folder in folders]
        log.info(
            "daemon.repaired",
            promotion_temps_removed=temps,
            orphan_reasons_removed=sum(r.orphans_removed for r in fixed),
            reasons_restored=sum(r.reasons_restored for r in fixed),
        )

    def retention_tick(self, now: datetime) -> bool:
        """SPEC §14: once an hour, start a retention run at `now` on a thread of its own, so that
        a long one (a million old entries) never holds up the main loop or its watchdog pings;
        True when one was started. Tests call it with their `now`.

        The first run comes FIRST_PRUNE_DELAY after READY, not at once: the start-up catch-up
        and the reports that waited have the database first, and a daemon restarted more often
        than hourly still prunes."""
        if not self.ready:
            return False
        if self.next_prune is None:
            self.next_prune = now + FIRST_PRUNE_DELAY
            return False
        if now < self.next_prune:
            return False
        if self.prune_thread is not None and self.prune_thread.is_alive():
            return False
        self.next_prune = now + PRUNE_INTERVAL
        self.prune_thread = threading.Thread(
            target=self._prune, args=(now,), name="retention", daemon=True
        )
        self.prune_thread.start()
        return True

    def _prune(self, now: datetime) -> None:
        try:
            Pruner(self.store, self.ctx.settings, stop=lambda: self.stopping).run_once(now)
        except Exception:  # a database outage, a full disk: the next hour tries again
            log.exception("retention.failed")

    def _publish_status(self) -> None:
        """Keep `systemctl status` current without flooding the notify socket."""
        line = self.status_line()
        if line != self.last_status:
            self.notifier.status(line)
            self.last_status = line

    def _next_tick(self) -> float:
        interval = self.notifier.watchdog_interval or 5.0
        upcoming = self.waiting.next_due_in()
        if upcoming is not None:
            interval = min(interval, upcoming)
        return max(0.05, min(interval, 5.0))

    def _revive_watcher(self) -> None:
        """The inotify reader can die (a read error), the root can lose its watch: start a
        new watcher, then rescan."""
        if self.watcher.is_alive():
            return
        log.error("watcher.died", action="restart and rescan")
        self.watcher.stop()
        self.watcher = DepositWatcher(
            self.settings.backup_storage_root, self._on_event, self._on_overflow
        )
        try:
            self.watcher.start()
        except OSError as exc:
            log.error("watcher.restart_failed", error=str(exc))
            return
        self.arrivals.events_lost()
        self.queue.needs_rescan.set()

    def _rescan_due(self) -> bool:
        period = self.ctx.settings.rescan_interval_minutes * 60
        return time.monotonic() - self.last_rescan >= period

    def _post(self, kind: str) -> dict[str, Any]:
        """Hand a control request to the main thread and wait for its answer."""
        if not self.ready:
            return {
                "ok": False,
                "error": f"the daemon is still starting ({self.phase}); try again once it is ready",
            }
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
        self.pool.beat()

    def healthy(self) -> bool:
        """Every loop alive and recently seen: only then does systemd get its ping."""
        return self.ready and not self.failing_loops()

    def failing_loops(self) -> list[str]:
        """The loops that are dead or unseen for too long (`/healthz` names them); read-only,
        safe from any thread."""
        if not self.ready:
            return [self.phase]
        stale = self.stale_after
        now = time.monotonic()
        checks = {
            "workers": self.pool.healthy(stale),
            "missing timer": self.timer.is_alive() and now - self.timer.heartbeat < stale,
            "alert delivery": self.delivery.healthy(stale),
            "inotify watcher": self.watcher.is_alive(),
            "control socket": self.control.is_alive(),
            "main loop": now - self.last_tick < stale,
        }
        if self.web is not None:
            checks["http listener"] = self.web.is_alive()
        return [name for name, ok in checks.items() if not ok]

    def runtime(self) -> Runtime:
        """The in-memory counters `/metrics` shows (SPEC §12)."""
        return Runtime(
            outcomes=dict(self.counters),
            hashed_bytes=self.handler.hashed_bytes,
            queue_depth=self.queue.in_progress_or_queued(),
            waiting=len(self.waiting),
            rescans=self.rescans,
            overflows=self.watcher.overflows,
            rebuilds=self.watcher.rebuilds,
            healthy=self.healthy(),
        )

    def status_answer(self, store: Store) -> dict[str, Any]:
        """`status` with its job rows, as the control socket answers it (`/api/status`)."""
        answer = self._status()
        if self.ready:
            self._add_jobs(answer, store)
        return answer

    # ------------------------------------------------------------ operations

    def rescan(self, misplaced: bool = True, listed: list[Path] | None = None) -> dict[str, Any]:
        """Queue every report waiting on disk (and warn about misplaced ones, unless told
        not to); returns how many were queued. `listed`: the files a walk has just listed
        (the watcher's at start), rather than listing the folders again."""
        self.queue.needs_rescan.clear()
        self.last_rescan = time.monotonic()
        self.rescans += 1
        queued = 0
        registry = self.ctx.registry
        waiting = pending_reports(registry) if listed is None else pending_among(registry, listed)
        for path in waiting:
            if self.queue.put(path):
                queued += 1
        if misplaced:
            self._note_all_misplaced()
        log.info("rescan.done", queued=queued)
        return {"ok": True, "queued": queued}

    def _note_all_misplaced(self) -> None:
        for path, classified in misplaced_reports(self.ctx.registry):
            self._note_misplaced(path, classified.why or "")

    def _scan_folders(self, folders: list[Path]) -> None:
        """`rescan` of these deposit folders only (not counted as a reconciliation scan)."""
        queued = sum(1 for path in reports_in(folders) if self.queue.put(path))
        for path, classified in misplaced_reports(self.ctx.registry, folders):
            self._note_misplaced(path, classified.why or "")
        log.info("rescan.done", queued=queued, folders=len(folders))

    def reload(self) -> dict[str, Any]:
        """SIGHUP / `backupwatchctl reload`: all or nothing; what fails changes nothing."""
        self.notifier.reloading()
        try:
            return self._reload()
        finally:
            heap.release_free_memory()  # a changed file's reading and the old records
            self.notifier.ready(self.status_line())

    def _reload(self) -> dict[str, Any]:
        try:
            settings = load_settings(self.settings.config_path, self.environ)
            specs = self.reader.load(settings)
        except ConfigError as exc:
            log.error("reload.invalid_config", errors=exc.errors)
            return {"ok": False, "error": str(exc)}
        self._note_unread_job_files(settings)
        needs_restart = self._restart_changes(settings)
        settings = settings.model_copy(update={k: getattr(self.settings, k) for k in RESTART_KEYS})
        try:
            resynced = resync(
                self.store, settings, specs, self.synced, self.ctx.registry, self.clock()
            )
            del specs
        except InstanceConflict as exc:
            log.error("reload.instance_conflict", error=str(exc))
            return {"ok": False, "error": str(exc)}
        except SQLAlchemyError as exc:
            detail = str(exc).splitlines()[0]
            log.error("reload.database_error", error=detail, action="previous configuration kept")
            return {
                "ok": False,
                "error": f"cannot reach the database ({detail}); "
                "the daemon keeps its previous configuration",
            }
        self.settings, self.synced, result = settings, resynced.synced, resynced.result
        self.store.routing = settings.alerts.routing()
        self.delivery.configure(settings.alerts)
        self.ctx = Context(self.store, settings, resynced.registry, self.beat, self.arrivals)
        self.timer.max_age = self.ctx.max_age
        self.timer.wake()
        if resynced.folders is None:
            self.rescan()
        else:  # only the sites the reload changed: the others' reports mean what they meant
            self._scan_folders(resynced.folders)
        self._note_conflicts(result.conflicts)
        log.info(
            "reload.done",
            added=result.added,
            changed=result.changed,
            deactivated=result.deactivated,
            needs_restart=[change.key for change in needs_restart],
        )
        return {
            "ok": True,
            "added": result.added,
            "changed": result.changed,
            "deactivated": result.deactivated,
            "needs_restart": [change.as_json() for change in needs_restart],
        }

    def _restart_changes(self, settings: Settings) -> list[RestartChange]:
        """Keys changed in the file that only a restart applies (SPEC §1): said, not hidden."""
        changes = []
        for key in RESTART_KEYS:
            old, new = getattr(self.settings, key), getattr(settings, key)
            if old != new:
                change = RestartChange(key, shown_setting(key, old), shown_setting(key, new))
                log.warning(
                    "reload.needs_restart", key=key, running=change.running, file=change.file
                )
                changes.append(change)
        return changes

    def _handle_status(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answered on the control thread from what exists at any moment of the start.

        `jobs: true` adds the job rows (read here, once the daemon is ready), so that
        `backupwatchctl status` needs neither pydantic nor SQLAlchemy of its own; `config_path`
        naming this daemon's own file adds `file_check`: that file's errors and the database
        it names now (with the control tool's `BACKUPWATCH_*` variables in `environ`).
        """
        answer = self._status()
        if request.get("jobs") and self.ready:
            self._add_jobs(answer, self.store, streamed=True)
        if request.get("config_path") == str(self.settings.config_path):
            environ = request.get("environ")
            answer["file_check"] = self._check_file(environ if isinstance(environ, dict) else {})
        return answer

    def _add_jobs(self, answer: dict[str, Any], store: Store, streamed: bool = False) -> None:
        """The job rows; `streamed`, a page at a time while the answer is sent (the control
        socket), rather than all of them held at once (the HTTP listener's `/api/status`)."""
        try:
            now = self.clock()
            if streamed:
                ids = store.job_ids()
                first = store.job_views(now, ExpectedBackupJob.id.in_(ids[:STATUS_PAGE]))
                answer["jobs"] = JsonArray(_job_pages(store, now, ids, first))
            else:
                answer["jobs"] = [view.as_json() for view in store.job_views(now)]
            answer["alerts"] = self.delivery.outbox.counts()
            since = self.clock() - REJECTED_WINDOW
            answer["rejected_sites"] = store.rejected_sites(since)
        except SQLAlchemyError as exc:
            answer["jobs_error"] = str(exc).splitlines()[0]

    def _check_file(self, environ: dict[str, Any]) -> dict[str, Any]:
        """The configuration file as it is now (not as it was loaded): its errors, and the
        database it names unless that key itself is wrong."""
        env = {str(k): str(v) for k, v in environ.items() if str(k).startswith("BACKUPWATCH_")}
        try:
            lenient = load_settings_lenient(self.settings.config_path, env)
        except ConfigError as exc:
            return {"errors": exc.errors, "database": None}
        database = None
        if "database_url" not in lenient.defaulted:
            database = shown_setting("database_url", lenient.settings.database_url)
        return {"errors": lenient.errors, "database": database}

    def _status(self) -> dict[str, Any]:
        return {
            "ok": True,
            "state": "running" if self.ready else ("stopping" if self.stopping else "starting"),
            "phase": self.phase,
            "pid": os.getpid(),
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started),
            "pending_reports": self.queue.in_progress_or_queued(),
            "waiting_reports": self.waiting.reasons(),
            "left_in_place": self.handler.parked(),
            "in_hand": self.pool.in_hand(),
            "replaced_workers": [w.retired for w in self.pool.retired()],
            "counters": dict(self.counters),
            "healthy": self.healthy(),
            "database": shown_setting("database_url", self.settings.database_url),
            "config_path": str(self.settings.config_path),
            "http": self.web.address if self.web is not None else None,
            "instance": self.settings.instance,
            "warnings": [*self.watcher.limit_warnings, *self.notices.texts()],
            "inotify": {
                "folders": self.watcher.folder_count,
                "watches": self.watcher.watch_count(),
                "overflows": self.watcher.overflows,
                "rebuilds": self.watcher.rebuilds,
            },
        }

    def status_line(self) -> str:
        registry = self.ctx.registry
        jobs = sum(len(site.jobs) for site in registry.sites.values())
        return (
            f"watching {len(registry.sites)} sites, {jobs} jobs; "
            f"{self.queue.in_progress_or_queued()} reports pending, {len(self.waiting)} waiting; "
            f"since start {self.counters['accepted']} accepted, "
            f"{self.counters['rejected']} rejected"
        )

    # --------------------------------------------------------------- stop

    def request_stop(self) -> None:
        """Safe from a signal handler: a flag and a byte on a pipe, no lock taken."""
        self.stopping = True
        self.wakeup.set()

    def shutdown(self) -> int:
        """Finish the reports in hand, then stop everything; queued ones stay on disk."""
        self.ready = False
        self.phase = "stopping"
        self.notifier.stopping()
        log.info("daemon.stopping")
        deadline = time.monotonic() + STOP_TIMEOUT
        self.watcher.stop()
        self.control.stop()
        if self.web is not None:
            self.web.stop(1.0)
        self.pool.stop()
        self.queue.close()
        self.pool.join(deadline)
        self.timer.stop(max(0.0, deadline - time.monotonic()))
        # A send in flight is abandoned at the deadline; its claim is freed at the next start.
        self.delivery.stop(max(0.0, deadline - time.monotonic()))
        if self.prune_thread is not None:  # it stops between two batches (`self.stopping`)
            self.prune_thread.join(max(0.0, deadline - time.monotonic()))
        self.store.dispose()
        log.info("daemon.stopped")
        return 0


class Wakeup:
    """Wakes the main loop from any thread or from a signal handler.

    A self-pipe rather than a threading.Event: Event.set() takes a lock, and a signal handler
    that runs while the main thread holds that same lock (inside Event.clear()) deadlocks it.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def set(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe is already a pending wake-up
            os.write(self._write, b"!")

    def wait(self, timeout: float) -> None:
        """Until set() (since the last wait) or `timeout` seconds."""
        ready, _, _ = select.select([self._read], [], [], timeout)
        if ready:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._read, 4096):
                    pass


@dataclass(frozen=True)
class RestartChange:
    key: str
    running: str
    file: str

    def as_json(self) -> dict[str, str]:
        return {"key": self.key, "running": self.running, "file": self.file}


STATUS_PAGE = 2_000  # job rows per page of a streamed `status` answer (an `IN` of ids)


def _job_pages(
    store: Store, now: datetime, ids: list[int], first: list[JobView]
) -> Iterator[list[Any]]:
    """`status` rows a page at a time, each page read when the previous one has been sent
    (the first one is read before the answer starts, so that a database error is answered).
    Pages of ids taken in job order keep the rows in job order; a job removed meanwhile is
    left out, one added meanwhile comes with the next `status`."""
    yield [view.as_json() for view in first]
    for start in range(STATUS_PAGE, len(ids), STATUS_PAGE):
        page = ids[start : start + STATUS_PAGE]
        yield [view.as_json() for view in store.job_views(now, ExpectedBackupJob.id.in_(page))]


def shown_setting(key: str, value: object) -> str:
    """A setting as it may be shown to an operator: a database URL without its password."""
    if key == "database_url":
        return make_url(str(value)).render_as_string(hide_password=True)
    return str(value)


def _has_links(path: Path) -> bool:
    """A new name with more than one link is a hard link to an existing file (lftp's `mv`
    may link then unlink): a complete file, which no writer holds open because of it."""
    try:
        return os.lstat(path).st_nlink > 1
    except OSError:
        return False


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
    parser.add_argument(
        "--log-level",
        type=str.upper,
        choices=LOG_LEVELS,
        default="INFO",
        help="messages below this level are not logged (default: INFO)",
    )
    parser.add_argument("--version", action="version", version=f"backupwatchd {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    environ = dict(os.environ)
    configure_logging(resolve_target(args.log_target, environ), args.log_level)
    try:
        settings = load_settings(default_config_path(args.config, environ), environ)
        reader = JobReader()
        specs = reader.load(settings)
    except ConfigError as exc:
        print(f"backupwatchd: invalid configuration:\n{exc}", file=sys.stderr)
        return 1
    daemon = Daemon(settings, specs, environ, reader=reader)
    del specs  # the daemon drops them after its first sync; nothing else may keep them alive
    _install_signals(daemon)
    try:
        daemon.start()
    except (ControlError, OSError, SQLAlchemyError, InstanceConflict) as exc:
        log.error("daemon.start_failed", error=str(exc))
        print(f"backupwatchd: cannot start: {exc}", file=sys.stderr)
        daemon.request_stop()
        daemon.shutdown()
        return 1
    heap.settle()  # here, not in `start`: a test process that starts daemons keeps its collector
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
