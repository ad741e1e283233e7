"""SPEC §6: the SQL store, shared by the daemon's threads and by `backupwatchctl`.

Idempotency lives in the schema, not in timing: a partial unique index allows one MISSING per
(job, cycle), another one entry per (job, report bytes), and `processed_reports` is keyed by the
report's SHA-256. The MISSING timer advances `next_cycle_at` with a compare-and-swap UPDATE, so
several daemons sharing one database never flag the same cycle twice.
"""

from __future__ import annotations

import array
import dataclasses
import functools
import json
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from sys import intern
from typing import Any, NamedTuple, TypeVar

import structlog
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Dialect,
    Engine,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Select,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    bindparam,
    case,
    cast,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    text,
    true,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, aliased, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

from backupwatch.alerting import (
    Kind,
    Routing,
    job_event_key,
    rejected_key,
    site_channels,
    transition,
)
from backupwatch.enums import WEEKDAYS, BackupEntryStatus, BackupFrequency, JobStatus
from backupwatch.jobrecord import JobRecord
from backupwatch.jobs import JobSpec
from backupwatch.missing import (
    Change,
    Cursor,
    Due,
    Era,
    Settlement,
    Timeline,
    change_schedule,
    describe,
    eras_from_json,
    eras_to_json,
    fresh_cursor,
    settle,
)
from backupwatch.rawsql import RawInsert, raw_insert
from backupwatch.schedule import Schedule

log = structlog.get_logger(__name__)
_Row = TypeVar("_Row")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# What the sync takes: the reference model (tools, tests) or the daemon's compact record.
AnySpec = JobSpec | JobRecord
READ_ONLY = "backupwatch_read_only"  # execution option: a SQLite reader skips BEGIN IMMEDIATE


class UTCDateTime(TypeDecorator[datetime]):
    """Naive UTC in the column, aware UTC in Python: one behaviour on SQLite and PostgreSQL."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store; every instant must be aware UTC")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _enum(cls: type[Any], name: str) -> Enum:
    # Stored as VARCHAR with a CHECK-free string: adding a value later needs no ALTER TYPE.
    return Enum(cls, name=name, native_enum=False, length=32, validate_strings=True)


class ExpectedBackupJob(Base):
    """One database of one site, expected on a schedule (the seed's ExpectedBackupJob)."""

    __tablename__ = "expected_backup_jobs"
    __table_args__ = (
        UniqueConstraint("company_name", "city", "neighborhood", "database_name"),
        # The timer's due jobs of an instance in (deadline, id) order: its keyset pages are
        # index range scans (migration 0010), not a sort of every due job per page.
        Index(
            "ix_expected_backup_jobs_due",
            "instance",
            "next_deadline_at",
            "id",
            postgresql_where=text("active IS true"),
            sqlite_where=text("active IS 1"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    company_name: Mapped[str] = mapped_column(String(255))
    city: Mapped[str] = mapped_column(String(255))
    neighborhood: Mapped[str] = mapped_column(String(255))
    database_name: Mapped[str] = mapped_column(String(255))
    frequency: Mapped[BackupFrequency] = mapped_column(_enum(BackupFrequency, "backup_frequency"))
    expected_hour_utc: Mapped[int | None] = mapped_column(Integer)
    expected_minute_utc: Mapped[int] = mapped_column(Integer, default=0)
    days_of_week: Mapped[str | None] = mapped_column(String(32))
    day_of_month: Mapped[int | None] = mapped_column(Integer)
    expected_date: Mapped[date | None] = mapped_column(Date)
    collection_window_minutes: Mapped[int | None] = mapped_column(Integer)
    window_minutes: Mapped[int] = mapped_column(Integer)
    agent_id: Mapped[str] = mapped_column(String(255))
    deposit_path: Mapped[str] = mapped_column(String(1024), index=True)
    agent_deposit_path_template: Mapped[str] = mapped_column(String(1024))
    final_storage_path_template: Mapped[str] = mapped_column(String(1024))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    activated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    deactivated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    config_source: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # The timer's cursor: the earliest cycle not yet settled, and its deadline (indexed).
    next_cycle_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    next_deadline_at: Mapped[datetime | None] = mapped_column(UTCDateTime, index=True)
    # Replaced schedules whose cycles are still owed (`missing.Era`, as JSON) and when the current
    # schedule took effect; both cleared by the timer step that settles those cycles.
    previous_schedules: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    schedule_changed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # SPEC §10, §11 (migration 0005): where the job's alerts go (None: the unnamed channel),
    # its pause (from `paused_at` until `paused_until`; None: until resumed) and its
    # acknowledgement, cleared by the transaction that changes its state.
    alert_channels: Mapped[list[str] | None] = mapped_column(JSON)
    paused_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    paused_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    pause_reason: Mapped[str | None] = mapped_column(Text)
    acked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    ack_reason: Mapped[str | None] = mapped_column(Text)
    # SPEC §15 (migration 0008): the daemon instance whose job files define this job; NULL
    # for rows of an older version, until the first sync adopts them.
    instance: Mapped[str | None] = mapped_column(String(255))
    # SPEC §13, §14 (migration 0007): the job's own archive test and GFS counts (None: the
    # config's).
    archive_test: Mapped[bool | None] = mapped_column(Boolean)
    keep_daily: Mapped[int | None] = mapped_column(Integer)
    keep_weekly: Mapped[int | None] = mapped_column(Integer)
    keep_monthly: Mapped[int | None] = mapped_column(Integer)

    @property
    def label(self) -> str:
        return f"{self.company_name}/{self.city}/{self.neighborhood}/{self.database_name}"

    @property
    def site_label(self) -> str:
        return f"{self.company_name}/{self.city}/{self.neighborhood}"

    def paused_at_instant(self, instant: datetime) -> bool:
        return Pause(self.paused_at, self.paused_until).covers(instant)

    @property
    def schedule(self) -> Schedule:
        return _schedule_of(self)

    @property
    def previous_eras(self) -> tuple[Era, ...]:
        return eras_from_json(self.previous_schedules)

    @property
    def timeline(self) -> Timeline:
        return _timeline_of(self)

    @property
    def fields(self) -> dict[str, str]:
        return {
            "company_name": self.company_name,
            "city": self.city,
            "neighborhood": self.neighborhood,
            "database_name": self.database_name,
            "agent_id": self.agent_id,
        }


def _schedule_of(job: Any) -> Schedule:
    """The schedule of a job's row: an ExpectedBackupJob, or a Core row with its columns as
    attributes (`schedule_of` for a mapping of them)."""
    return _schedule(
        job.frequency,
        job.expected_hour_utc,
        job.expected_minute_utc,
        job.days_of_week,
        job.day_of_month,
        job.expected_date,
        job.window_minutes,
    )


@functools.lru_cache(maxsize=4096)
def _schedule(
    frequency: BackupFrequency,
    hour: int | None,
    minute: int,
    days_of_week: str | None,
    day_of_month: int | None,
    expected_date: date | None,
    window_minutes: int,
) -> Schedule:
    """A Schedule is immutable and validated when built: a fleet's 100,000 jobs share a few
    dozen, and `status` and the timer build one per job they read."""
    days = frozenset(int(d) for d in days_of_week.split(",")) if days_of_week else None
    return Schedule(
        frequency=frequency,
        hour=hour,
        minute=minute,
        days_of_week=days,
        day_of_month=day_of_month,
        expected_date=expected_date,
        window=timedelta(minutes=window_minutes),
    )


def _timeline_of(job: Any) -> Timeline:
    """The cycles a job's row owes: its schedule and the replaced ones still owed."""
    eras = eras_from_json(job.previous_schedules)
    return Timeline(_schedule_of(job), job.activated_at, eras, job.schedule_changed_at)


@dataclasses.dataclass(frozen=True, slots=True)
class DueJob:
    """What the MISSING timer reads of a job whose deadline has passed: its cursor, what it
    owes, and what the compare-and-swap checks (`_Plan.unchanged`). Read by Core, a page
    of 250 at a time: a wave of 100,000 deadlines is 400 pages, and an ORM object per job
    was about a tenth of the timer's CPU (BENCHMARKS.md, issue 10)."""

    id: int
    label: str
    agent_id: str
    deposit_path: str
    instance: str | None
    timeline: Timeline
    next_cycle_at: datetime | None
    next_deadline_at: datetime
    schedule_changed_at: datetime | None
    updated_at: datetime

    @classmethod
    def of(cls, row: Any) -> DueJob:
        return cls(
            id=row.id,
            label=f"{row.company_name}/{row.city}/{row.neighborhood}/{row.database_name}",
            agent_id=row.agent_id,
            deposit_path=row.deposit_path,
            instance=row.instance,
            timeline=_timeline_of(row),
            next_cycle_at=row.next_cycle_at,
            next_deadline_at=row.next_deadline_at,
            schedule_changed_at=row.schedule_changed_at,
            updated_at=row.updated_at,
        )


class BackupEntry(Base):
    """One event in a job's history: a validated outcome, or MISSING (the seed's BackupEntry)."""

    __tablename__ = "backup_entries"
    __table_args__ = (
        Index("ix_backup_entries_job_cycle", "job_id", "cycle"),
        Index("ix_backup_entries_report_sha256", "report_sha256"),
        Index(
            "uq_backup_entries_missing_once",
            "job_id",
            "cycle",
            unique=True,
            sqlite_where=text("status = 'MISSING'"),
            postgresql_where=text("status = 'MISSING'"),
        ),
        UniqueConstraint("job_id", "report_sha256"),
        # The web grid (SPEC §12): a range scan of the window that never reads the table.
        Index(
            "ix_backup_entries_cycle_job",
            "cycle",
            "job_id",
            "status",
            "unchanged_since_last_success",
            "id",
        ),
        # SPEC §13, §14 (migration 0007): a job's successes newest first (the size anomaly's
        # previous sizes, the GFS candidates), and entries by age (history retention).
        Index("ix_backup_entries_job_status_cycle", "job_id", "status", "cycle"),
        Index("ix_backup_entries_cycle", "cycle"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("expected_backup_jobs.id"))
    cycle: Mapped[datetime] = mapped_column(UTCDateTime)
    status: Mapped[BackupEntryStatus] = mapped_column(_enum(BackupEntryStatus, "entry_status"))
    message: Mapped[str] = mapped_column(Text)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)
    report_name: Mapped[str | None] = mapped_column(String(1024))
    report_sha256: Mapped[str | None] = mapped_column(String(64))
    operation_start_time: Mapped[datetime | None] = mapped_column(UTCDateTime)
    operation_timestamp: Mapped[datetime | None] = mapped_column(UTCDateTime)
    backup_ok: Mapped[bool | None] = mapped_column(Boolean)
    compress_ok: Mapped[bool | None] = mapped_column(Boolean)
    transfer_ok: Mapped[bool | None] = mapped_column(Boolean)
    agent_sha256: Mapped[str | None] = mapped_column(String(64))
    agent_size: Mapped[int | None] = mapped_column(BigInteger)
    server_sha256: Mapped[str | None] = mapped_column(String(64))
    server_size: Mapped[int | None] = mapped_column(BigInteger)
    staged_path: Mapped[str | None] = mapped_column(String(4096))
    final_path: Mapped[str | None] = mapped_column(String(4096))
    unchanged_since_last_success: Mapped[bool] = mapped_column(Boolean, default=False)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # SPEC §14 (migration 0007): the promoted file as the daemon placed it (its size and
    # SHA-256 are server_size and server_sha256), and its removal: None, "claimed" (by one
    # pruner, since `final_removal_at`), "removed", "changed" (kept: not what was placed) or
    # "gone" (someone else removed it).
    final_dev: Mapped[int | None] = mapped_column(BigInteger)
    final_ino: Mapped[int | None] = mapped_column(BigInteger)
    # SPEC §13: a success much smaller than the job's recent ones (raised SUSPICIOUS).
    suspicious: Mapped[bool | None] = mapped_column(Boolean)
    final_removal: Mapped[str | None] = mapped_column(String(16))
    final_removal_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ProcessedReport(Base):
    """A report's bytes, once processed: the idempotency key of SPEC §5's last paragraph."""

    __tablename__ = "processed_reports"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    site: Mapped[str] = mapped_column(String(4096))
    report_name: Mapped[str] = mapped_column(String(1024))
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    processed_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)


class AlertEvent(Base):
    """SPEC §10's outbox: one row per alert event, written in the transaction that changes the
    state; `dedupe_key` (see `alerting`) makes every path that could write it write it once."""

    __tablename__ = "alert_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dedupe_key: Mapped[str] = mapped_column(String(255), unique=True)
    kind: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[int | None] = mapped_column(ForeignKey("expected_backup_jobs.id"), index=True)
    company: Mapped[str | None] = mapped_column(String(255))
    site: Mapped[str] = mapped_column(String(4096))
    job_label: Mapped[str | None] = mapped_column(String(1024))
    agent_id: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str | None] = mapped_column(String(32))
    cycle: Mapped[datetime | None] = mapped_column(UTCDateTime)
    since: Mapped[datetime | None] = mapped_column(UTCDateTime)
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, index=True)
    # SPEC §15 (migration 0009): the instance whose job or deposit folder the event is about.
    instance: Mapped[str | None] = mapped_column(String(255))


class AlertDelivery(Base):
    """One event to one channel: claimed, sent outside any transaction, then recorded."""

    __tablename__ = "alert_deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "channel"),
        Index("ix_alert_deliveries_due", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    event_id: Mapped[int] = mapped_column(ForeignKey("alert_events.id"))
    channel: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))  # pending, sending, sent, failed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime)
    claimed_by: Mapped[str | None] = mapped_column(String(255))
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_error: Mapped[str | None] = mapped_column(Text)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    done_urls: Mapped[list[str] | None] = mapped_column(JSON)  # URLs (by digest) that took it
    batch: Mapped[str | None] = mapped_column(String(64))  # the grouped message it went in


