"""SPEC §14: the retention adapter around `retention`'s pure rules.

One run, in this order: validated backups by each job's GFS rule (only files the daemon placed
and recorded, each claimed by a conditional UPDATE so that several daemons on one database never
remove one twice, and removed only while it is still the very inode and size placed), then old
entries and report digests in short batches (reports keep flowing meanwhile), then old files in
each site's `_archive/` and `_rejected/`, then a list of stale uploads (logged, never deleted).
Every deletion goes through the confinement of `fsutil` (a walk beneath a root, no symlink
followed) and is one structured log line; entries, being rows, are one line per batch.

`Pruner.run_once(now)` is what `backupwatchctl prune` and the daemon's hourly step call; a
`dry_run` removes and claims nothing and says what it would do.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath

import structlog

from backupwatch.config import Settings
from backupwatch.fsutil import UnsafePath, open_beneath, open_dir_beneath
from backupwatch.retention import (
    Backup,
    Cutoffs,
    Keep,
    Placed,
    cutoffs,
    gfs_prune,
    same_file,
)
from backupwatch.sites import ARCHIVE_DIR, NEVER_SCANNED, REJECTED_DIR
from backupwatch.store import ExpectedBackupJob, PlacedEntry, Store

log = structlog.get_logger(__name__)

BATCH = 1000  # entries per short transaction
BATCH_PAUSE = 0.01  # seconds between batches: SQLite's writers (the workers) get the lock
CLAIM_STALE = timedelta(hours=1)  # a removal claimed this long ago belongs to a dead pruner
INTERVAL = timedelta(hours=1)  # SPEC §14: once an hour
STALE_WALK_LIMIT = 10_000  # directory entries looked at per site for stale uploads
STALE_SHOWN = 20  # names of stale uploads per site in the log line


@dataclass
class PruneReport:
    """What one run removed (or, dry, would remove): `backupwatchctl prune` prints it."""

    dry_run: bool
    entries: int = 0
    reports: int = 0
    alerts: int = 0  # alert events, with their deliveries
    backups: list[str] = field(default_factory=list)
    kept_changed: list[str] = field(default_factory=list)
    moved: list[str] = field(default_factory=list)  # files of _archive/ and _rejected/
    stale_uploads: list[str] = field(default_factory=list)


class Pruner:
    def __init__(
        self,
        store: Store,
        settings: Settings,
        progress: Callable[[str], None] | None = None,
        stop: Callable[[], bool] = lambda: False,
        pause: float = BATCH_PAUSE,
    ) -> None:
        self.store = store
        self.settings = settings
        self.progress = progress or (lambda _text: None)
        self.stop = stop
        self.pause = pause

    def run_once(self, now: datetime, dry_run: bool = False) -> PruneReport:
        retention = self.settings.retention
        limits = cutoffs(
            now,
            retention.history_days,
            retention.archive_days,
            retention.stale_upload_hours,
            self.settings.max_status_file_age_days,
        )
        report = PruneReport(dry_run)
        self._backups(now, report)
        self._entries(limits, report)
        self._moved(limits, report)
        self._stale(limits, report)
        log.info(
            "retention.done",
            dry_run=dry_run,
            entries=report.entries,
            reports=report.reports,
            alerts=report.alerts,
            backups=len(report.backups),
            kept_changed=len(report.kept_changed),
            moved=len(report.moved),
            stale_uploads=len(report.stale_uploads),
        )
        return report

    # ------------------------------------------------------------ validated backups

    def _backups(self, now: datetime, report: PruneReport) -> None:
        defaults = self.settings.retention
        fallback = (defaults.keep_daily, defaults.keep_weekly, defaults.keep_monthly)
        for job in self.store.active_jobs():
            keep = Keep.resolve((job.keep_daily, job.keep_weekly, job.keep_monthly), fallback)
            if keep is None or self.stop():
                continue
            placed = self.store.placed_successes(job.id, now - CLAIM_STALE)
            by_id = {p.id: p for p in placed}
            for backup in gfs_prune((Backup(p.id, p.cycle) for p in placed), keep):
                entry = by_id[backup.id]
                if entry.final_path is None or entry.final_ino is None:
                    continue  # not recorded as placed by this daemon: never touched
                if report.dry_run:
                    report.backups.append(entry.final_path)
                    self.progress(f"would remove {entry.final_path}")
                elif self.store.claim_removal(entry.id, now, now - CLAIM_STALE):
                    self._remove_placed(job, entry, now, report)

    def _remove_placed(
        self, job: ExpectedBackupJob, entry: PlacedEntry, now: datetime, report: PruneReport
    ) -> None:
        assert entry.final_path is not None
        root = self.settings.validated_backups_base_path
        recorded = Placed(entry.final_dev, entry.final_ino, entry.size)
        where = {"job": job.label, "cycle": entry.cycle.isoformat(), "path": entry.final_path}
        try:
            relative = PurePosixPath(Path(entry.final_path).relative_to(root))
            state = _unlink_if_same(root, relative, recorded)
        except ValueError:
            state, why = "changed", f"not under validated_backups_base_path {root}"
        except FileNotFoundError:
            state, why = "gone", "already gone"
        except (UnsafePath, IsADirectoryError) as exc:
            state, why = "changed", f"refused: {exc}"
        except OSError as exc:
            # Left claimed: the claim goes stale and a later run tries again.
            log.error("retention.remove_failed", kind="backup", error=str(exc), **where)
            return
        else:
            why = "its inode or size changed since promotion"
        if state == "removed":
            report.backups.append(entry.final_path)
            log.info("retention.removed", kind="backup", size=entry.size, **where)
            self.progress(f"removed {entry.final_path}")
        elif state == "gone":
            log.info("retention.already_gone", kind="backup", **where)
        else:
            report.kept_changed.append(entry.final_path)
            log.warning("retention.kept", kind="backup", reason=why, **where)
            self.progress(f"kept {entry.final_path}: {why}")
        self.store.finish_removal(entry.id, state, now)

    # ----------------------------------------------------------------- entries

    def _entries(self, limits: Cutoffs, report: PruneReport) -> None:
        if report.dry_run:
            report.entries = self.store.count_old_entries(limits.entries)
            report.reports = self.store.prune_processed_reports(limits.reports, 0, dry_run=True)
            report.alerts = self.store.prune_alert_events(limits.alerts, 0, dry_run=True)
            self.progress(
                f"would delete {report.entries} entries, {report.reports} report keys, "
                f"{report.alerts} alert events"
            )
            return
        while not self.stop():
            ids = self.store.prune_entries(limits.entries, BATCH)
            if not ids:
                break
            report.entries += len(ids)
            log.info("retention.entries_deleted", count=len(ids), first=min(ids), last=max(ids))
            self.progress(f"entries: {report.entries} deleted")
            time.sleep(self.pause)
        report.reports = self._batches(
            lambda: self.store.prune_processed_reports(limits.reports, BATCH),
            "retention.reports_forgotten",
            "report keys forgotten",
        )
        report.alerts = self._batches(
            lambda: self.store.prune_alert_events(limits.alerts, BATCH),
            "retention.alerts_deleted",
            "alert events deleted",
        )

    def _batches(self, step: Callable[[], int], event: str, what: str) -> int:
        """Run `step` (one short transaction, how many rows it removed) until nothing is
        left or the run is stopped, pausing between batches; the total."""
        total = 0
        while not self.stop():
            count = step()
            if not count:
                break
            total += count
            log.info(event, count=count)
            self.progress(f"{what}: {total}")
            time.sleep(self.pause)
        return total

    # ------------------------------------------------------- _archive/, _rejected/

    def _moved(self, limits: Cutoffs, report: PruneReport) -> None:
        root = self.settings.backup_storage_root
        before = limits.moved.timestamp()
        for folder in self.store.deposit_folders():
            for sub in (ARCHIVE_DIR, REJECTED_DIR):
                if self.stop():
                    return
                relative = PurePosixPath(folder) / sub
                try:
                    with open_dir_beneath(root, relative) as dir_fd:
                        self._prune_dir(dir_fd, root / relative, sub, before, report)
                except FileNotFoundError:
                    continue
                except (UnsafePath, OSError) as exc:
                    shown = str(root / relative)
                    log.warning("retention.folder_skipped", folder=shown, reason=str(exc))

    def _prune_dir(
        self, dir_fd: int, path: Path, kind: str, before: float, report: PruneReport
    ) -> None:
        """Regular files moved here before `before` (their ctime: the kernel sets it on the
        move; an agent can set mtime to anything). Symlinks and folders are left alone."""
        with os.scandir(dir_fd) as entries:
            names = [(e.name, e.stat(follow_symlinks=False)) for e in entries]
        for name, st in names:
            if not stat.S_ISREG(st.st_mode) or st.st_ctime >= before:
                continue
            shown = str(path / name)
            if report.dry_run:
                report.moved.append(shown)
                continue
            try:
                again = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
                    continue  # replaced since listed: judged again next time
                os.unlink(name, dir_fd=dir_fd)
            except FileNotFoundError:
                continue  # another daemon's pruner took it first
            except OSError as exc:
                log.warning("retention.remove_failed", kind=kind, path=shown, error=str(exc))
                continue
            report.moved.append(shown)
            log.info("retention.removed", kind=kind, path=shown, size=st.st_size)

    # ------------------------------------------------------------------ stale uploads

    def _stale(self, limits: Cutoffs, report: PruneReport) -> None:
        """Files in D no report claimed for `stale_upload_hours`: listed and logged, kept."""
        root = self.settings.backup_storage_root
        before = limits.stale.timestamp()
        for folder in self.store.deposit_folders():
            found = _stale_files(root / folder, before)
            if found:
                report.stale_uploads.extend(found)
                log.warning(
                    "retention.stale_uploads",
                    folder=str(root / folder),
                    count=len(found),
                    files=found[:STALE_SHOWN],
                )


def _unlink_if_same(root: Path, relative: PurePosixPath, recorded: Placed) -> str:
    """Remove the file at `relative` only if it is the one recorded; "removed" or "changed"."""
    with open_beneath(root, relative) as (dir_fd, fd, name):
        st = os.fstat(fd)
        if not same_file(recorded, Placed(st.st_dev, st.st_ino, st.st_size)):
            return "changed"
        again = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino):
            return "changed"  # the name was replaced between the open and now
        os.unlink(name, dir_fd=dir_fd)
    return "removed"


def _stale_files(folder: Path, before: float) -> list[str]:
    """Regular files under a site folder older (ctime) than `before`; `_archive/` and
    `_rejected/` left out, symlinks not followed, at most STALE_WALK_LIMIT entries read."""
    try:
        if not stat.S_ISDIR(folder.lstat().st_mode):
            return []
    except OSError:
        return []
    found: list[str] = []
    stack, seen = [folder], 0
    while stack and seen < STALE_WALK_LIMIT:
        here = stack.pop()
        try:
            with os.scandir(here) as entries:
                for entry in entries:
                    seen += 1
                    if entry.is_dir(follow_symlinks=False):
                        if not (here == folder and entry.name in NEVER_SCANNED):
                            stack.append(Path(entry.path))
                    elif (
                        entry.is_file(follow_symlinks=False)
                        and entry.stat(follow_symlinks=False).st_ctime < before
                    ):
                        found.append(entry.path)
        except OSError:
            continue
    return sorted(found)
