"""SPEC §3 and §5: turning one report file into entries, promoted backups and an archived report.

`process_path` is the one adapter around the pure parts: `report.accept_report` (is the report
acceptable?), `readiness` (may it be judged yet?) and `verdict.decide` (the §5 table). Its order
makes a crash at any line harmless: read the bytes → their SHA-256 → already processed? (finish
the clean-up, archive) → accept or reject → per database, the staged file opened beneath D,
hashed once and, on SUCCESS, linked (or copied, see `promotion`) into final storage → one
transaction: the entries and the report's idempotency row → remove the promoted staged files →
archive the report. A retried report finds its key committed and only finishes the clean-up.

Nothing an agent puts in its folder may raise out of here except through the daemon's retry
of unexpected errors: bad input is rejected with a reason, a report that cannot be moved is
left in place (`Outcome.PARKED`) and said so.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import os
import stat
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path, PurePosixPath
from sys import intern
from typing import Any, Protocol

import structlog
from sqlalchemy.exc import InterfaceError, OperationalError

from backupwatch.archivetest import ArchiveTest, Background
from backupwatch.config import Settings
from backupwatch.enums import BackupEntryStatus
from backupwatch.fsutil import (
    Beneath,
    Identity,
    StagedDir,
    UnsafePath,
    move_unique,
    open_beneath,
    read_capped,
    sha256_fd,
)
from backupwatch.jobrecord import JobRecord
from backupwatch.jobs import JobSpec, final_relpath
from backupwatch.missing import eras_from_json
from backupwatch.names import display_name
from backupwatch.promotion import (
    TEMP_DIR,
    AlreadyCommitted,
    Facts,
    Promoted,
    PromotionBusy,
    Request,
    StagedChanged,
    ensure_sole_link,
    promote,
    release_temp,
)
from backupwatch.readiness import Content, StagedState, Wait, Writer, report_wait, staged_wait
from backupwatch.rejected import reject_into
from backupwatch.report import (
    DatabaseReport,
    ReportRejected,
    StatusReport,
    accept_report,
    size_problem,
)
from backupwatch.schedule import Schedule
from backupwatch.sites import ARCHIVE_DIR, JobRef, PathKind, Registry, Site, normalize
from backupwatch.store import (
    JobKey,
    NewEntry,
    ProcessedReportRecord,
    Store,
    Successes,
    Unchanged,
    schedule_of,
)
from backupwatch.timeutil import utc_now
from backupwatch.verdict import (
    SIZE_HISTORY,
    UNCHANGED_WARNING,
    StagedFacts,
    Verdict,
    agent_verdict,
    decide,
    file_verdict,
    mark_unchanged,
    size_anomaly,
)

__all__ = [
    "Context",
    "Outcome",
    "Result",
    "StagedFacts",
    "Verdict",
    "agent_verdict",
    "decide",
    "file_verdict",
    "process_group",
    "process_path",
]

log = structlog.get_logger(__name__)

BUSY_RETRY = 0.5  # seconds: another worker is promoting the same report bytes


class Outcome(enum.StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    DUPLICATE = "duplicate"
    WAIT = "wait"  # not yet judged: `Result.wait` says until when (SPEC §3, §5 step 3)
    GONE = "gone"
    IGNORED = "ignored"
    PARKED = "parked"  # could not be archived or rejected: left in place, said why


@dataclass
class Result:
    outcome: Outcome
    path: Path
    reason: str | None = None
    wait: Wait | None = None
    entries: list[NewEntry] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    not_relevant: list[str] = field(default_factory=list)
    left_in_place: str | None = None  # recorded, but the report could not be archived: why


class Observer(Protocol):
    """What the daemon has observed that the readiness rules need (see `arrivals`)."""

    def writer(self, path: Path) -> Writer: ...

    def unchanged_for(self, path: Path, st: os.stat_result) -> float: ...

    def quiet_for(self, folder: Path) -> float: ...


class Settled:
    """No observation at all: every file is whole and every folder quiet (tools, tests)."""

    def writer(self, path: Path) -> Writer:
        return Writer(open=False, closed_for=float("inf"))

    def unchanged_for(self, path: Path, st: os.stat_result) -> float:
        return float("inf")

    def quiet_for(self, folder: Path) -> float:
        return float("inf")


@dataclass
class Context:
    """What processing needs; the daemon swaps `registry` in one assignment on reload."""

    store: Store
    settings: Settings
    registry: Registry
    beat: Callable[[], None] = lambda: None  # "still working": keeps the watchdog fed
    observer: Observer = field(default_factory=Settled)

    @property
    def max_age(self) -> timedelta:
        return timedelta(days=self.settings.max_status_file_age_days)

    @property
    def settle(self) -> float:
        return self.settings.report_settle_seconds

    @property
    def temp_root(self) -> Path:
        return self.settings.validated_backups_base_path / TEMP_DIR


def registry_of(settings: Settings, store: Store) -> Registry:
    """The in-memory snapshot of this instance's active jobs that the workers and the watcher
    consult, read as plain rows streamed from the database (no ORM object per job), with the
    strings and schedules that many jobs share held once. A job's own `archive_test` wins over
    the config's (SPEC §13)."""
    entries = _job_refs(settings, store.iter_active_job_rows())
    return Registry.build(settings.backup_storage_root, entries)


