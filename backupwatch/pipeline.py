"""SPEC §3 and §5: turning one report file into entries, promoted backups and an archived report.

The decision table is `agent_verdict` + `file_verdict`, pure functions of the database block and of
the server's facts about the staged file. `process_path` is the single adapter around them. Its
order makes a crash at any line harmless: the staged file is hard-linked (never moved) to final
storage before the commit, the entries and the report's idempotency row commit together, and only
then are the staged files unlinked and the report archived. A retried report finds its key
committed and just finishes the clean-up.
"""

from __future__ import annotations

import enum
import errno
import hashlib
import json
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any

import structlog

from backupwatch.config import Settings
from backupwatch.enums import BackupEntryStatus
from backupwatch.fsutil import (
    Identity,
    UnsafePath,
    copy_verified,
    ensure_real_dir,
    link_unique,
    move_unique,
    open_beneath,
    open_dir,
    read_capped,
    sha256_fd,
)
from backupwatch.jobs import final_relpath
from backupwatch.report import (
    DatabaseReport,
    ReportRejected,
    StatusReport,
    check_freshness,
    parse_report,
)
from backupwatch.sites import ARCHIVE_DIR, REJECTED_DIR, JobRef, PathKind, Registry, Site
from backupwatch.store import ExpectedBackupJob, NewEntry, ProcessedReportRecord, Store

log = structlog.get_logger(__name__)


# ----------------------------------------------------------------- the decision table


@dataclass(frozen=True)
class Verdict:
    status: BackupEntryStatus
    message: str


@dataclass(frozen=True)
class StagedFacts:
    """What the server itself found: `problem` set when there is no usable regular file."""

    name: str
    problem: str | None = None
    size: int | None = None
    sha256: str | None = None  # None when the size already differed: no need to hash


def agent_verdict(db: DatabaseReport) -> Verdict | None:
    """Steps 1-2 of SPEC §5: what the agent itself says failed."""
    failed = [
        step
        for step, ok in (
            ("backup", db.backup_process.status),
            ("compress", db.compress_process.status),
        )
        if not ok
    ]
    if failed:
        return Verdict(
            BackupEntryStatus.FAILED, f"the agent reports its {' and '.join(failed)} step failed"
        )
    if not db.transfer_process.status:
        detail = db.transfer_process.error_message or "no error message given"
        return Verdict(BackupEntryStatus.FAILED, f"the agent reports its transfer failed: {detail}")
    return None


def file_verdict(db: DatabaseReport, facts: StagedFacts) -> Verdict:
    """Steps 3-6 of SPEC §5: what the server finds on disk."""
    if facts.problem is not None:
        return Verdict(
            BackupEntryStatus.TRANSFER_INTEGRITY_FAILED,
            f"staged file {facts.name}: {facts.problem}",
        )
    expected_size = db.compress_process.size_bytes
    if facts.size != expected_size:
        return Verdict(
            BackupEntryStatus.TRANSFER_INTEGRITY_FAILED,
            f"staged file {facts.name} is {facts.size} bytes, the agent reported {expected_size}",
        )
    if facts.sha256 != db.compress_process.sha256_checksum:
        return Verdict(
            BackupEntryStatus.HASH_MISMATCH,
            f"staged file {facts.name} has SHA-256 {facts.sha256}, "
            f"the agent reported {db.compress_process.sha256_checksum}",
        )
    return Verdict(
        BackupEntryStatus.SUCCESS, f"staged file {facts.name} verified ({facts.size} bytes)"
    )


def decide(db: DatabaseReport, facts: StagedFacts | None) -> Verdict:
    """The whole table; `facts` may be None only when the agent's own steps failed."""
    verdict = agent_verdict(db)
    if verdict is not None:
        return verdict
    if facts is None:
        raise ValueError("the staged file must be inspected once the agent's steps succeeded")
    return file_verdict(db, facts)


# ---------------------------------------------------------------------- the adapter