# --------------------------------------------------------------------------- engine


def make_engine(url: str, create: bool = True) -> Engine:
    """SQLite in WAL mode with a busy timeout and BEGIN IMMEDIATE; PostgreSQL with pre-ping.

    BEGIN IMMEDIATE takes SQLite's write lock up front, so two threads never deadlock upgrading a
    read transaction; pre-ping lets a restarted PostgreSQL be reconnected transparently.
    The PostgreSQL URL may name another driver than psycopg2 (then the executemany mode, a
    psycopg2 option, is not passed).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and create:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        _configure_sqlite(engine)
        return engine
    options: dict[str, Any] = {}
    if parsed.get_driver_name() == "psycopg2":
        # An executemany UPDATE (a sync flushing many changed jobs) in pages of statements per
        # round trip, not one round trip per row.
        options["executemany_mode"] = "values_plus_batch"
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, **options)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout = 30000")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Writers take the lock up front; readers need no lock at all in WAL mode.
        if connection.get_execution_options().get(READ_ONLY):
            connection.exec_driver_sql("BEGIN")
        else:
            connection.exec_driver_sql("BEGIN IMMEDIATE")


# The PostgreSQL advisory lock that serialises migrations: an arbitrary fixed 64-bit number (the
# bytes of "bwmigrat"), hashed with the schema's name, so that installations (or test runs) in
# other schemas of one database never wait for each other. Advisory locks are per database already.
MIGRATION_LOCK_KEY = 0x62776D6967726174
_TAKE_MIGRATION_LOCK = text(
    "SELECT pg_advisory_xact_lock(hashtextextended(coalesce(current_schema(), ''), :key))"
)


def migrate(engine: Engine) -> None:
    """Create or upgrade the schema to the newest Alembic revision (SPEC §6: done at start).

    Two daemons of a failover pair start together: the migration runs in one transaction that
    first takes a lock, so the second waits for the first to commit, then finds the schema at
    head. On PostgreSQL the lock is an advisory one, released with the transaction; on SQLite it
    is the write lock that `make_engine`'s BEGIN IMMEDIATE takes (this transaction must never
    be READ_ONLY). Alembic reads the current revision after the lock, never before.
    """
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(_TAKE_MIGRATION_LOCK, {"key": MIGRATION_LOCK_KEY})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


# Due jobs the timer settles in one transaction: few statements per job, a write lock held for
# a fraction of a second, and under SQLite's limit of 500 terms in the UNION ALLs that read the
# page's newest entries and streaks in one statement each.
SETTLE_PAGE = 250
# Jobs per UNION ALL of `_recent_successes` (a power of two, under SQLite's 500 terms).
SUCCESSES_CHUNK = 32


class Store:
    """The daemon's and ctl's handle on the database: an engine and a session factory."""

    def __init__(self, url: str, create: bool = True) -> None:
        self.engine = make_engine(url, create)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.reader = self.engine.execution_options(**{READ_ONLY: True})
        self._readers = sessionmaker(self.reader, expire_on_commit=False)
        # Where alert events fan out to (SPEC §10); the daemon sets it from `[alerts]`, and
        # without it events are written with no delivery (nothing is configured to send).
        self.routing = Routing()
        # SPEC §15: the daemon's `instance`. Set, the sync, the registry, the timer and the
        # REJECTED events see only this instance's jobs; None (tools, tests): every job.
        self.instance: str | None = None
        self._raw: tuple[RawInsert | None, RawInsert | None] | None = None

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any exception."""
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def reading(self) -> Iterator[Session]:
        """A read-only transaction: on SQLite it does not wait for, or hold, the write lock."""
        with self._readers.begin() as session:
            yield session

    def migrate(self) -> None:
        migrate(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()

    def _insert(self, table: Any) -> Any:
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(table)

    # ------------------------------------------------------------------- jobs

    def sync_jobs(
        self,
        specs: Sequence[AnySpec],
        default_window_minutes: int,
        now: datetime,
        gone: Sequence[JobKey] | None = None,
    ) -> SyncResult:
        """SPEC §2: add new jobs, update changed ones (history kept), deactivate vanished ones.

        With `gone`, a partial sync, for a reload that knows what changed since its last sync:
        only `specs` (new and edited jobs) and the keys in `gone` (removed ones) are compared
        with the database, and every other job is taken to be as that sync left it.

        Two daemons starting together may both insert a new job; the loser's unique-constraint
        error means the row now exists, so one more pass (which updates it instead) settles it.
        """
        try:
            result = self._sync_once(specs, default_window_minutes, now, gone)
        except IntegrityError:
            result = self._sync_once(specs, default_window_minutes, now, gone)
        for change in result.schedule_changes:
            change.log()
        return result

    def _sync_once(
        self,
        specs: Sequence[AnySpec],
        default_window_minutes: int,
        now: datetime,
        gone: Sequence[JobKey] | None,
    ) -> SyncResult:
        """One transaction, streamed: the jobs in the database are compared by a compact
        fingerprint, new ones inserted and changed ones loaded in batches of SYNC_BATCH, so
        that 100,000 jobs never mean 100,000 ORM objects alive at once."""
        result = SyncResult()
        me = self.instance
        with self.session() as session:
            if me is not None:
                self._adopt(session, me)
            scope = None if gone is None else [*(spec.key for spec in specs), *gone]
            known = self._known_jobs(session, scope)
            others = self._other_instances(session, me, scope)
            batch = _SyncBatch(session, now, result)
            seen: set[JobKey] = set()
            for spec in specs:
                key = spec.key
                seen.add(key)
                mine = known.get(key)
                if mine is None and key in others:
                    columns = _spec_columns(spec, default_window_minutes)
                    job = self._take_over(session, others[key], spec, result)
                    if job is not None and _apply_spec(
                        job, spec.active, columns, now, result.schedule_changes
                    ):
                        result.changed += 1
                elif mine is None:
                    columns = _spec_columns(spec, default_window_minutes)
                    batch.add(_new_row(spec, columns, now, me))
                else:
                    values = _config_values(spec, default_window_minutes)
                    if mine.fingerprint != _fingerprint(spec.active, values):
                        columns = _spec_columns(spec, default_window_minutes)
                        batch.change(mine.id, spec.active, columns)
                        continue
                    if mine.source != spec.source:
                        batch.move(mine.id, spec.source)
                    if gone is None and spec.active:
                        result.unchanged.add(spec, mine.id, mine.previous)
            batch.flush()
            ids = [m.id for key, m in known.items() if key not in seen and m.active]
            for start in range(0, len(ids), SYNC_BATCH):
                _deactivate_ids(session, ids[start : start + SYNC_BATCH], now)
            result.deactivated = len(ids)
        return result

    def _known_jobs(self, session: Session, scope: Sequence[JobKey] | None) -> dict[JobKey, _Known]:
        """This instance's jobs as the sync compares them: id, fingerprint, source, active;
        only those of `scope` when there is one."""
        j = ExpectedBackupJob
        query = select(
            j.id,
            j.company_name,
            j.city,
            j.neighborhood,
            j.database_name,
            j.active,
            j.config_source,
            _raw_json(j.previous_schedules),
            *(
                _raw_json(j.alert_channels) if name == "alert_channels" else getattr(j, name)
                for name in FINGERPRINTED
            ),
        )
        known: dict[JobKey, _Known] = {}
        # Core rows (the session's connection): through the ORM's loading they cost twice as
        # much, and the two JSON columns are decoded here only when they hold something.
        connection = session.connection()
        for part in _scoped(self._own(query), scope):
            for row in connection.execute(part.execution_options(yield_per=SYNC_BATCH)):
                values = list(row)
                values[_RAW_CHANNELS_AT] = _json_of(values[_RAW_CHANNELS_AT])
                # interned: the reader's records hold these names already, so the 100,000
                # keys of this dict cost no strings of their own (~20 MiB less at the peak)
                key = (intern(values[1]), intern(values[2]), intern(values[3]), intern(values[4]))
                known[key] = _Known(
                    values[0],
                    _fingerprint(values[5], tuple(values[8:])),
                    values[6],
                    values[5],
                    _json_of(values[7]),
                )
        return known

    def _adopt(self, session: Session, me: str) -> None:
        """SPEC §15: the jobs an older version wrote (no instance) become this daemon's; on
        SQLite (one file, one host) another instance's jobs refuse the start."""
        j = ExpectedBackupJob
        session.execute(update(j).where(j.instance.is_(None)).values(instance=me))
        if self.engine.dialect.name != "sqlite":
            return
        other = session.scalar(select(j.instance).where(j.instance != me).limit(1))
        if other is not None:
            raise InstanceConflict(
                f"this SQLite database holds the jobs of instance {other!r}, and this daemon "
                f"is instance {me!r}: an SQLite file serves one host. If this host was "
                f"renamed, set instance = {other!r} in the configuration file; to run several "
                "daemons on one database, use PostgreSQL (SPEC §15)"
            )

    def _other_instances(
        self, session: Session, me: str | None, scope: Sequence[JobKey] | None
    ) -> dict[JobKey, _Owned]:
        """The keys of other instances' jobs (a job key is unique across instances)."""
        if me is None:
            return {}
        j = ExpectedBackupJob
        query = select(
            j.id, j.company_name, j.city, j.neighborhood, j.database_name, j.instance, j.active
        ).where(j.instance != me)
        return {
            (r.company_name, r.city, r.neighborhood, r.database_name): _Owned(
                r.id, str(r.instance), r.active
            )
            for part in _scoped(query, scope)
            for r in session.execute(part)
        }

    def _take_over(
        self, session: Session, owned: _Owned, spec: AnySpec, result: SyncResult
    ) -> ExpectedBackupJob | None:
        """A job another instance defines too: its while active there (a conflict said, not
        settled by whoever syncs last); an inactive one (moved hosts) becomes this one's."""
        label = "/".join(spec.key)
        if owned.active:
            text = (
                f"job {label} ({spec.source}) is defined by instance {owned.instance!r} too, "
                f"where it is active: left to {owned.instance!r}; remove it from one of them"
            )
            log.warning("job.owned_elsewhere", job=label, instance=owned.instance)
            result.conflicts.append(text)
            result.conflict_keys.append(spec.key)
            return None
        job = session.get(ExpectedBackupJob, owned.id)
        assert job is not None
        log.info("job.taken_over", job=label, previous_instance=owned.instance)
        job.instance = self.instance
        return job

    def active_jobs(self) -> list[ExpectedBackupJob]:
        """This instance's active jobs: the ones whose deposit folders it watches."""
        with self.reading() as session:
            query = select(ExpectedBackupJob).where(ExpectedBackupJob.active.is_(True))
            return list(session.scalars(self._own(query)))

    def iter_active_job_rows(self, scope: Sequence[JobKey] | None = None) -> Iterator[Any]:
        """What the registry needs of this instance's active jobs, as plain rows, streamed
        (`pipeline.registry_of` reads them by position: id, the four names, agent_id,
        deposit_path, final template, previous schedules, archive_test, SCHEDULE_COLUMNS)."""
        j = ExpectedBackupJob
        query = select(
            j.id,
            j.company_name,
            j.city,
            j.neighborhood,
            j.database_name,
            j.agent_id,
            j.deposit_path,
            j.final_storage_path_template,
            j.previous_schedules,
            j.archive_test,
            *(getattr(j, name) for name in SCHEDULE_COLUMNS),
        ).where(j.active.is_(True))
        with self.reader.begin() as connection:
            for part in _scoped(self._own(query), scope):
                yield from connection.execute(part.execution_options(yield_per=SYNC_BATCH))

    def _own(self, query: Select[_Row]) -> Select[_Row]:
        """`query` narrowed to this daemon's instance (SPEC §15), when it has one."""
        if self.instance is None:
            return query
        return query.where(ExpectedBackupJob.instance == self.instance)

    def all_jobs(self) -> list[ExpectedBackupJob]:
        with self.reading() as session:
            query = select(ExpectedBackupJob).order_by(*_job_order())
            return list(session.scalars(query))

    def find_job(self, ident: str) -> ExpectedBackupJob | None:
        """A job by numeric id or by `company/city/neighborhood/database`."""
        with self.reading() as session:
            if ident.isascii() and ident.isdigit():  # "²".isdigit() is True, int("²") fails
                job_id = int(ident)  # beyond SQLite's 64-bit INTEGER: no such job, not a crash
                return session.get(ExpectedBackupJob, job_id) if job_id < 2**63 else None
            parts = ident.split("/")
            if len(parts) != 4:
                return None
            return session.scalars(
                select(ExpectedBackupJob).where(
                    ExpectedBackupJob.company_name == parts[0],
                    ExpectedBackupJob.city == parts[1],
                    ExpectedBackupJob.neighborhood == parts[2],
                    ExpectedBackupJob.database_name == parts[3],
                )
            ).first()

    def site_jobs(self, site: str) -> list[ExpectedBackupJob]:
        """The jobs of a site named `company/city/neighborhood` (SPEC §11: pause SITE)."""
        parts = site.split("/")
        if len(parts) != 3:
            return []
        j = ExpectedBackupJob
        with self.reading() as session:
            query = (
                select(j)
                .where(j.company_name == parts[0], j.city == parts[1], j.neighborhood == parts[2])
                .order_by(*_job_order())
            )
            return list(session.scalars(query))

    # ------------------------------------------------------------ pause, ack

    def pause(
        self, job_ids: Sequence[int], now: datetime, until: datetime | None, reason: str | None
    ) -> None:
        """SPEC §11: stop expecting the jobs from `now` until `until` (None: until resumed).

        The rows are locked as the timer's compare-and-swap locks them: the timer's step
        either committed before (its flags were due before the pause) or sees the pause.
        A job already paused keeps the start of its pause; only the end and reason change.
        """
        with self.engine.begin() as connection:
            for job_id, pause in self._locked_pauses(connection, job_ids):
                since = pause.since if pause.covers(now) else now
                connection.execute(
                    update(ExpectedBackupJob)
                    .where(ExpectedBackupJob.id == job_id)
                    .values(paused_at=since, paused_until=until, pause_reason=reason)
                )

    def resume(self, job_ids: Sequence[int], now: datetime) -> int:
        """End the pause of the jobs now; the cycles it covered stay unexpected. Returns how
        many were paused."""
        resumed = 0
        with self.engine.begin() as connection:
            for job_id, pause in self._locked_pauses(connection, job_ids):
                if pause.covers(now):
                    connection.execute(
                        update(ExpectedBackupJob)
                        .where(ExpectedBackupJob.id == job_id)
                        .values(paused_until=now)
                    )
                    resumed += 1
        return resumed

    def _locked_pauses(self, connection: Any, job_ids: Sequence[int]) -> list[tuple[int, Pause]]:
        j = ExpectedBackupJob
        rows = connection.execute(
            select(j.id, j.paused_at, j.paused_until)
            .where(j.id.in_(list(job_ids)))
            .order_by(j.id)
            .with_for_update(key_share=True)
        ).all()
        return [(r.id, Pause(r.paused_at, r.paused_until)) for r in rows]

    def acknowledge(self, job_id: int, now: datetime, reason: str | None) -> JobStatus:
        """SPEC §11: no reminders for this job until its state changes. Returns its status;
        an OK (or UNKNOWN) job has nothing to acknowledge and is left as it is."""
        with self.engine.begin() as connection:
            self._locked_pauses(connection, [job_id])  # after any state change under way
            latest = _latest(connection, job_id)
            status = latest.job_status if latest else JobStatus.UNKNOWN
            if status not in (JobStatus.OK, JobStatus.UNKNOWN):
                connection.execute(
                    update(ExpectedBackupJob)
                    .where(ExpectedBackupJob.id == job_id)
                    .values(acked_at=now, ack_reason=reason)
                )
            return status

    # ---------------------------------------------------------------- reports

    def report_processed(self, sha256: str) -> bool:
        """Were these report bytes committed already? (Core: asked for every report.)"""
        with self.reader.begin() as connection:
            return connection.execute(_PROCESSED, {"sha256": sha256}).first() is not None

    def successes_of_report(self, sha256: str) -> list[BackupEntry]:
        with self.reading() as session:
            query = select(BackupEntry).where(
                BackupEntry.report_sha256 == sha256,
                BackupEntry.status == BackupEntryStatus.SUCCESS,
            )
            return list(session.scalars(query))

    def recent_successes(
        self, job_ids: Sequence[int], limit: int = 7
    ) -> dict[int, list[tuple[str | None, int | None]]]:
        """Each job's newest successes, newest first: (server SHA-256, server size).

        SPEC §5's unchanged check (the first one's SHA-256) and §13's size anomaly (the sizes)
        in one statement: a UNION ALL of one `LIMIT` range per job on the (job_id, status,
        cycle) index (migration 0007), so its cost grows neither with the job's history nor,
        in round trips, with the report's databases.
        """
        with self.reader.begin() as connection:  # one statement: one round trip per report
            return _recent_successes(connection, job_ids, limit)

    def report_history(self, sha256: str, job_ids: Sequence[int], limit: int = 7) -> ReportHistory:
        """What a report's judgement reads, in one read transaction: were its bytes committed
        already (`report_processed`), and its jobs' `recent_successes`."""
        return self.report_histories([(sha256, job_ids)], limit)[0]

    def report_histories(
        self, reports: Sequence[tuple[str, Sequence[int]]], limit: int = 7
    ) -> list[ReportHistory]:
        """`report_history` of several reports (sha256, job ids) in one read transaction and
        two statements whatever their number: a worker's group of queued reports (issue 10)."""
        with self.reader.begin() as connection:
            shas = [sha for sha, _jobs in reports]
            done = set(connection.execute(_PROCESSED_ANY, {"shas": shas}).scalars())
            wanted = [j for sha, jobs in reports if sha not in done for j in jobs]
            found = _recent_successes(connection, wanted, limit)
        return [
            ReportHistory(True)
            if sha in done
            else ReportHistory(False, {j: found[j] for j in jobs})
            for sha, jobs in reports
        ]

    def record_report(
        self, record: ProcessedReportRecord, entries: Sequence[NewEntry], now: datetime
    ) -> bool:
        """Commit a report's entries and its idempotency row together; False if already done."""
        return bool(self.record_reports([(record, entries)], now))

    def record_reports(
        self, reports: Sequence[tuple[ProcessedReportRecord, Sequence[NewEntry]]], now: datetime
    ) -> set[str]:
        """Commit several reports' entries and idempotency rows in one transaction (a group
        commit: one BEGIN/COMMIT, one WAL flush or fsync, one statement per table); the SHA-256
        of those recorded now. A report whose row exists already (another worker or daemon
        committed its bytes first) records nothing: its entries are not inserted. Either all
        of this commits or nothing does; the caller then tries each report on its own.

        The reports must not share a SHA-256 (their rows would collide), and should not share
        a job: each report's judgement read its jobs' history before this transaction.
        """
        # Core, not the ORM, and the two INSERTs straight to the driver (`rawsql`): this is the
        # hot path of every report (see BENCHMARKS.md, Burst, and issue 10).
        with self.engine.begin() as connection:
            processed, inserts = self._raw_inserts(connection.dialect)
            rows = [record.row(now) for record, _entries in reports]
            if processed is None:
                statement = _processed_insert(connection.dialect.name)
                done = set(connection.execute(statement, rows).scalars())
            else:
                done = processed.returning_new(connection, rows, "sha256")
            entries = [e for record, found in reports if record.sha256 in done for e in found]
            if entries:
                changes = _Changes(self, connection, sorted({e.job_id for e in entries}))
                if inserts is None:
                    connection.execute(_INSERT_ENTRY, [e.row(now) for e in entries])
                else:
                    inserts.many(connection, [e.row(now) for e in entries])
                changes.report_events(entries, now)
        return done

    def _raw_inserts(self, dialect: Dialect) -> tuple[RawInsert | None, RawInsert | None]:
        """The idempotency rows' and the entries' `RawInsert`s for this engine's dialect."""
        if self._raw is None:
            processed = typing.cast(Table, ProcessedReport.__table__)
            entries = typing.cast(Table, BackupEntry.__table__)
            self._raw = (
                raw_insert(processed, PROCESSED_COLUMNS, dialect),
                raw_insert(entries, ENTRY_COLUMNS, dialect),
            )
        return self._raw

    def record_rejection(self, site: str, report_name: str, reason: str, now: datetime) -> bool:
        """SPEC §10's REJECTED event (one per site per hour), in a transaction of its own.

        Called BEFORE the report moves to `_rejected/`: a crash in between leaves the report in
        place, to be rejected again, and the dedupe key makes that second write do nothing.
        `site` is the folder relative to the deposit root. False: nothing was written (a
        duplicate within the hour, or every job of the site is paused).
        """
        j = ExpectedBackupJob
        with self.engine.begin() as connection:
            jobs = connection.execute(
                select(
                    j.company_name,
                    j.city,
                    j.neighborhood,
                    j.alert_channels,
                    j.paused_at,
                    j.paused_until,
                ).where(
                    j.deposit_path == site,
                    j.active.is_(True),
                    true() if self.instance is None else j.instance == self.instance,
                )
            ).all()
            if jobs and all(Pause(r.paused_at, r.paused_until).covers(now) for r in jobs):
                return False
            companies = {r.company_name for r in jobs}
            labels = {f"{r.company_name}/{r.city}/{r.neighborhood}" for r in jobs}
            event = {
                "dedupe_key": rejected_key(site, now),
                "kind": Kind.REJECTED.value,
                "job_id": None,
                "company": companies.pop() if len(companies) == 1 else None,
                "site": labels.pop() if len(labels) == 1 else site,
                "job_label": None,
                "agent_id": None,
                "status": None,
                "cycle": None,
                "since": None,
                "message": f"{report_name} was rejected: {reason}",
                "created_at": now,
                "instance": self.instance,  # its deposit root is this daemon's
            }
            channels = site_channels(r.alert_channels for r in jobs)
            targets = self.routing.targets(Kind.REJECTED, channels)
            return _emit(connection, event, targets, now)

    # ---------------------------------------------------------------- MISSING

    def earliest_deadline(self) -> datetime | None:
        with self.reading() as session:
            query = select(func.min(ExpectedBackupJob.next_deadline_at)).where(
                ExpectedBackupJob.active.is_(True)
            )
            return session.scalar(self._own(query))

    def due_jobs(
        self, now: datetime, limit: int = SETTLE_PAGE, after: tuple[datetime, int] | None = None
    ) -> list[DueJob]:
        """Jobs whose cursor deadline has passed: an index range scan, never a scan of all jobs.

        `after` is the (deadline, id) of the last job of the previous page (keyset paging), so
        jobs the caller skipped (deferred) never hide the ones behind them.
        """
        # SPEC §15: each instance flags its own jobs: only it knows their sites' queued reports.
        statement = _due_statement(after is not None, self.instance is not None)
        values: dict[str, Any] = {"now": now, "limit": limit, "instance": self.instance}
        if after is not None:
            values["after_deadline"], values["after_id"] = after
        with self.reader.begin() as connection:
            return [DueJob.of(row) for row in connection.execute(statement, values)]

    def settle_jobs(
        self, jobs: Sequence[DueJob], now: datetime, oldest: datetime
    ) -> dict[int, list[datetime]]:
        """Flag every due cycle (`missing.settle`) without an entry of a page of jobs; return
        the cycles flagged, by job id. One transaction for the page, a few statements in all.

        Each job's cursor moves by compare-and-swap, under its row lock: if another daemon moved
        it first, or a sync changed the job since it was read, this step flags nothing for it.
        The partial unique index makes a second MISSING impossible even so.
        """
        plans = {
            job.id: _Plan(
                job, job.next_cycle_at, settle(job.timeline, job.next_cycle_at, now, oldest)
            )
            for job in jobs
            if job.next_cycle_at is not None
        }
        if not plans:
            return {}
        with self.engine.begin() as connection:
            moved = _move_cursors(connection, plans)
            if not moved:
                return {}
            # The compare-and-swap holds the jobs' rows now: a pause committed before it is
            # seen here, and a pause that comes after waits for this transaction (SPEC §11:
            # never a paused job flagged, never a flag lost).
            changes = _Changes(self, connection, moved)
            wanted = [
                _Missing(plans[job_id].job, due, now)
                for job_id in moved
                for due in plans[job_id].plan.due
                if not _paused(changes.jobs[job_id], plans[job_id].job, due, now)
            ]
            flagged = self._flag_missing(connection, wanted)
            if flagged:
                changes.missing_events(sorted(flagged), now)
        return flagged

    def _flag_missing(
        self, connection: Any, wanted: Sequence[_Missing]
    ) -> dict[int, list[datetime]]:
        """Insert MISSING for each wanted cycle that has no entry; the cycles inserted, by job.

        The jobs' rows are locked, and a report records its entries under the same locks, so
        the existence check cannot race a report; the unique index guards the rest.
        """
        if not wanted:
            return {}
        cycles = [m.due.cycle for m in wanted]
        ids = sorted({m.job.id for m in wanted})
        span = {"ids": ids, "first": min(cycles), "last": max(cycles)}
        existing = set(connection.execute(_ENTRIES_IN_SPAN, span))
        rows = [m.row() for m in wanted if (m.job.id, m.due.cycle) not in existing]
        if not rows:
            return {}
        statement = _missing_insert(connection.dialect.name)
        flagged: dict[int, list[datetime]] = {}
        for job_id, cycle in connection.execute(statement, rows):
            flagged.setdefault(job_id, []).append(cycle)
        for found in flagged.values():
            found.sort()
        return flagged

    # ----------------------------------------------------------------- queries

    def job_ids(self) -> list[int]:
        """Every job's id in job order (the unique key's index alone): `status` reads the
        views of 100,000 jobs a page of these at a time."""
        with self.reader.begin() as connection:
            query = select(ExpectedBackupJob.id).order_by(*_job_order())
            return list(connection.scalars(query))

    def job_views(self, now: datetime, *where: Any, instance: str | None = None) -> list[JobView]:
        """One row per job for `status`: current status, last success and next deadline.

        Every instance's jobs (SPEC §15: `status` of any daemon covers them all), or only
        `instance`'s; `where`: criteria on ExpectedBackupJob (one job, one site for the pages)."""
        # Core rows, not ORM objects: `status` of 100,000 jobs is 50 pages of these, and the
        # objects were half of its time (BENCHMARKS.md, issue 10).
        query = select(*_view_columns()).where(*where).order_by(*_job_order())
        if instance is not None:
            query = query.where(ExpectedBackupJob.instance == instance)
        with self.reader.begin() as connection:
            rows = connection.execute(query).all()
        return [_job_view(_ViewRow._make(row), now) for row in rows]

    def job_states(self, now: datetime, last_success: bool = True) -> list[JobView]:
        """`job_views` for the active jobs, lean enough for every page view and scrape (SPEC
        §12): columns, not ORM objects, and the next deadline from the MISSING cursor (the next
        cycle still to settle) instead of a schedule computation per job."""
        j = ExpectedBackupJob
        columns = [
            j.id,
            j.company_name,
            j.city,
            j.neighborhood,
            j.database_name,
            j.agent_id,
            j.deposit_path,
            j.frequency,
            j.next_deadline_at,
            j.paused_at,
            j.paused_until,
            j.pause_reason,
            j.acked_at,
            j.ack_reason,
            j.instance,
            _current_grade().label("grade"),
        ]
        if last_success:
            columns.append(_last_success().label("success"))
        query = select(*columns).where(j.active.is_(True)).order_by(*_job_order())
        with self.reader.begin() as connection:
            rows = connection.execute(query).all()
        views = []
        for row in rows:
            # By position: 10,000 rows for each scrape and page, where a name lookup per column
            # and a Pause per job showed in the profile.
            ident, company, city, neighborhood, database, agent, deposit, frequency = row[:8]
            deadline, paused_at, paused_until, reason, acked_at, ack_reason, instance = row[8:15]
            paused = paused_at is not None and Pause(paused_at, paused_until).covers(now)
            status, unchanged = _STATES.get(row[15], _NO_STATE)
            views.append(
                JobView(
                    id=ident,
                    company_name=company,
                    city=city,
                    neighborhood=neighborhood,
                    database_name=database,
                    agent_id=agent,
                    deposit_path=deposit,
                    frequency=frequency,
                    active=True,
                    current_status=status,
                    last_success_at=row[16] if last_success else None,
                    next_deadline=deadline,
                    paused=paused,
                    paused_until=paused_until if paused else None,
                    pause_reason=reason if paused else None,
                    acked_at=acked_at,
                    ack_reason=ack_reason,
                    unchanged=unchanged,
                    instance=instance,
                )
            )
        return views

    def rejected_sites(self, since: datetime) -> list[tuple[str | None, str]]:
        """(company, site) of the REJECTED events since then (`check`: SPEC §11's WARNING)."""
        e = AlertEvent
        query = (
            select(e.company, e.site)
            .where(e.kind == Kind.REJECTED.value, e.created_at >= since)
            .distinct()
        )
        with self.reader.begin() as connection:
            return [(row.company, row.site) for row in connection.execute(query)]

    def history(self, job_id: int, limit: int | None) -> list[BackupEntry]:
        with self.reading() as session:
            query = (
                select(BackupEntry)
                .where(BackupEntry.job_id == job_id)
                .order_by(BackupEntry.cycle.desc(), BackupEntry.id.desc())
            )
            if limit is not None:
                query = query.limit(limit)
            return list(session.scalars(query))

    # ---------------------------------------------------------- retention (SPEC §14)

    def _old_entries(self, cutoff: datetime) -> Any:
        """Entries older than `cutoff`, except each job's newest cycle and a success whose file
        the daemon placed and has not removed (its only record: without it the file could
        never be pruned). Walks the (cycle) index from the oldest end. With an instance set,
        only that instance's jobs: another host keeps its entries by its own `history_days`
        (SPEC §15)."""
        e, j = BackupEntry, ExpectedBackupJob
        newer = aliased(BackupEntry)
        newest_cycle = (
            select(func.max(newer.cycle)).where(newer.job_id == e.job_id).scalar_subquery()
        )
        placed = and_(
            e.final_ino.is_not(None),
            or_(e.final_removal.is_(None), e.final_removal == REMOVAL_CLAIMED),
        )
        query = select(e.id).where(e.cycle < cutoff, e.cycle < newest_cycle, ~placed)
        if self.instance is not None:
            query = query.where(e.job_id.in_(self._own(select(j.id))))
        return query

    def prune_entries(self, cutoff: datetime, batch: int) -> list[int]:
        """Delete one batch of old entries in a short transaction; the ids deleted.

        Several daemons may prune at once: PostgreSQL's SKIP LOCKED lets each take other rows,
        and a row deleted by another is simply not counted (a DELETE's rowcount), so nothing
        is pruned (or logged) twice.
        """
        e = BackupEntry
        candidates = self._old_entries(cutoff).order_by(e.cycle).limit(batch)
        if self.engine.dialect.name != "postgresql":
            # SQLite: found without the write lock, which only the DELETE takes (a worker's
            # commit waits one short DELETE at most); a row another pruner deleted meanwhile
            # is not in RETURNING.
            with self.reader.begin() as connection:
                ids = list(connection.execute(candidates).scalars())
            if not ids:
                return []
        with self.engine.begin() as connection:
            if self.engine.dialect.name == "postgresql":
                found = candidates.with_for_update(skip_locked=True)
                ids = list(connection.execute(found).scalars())
                if not ids:
                    return []
            deleted = connection.execute(delete(e).where(e.id.in_(ids)).returning(e.id)).scalars()
            return list(deleted)

    def count_old_entries(self, cutoff: datetime) -> int:
        return self._count(self._old_entries(cutoff))

    def prune_processed_reports(self, cutoff: datetime, batch: int, dry_run: bool = False) -> int:
        """Forget one batch of old report digests (`processed_at` is indexed); how many."""
        p = ProcessedReport
        old = select(p.sha256).where(p.processed_at < cutoff)
        if dry_run:
            return self._count(old)

        def forget(connection: Any, keys: list[Any]) -> int:
            return int(connection.execute(delete(p).where(p.sha256.in_(keys))).rowcount)

        return self._prune_batch(old.order_by(p.processed_at).limit(batch), forget)

    def prune_alert_events(self, cutoff: datetime, batch: int, dry_run: bool = False) -> int:
        """Delete one batch of alert events older than `cutoff` with their deliveries; how
        many events. An event with a delivery still pending or being sent stays (the outbox
        retries for 24 h). With an instance set, only its own events and those written before
        events had one (SPEC §15)."""
        ev, d = AlertEvent, AlertDelivery
        undone = select(d.id).where(d.event_id == ev.id, d.state.in_(("pending", "sending")))
        old = select(ev.id).where(ev.created_at < cutoff, ~undone.exists())
        if self.instance is not None:
            old = old.where(or_(ev.instance == self.instance, ev.instance.is_(None)))
        if dry_run:
            return self._count(old)

        def remove(connection: Any, ids: list[Any]) -> int:
            connection.execute(delete(d).where(d.event_id.in_(ids)))
            return int(connection.execute(delete(ev).where(ev.id.in_(ids))).rowcount)

        return self._prune_batch(old.order_by(ev.created_at).limit(batch), remove)

    def _count(self, query: Select[Any]) -> int:
        with self.reader.begin() as connection:
            counted = select(func.count()).select_from(query.subquery())
            return int(connection.execute(counted).scalar() or 0)

    def _prune_batch(self, candidates: Select[Any], remove: Callable[[Any, list[Any]], int]) -> int:
        """`remove` the keys `candidates` selects, in one short transaction; how many went.

        Several pruners at once: PostgreSQL's SKIP LOCKED lets each take other rows, and a row
        another deleted is not in the DELETE's rowcount, so nothing is counted twice. SQLite
        looks first without the write lock (as `prune_entries` does): a worker's commit waits
        for one short DELETE at most."""
        if self.engine.dialect.name == "postgresql":
            candidates = candidates.with_for_update(skip_locked=True)
        else:
            with self.reader.begin() as connection:
                if connection.execute(candidates).first() is None:
                    return 0
        with self.engine.begin() as connection:
            keys = list(connection.execute(candidates).scalars())
            return remove(connection, keys) if keys else 0

    def placed_successes(self, job_id: int, stale_claim: datetime) -> list[PlacedEntry]:
        """A job's successes whose file may still be in final storage (the GFS candidates):
        not removed, not found changed or gone, and not claimed by a pruner still at work."""
        e = BackupEntry
        query = (
            select(
                e.id,
                e.cycle,
                e.final_path,
                e.final_dev,
                e.final_ino,
                e.server_size,
                e.final_removal,
            )
            .where(
                e.job_id == job_id,
                e.status == BackupEntryStatus.SUCCESS,
                or_(
                    e.final_removal.is_(None),
                    and_(e.final_removal == REMOVAL_CLAIMED, e.final_removal_at < stale_claim),
                ),
            )
            .order_by(e.cycle, e.id)
        )
        with self.reader.begin() as connection:
            return [
                PlacedEntry(r.id, r.cycle, r.final_path, r.final_dev, r.final_ino, r.server_size)
                for r in connection.execute(query)
            ]

    def claim_removal(self, entry_id: int, now: datetime, stale_claim: datetime) -> bool:
        """SPEC §14: one pruner removes a file, whoever else tries (a conditional UPDATE). A
        claim older than `stale_claim` belongs to a pruner that died: it may be taken over."""
        e = BackupEntry
        with self.engine.begin() as connection:
            claimed = connection.execute(
                update(e)
                .where(
                    e.id == entry_id,
                    or_(
                        e.final_removal.is_(None),
                        and_(e.final_removal == REMOVAL_CLAIMED, e.final_removal_at < stale_claim),
                    ),
                )
                .values(final_removal=REMOVAL_CLAIMED, final_removal_at=now)
            )
            return bool(claimed.rowcount == 1)

    def finish_removal(self, entry_id: int, state: str, now: datetime) -> None:
        e = BackupEntry
        with self.engine.begin() as connection:
            connection.execute(
                update(e)
                .where(e.id == entry_id, e.final_removal == REMOVAL_CLAIMED)
                .values(final_removal=state, final_removal_at=now)
            )

    def deposit_folders(self) -> list[str]:
        """Every job's deposit folder (relative to the deposit root), inactive ones too: their
        `_archive/` and `_rejected/` still grow old."""
        with self.reader.begin() as connection:
            query = select(ExpectedBackupJob.deposit_path).distinct()
            return sorted(connection.execute(query).scalars())


# --------------------------------------------------------------------- values


@dataclasses.dataclass
class SyncResult:
    added: int = 0
    changed: int = 0
    deactivated: int = 0
    schedule_changes: list[ScheduleChange] = dataclasses.field(default_factory=list)
    # SPEC §15: jobs this instance defines but another instance owns (active there): not synced.
    conflicts: list[str] = dataclasses.field(default_factory=list)
    conflict_keys: list[JobKey] = dataclasses.field(default_factory=list)  # a reload asks again
    unchanged: Unchanged = dataclasses.field(default_factory=lambda: Unchanged())


@dataclasses.dataclass
class Unchanged:
    """A full sync's jobs that were active, this instance's and equal to their specs, so left
    as they were: the registry is made of the specs instead of reading the table a second time
    (`pipeline.registry_after_sync`). Parallel arrays: a tuple or a dict entry per job was
    ~20 MiB more at the start's peak."""

    specs: list[AnySpec] = dataclasses.field(default_factory=list)
    ids: array.array[int] = dataclasses.field(default_factory=lambda: array.array("q"))
    previous: dict[int, Any] = dataclasses.field(default_factory=dict)  # by index, when some

    def add(self, spec: AnySpec, job_id: int, previous: Any) -> None:
        if previous is not None:
            self.previous[len(self.specs)] = previous
        self.specs.append(spec)
        self.ids.append(job_id)

    def __len__(self) -> int:
        return len(self.specs)

    def clear(self) -> None:
        """Once the registry is made: the specs stay alive in the reader, not here."""
        self.specs, self.ids, self.previous = [], array.array("q"), {}

    def __iter__(self) -> Iterator[tuple[AnySpec, int, Any]]:
        for index, (spec, job_id) in enumerate(zip(self.specs, self.ids, strict=True)):
            yield spec, job_id, self.previous.get(index)


class InstanceConflict(Exception):
    """SPEC §15: an SQLite database already holds another instance's jobs."""


JobKey = tuple[str, str, str, str]


@dataclasses.dataclass(frozen=True)
class _Owned:
    """A job of another instance, as much as the sync needs to know of it."""

    id: int
    instance: str
    active: bool


@dataclasses.dataclass(frozen=True)
class ScheduleChange:
    """One active job's schedule change, logged once the sync has committed."""

    job: str
    old: Schedule
    changed_at: datetime
    change: Change

    def log(self) -> None:
        """One line per change: what the catch-up still owes, and where counting resumes."""
        first = self.change.first_cycle
        level = log.warning if self.change.owed else log.info
        level(
            "job.schedule_changed",
            job=self.job,
            old=describe(self.old),
            new=describe(self.change.timeline.schedule),
            changed_at=self.changed_at.isoformat(),
            owed=self.change.owed,
            first_cycle=first.isoformat() if first else None,
        )


Successes = dict[int, list[tuple[str | None, int | None]]]  # job id: (SHA-256, size), newest first


@dataclasses.dataclass(frozen=True)
class ReportHistory:
    """`Store.report_history`: committed already, or each job's recent successes."""

    processed: bool
    previous: Successes = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ProcessedReportRecord:
    sha256: str
    site: str
    report_name: str
    outcome: str
    reason: str | None = None

    def row(self, now: datetime) -> dict[str, Any]:
        return {**_shallow(self), "processed_at": now}


def _shallow(item: Any) -> dict[str, Any]:
    """A dataclass's fields as a dict, values as they are: `dataclasses.asdict` deep-copies
    (every entry's `details`), which cost more than its INSERT (BENCHMARKS.md, issue 10)."""
    return {f.name: getattr(item, f.name) for f in dataclasses.fields(item)}


@dataclasses.dataclass(frozen=True)
class NewEntry:
    """An entry the pipeline decided on; `recorded_at` is added by the store."""

    job_id: int
    cycle: datetime
    status: BackupEntryStatus
    message: str
    report_name: str | None = None
    report_sha256: str | None = None
    operation_start_time: datetime | None = None
    operation_timestamp: datetime | None = None
    backup_ok: bool | None = None
    compress_ok: bool | None = None
    transfer_ok: bool | None = None
    agent_sha256: str | None = None
    agent_size: int | None = None
    server_sha256: str | None = None
    server_size: int | None = None
    staged_path: str | None = None
    final_path: str | None = None
    unchanged_since_last_success: bool = False
    details: dict[str, Any] | None = None
    final_dev: int | None = None
    final_ino: int | None = None
    suspicious: bool = False

    def row(self, now: datetime) -> dict[str, Any]:
        return {**_shallow(self), "recorded_at": now}


# The columns a report's INSERTs write, in `rawsql`'s order: the records' fields and the time.
PROCESSED_COLUMNS = (*(f.name for f in dataclasses.fields(ProcessedReportRecord)), "processed_at")
ENTRY_COLUMNS = (*(f.name for f in dataclasses.fields(NewEntry)), "recorded_at")

REMOVAL_CLAIMED = "claimed"  # `final_removal` while one pruner is at work on the file


@dataclasses.dataclass(frozen=True)
class PlacedEntry:
    """A success and the file the daemon placed for it (SPEC §14's GFS candidates)."""

    id: int
    cycle: datetime
    final_path: str | None
    final_dev: int | None
    final_ino: int | None
    size: int | None


@dataclasses.dataclass(frozen=True)
class JobView:
    id: int
    company_name: str
    city: str
    neighborhood: str
    database_name: str
    agent_id: str
    deposit_path: str
    frequency: BackupFrequency
    active: bool
    current_status: JobStatus
    last_success_at: datetime | None
    next_deadline: datetime | None
    paused_until: datetime | None = None  # set while paused (None with `paused`: until resumed)
    paused: bool = False
    pause_reason: str | None = None
    acked_at: datetime | None = None
    ack_reason: str | None = None
    unchanged: bool = False  # the newest entry is a success with the previous one's SHA-256
    instance: str | None = None  # SPEC §15: the daemon instance the job belongs to
    suspicious: bool = False  # the newest entry is a success much smaller than usual (§13)

    def as_json(self) -> dict[str, Any]:
        """SPEC §8's `status --json` row: what the daemon sends and the control tool prints."""
        from backupwatch.timeutil import format_z

        return {
            "id": self.id,
            "company_name": self.company_name,
            "city": self.city,
            "neighborhood": self.neighborhood,
            "database_name": self.database_name,
            "frequency": self.frequency.value,
            "active": self.active,
            "current_status": self.current_status.value,
            "last_success_at": format_z(self.last_success_at),
            "next_deadline": format_z(self.next_deadline),
            "paused": self.paused,
            "paused_until": format_z(self.paused_until),
            "pause_reason": self.pause_reason,
            "acked_at": format_z(self.acked_at),
            "ack_reason": self.ack_reason,
            "unchanged": self.unchanged,
            "instance": self.instance,
            "suspicious": self.suspicious,
        }


# ------------------------------------------------------------------- alerts


@dataclasses.dataclass(frozen=True)
class Pause:
    """SPEC §11: a job paused from `since` until `until` (None: until resumed)."""

    since: datetime | None
    until: datetime | None

    def covers(self, instant: datetime) -> bool:
        if self.since is None or instant < self.since:
            return False
        return self.until is None or instant < self.until


@dataclasses.dataclass(frozen=True)
class _Latest:
    """A job's newest entry by `current_status`'s order: what its status is."""

    cycle: datetime
    status: BackupEntryStatus
    message: str

    @property
    def job_status(self) -> JobStatus:
        return JobStatus.from_entry(self.status)


@dataclasses.dataclass(frozen=True)
class _JobRow:
    id: int
    company: str
    site: str
    label: str
    agent_id: str
    channels: list[str] | None
    pause: Pause
    acked: bool
    instance: str | None


def _all_of(parts: Sequence[Any]) -> Any:
    """One statement for several `LIMIT 1` seeks: a UNION ALL of them, each as a subquery
    (SQLite allows no LIMIT inside a compound SELECT's members)."""
    wrapped = [select(part.subquery()) for part in parts]
    return wrapped[0] if len(wrapped) == 1 else union_all(*wrapped)


def _latest(connection: Any, job_id: int) -> _Latest | None:
    e = BackupEntry
    row = connection.execute(
        select(e.cycle, e.status, e.message)
        .where(e.job_id == job_id)
        .order_by(*_newest_order())
        .limit(1)
    ).first()
    return None if row is None else _Latest(row.cycle, row.status, row.message)


def _streak_starts(connection: Any, job_ids: Sequence[int]) -> dict[int, datetime]:
    """Per job, since when it is not OK: the first cycle of the not-OK streak that reaches its
    newest entry (absent: no such entry). One statement of a constant shape, a few index seeks
    per job: the newest cycle, the last success before it, the first not-OK cycle after that."""
    if not job_ids:
        return {}
    rows = connection.execute(_streak_statement(), {"ids": list(job_ids)})
    return {row.id: row.since for row in rows if row.since is not None}


@functools.cache
def _streak_statement() -> Any:
    """`_streak_starts`' statement, built once (the job ids: one expanding parameter)."""
    e, j = aliased(BackupEntry), ExpectedBackupJob
    success = BackupEntryStatus.SUCCESS
    newest = select(func.max(e.cycle)).where(e.job_id == j.id).correlate(j).scalar_subquery()
    ok, streak = aliased(BackupEntry), aliased(BackupEntry)
    last_ok = (
        select(func.max(ok.cycle))
        .where(ok.job_id == j.id, ok.status == success, ok.cycle < newest)
        .correlate(j)
        .scalar_subquery()
    )
    since = (
        select(func.min(streak.cycle))
        .where(
            streak.job_id == j.id,
            streak.status != success,
            or_(last_ok.is_(None), streak.cycle > last_ok),
        )
        .correlate(j)
        .scalar_subquery()
    )
    return select(j.id, since.label("since")).where(j.id.in_(bindparam("ids", expanding=True)))


@dataclasses.dataclass(frozen=True)
class _Plan:
    """One job of a timer page: as the step read it, where its cursor was, what to settle."""

    job: DueJob
    start: datetime
    plan: Settlement

    def unchanged(self, row: Any) -> bool:
        """The compare-and-swap's condition, checked on the locked row: the cursor is where
        the step read it, and no sync changed the schedule or the owed eras it planned from
        (a sync may leave the cursor on the same instant; `updated_at` and
        `schedule_changed_at` catch that)."""
        job = self.job
        return bool(
            row.active
            and row.next_cycle_at == self.start
            and row.schedule_changed_at == job.schedule_changed_at
            and row.updated_at == job.updated_at
        )


@dataclasses.dataclass(frozen=True)
class _Missing:
    """A due cycle to flag MISSING unless it has an entry."""

    job: DueJob
    due: Due
    now: datetime

    def row(self) -> dict[str, Any]:
        return {
            "job_id": self.job.id,
            "cycle": self.due.cycle,
            "status": BackupEntryStatus.MISSING.value,
            "message": self.due.message(self.job.agent_id),
            "recorded_at": self.now,
            "unchanged_since_last_success": False,
        }


def _move_cursors(connection: Any, plans: Mapping[int, _Plan]) -> list[int]:
    """The timer's compare-and-swap for a page: lock the rows (in id order, as every writer
    does), keep the jobs that are as the step read them, move their cursors; their ids.

    On PostgreSQL a row another transaction holds is skipped, not waited for: another daemon
    of this instance settling the same page, or a report being recorded for the job. The job
    stays due, so the timer's next pass (at once: its deadline has passed) sees what that
    transaction committed; two daemons of one instance share a wave instead of queueing.
    """
    rows = connection.execute(_LOCK_CURSORS, {"ids": sorted(plans)}).all()
    moved = [row.id for row in rows if plans[row.id].unchanged(row)]
    # Jobs of one schedule move to the same cursor: one UPDATE per cursor (a wave: one).
    by_cursor: dict[Cursor, list[int]] = {}
    for job_id in moved:
        by_cursor.setdefault(plans[job_id].plan.cursor, []).append(job_id)
    for cursor, ids in by_cursor.items():
        values = {"ids": ids, "cycle": cursor.cycle, "deadline": cursor.deadline}
        connection.execute(_MOVE_CURSORS, values)
    return moved


def _paused(row: _JobRow, job: DueJob, due: Due, now: datetime) -> bool:
    """Paused now: nothing is flagged; resumed: the cycles the pause covered stay unexpected
    (the cursor moves past them either way)."""
    if row.pause.covers(now) or row.pause.covers(due.deadline):
        log.info("timer.paused", job=job.label, cycle=due.cycle.isoformat())
        return True
    return False


@dataclasses.dataclass(frozen=True)
class _Outgoing:
    """An alert event's row and the channels it fans out to."""

    event: dict[str, Any]
    targets: Sequence[str]


def _emit(connection: Any, event: dict[str, Any], targets: Sequence[str], now: datetime) -> bool:
    """Insert the event unless its key exists, and one delivery per target channel."""
    return _emit_many(connection, [_Outgoing(event, targets)], now) == 1


def _emit_many(connection: Any, outgoing: Sequence[_Outgoing], now: datetime) -> int:
    """`_emit` of several events in two statements; how many were new."""
    if not outgoing:
        return 0
    statement = _event_insert(connection.dialect.name)
    written = {key: id_ for id_, key in connection.execute(statement, [o.event for o in outgoing])}
    rows = [
        {
            "event_id": written[o.event["dedupe_key"]],
            "channel": channel,
            "state": "pending",
            "attempts": 0,
            "next_attempt_at": now,
        }
        for o in outgoing
        if o.event["dedupe_key"] in written
        for channel in o.targets
    ]
    if rows:
        connection.execute(_INSERT_DELIVERY, rows)
    return len(written)


class _Changes:
    """The jobs a transaction is about to change: their rows locked first (PostgreSQL; SQLite's
    BEGIN IMMEDIATE locks everything), then their state read, so that two transactions on one
    job (two workers, the timer, a pause or an ack from backupwatchctl) see each other whole.
    """

    def __init__(self, store: Store, connection: Any, job_ids: Sequence[int]) -> None:
        self.store = store
        self.connection = connection
        rows = connection.execute(_LOCK_JOBS, {"ids": list(job_ids)}).all()
        self.jobs = {
            r.id: _JobRow(
                id=r.id,
                company=r.company_name,
                site=f"{r.company_name}/{r.city}/{r.neighborhood}",
                label=f"{r.company_name}/{r.city}/{r.neighborhood}/{r.database_name}",
                agent_id=r.agent_id,
                channels=r.alert_channels,
                pause=Pause(r.paused_at, r.paused_until),
                acked=r.acked_at is not None,
                instance=r.instance,
            )
            for r in rows
        }
        found = _newest_of(connection, list(self.jobs))
        self.before = {job_id: found.get(job_id) for job_id in self.jobs}

    def report_events(self, entries: Sequence[NewEntry], now: datetime) -> None:
        """The events of the entries just inserted; their jobs' rows are locked since
        `__init__`, so each job's newest entry is now `before` or its new entry (`_newer`)."""
        after = dict(self.before)
        for entry in entries:
            if entry.job_id in after:
                after[entry.job_id] = _newer(after[entry.job_id], entry)
        self._transitions({j: latest for j, latest in after.items() if latest is not None}, now)
        for entry in entries:
            if entry.job_id not in self.jobs:
                continue
            ok = _Latest(entry.cycle, BackupEntryStatus.SUCCESS, entry.message)
            job = self.jobs[entry.job_id]
            if entry.unchanged_since_last_success:
                self._event(job, Kind.UNCHANGED, ok, now)
            if entry.suspicious:
                # SPEC §13: the size anomaly, in the transaction that records the entry.
                self._event(job, Kind.SUSPICIOUS, ok, now)

    def missing_events(self, job_ids: Sequence[int], now: datetime) -> None:
        """The events of jobs the timer flagged: from their newest entries, read once."""
        found = _newest_of(self.connection, job_ids)
        self._transitions({job_id: found[job_id] for job_id in job_ids if job_id in found}, now)

    def _transitions(self, after: Mapping[int, _Latest], now: datetime) -> None:
        """Each job's status change since `before`: its acknowledgement cleared, its event
        written (with the start of its not-OK streak), a few statements for all of them."""
        moves: dict[int, tuple[Kind, _Latest]] = {}
        cleared: list[int] = []
        for job_id, latest in after.items():
            before = self.before[job_id]
            old = before.job_status if before else JobStatus.UNKNOWN
            if old is not latest.job_status and self.jobs[job_id].acked:
                cleared.append(job_id)
            kind = transition(old, latest.job_status)
            if kind is not None and not self.jobs[job_id].pause.covers(now):
                moves[job_id] = (kind, latest)
        if cleared:
            self.connection.execute(_CLEAR_ACKS, {"ids": cleared})
        since = _streak_starts(self.connection, list(moves))
        events = [
            self._event_row(self.jobs[job_id], kind, latest, since.get(job_id), now)
            for job_id, (kind, latest) in moves.items()
        ]
        _emit_many(self.connection, events, now)

    def _event(self, job: _JobRow, kind: Kind, about: _Latest, now: datetime) -> None:
        if job.pause.covers(now):
            return  # SPEC §10: a paused job sends nothing (its entries are still recorded)
        _emit_many(self.connection, [self._event_row(job, kind, about, None, now)], now)

    def _event_row(
        self, job: _JobRow, kind: Kind, about: _Latest, since: datetime | None, now: datetime
    ) -> _Outgoing:
        """The event of `kind` about the entry `about` (its cycle, status and message)."""
        event = {
            "dedupe_key": job_event_key(job.id, kind, about.cycle),
            "kind": kind.value,
            "job_id": job.id,
            "company": job.company,
            "site": job.site,
            "job_label": job.label,
            "agent_id": job.agent_id,
            "status": about.job_status.value,
            "cycle": about.cycle,
            "since": since,
            "message": about.message,
            "created_at": now,
            "instance": job.instance,
        }
        return _Outgoing(event, self.store.routing.targets(kind, job.channels))


# --------------------------------------------------------- the report's statements
# Built once and reused: SQLAlchemy memoizes a statement object's cache key and result
# columns, so each report pays for running these, not for building and matching them again
# (BENCHMARKS.md, issue 10's burst: building them was a third of the daemon's CPU).


def _newer(before: _Latest | None, entry: NewEntry) -> _Latest:
    """A job's newest entry (`_latest`'s order: cycle, then not MISSING, then id) once `entry`
    is inserted after `before`: the new row has the highest id, so it wins every tie."""
    new = _Latest(entry.cycle, entry.status, entry.message)
    if before is None:
        return new
    missing = BackupEntryStatus.MISSING
    if (new.cycle, new.status is not missing) >= (before.cycle, before.status is not missing):
        return new
    return before


def _recent_successes(connection: Any, job_ids: Sequence[int], limit: int) -> Successes:
    unique = list(dict.fromkeys(job_ids))
    found: Successes = {j: [] for j in job_ids}
    rows = []
    for start in range(0, len(unique), SUCCESSES_CHUNK):
        chunk = unique[start : start + SUCCESSES_CHUNK]
        # Padded to a power of two with ids no job has: a group's varying number of jobs
        # shares a few compiled statements instead of one per count.
        size = 1 << (len(chunk) - 1).bit_length()
        chunk += [-1] * (size - len(chunk))
        rows += connection.execute(_successes_statement(size, limit), _ids(chunk)).all()
    for row in sorted(rows, key=lambda r: (r.cycle, r.id), reverse=True):
        found[row.job_id].append((row.server_sha256, row.server_size))
    return found


def _ids(job_ids: Sequence[int]) -> dict[str, int]:
    return {f"job_{i}": job_id for i, job_id in enumerate(job_ids)}


@functools.cache
def _newest_statement(dialect: str) -> Any:
    """`_newest_of`'s statement, built once per dialect: the job ids are one expanding
    parameter, so any number of jobs shares it.

    PostgreSQL: a LATERAL subquery, one index seek per job by construction. The form that
    SQLite runs (the newest entries' ids by a correlated subquery, then `id IN` them) let
    PostgreSQL's planner hash-join a sequential scan of the whole history when its
    statistics were stale: 100 ms a timer page at 80,000 entries, half of a wave's server
    time (BENCHMARKS.md, issue 10)."""
    e, j = BackupEntry, ExpectedBackupJob
    ids = j.id.in_(bindparam("ids", expanding=True))
    if dialect == "postgresql":
        newest = (
            select(e.cycle, e.status, e.message)
            .where(e.job_id == j.id)
            .order_by(*_newest_order())
            .limit(1)
            .correlate(j)
            .lateral("newest")
        )
        columns = (newest.c.cycle, newest.c.status, newest.c.message)
        return select(j.id.label("job_id"), *columns).select_from(j).join(newest, true()).where(ids)
    newest_id = select(_newest_entry_value(e.id)).where(ids).scalar_subquery()
    return select(e.job_id, e.cycle, e.status, e.message).where(e.id.in_(newest_id))


def _newest_of(connection: Any, job_ids: Sequence[int]) -> dict[int, _Latest]:
    """`_latest` of several jobs in one statement."""
    if not job_ids:
        return {}
    statement = _newest_statement(connection.dialect.name)
    rows = connection.execute(statement, {"ids": list(job_ids)})
    return {row.job_id: _Latest(row.cycle, row.status, row.message) for row in rows}


@functools.cache
def _successes_statement(count: int, limit: int) -> Any:
    """`Store.recent_successes`'s UNION ALL for `count` jobs (parameters job_0, job_1...)."""
    e = BackupEntry
    return _all_of(
        [
            select(e.job_id, e.server_sha256, e.server_size, e.cycle, e.id)
            .where(e.job_id == bindparam(f"job_{i}"), e.status == BackupEntryStatus.SUCCESS)
            .order_by(e.cycle.desc(), e.id.desc())
            .limit(limit)
            for i in range(count)
        ]
    )


@functools.cache
def _processed_insert(dialect: str) -> Any:
    """The idempotency rows' INSERT ... ON CONFLICT DO NOTHING RETURNING the keys inserted, its
    values given at execution (one row or many: SQLAlchemy's "insertmanyvalues")."""
    module = postgresql if dialect == "postgresql" else sqlite
    table = ProcessedReport.__table__
    return module.insert(table).on_conflict_do_nothing().returning(table.c.sha256)


_INSERT_ENTRY = insert(BackupEntry)
_INSERT_DELIVERY = insert(AlertDelivery)


@functools.cache
def _missing_insert(dialect: str) -> Any:
    """The MISSING entries' INSERT ... ON CONFLICT DO NOTHING RETURNING what was inserted."""
    table = BackupEntry.__table__
    module = postgresql if dialect == "postgresql" else sqlite
    statement = module.insert(table).on_conflict_do_nothing()
    return statement.returning(table.c.job_id, table.c.cycle)


@functools.cache
def _event_insert(dialect: str) -> Any:
    """The alert events' INSERT ... ON CONFLICT DO NOTHING RETURNING their ids and keys."""
    table = AlertEvent.__table__
    module = postgresql if dialect == "postgresql" else sqlite
    return module.insert(table).on_conflict_do_nothing().returning(table.c.id, table.c.dedupe_key)


_PROCESSED = select(ProcessedReport.sha256).where(ProcessedReport.sha256 == bindparam("sha256"))
_PROCESSED_ANY = select(ProcessedReport.sha256).where(
    ProcessedReport.sha256.in_(bindparam("shas", expanding=True))
)

_j = ExpectedBackupJob
# FOR NO KEY UPDATE: what the cursor's UPDATE takes too; it does not block the foreign-key
# checks (FOR KEY SHARE) of entries inserted for the job meanwhile. In id order: no deadlock.
_LOCK_JOBS = (
    select(
        _j.id,
        _j.company_name,
        _j.city,
        _j.neighborhood,
        _j.database_name,
        _j.agent_id,
        _j.alert_channels,
        _j.paused_at,
        _j.paused_until,
        _j.acked_at,
        _j.instance,
    )
    .where(_j.id.in_(bindparam("ids", expanding=True)))
    .order_by(_j.id)
    .with_for_update(key_share=True)
)

# The timer's statements (`settle_jobs`), built once like the report's.
_LOCK_CURSORS = (
    select(_j.id, _j.active, _j.next_cycle_at, _j.schedule_changed_at, _j.updated_at)
    .where(_j.id.in_(bindparam("ids", expanding=True)))
    .order_by(_j.id)
    .with_for_update(key_share=True, skip_locked=True)
)
_MOVE_CURSORS = (
    update(ExpectedBackupJob)
    .where(ExpectedBackupJob.id.in_(bindparam("ids", expanding=True)))
    .values(
        next_cycle_at=bindparam("cycle", type_=UTCDateTime),
        next_deadline_at=bindparam("deadline", type_=UTCDateTime),
        previous_schedules=None,
        schedule_changed_at=None,
    )
)
_CLEAR_ACKS = (
    update(ExpectedBackupJob)
    .where(ExpectedBackupJob.id.in_(bindparam("ids", expanding=True)))
    .values(acked_at=None, ack_reason=None)
)
_ENTRIES_IN_SPAN = select(BackupEntry.job_id, BackupEntry.cycle).where(
    BackupEntry.job_id.in_(bindparam("ids", expanding=True)),
    BackupEntry.cycle >= bindparam("first"),
    BackupEntry.cycle <= bindparam("last"),
)

_DUE_COLUMNS = (
    _j.id,
    _j.company_name,
    _j.city,
    _j.neighborhood,
    _j.database_name,
    _j.agent_id,
    _j.deposit_path,
    _j.instance,
    _j.frequency,
    _j.expected_hour_utc,
    _j.expected_minute_utc,
    _j.days_of_week,
    _j.day_of_month,
    _j.expected_date,
    _j.window_minutes,
    _j.activated_at,
    _j.previous_schedules,
    _j.schedule_changed_at,
    _j.next_cycle_at,
    _j.next_deadline_at,
    _j.updated_at,
)


@functools.cache
def _due_statement(after: bool, own: bool) -> Any:
    """`Store.due_jobs`' page: after a (deadline, id) key or from the first, of this
    instance's jobs or of all; the partial index (instance, next_deadline_at, id) WHERE
    active serves it as a range scan (migration 0010)."""
    query = select(*_DUE_COLUMNS).where(
        _j.active.is_(True), _j.next_deadline_at <= bindparam("now", type_=UTCDateTime)
    )
    if after:
        key = tuple_(
            bindparam("after_deadline", type_=UTCDateTime), bindparam("after_id", type_=Integer)
        )
        query = query.where(tuple_(_j.next_deadline_at, _j.id) > key)
    if own:
        query = query.where(_j.instance == bindparam("instance"))
    return query.order_by(_j.next_deadline_at, _j.id).limit(bindparam("limit", type_=Integer))


# -------------------------------------------------------------------- helpers


SCOPE_BATCH = 500  # job keys per `IN` of a partial sync's queries


def _scoped(query: Any, scope: Sequence[JobKey] | None) -> Iterator[Any]:
    """`query`, or its parts narrowed to the keys of `scope`, a batch of keys at a time."""
    if scope is None:
        yield query
        return
    j = ExpectedBackupJob
    key = tuple_(j.company_name, j.city, j.neighborhood, j.database_name)
    for start in range(0, len(scope), SCOPE_BATCH):
        yield query.where(key.in_(scope[start : start + SCOPE_BATCH]))


def job_key(job: ExpectedBackupJob) -> tuple[str, str, str, str]:
    return (job.company_name, job.city, job.neighborhood, job.database_name)


def _job_order() -> tuple[Any, ...]:
    j = ExpectedBackupJob
    return (j.company_name, j.city, j.neighborhood, j.database_name)


SCHEDULE_COLUMNS = (
    "frequency",
    "expected_hour_utc",
    "expected_minute_utc",
    "days_of_week",
    "day_of_month",
    "expected_date",
    "window_minutes",
)


def _spec_columns(spec: AnySpec, default_window_minutes: int) -> dict[str, Any]:
    columns = dict(zip(FINGERPRINTED, _config_values(spec, default_window_minutes), strict=True))
    channels = columns["alert_channels"]
    columns["alert_channels"] = list(channels) if channels else None
    columns["config_source"] = spec.source
    return columns


def _config_values(spec: AnySpec, default_window_minutes: int) -> tuple[Any, ...]:
    """The configured columns but the source, in `FINGERPRINTED` order (the channels as a
    tuple: what `_fingerprint` hashes)."""
    days = None
    if spec.days_of_week is not None:
        days = ",".join(str(d) for d in sorted(spec.days_of_week))
    # A record's deposit path was rendered once, when its file was read.
    deposit = spec.deposit_path if isinstance(spec, JobRecord) else str(spec.deposit_relpath)
    return (
        spec.frequency,
        spec.expected_hour_utc,
        spec.expected_minute_utc,
        days,
        spec.day_of_month,
        spec.expected_date,
        spec.collection_window_minutes,
        spec.collection_window_minutes or default_window_minutes,
        spec.agent_id,
        deposit,
        spec.agent_deposit_path_template,
        spec.final_storage_path_template,
        spec.alert_channels or None,
        spec.archive_test,
        spec.keep_daily,
        spec.keep_weekly,
        spec.keep_monthly,
    )


SPEC_COLUMNS = (
    "frequency",
    "expected_hour_utc",
    "expected_minute_utc",
    "days_of_week",
    "day_of_month",
    "expected_date",
    "collection_window_minutes",
    "window_minutes",
    "agent_id",
    "deposit_path",
    "agent_deposit_path_template",
    "final_storage_path_template",
    "alert_channels",
    "archive_test",
    "keep_daily",
    "keep_weekly",
    "keep_monthly",
    "config_source",
)  # every key of `_spec_columns`: a column left out here is never synced once a job exists
SYNC_BATCH = 1000  # rows per INSERT / UPDATE batch and per batch of changed jobs loaded


FINGERPRINTED = SPEC_COLUMNS[:-1]  # all but config_source: a moved job is the same job
_CHANNELS_AT = FINGERPRINTED.index("alert_channels")


def _fingerprint(active: bool, values: tuple[Any, ...]) -> int:
    """What the sync compares a configured job by: whether it is active and every configured
    column but its source (`FINGERPRINTED` order), as Python's 64-bit hash. It is compared
    within one sync and never stored, and it only decides which jobs to load and compare
    column by column (`_apply_spec`); two different configurations hashing alike (2**-64)
    would leave one job's edit unsynced until its next change. The same values give the same
    hash on both sides: enums, dates and JSON lists come back from the database as the spec
    gives them (the channels list made a tuple)."""
    channels = values[_CHANNELS_AT]
    if channels is not None and not isinstance(channels, tuple):
        values = (*values[:_CHANNELS_AT], tuple(channels), *values[_CHANNELS_AT + 1 :])
    return hash((active, values))


@dataclasses.dataclass(frozen=True, slots=True)
class _Known:
    id: int
    fingerprint: int
    source: str | None
    active: bool
    previous: Any  # the previous schedules, decoded JSON (None: none)


_RAW_CHANNELS_AT = 8 + FINGERPRINTED.index("alert_channels")  # in `_known_jobs`' rows


def _raw_json(column: Any) -> Any:
    """A JSON column as its text (PostgreSQL's driver would decode it): most rows hold
    `null`, and the JSON type decodes each."""
    return cast(column, Text)


def _json_of(text: str | None) -> Any:
    """What the JSON type would have made of a column's text."""
    return None if text is None or text == "null" else json.loads(text)


class _SyncBatch:
    """The sync's pending writes, flushed every SYNC_BATCH: Core inserts of new jobs,
    executemany updates of moved sources, and changed jobs loaded as ORM objects (the
    schedule-change logic needs them) a batch at a time, then let go."""

    def __init__(self, session: Session, now: datetime, result: SyncResult) -> None:
        self.session, self.now, self.result = session, now, result
        self.new: list[dict[str, Any]] = []
        self.changed: dict[int, tuple[bool, dict[str, Any]]] = {}
        self.moved: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        self.new.append(row)
        self.result.added += 1
        if len(self.new) >= SYNC_BATCH:
            self._insert()

    def change(self, job_id: int, active: bool, columns: dict[str, Any]) -> None:
        self.changed[job_id] = (active, columns)
        if len(self.changed) >= SYNC_BATCH:
            self._apply()

    def move(self, job_id: int, source: str) -> None:
        self.moved.append({"id": job_id, "config_source": source})
        if len(self.moved) >= SYNC_BATCH:
            self._move()

    def flush(self) -> None:
        self._insert()
        self._apply()
        self._move()

    def _insert(self) -> None:
        if self.new:
            self.session.execute(insert(ExpectedBackupJob), self.new)
            self.new = []

    def _apply(self) -> None:
        if not self.changed:
            return
        j = ExpectedBackupJob
        jobs = self.session.scalars(select(j).where(j.id.in_(list(self.changed))))
        for job in jobs:
            active, columns = self.changed[job.id]
            if _apply_spec(job, active, columns, self.now, self.result.schedule_changes):
                self.result.changed += 1
        self.session.flush()
        self.session.expunge_all()
        self.changed = {}

    def _move(self) -> None:
        if self.moved:  # an ORM bulk UPDATE by primary key: one executemany
            self.session.execute(update(ExpectedBackupJob), self.moved)
            self.moved = []


def _new_row(
    spec: AnySpec, columns: dict[str, Any], now: datetime, instance: str | None
) -> dict[str, Any]:
    """A new job as the row an insert takes: `_new_job`'s values without an ORM object."""
    cursor = Cursor(None, None)
    if spec.active:
        cursor = fresh_cursor(Timeline(schedule_of(columns), now), now)
    return {
        **columns,
        "company_name": spec.company_name,
        "city": spec.city,
        "neighborhood": spec.neighborhood,
        "database_name": spec.database_name,
        "active": spec.active,
        "activated_at": now,
        "deactivated_at": None if spec.active else now,
        "created_at": now,
        "updated_at": now,
        "next_cycle_at": cursor.cycle,
        "next_deadline_at": cursor.deadline,
        "previous_schedules": None,
        "schedule_changed_at": None,
        "instance": instance,
    }


def schedule_of(columns: Mapping[str, Any]) -> Schedule:
    """`ExpectedBackupJob.schedule` from its columns (`_spec_columns`, or a row's mapping):
    `_schedule_of` for what holds them as keys."""
    return _schedule(
        columns["frequency"],
        columns["expected_hour_utc"],
        columns["expected_minute_utc"],
        columns["days_of_week"],
        columns["day_of_month"],
        columns["expected_date"],
        columns["window_minutes"],
    )


def _deactivate_ids(session: Session, ids: Sequence[int], now: datetime) -> None:
    """`_deactivate` for a batch of jobs by id, in one UPDATE."""
    session.execute(
        update(ExpectedBackupJob)
        .where(ExpectedBackupJob.id.in_(list(ids)))
        .values(
            active=False,
            deactivated_at=now,
            next_cycle_at=None,
            next_deadline_at=None,
            previous_schedules=None,
            schedule_changed_at=None,
        )
    )


def _new_job(spec: AnySpec, columns: dict[str, Any], now: datetime) -> ExpectedBackupJob:
    job = ExpectedBackupJob(
        company_name=spec.company_name,
        city=spec.city,
        neighborhood=spec.neighborhood,
        database_name=spec.database_name,
        active=spec.active,
        activated_at=now,
        created_at=now,
        updated_at=now,
        **columns,
    )
    _start_fresh(job, now) if spec.active else _deactivate(job, now)
    return job


def _apply_spec(
    job: ExpectedBackupJob,
    active: bool,
    columns: dict[str, Any],
    now: datetime,
    schedule_changes: list[ScheduleChange],
) -> bool:
    """Update `job` from its configured columns; True when anything changed. History is kept."""
    changed = {k for k, v in columns.items() if k != "config_source" and getattr(job, k) != v}
    reactivated = active and not job.active
    if not changed and active == job.active:
        job.config_source = columns["config_source"]
        return False
    old, cursor = job.timeline, job.next_cycle_at
    for key, value in columns.items():
        setattr(job, key, value)
    job.updated_at = now
    if not active:
        _deactivate(job, now)
    elif reactivated:
        job.active, job.activated_at, job.deactivated_at = True, now, None
        _start_fresh(job, now)
    elif changed & set(SCHEDULE_COLUMNS):
        change = change_schedule(old, cursor, job.schedule, now)
        _set_cursor(job, change.cursor, change.timeline)
        schedule_changes.append(ScheduleChange(job.label, old.schedule, now, change))
    # A change of agent or paths alone counts as a change but keeps the timer's cursor.
    return True


def _deactivate(job: ExpectedBackupJob, now: datetime) -> None:
    """Inactive: never MISSING again (SPEC §2), so nothing is owed either."""
    job.active = False
    job.deactivated_at = now
    _set_cursor(job, Cursor(None, None))


def _start_fresh(job: ExpectedBackupJob, now: datetime) -> None:
    """A job added or reactivated at `now`: its first deadline ahead, nothing owed."""
    _set_cursor(job, fresh_cursor(Timeline(job.schedule, job.activated_at), now))


def _set_cursor(job: ExpectedBackupJob, cursor: Cursor, timeline: Timeline | None = None) -> None:
    """Write the timer's cursor and what is still owed (the eras of `timeline`; by default none)."""
    job.next_cycle_at, job.next_deadline_at = cursor.cycle, cursor.deadline
    job.previous_schedules = eras_to_json(timeline.previous) if timeline else None
    job.schedule_changed_at = timeline.changed_at if timeline else None


def _current_status() -> Any:
    """The newest cycle's status, one index seek per job (not a pass over all history).

    Within one cycle a real outcome outranks MISSING: a report processed just after the timer
    flagged its cycle must not leave the job looking MISSING.
    """
    return _newest_entry_value(BackupEntry.status)


# `_current_grade`'s numbers: the newest entry's status, and whether it is an unchanged success.
GRADES: dict[int, tuple[BackupEntryStatus, bool]] = {
    n: (status, unchanged)
    for n, (status, unchanged) in enumerate(
        [(BackupEntryStatus.SUCCESS, False), (BackupEntryStatus.SUCCESS, True)]
        + [(status, False) for status in BackupEntryStatus if status != BackupEntryStatus.SUCCESS]
    )
}


# `job_states`: a grade as the job's current status (None: the job has no entry yet).
_STATES: dict[int, tuple[JobStatus, bool]] = {
    n: (JobStatus.from_entry(status), unchanged) for n, (status, unchanged) in GRADES.items()
}
_NO_STATE = (JobStatus.UNKNOWN, False)


def _current_grade() -> Any:
    """`_current_status` and `_latest_unchanged` in one index seek per job (`GRADES`)."""
    e, j = BackupEntry, ExpectedBackupJob
    not_missing = (e.status != BackupEntryStatus.MISSING).desc()
    grade = case(
        *[
            (
                and_(e.status == status, e.unchanged_since_last_success == unchanged),
                n,
            )
            for n, (status, unchanged) in GRADES.items()
            if status == BackupEntryStatus.SUCCESS
        ],
        *[(e.status == status, n) for n, (status, _) in GRADES.items() if n >= 2],
        else_=0,
    )
    return (
        select(grade)
        .where(e.job_id == j.id)
        .order_by(e.cycle.desc(), not_missing, e.id.desc())
        .limit(1)
        .correlate(j)
        .scalar_subquery()
    )


def _latest_unchanged() -> Any:
    """Whether the newest entry (by `_current_status`'s order) is an unchanged success."""
    return _newest_entry_value(BackupEntry.unchanged_since_last_success)


def _newest_order() -> tuple[Any, ...]:
    """A job's entries newest first: by cycle, a real outcome before MISSING, then by id."""
    e = BackupEntry
    return (e.cycle.desc(), (e.status != BackupEntryStatus.MISSING).desc(), e.id.desc())


def _newest_entry_value(column: Any) -> Any:
    """`column` of the job's newest entry by `_current_status`'s order: one index seek per job."""
    e, j = BackupEntry, ExpectedBackupJob
    return (
        select(column)
        .where(e.job_id == j.id)
        .order_by(*_newest_order())
        .limit(1)
        .correlate(j)
        .scalar_subquery()
    )


def _last_success() -> Any:
    """The agent's time of the newest successful backup, also one index seek per job."""
    e, j = BackupEntry, ExpectedBackupJob
    return (
        select(e.operation_timestamp)
        .where(e.job_id == j.id, e.status == BackupEntryStatus.SUCCESS)
        .order_by(e.cycle.desc(), e.id.desc())
        .limit(1)
        .correlate(j)
        .scalar_subquery()
    )


def _latest_suspicious() -> Any:
    """Whether the newest entry (by `_current_status`'s order) is a SUSPICIOUS success (§13)."""
    return _newest_entry_value(BackupEntry.suspicious)


class _ViewRow(NamedTuple):
    """`Store.job_views`' row: the job's columns, then four of its entries' values (one index
    seek each). A named tuple because its attributes are read at C speed: by name on
    SQLAlchemy's Row they were a third of `status`' time at 100,000 jobs."""

    id: int
    company_name: str
    city: str
    neighborhood: str
    database_name: str
    agent_id: str
    deposit_path: str
    active: bool
    activated_at: datetime
    frequency: BackupFrequency
    expected_hour_utc: int | None
    expected_minute_utc: int
    days_of_week: str | None
    day_of_month: int | None
    expected_date: date | None
    window_minutes: int
    paused_at: datetime | None
    paused_until: datetime | None
    pause_reason: str | None
    acked_at: datetime | None
    ack_reason: str | None
    instance: str | None
    latest: BackupEntryStatus | None
    success: datetime | None
    unchanged: bool | None
    suspicious: bool | None


@functools.cache
def _view_columns() -> tuple[Any, ...]:
    """`_ViewRow`'s columns, in its order."""
    entry_values = {
        "latest": _current_status,
        "success": _last_success,
        "unchanged": _latest_unchanged,
        "suspicious": _latest_suspicious,
    }
    return tuple(
        entry_values[name]().label(name)
        if name in entry_values
        else getattr(ExpectedBackupJob, name)
        for name in _ViewRow._fields
    )


def _job_view(row: _ViewRow, now: datetime) -> JobView:
    """A job's row as `status` shows it."""
    from backupwatch.schedule import next_deadline

    schedule = _schedule_of(row) if row.active else None
    upcoming = next_deadline(schedule, now, row.activated_at) if schedule else None
    paused = row.paused_at is not None and Pause(row.paused_at, row.paused_until).covers(now)
    return JobView(
        id=row.id,
        company_name=row.company_name,
        city=row.city,
        neighborhood=row.neighborhood,
        database_name=row.database_name,
        agent_id=row.agent_id,
        deposit_path=row.deposit_path,
        frequency=row.frequency,
        active=row.active,
        current_status=JobStatus.from_entry(row.latest),
        last_success_at=row.success,
        next_deadline=upcoming,
        paused=paused,
        paused_until=row.paused_until if paused else None,
        pause_reason=row.pause_reason if paused else None,
        acked_at=row.acked_at,
        ack_reason=row.ack_reason,
        unchanged=bool(row.unchanged),
        suspicious=bool(row.suspicious),
        instance=row.instance,
    )


def weekday_codes(days: str | None) -> list[str] | None:
    if not days:
        return None
    return [WEEKDAYS[int(d)] for d in days.split(",")]


Clock = Callable[[], datetime]