REREAD_LIMIT = 5_000  # jobs the sync wrote, read again by key; more: the whole table


def registry_after_sync(
    settings: Settings, store: Store, specs: Sequence[JobSpec | JobRecord], unchanged: Unchanged
) -> Registry:
    """`registry_of` after a full sync, without reading the rows the sync has just compared.

    A job the sync left as it was (`SyncResult.unchanged`) is in the database what its record
    says (the sync compared every configured column), so its `JobRef` is made from the record,
    with the id and the previous schedules the sync read. Only the jobs it added or changed are
    read again, by key; when they are many (a first start), the whole table is read instead."""
    if len(specs) - len(unchanged) > REREAD_LIMIT:
        return registry_of(settings, store)
    if not all(isinstance(spec, JobRecord) for spec in unchanged.specs):
        return registry_of(settings, store)
    schedules: dict[tuple[Any, ...], Schedule] = {}
    window = settings.scanner_report_collection_window_minutes
    entries: list[tuple[str, JobRef]] = []
    for record, job_id, previous in unchanged:
        assert isinstance(record, JobRecord)
        entries.append(
            (record.deposit_path, _ref_of(record, job_id, previous, window, settings, schedules))
        )
    written = _others(specs, unchanged.specs)
    if written:
        entries += _job_refs(settings, store.iter_active_job_rows(written))
    entries.sort(key=lambda entry: entry[1].id)  # a site's jobs in id order, as the table's
    return Registry.build(settings.backup_storage_root, entries)


def _others(specs: Sequence[JobSpec | JobRecord], kept: Sequence[object]) -> list[JobKey]:
    """The keys of the active specs not in `kept`, which holds some of `specs` in their order
    (the sync goes through them in order)."""
    later = iter(kept)
    expected = next(later, None)
    out = []
    for spec in specs:
        if spec is expected:
            expected = next(later, None)
        elif spec.active:
            out.append(spec.key)
    return out


def _ref_of(
    record: JobRecord,
    job_id: int,
    previous: Any,
    window: int,
    settings: Settings,
    schedules: dict[tuple[Any, ...], Schedule],
) -> JobRef:
    """The `JobRef` `_job_refs` would make of this record's row."""
    when = (
        record.frequency,
        record.expected_hour_utc,
        record.expected_minute_utc,
        record.days_of_week,
        record.day_of_month,
        record.expected_date,
        record.collection_window_minutes or window,
    )
    schedule = schedules.get(when)
    if schedule is None:
        schedule = schedules[when] = Schedule(
            frequency=when[0],
            hour=when[1],
            minute=when[2],
            days_of_week=None if not when[3] else frozenset(when[3]),
            day_of_month=when[4],
            expected_date=when[5],
            window=timedelta(minutes=when[6]),
        )
    return JobRef(
        id=job_id,
        company_name=record.company_name,
        city=record.city,
        neighborhood=record.neighborhood,
        database_name=record.database_name,
        agent_id=record.agent_id,
        schedule=schedule,
        final_storage_path_template=record.final_storage_path_template,
        previous=eras_from_json(previous) if previous else (),
        archive_test=settings.archive_test if record.archive_test is None else record.archive_test,
    )


def registry_updated(
    old: Registry, settings: Settings, store: Store, keys: Collection[JobKey]
) -> Registry:
    """`registry_of` after a partial sync: the jobs of `keys` read again, every other site
    kept as it is (a reload that changed one job rebuilt 30,000 sites before)."""
    keys = set(keys)
    touched: dict[Path, list[JobRef]] = {}
    for folder, site in old.sites.items():
        if any(job.names in keys for job in site.jobs):
            touched[folder] = [job for job in site.jobs if job.names not in keys]
    sites = dict(old.sites)
    for relpath, ref in _job_refs(settings, store.iter_active_job_rows(sorted(keys))):
        folder = normalize(settings.backup_storage_root / relpath)
        if folder not in touched:
            touched[folder] = list(sites[folder].jobs) if folder in sites else []
        touched[folder].append(ref)
    for folder, jobs in touched.items():
        if jobs:
            sites[folder] = Site(folder, tuple(sorted(jobs, key=lambda job: job.id)))
        else:
            del sites[folder]
    return Registry(root=old.root, sites=sites)