class Outcome(enum.StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"
    RETRY = "retry"  # not yet valid JSON: its writer may still be at work
    GONE = "gone"
    IGNORED = "ignored"


@dataclass
class Result:
    outcome: Outcome
    path: Path
    reason: str | None = None
    entries: list[NewEntry] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    not_relevant: list[str] = field(default_factory=list)


@dataclass
class Context:
    """What processing needs; the daemon swaps `registry` in one assignment on reload."""

    store: Store
    settings: Settings
    registry: Registry
    beat: Callable[[], None] = lambda: None  # "still working": keeps the watchdog fed

    @property
    def max_age(self) -> timedelta:
        return timedelta(days=self.settings.max_status_file_age_days)


def build_registry(settings: Settings, jobs: list[ExpectedBackupJob]) -> Registry:
    """The in-memory snapshot of active jobs that the workers and the watcher consult."""
    entries = []
    for job in jobs:
        ref = JobRef(
            id=job.id,
            label=job.label,
            agent_id=job.agent_id,
            database_name=job.database_name,
            schedule=job.schedule,
            fields=job.fields,
            final_storage_path_template=job.final_storage_path_template,
            previous=job.previous_eras,
        )
        entries.append((PurePosixPath(job.deposit_path), ref))
    return Registry.build(settings.backup_storage_root, entries)


class Rejection(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def process_path(ctx: Context, path: Path, now: datetime, may_retry: bool = False) -> Result:
    """Process whatever `path` is (SPEC §3); never raises for bad agent input."""
    classified = ctx.registry.classify(path)
    if classified.kind is PathKind.IGNORED:
        return Result(Outcome.IGNORED, path)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return Result(Outcome.GONE, path)
    if stat.S_ISDIR(mode) or os.path.islink(path.parent):
        # A folder is never a report (SPEC §3), and a symlinked log/ is never followed (§9).
        return Result(Outcome.IGNORED, path)
    if classified.kind is PathKind.STRAY or classified.site is None:
        return reject(ctx, path, path.parent, "it lies in a folder that no active job uses")
    return _process_report(ctx, classified.site, path, now, may_retry)


def _process_report(ctx: Context, site: Site, path: Path, now: datetime, may_retry: bool) -> Result:
    try:
        data = _read_report(site, path, ctx.settings.report_max_bytes)
    except FileNotFoundError:
        return Result(Outcome.GONE, path)
    except Rejection as exc:
        return reject(ctx, path, site.folder, exc.reason)
    sha = hashlib.sha256(data).hexdigest()
    if ctx.store.report_processed(sha):
        finish_promotions(ctx.store, sha, site)
        archive(path, site)
        log.info("report.duplicate", site=site.name, report=_name(ctx, path), sha256=sha)
        return Result(Outcome.DUPLICATE, path)
    try:
        report = _validate(data, site, now, ctx.max_age)
    except Rejection as exc:
        if may_retry and not _is_json(data):
            return Result(Outcome.RETRY, path, exc.reason)
        return reject(ctx, path, site.folder, exc.reason)
    return _record(ctx, site, path, report, sha, now)


def _read_report(site: Site, path: Path, limit: int) -> bytes:
    relative = PurePosixPath(path.relative_to(site.folder))
    try:
        with open_beneath(site.folder, relative) as (_dir_fd, fd, _name):
            size = os.fstat(fd).st_size
            if size > limit:
                raise Rejection(f"it is {size} bytes, over report_max_bytes ({limit})")
            data = read_capped(fd, limit)
    except UnsafePath as exc:
        raise Rejection(f"it is not a regular file inside the deposit folder ({exc})") from exc
    if len(data) > limit:
        raise Rejection(f"it grew over report_max_bytes ({limit}) while being read")
    return data


def _is_json(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def _validate(data: bytes, site: Site, now: datetime, max_age: timedelta) -> StatusReport:
    try:
        report = parse_report(data)
        check_freshness(report, now, max_age)
    except ReportRejected as exc:
        raise Rejection(exc.reason) from exc
    if report.agent_id is not None and report.agent_id not in site.agent_ids:
        expected = ", ".join(sorted(site.agent_ids))
        raise Rejection(f"agent_id {report.agent_id!r} is not this site's ({expected})")
    return report


def _record(
    ctx: Context, site: Site, path: Path, report: StatusReport, sha: str, now: datetime
) -> Result:
    result = Result(Outcome.ACCEPTED, path)
    name = _name(ctx, path)
    relevant: list[tuple[JobRef, datetime, DatabaseReport]] = []
    for database_name, db in report.databases.items():
        job = site.job_for(database_name, report.agent_id)
        if job is None:
            result.unexpected.append(database_name)
            log.warning(
                "report.database_unexpected", site=site.name, report=name, database=database_name
            )
            continue
        cycle = job.cycle_for(report.operation_timestamp)
        if cycle is None:
            result.not_relevant.append(database_name)
            log.info(
                "report.not_relevant",
                job=job.label,
                site=site.name,
                report=name,
                operation_timestamp=report.operation_timestamp.isoformat(),
            )
            continue
        relevant.append((job, cycle, db))
    previous = ctx.store.last_success_sha256s([job.id for job, _, _ in relevant])
    for job, cycle, db in relevant:
        entry = _judge(ctx, site, job, cycle, report, db, name, sha, previous.get(job.id))
        result.entries.append(entry)
    record = ProcessedReportRecord(sha, str(site.folder), name, Outcome.ACCEPTED.value)
    if ctx.store.record_report(record, result.entries, now):
        finish_promotions(ctx.store, sha, site, result.entries)
    else:
        result.outcome = Outcome.DUPLICATE  # another worker or daemon committed these bytes first
        result.entries = []  # none of these was recorded: do not log them as recorded
        finish_promotions(ctx.store, sha, site)
    archive(path, site)
    for entry in result.entries:
        _log_entry(entry, job_label(site, entry.job_id), site, name)
    return result


def _judge(
    ctx: Context,
    site: Site,
    job: JobRef,
    cycle: datetime,
    report: StatusReport,
    db: DatabaseReport,
    report_name: str,
    sha: str,
    previous_sha256: str | None,
) -> NewEntry:
    ctx.beat()
    verdict = agent_verdict(db)
    server: dict[str, Any] = {}
    final_path: Path | None = None
    facts: StagedFacts | None = None
    if verdict is None:
        verdict, facts, final_path, server = _judge_staged(ctx, site, job, cycle, db)
    unchanged = False
    if verdict.status is BackupEntryStatus.SUCCESS and facts is not None:
        unchanged = previous_sha256 == facts.sha256
        if unchanged:
            verdict = Verdict(
                verdict.status,
                verdict.message + "; WARNING: identical to the "
                "previous successful backup (SHA-256 unchanged)",
            )
    staged = site.folder / db.staged_file_name if db.staged_file_name else None
    return NewEntry(
        job_id=job.id,
        cycle=cycle,
        status=verdict.status,
        message=verdict.message,
        report_name=report_name,
        report_sha256=sha,
        operation_start_time=report.operation_start_time,
        operation_timestamp=report.operation_timestamp,
        backup_ok=db.backup_process.status,
        compress_ok=db.compress_process.status,
        transfer_ok=db.transfer_process.status,
        agent_sha256=db.compress_process.sha256_checksum,
        agent_size=db.compress_process.size_bytes,
        server_sha256=facts.sha256 if facts else None,
        server_size=facts.size if facts else None,
        staged_path=str(staged) if staged else None,
        final_path=str(final_path) if final_path else None,
        unchanged_since_last_success=unchanged,
        details={"agent": db.model_dump(mode="json"), "server": server},
    )


def _judge_staged(
    ctx: Context, site: Site, job: JobRef, cycle: datetime, db: DatabaseReport
) -> tuple[Verdict, StagedFacts, Path | None, dict[str, Any]]:
    """Inspect, hash and (on success) promote the staged file, all through one open descriptor."""
    staged_name = db.staged_file_name or ""
    try:
        with open_beneath(site.folder, PurePosixPath(staged_name)) as (dir_fd, fd, base):
            facts = _inspect(staged_name, fd, db.compress_process.size_bytes, ctx.beat)
            verdict = file_verdict(db, facts)
            if verdict.status is not BackupEntryStatus.SUCCESS:
                return verdict, facts, None, {}
            return _promote(ctx, job, cycle, dir_fd, fd, base, facts, verdict)
    except FileNotFoundError:
        facts = StagedFacts(staged_name, problem="absent")
    except (UnsafePath, IsADirectoryError) as exc:
        facts = StagedFacts(staged_name, problem=f"refused: {exc}")
    except PermissionError as exc:
        facts = StagedFacts(staged_name, problem=f"not readable by the server: {exc.strerror}")
    return file_verdict(db, facts), facts, None, {}


def _inspect(
    name: str, fd: int, expected_size: int | None, progress: Callable[[], None]
) -> StagedFacts:
    size = os.fstat(fd).st_size
    if size != expected_size:
        return StagedFacts(name, size=size)
    digest, read = sha256_fd(fd, progress)
    return StagedFacts(name, size=read, sha256=digest)


def _promote(
    ctx: Context,
    job: JobRef,
    cycle: datetime,
    dir_fd: int,
    fd: int,
    base: str,
    facts: StagedFacts,
    verdict: Verdict,
) -> tuple[Verdict, StagedFacts, Path | None, dict[str, Any]]:
    """SPEC §5 step 6: link (or verified copy) into final storage, never overwriting."""
    root = ctx.settings.validated_backups_base_path
    target = root / final_relpath(job.final_storage_path_template, job.fields, cycle, base)
    ensure_real_dir(target.parent)
    staged = Identity.of(os.fstat(fd))
    assert facts.sha256 is not None
    assert facts.size is not None
    try:
        final = link_unique(dir_fd, base, target.parent, target.name, staged)
        method = "link"
        if Identity.of(final.lstat()) != staged:
            final.unlink()
            failed = Verdict(
                BackupEntryStatus.TRANSFER_INTEGRITY_FAILED,
                f"staged file {facts.name} was replaced while it was being validated",
            )
            return failed, facts, None, {}
    except OSError as exc:
        # EXDEV: final storage is on another filesystem. EPERM: fs.protected_hardlinks refuses
        # to link an agent's file the daemon may read but not write. Both: a verified copy.
        if exc.errno not in (errno.EXDEV, errno.EPERM):
            raise
        try:
            final = copy_verified(
                fd, target.parent, target.name, facts.sha256, facts.size, ctx.beat
            )
        except ValueError:  # copy_verified's digest check: the agent rewrote it meanwhile
            failed = Verdict(
                BackupEntryStatus.TRANSFER_INTEGRITY_FAILED,
                f"staged file {facts.name} changed while it was being copied to final storage",
            )
            return failed, facts, None, {}
        method = "copy"
    message = f"{verdict.message}; stored at {final}"
    if final.name != target.name:
        message += f" ({target.name} already existed, so a new name was used)"
    server = {"promotion": method, "staged_dev": staged.dev, "staged_ino": staged.ino}
    return Verdict(verdict.status, message), facts, final, server


def finish_promotions(
    store: Store, sha: str, site: Site, committed: Sequence[NewEntry] | None = None
) -> None:
    """Unlink the staged files of a committed report's successes, if still the validated ones.

    `committed` are the entries this worker has just committed; without them (a report seen
    again after a crash) they are read back from the store.
    The staged path is walked beneath D without following a symlink (SPEC §9): an agent that
    swapped a folder for a symlink after the commit cannot make us unlink anything elsewhere.
    """
    entries = committed if committed is not None else store.successes_of_report(sha)
    for entry in entries:
        if entry.status is not BackupEntryStatus.SUCCESS:
            continue
        if entry.staged_path is None or entry.final_path is None:
            continue
        server = (entry.details or {}).get("server", {})
        validated = Identity(server.get("staged_dev", -1), server.get("staged_ino", -1))
        try:
            relative = PurePosixPath(Path(entry.staged_path).relative_to(site.folder))
            with open_beneath(site.folder, relative) as (dir_fd, fd, name):
                if Identity.of(os.fstat(fd)) == validated:
                    os.unlink(name, dir_fd=dir_fd)
        except FileNotFoundError:
            continue
        except (ValueError, UnsafePath, OSError) as exc:
            log.warning("staged.not_removed", staged=entry.staged_path, reason=str(exc))


def archive(path: Path, site: Site) -> Path | None:
    """Move a processed report to D/_archive/ under a unique name."""
    try:
        return move_unique(path, site.folder / ARCHIVE_DIR)
    except FileNotFoundError:
        return None  # a concurrent worker archived it already


def reject(ctx: Context, path: Path, folder: Path, reason: str) -> Result:
    """Move a report to FOLDER/_rejected/ with NAME.reason.txt beside it (SPEC §3)."""
    name = _name(ctx, path)
    log.warning("report.rejected", report=name, reason=reason)
    try:
        target = move_unique(path, folder / REJECTED_DIR)
    except FileNotFoundError:
        return Result(Outcome.GONE, path)
    _write_reason(target, name, reason)
    return Result(Outcome.REJECTED, path, reason)


def _write_reason(target: Path, name: str, reason: str) -> None:
    text = f"{name} was rejected: {reason}\n"
    with open_dir(target.parent) as dir_fd:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(f"{target.name}.reason.txt", flags, 0o644, dir_fd=dir_fd)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)


def _name(ctx: Context, path: Path) -> str:
    """The report's path relative to the deposit root: what operators see and search for."""
    try:
        return str(path.relative_to(ctx.registry.root))
    except ValueError:
        return str(path)


def job_label(site: Site, job_id: int) -> str:
    return next((job.label for job in site.jobs if job.id == job_id), str(job_id))


def _log_entry(entry: NewEntry, label: str, site: Site, report_name: str) -> None:
    level = log.info if entry.status is BackupEntryStatus.SUCCESS else log.warning
    if entry.unchanged_since_last_success:
        level = log.warning
    level(
        "entry.recorded",
        job=label,
        site=site.name,
        status=entry.status.value,
        report=report_name,
        cycle=entry.cycle.isoformat(),
        message=entry.message,
    )