def _job_refs(settings: Settings, rows: Iterable[Any]) -> Iterator[tuple[str, JobRef]]:
    """(deposit path, JobRef) of each row of `Store.iter_active_job_rows`."""
    for row in rows:
        values = tuple(row)
        ref = JobRef(
            id=values[0],
            company_name=intern(values[1]),
            city=intern(values[2]),
            neighborhood=intern(values[3]),
            database_name=intern(values[4]),
            agent_id=intern(values[5]),
            schedule=schedule_of(row._mapping),  # shared by the jobs of one schedule (cached)
            final_storage_path_template=intern(values[7]),
            previous=eras_from_json(values[8]) if values[8] else (),
            archive_test=settings.archive_test if values[9] is None else values[9],
        )
        yield intern(values[6]), ref


# ------------------------------------------------------------------------- reading


class Rejection(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Unreadable(Exception):
    """The server may not open the report (mode or owner): wait, then say what to fix."""

    def __init__(self, st: os.stat_result) -> None:
        super().__init__("permission denied")
        self.st = st


@dataclass(frozen=True)
class ReportBytes:
    data: bytes
    st: os.stat_result


def process_path(ctx: Context, path: Path, now: datetime) -> Result:
    """Process whatever `path` is (SPEC §3); never raises for bad agent input."""
    (outcome,) = process_group(ctx, [path], now)
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def process_group(ctx: Context, paths: Sequence[Path], now: datetime) -> list[Result | Exception]:
    """`process_path` of several paths, with one read transaction for their history and one
    commit for the reports judged (a group commit, issue 10); each path's Result, or the
    exception that stopped it (a database error, a bug), in the order of `paths`.

    Each report keeps its own idempotency row and its own outcome. The reports of one commit
    touch distinct jobs and bytes: one that shares a job or its SHA-256 with an earlier report
    of the group waits for that one's commit, in a later round, so that its judgement reads
    the other's entries as the one-at-a-time order would have. A failed group commit is tried
    again one report at a time (`_commit`): one report's failure loses or doubles no other.
    """
    outcomes: dict[int, Result | Exception] = {}
    ready: list[tuple[int, Candidate]] = []
    for index, path in enumerate(paths):
        front: Result | Candidate | Exception
        try:
            front = _front(ctx, path, now)
        except Exception as exc:
            front = exc
        if isinstance(front, Candidate):
            ready.append((index, front))
        else:
            outcomes[index] = front
    while ready:
        batch, ready = _disjoint(ready)
        outcomes.update(_judge_and_commit(ctx, batch, now))
    return [outcomes[index] for index in range(len(paths))]


def _front(ctx: Context, path: Path, now: datetime) -> Result | Candidate:
    """What can be decided without the database's history: the report's bytes read and
    accepted (a Candidate), or an outcome already (ignored, gone, waiting, rejected)."""
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
        return reject(ctx, path, path.parent, "it lies in a folder that no active job uses", now)
    return _accepted(ctx, classified.site, path, now)


@dataclass(frozen=True)
class Candidate:
    """A report read and accepted, not yet judged against its history."""

    site: Site
    path: Path
    report: StatusReport
    sha: str
    jobs: list[int]


def _accepted(ctx: Context, site: Site, path: Path, now: datetime) -> Result | Candidate:
    try:
        read = _read_report(site, path, ctx.settings.report_max_bytes)
    except FileNotFoundError:
        return Result(Outcome.GONE, path)
    except Unreadable as exc:
        return _unreadable(ctx, site, path, exc.st)
    except Rejection as exc:
        return reject(ctx, path, site.folder, exc.reason, now)
    sha = hashlib.sha256(read.data).hexdigest()
    try:
        report = accept_report(read.data, now, ctx.max_age, site.agent_ids)
    except ReportRejected as exc:
        if ctx.store.report_processed(sha):  # committed before (now too old, say): a duplicate
            return _seen_before(ctx, site, path, sha)
        if exc.incomplete:
            writer = ctx.observer.writer(path)
            unchanged = ctx.observer.unchanged_for(path, read.st)
            wait = report_wait(Content.INCOMPLETE, writer, unchanged, ctx.settle)
            if wait is not None:
                return Result(Outcome.WAIT, path, exc.reason, wait=wait)
        return reject(ctx, path, site.folder, exc.reason, now)
    return Candidate(site, path, report, sha, _job_ids(site, report))


def _disjoint(
    ready: list[tuple[int, Candidate]],
) -> tuple[list[tuple[int, Candidate]], list[tuple[int, Candidate]]]:
    """The candidates that share no job and no SHA-256 with an earlier one, and the rest."""
    batch: list[tuple[int, Candidate]] = []
    later: list[tuple[int, Candidate]] = []
    jobs: set[int] = set()
    shas: set[str] = set()
    for index, candidate in ready:
        if candidate.sha in shas or not jobs.isdisjoint(candidate.jobs):
            later.append((index, candidate))
            continue
        batch.append((index, candidate))
        shas.add(candidate.sha)
        jobs.update(candidate.jobs)
    return batch, later


def _judge_and_commit(
    ctx: Context, batch: list[tuple[int, Candidate]], now: datetime
) -> dict[int, Result | Exception]:
    """One read transaction for the batch's history (issue 10), each report judged and
    promoted, then one commit for all of them."""
    outcomes: dict[int, Result | Exception] = {}
    try:
        histories = ctx.store.report_histories([(c.sha, c.jobs) for _i, c in batch], SIZE_HISTORY)
    except Exception as exc:
        return {index: exc for index, _c in batch}
    pending: list[tuple[int, Pending]] = []
    for (index, candidate), history in zip(batch, histories, strict=True):
        try:
            if history.processed:
                outcomes[index] = _seen_before(ctx, candidate.site, candidate.path, candidate.sha)
                continue
            judged = _prepare(ctx, candidate, now, history.previous)
        except Exception as exc:
            outcomes[index] = exc
            continue
        if isinstance(judged, Pending):
            pending.append((index, judged))
        else:
            outcomes[index] = judged
    outcomes.update(_commit(ctx, pending, now))
    return outcomes


def _job_ids(site: Site, report: StatusReport) -> list[int]:
    """The jobs the report's databases belong to (`_assign` says which of them count)."""
    jobs = (site.job_for(name, report.agent_id) for name in report.databases)
    return [job.id for job in jobs if job is not None]


def _read_report(site: Site, path: Path, limit: int) -> ReportBytes:
    relative = PurePosixPath(path.relative_to(site.folder))
    try:
        with open_beneath(site.folder, relative) as (_dir_fd, fd, _name):
            st = os.fstat(fd)
            problem = size_problem(st.st_size, limit)
            if problem:
                raise Rejection(problem)
            data = read_capped(fd, limit)
    except UnsafePath as exc:
        raise Rejection(f"it is not a regular file inside the deposit folder ({exc})") from exc
    except PermissionError as exc:
        raise Unreadable(os.lstat(path)) from exc
    if len(data) > limit:
        raise Rejection(f"it grew over report_max_bytes ({limit}) while being read")
    return ReportBytes(data, st)


def _unreadable(ctx: Context, site: Site, path: Path, st: os.stat_result) -> Result:
    writer = ctx.observer.writer(path)
    unchanged = ctx.observer.unchanged_for(path, st)
    wait = report_wait(Content.UNREADABLE, writer, unchanged, ctx.settle)
    if wait is not None:
        return Result(Outcome.WAIT, path, "the server may not read it yet", wait=wait)
    return reject(ctx, path, site.folder, unreadable_reason("it", st))


def unreadable_reason(what: str, st: os.stat_result) -> str:
    """What an operator must fix when the daemon's user may not read an agent's file."""
    return (
        f"{what} is not readable by the daemon's user (permission denied; owner uid "
        f"{st.st_uid}, group gid {st.st_gid}, mode {st.st_mode & 0o7777:04o}): agents must "
        "upload files the backupwatch group can read (a set-gid site folder with a default "
        "ACL, or umask 027); "
        'see "Agents\' upload accounts" in the packaging guide'
    )


def _seen_before(ctx: Context, site: Site, path: Path, sha: str) -> Result:
    """These bytes were committed already (a crash before the archive, or sent twice)."""
    finish_promotions(ctx, sha, site, ctx.store.successes_of_report(sha))
    result = Result(Outcome.DUPLICATE, path)
    result.left_in_place = archive(path, site)
    log.info("report.duplicate", site=site.name, report=_name(ctx, path), sha256=sha)
    return result


# ------------------------------------------------------------------------- judging


@dataclass(frozen=True)
class Assigned:
    """One database of the report, matched to the job and cycle it belongs to."""

    job: JobRef
    cycle: datetime
    db: DatabaseReport


@dataclass
class Judged:
    entry: NewEntry
    promoted: Promoted | None = None


def _assign(site: Site, report: StatusReport, name: str, result: Result) -> list[Assigned]:
    relevant: list[Assigned] = []
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
        relevant.append(Assigned(job, cycle, db))
    return relevant


@dataclass
class Pending:
    """A report judged, its successes promoted, its entries not yet committed."""

    candidate: Candidate
    name: str
    record: ProcessedReportRecord
    judged: list[Judged]
    result: Result
    staged_dirs: list[StagedDir | None] = field(default_factory=list)  # by `judged`: the clean-up

    @property
    def entries(self) -> list[NewEntry]:
        return [j.entry for j in self.judged]

    def close(self) -> None:
        """Close the staged files' folders kept for the clean-up (whatever became of it)."""
        for folder in self.staged_dirs:
            if folder is not None:
                folder.close()


def _prepare(
    ctx: Context, candidate: Candidate, now: datetime, previous: Successes
) -> Result | Pending:
    """Judge each database of the report and promote its successes (SPEC §5 steps 3-6)."""
    site, path, report = candidate.site, candidate.path, candidate.report
    result = Result(Outcome.ACCEPTED, path)
    name = _name(ctx, path)
    assigned = _assign(site, report, name, result)
    # Each staged file opened once, beneath D: the readiness check, the judgement and the
    # promotion use that descriptor, the clean-up its folder's (issue 10: three walks before).
    opened = [_open_staged(site, item.db) for item in assigned]
    try:
        return _judge_opened(ctx, candidate, name, result, assigned, opened, previous)
    finally:
        for staged in opened:
            if isinstance(staged, Beneath):
                staged.close()


def _judge_opened(
    ctx: Context,
    candidate: Candidate,
    name: str,
    result: Result,
    assigned: list[Assigned],
    opened: list[Opened],
    previous: Successes,
) -> Result | Pending:
    """`_prepare` with each staged file already opened (or the error its opening met)."""
    site, path, report, sha = candidate.site, candidate.path, candidate.report, candidate.sha
    wait = _staged_wait(ctx, site, assigned, opened)
    if wait is not None:
        return Result(Outcome.WAIT, path, wait.why, wait=wait)
    judged: list[Judged] = []
    record = ProcessedReportRecord(sha, str(site.folder), name, Outcome.ACCEPTED.value)
    try:
        for item, staged in zip(assigned, opened, strict=True):
            history = previous.get(item.job.id, [])
            judged.append(_judge(ctx, site, item, report, name, sha, history, staged))
    except PromotionBusy:
        _undo(judged)
        return Result(Outcome.WAIT, path, "being promoted by another worker", Wait(BUSY_RETRY, ""))
    except AlreadyCommitted:
        _undo(judged)
        return _seen_before(ctx, site, path, sha)
    except BaseException:
        _undo(judged)  # SPEC §5: no promoted file without its entry
        raise
    folders = [_keep_folder(j, staged) for j, staged in zip(judged, opened, strict=True)]
    return Pending(candidate, name, record, judged, result, folders)


def _keep_folder(judged: Judged, staged: Opened) -> StagedDir | None:
    """A promoted staged file's folder, kept open to remove that file after the commit."""
    if judged.promoted is None or not isinstance(staged, Beneath):
        return None
    return staged.detach_dir()


def _commit(
    ctx: Context, pending: list[tuple[int, Pending]], now: datetime
) -> dict[int, Result | Exception]:
    """The entries of `pending` committed, in one transaction when there are several; then
    each report finished (`_finish`). A group whose commit fails is tried one report at a
    time, unless the database itself is unreachable or locked (the same wait for each)."""
    outcomes: dict[int, Result | Exception] = {}
    committed: set[str] | None = None
    if len(pending) > 1:
        try:
            committed = ctx.store.record_reports([(p.record, p.entries) for _i, p in pending], now)
        except (OperationalError, InterfaceError) as exc:
            for index, item in pending:
                _undo(item.judged)
                item.close()
                outcomes[index] = exc
            return outcomes
        except Exception as exc:
            log.warning("report.group_commit_failed", reports=len(pending), error=repr(exc))
        except BaseException:
            for _index, item in pending:
                _undo(item.judged)  # SPEC §5: no promoted file without its entry
                item.close()
            raise
    for index, item in pending:
        try:
            if committed is None:
                done = _commit_one(ctx, item, now)
            else:
                done = item.record.sha256 in committed
            outcomes[index] = _finish(ctx, item, done)
        except Exception as exc:
            outcomes[index] = exc
        finally:
            item.close()
    return outcomes


def _commit_one(ctx: Context, item: Pending, now: datetime) -> bool:
    try:
        return ctx.store.record_report(item.record, item.entries, now)
    except BaseException:
        _undo(item.judged)  # SPEC §5: no promoted file without its entry
        raise


def _finish(ctx: Context, item: Pending, committed: bool) -> Result:
    """After the commit: the staged files removed, the report archived, the entries logged."""
    site, path, sha = item.candidate.site, item.candidate.path, item.candidate.sha
    result = item.result
    if committed:
        result.entries = item.entries
        finish_promotions(ctx, sha, site, result.entries, item.judged, item.staged_dirs)
    else:
        # Another worker or daemon committed these bytes first: keep only what it recorded.
        _drop_uncommitted(item.judged, ctx.store.successes_of_report(sha))
        result.outcome = Outcome.DUPLICATE
        finish_promotions(ctx, sha, site, ctx.store.successes_of_report(sha))
    result.left_in_place = archive(path, site)
    # One logger bound for the report's lines: the module's lazy proxy builds a new one (and
    # looks its stdlib logger up) for every call. Bound to nothing, so each line keeps its
    # fields in their order.
    bound = log.bind()
    for entry in result.entries:
        _log_entry(entry, job_label(site, entry.job_id), site, item.name, bound)
    return result


Opened = Beneath | OSError | UnsafePath | None
"""A staged file opened beneath D, the error its opening met, or None: none to look at."""


def _open_staged(site: Site, db: DatabaseReport) -> Opened:
    """The staged file opened beneath D (SPEC §9), once for the readiness check and the
    judgement; None when the agent's own steps failed (no file is looked at)."""
    if agent_verdict(db) is not None:
        return None
    try:
        return Beneath.open(site.folder, PurePosixPath(db.staged_file_name or ""))
    except (UnsafePath, OSError) as exc:
        return exc


def _staged_wait(
    ctx: Context, site: Site, assigned: list[Assigned], opened: list[Opened]
) -> Wait | None:
    """SPEC §5 step 3: a staged file still arriving is not judged while D keeps changing."""
    states = [
        _staged_state(item.db, staged)
        for item, staged in zip(assigned, opened, strict=True)
        if staged is not None
    ]
    if all(state is StagedState.PRESENT for state in states):
        return None
    return staged_wait(states, ctx.observer.quiet_for(site.folder), ctx.settle)


def _staged_state(db: DatabaseReport, staged: Beneath | OSError | UnsafePath) -> StagedState:
    """A stat through the same confined open as the verdict: no read, no hash."""
    if isinstance(staged, FileNotFoundError):
        return StagedState.ABSENT
    if isinstance(staged, PermissionError):
        return StagedState.UNREADABLE
    if not isinstance(staged, Beneath):
        return StagedState.PRESENT  # a symlink or a folder: judged now, not waited for
    size = os.fstat(staged.fd).st_size
    expected = db.compress_process.size_bytes
    return StagedState.SHORT if expected is not None and size < expected else StagedState.PRESENT


def _judge(
    ctx: Context,
    site: Site,
    item: Assigned,
    report: StatusReport,
    report_name: str,
    sha: str,
    previous: list[tuple[str | None, int | None]],
    opened: Opened = None,
) -> Judged:
    ctx.beat()
    db = item.db
    facts: StagedFacts | None = None
    promoted: Promoted | None = None
    if agent_verdict(db) is None:
        verdict, facts, promoted = _judge_staged(ctx, site, item, sha, opened)
    else:
        verdict = decide(db, None)  # the agent's own steps failed: no file to look at
    unchanged = mark_unchanged(verdict, facts, previous[0][0] if previous else None)
    if unchanged:
        verdict = Verdict(verdict.status, verdict.message + UNCHANGED_WARNING)
    anomaly = None
    if verdict.status is BackupEntryStatus.SUCCESS and facts is not None:
        sizes = [size for _sha, size in previous if size is not None]
        anomaly = size_anomaly(facts.size, sizes, ctx.settings.size_drop_ratio)
    if anomaly is not None:
        verdict = Verdict(verdict.status, verdict.message + anomaly)
    staged = site.folder / db.staged_file_name if db.staged_file_name else None
    server = _server_details(promoted)
    entry = NewEntry(
        job_id=item.job.id,
        cycle=item.cycle,
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
        final_path=str(promoted.path) if promoted else None,
        unchanged_since_last_success=unchanged,
        details={"agent": db.model_dump(mode="json"), "server": server},
        # SPEC §14: which file the daemon placed, so that pruning removes only that one.
        final_dev=server.get("final_dev"),
        final_ino=server.get("final_ino"),
        suspicious=anomaly is not None,
    )
    return Judged(entry, promoted)


def _server_details(promoted: Promoted | None) -> dict[str, Any]:
    if promoted is None:
        return {}
    # What `promote` checked its final name holds, without a stat of that path (issue 10).
    final = promoted.placed()
    return {
        "promotion": promoted.method,
        "staged_dev": promoted.staged.dev,
        "staged_ino": promoted.staged.ino,
        "final_dev": final.dev,
        "final_ino": final.ino,
    }


def _judge_staged(
    ctx: Context, site: Site, item: Assigned, sha: str, staged: Opened = None
) -> tuple[Verdict, StagedFacts, Promoted | None]:
    """Inspect, hash and (on success) promote the staged file, all through one open descriptor:
    the one the readiness check opened, else (its opening failed) one opened again now, since
    the file may have arrived since then."""
    db = item.db
    staged_name = db.staged_file_name or ""
    try:
        if isinstance(staged, Beneath):
            return _judge_open(ctx, item, sha, staged)
        with contextlib.closing(Beneath.open(site.folder, PurePosixPath(staged_name))) as again:
            return _judge_open(ctx, item, sha, again)
    except FileNotFoundError:
        facts = StagedFacts(staged_name, problem="absent")
    except (UnsafePath, IsADirectoryError) as exc:
        facts = StagedFacts(staged_name, problem=f"refused: {exc}")
    except PermissionError:
        st = _lstat_beneath(site.folder, staged_name)
        problem = unreadable_reason("it", st) if st else "permission denied"
        facts = StagedFacts(staged_name, problem=problem)
    return decide(db, facts), facts, None


def _judge_open(
    ctx: Context, item: Assigned, sha: str, staged: Beneath
) -> tuple[Verdict, StagedFacts, Promoted | None]:
    db = item.db
    name = db.staged_file_name or ""
    fd = staged.fd
    facts = _inspect(name, fd, db.compress_process.size_bytes, ctx.beat, item.job.archive_test)
    verdict = decide(db, facts)
    if verdict.status is not BackupEntryStatus.SUCCESS:
        return verdict, facts, None
    return _promote(ctx, item, sha, staged.dir_fd, fd, staged.name, facts, verdict)


def _lstat_beneath(folder: Path, relative: str) -> os.stat_result | None:
    try:
        return os.lstat(folder / relative)
    except OSError:
        return None


def _inspect(
    name: str,
    fd: int,
    expected_size: int | None,
    progress: Callable[[], None],
    archive_test: bool = True,
) -> StagedFacts:
    size = os.fstat(fd).st_size
    if size != expected_size:
        return StagedFacts(name, size=size)
    test = ArchiveTest.for_name(name) if archive_test else None
    if test is None:
        digest, read = sha256_fd(fd, progress)
        return StagedFacts(name, size=read, sha256=digest)
    with Background(test, progress) as background:  # SPEC §13: in the same single read
        digest, read = sha256_fd(fd, progress, background.feed)
        problem = background.finish()
    return StagedFacts(name, size=read, sha256=digest, archive_problem=problem)


def _promote(
    ctx: Context,
    item: Assigned,
    sha: str,
    dir_fd: int,
    fd: int,
    base: str,
    facts: StagedFacts,
    verdict: Verdict,
) -> tuple[Verdict, StagedFacts, Promoted | None]:
    """SPEC §5 step 6: into final storage, never overwriting (see `promotion`)."""
    assert facts.sha256 is not None
    assert facts.size is not None
    job = item.job
    root = ctx.settings.validated_backups_base_path
    target = root / final_relpath(job.final_storage_path_template, job.fields, item.cycle, base)
    request = Request(
        dir_fd=dir_fd,
        fd=fd,
        base=base,
        target=target,
        facts=Facts(facts.sha256, facts.size),
        key=f"{sha}-{job.id}",
        temp_root=ctx.temp_root,
        committed=lambda: ctx.store.report_processed(sha),
        progress=ctx.beat,
    )
    try:
        promoted = promote(request)
    except StagedChanged as exc:
        failed = Verdict(
            BackupEntryStatus.TRANSFER_INTEGRITY_FAILED, f"staged file {facts.name} {exc}"
        )
        return failed, facts, None
    message = f"{verdict.message}; stored at {promoted.path}"
    if promoted.path.name != target.name:
        message += f" ({target.name} already existed, so a new name was used)"
    return Verdict(verdict.status, message), facts, promoted


def _undo(judged: Sequence[Judged]) -> None:
    for item in judged:
        if item.promoted is not None:
            item.promoted.undo()


def _drop_uncommitted(judged: Sequence[Judged], committed: Sequence[Any]) -> None:
    """A duplicate: remove what this attempt put in final storage that nobody recorded."""
    recorded = {entry.final_path for entry in committed}
    for item in judged:
        promoted = item.promoted
        if promoted is None:
            continue
        if str(promoted.path) in recorded:
            promoted.release()
        else:
            promoted.undo()


# ---------------------------------------------------------------------- after the commit


def finish_promotions(
    ctx: Context,
    sha: str,
    site: Site,
    entries: Sequence[Any],
    judged: Sequence[Judged] = (),
    folders: Sequence[StagedDir | None] = (),
) -> None:
    """Remove the staged files of a committed report's successes and what the copies left.

    `entries` are NewEntry or BackupEntry rows; `judged` holds this attempt's promotions (a
    report seen again after a crash has none: its temps are found by name). The staged path is
    walked beneath D without following a symlink (SPEC §9), and only the very file validated
    (same inode) is removed. Then the final file must have one link (`ensure_sole_link`).
    `folders` (by `judged`) are the staged files' folders this attempt opened beneath D: the
    file is looked for there, with the promoted file's identity, instead of walking D again.
    """
    kept: dict[int, tuple[StagedDir, Identity]] = {}
    for index, item in enumerate(judged):
        folder = folders[index] if index < len(folders) else None
        if item.promoted is not None:
            item.promoted.release()
            if folder is not None:
                kept[id(item.entry)] = (folder, item.promoted.staged)
    for entry in entries:
        if entry.status is not BackupEntryStatus.SUCCESS or entry.final_path is None:
            continue
        if id(entry) in kept:
            _remove_staged_at(*kept[id(entry)], entry.staged_path)
        else:
            server = (entry.details or {}).get("server", {})
            _remove_staged(
                site,
                entry.staged_path,
                Identity(server.get("staged_dev", -1), server.get("staged_ino", -1)),
            )
        if not judged:
            release_temp(ctx.temp_root, f"{sha}-{entry.job_id}")
        if entry.server_sha256 is not None and entry.server_size is not None:
            ensure_sole_link(
                Path(entry.final_path), Facts(entry.server_sha256, entry.server_size), ctx.beat
            )


def _remove_staged(site: Site, staged_path: str | None, validated: Identity) -> None:
    if staged_path is None:
        return
    try:
        relative = PurePosixPath(Path(staged_path).relative_to(site.folder))
        with open_beneath(site.folder, relative) as (dir_fd, fd, name):
            if Identity.of(os.fstat(fd)) == validated:
                os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return
    except (ValueError, UnsafePath, OSError) as exc:
        log.warning("staged.not_removed", staged=staged_path, reason=str(exc))


def _remove_staged_at(folder: StagedDir, validated: Identity, staged_path: str | None) -> None:
    """`_remove_staged` in the folder the judgement walked to (still the one beneath D)."""
    try:
        folder.remove_if(validated)
    except FileNotFoundError:
        return
    except (UnsafePath, OSError) as exc:
        log.warning("staged.not_removed", staged=staged_path, reason=str(exc))


def archive(path: Path, site: Site) -> str | None:
    """Move a processed report to D/_archive/ under a unique name; why not, if it cannot be."""
    try:
        move_unique(path, site.folder / ARCHIVE_DIR)
    except FileNotFoundError:
        return None  # a concurrent worker archived it already
    except (UnsafePath, OSError) as exc:
        log.error(
            "report.cannot_archive", report=str(path), reason=str(exc), action="left in place"
        )
        return f"cannot be archived: {exc}"
    return None


def reject(
    ctx: Context, path: Path, folder: Path, reason: str, now: datetime | None = None
) -> Result:
    """Move a report to FOLDER/_rejected/ with NAME.reason.txt beside it (SPEC §3).

    The REJECTED alert event (SPEC §10) is committed first: a crash before the move leaves the
    report in place, to be rejected again, and the event's key makes that a no-op.
    """
    name = _name(ctx, path)
    if path.exists() or path.is_symlink():
        ctx.store.record_rejection(_site_of(ctx, folder), name, reason, now or utc_now())
    try:
        reject_into(path, folder, name, reason)
    except FileNotFoundError:
        return Result(Outcome.GONE, path)
    except (UnsafePath, OSError) as exc:
        log.error(
            "report.cannot_reject",
            report=name,
            reason=reason,
            error=str(exc),
            action="left in place; retried once it changes",
        )
        return Result(Outcome.PARKED, path, reason, left_in_place=f"cannot be rejected: {exc}")
    log.warning("report.rejected", report=name, reason=reason)
    return Result(Outcome.REJECTED, path, reason)


def _site_of(ctx: Context, folder: Path) -> str:
    """A site folder as the jobs' `deposit_path` names it (relative to the deposit root)."""
    try:
        return display_name(str(PurePosixPath(folder.relative_to(ctx.registry.root))))
    except ValueError:
        return display_name(str(folder))


def _name(ctx: Context, path: Path) -> str:
    """The report's path relative to the deposit root, as safe text: what operators search."""
    try:
        return display_name(str(path.relative_to(ctx.registry.root)))
    except ValueError:
        return display_name(str(path))


def job_label(site: Site, job_id: int) -> str:
    return next((job.label for job in site.jobs if job.id == job_id), str(job_id))


def _log_entry(
    entry: NewEntry, label: str, site: Site, report_name: str, logger: Any = log
) -> None:
    level = logger.info if entry.status is BackupEntryStatus.SUCCESS else logger.warning
    if entry.unchanged_since_last_success or entry.suspicious:
        level = logger.warning
    level(
        "entry.recorded",
        job=label,
        site=site.name,
        status=entry.status.value,
        report=report_name,
        cycle=entry.cycle.isoformat(),
        message=entry.message,
    )
