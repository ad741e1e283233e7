"""SPEC §12: the status page's grid, sites by UTC day, worst verdict per cell.

The database does the aggregation: one statement groups every cycle of a range of days by
(site, day) (or by (job, day) for one site's page), one index range scan over
`backup_entries.cycle` (migration 0006), never one query per cell or per job. The index page
runs it for today only and keeps the past days' part of each row (`Stretch`) in `pastdays`.
What a cell shows is decided here, in pure functions of those rows and `now`.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from markupsafe import escape
from sqlalchemy import BigInteger, case, cast, func, select

from backupwatch.enums import BackupEntryStatus, JobStatus
from backupwatch.store import BackupEntry, ExpectedBackupJob, JobView, Store
from backupwatch.timeutil import format_z

DAYS = 14
PACK = 8  # more than the highest grade


class Verdict(enum.IntEnum):
    """A cycle's verdict, ordered from best to worst: a cell shows the highest."""

    NONE = -2  # no cycle expected that day
    PENDING = -1  # a cycle expected today whose deadline has not passed yet
    OK = 0
    UNCHANGED = 1  # a success whose staged file is the previous one, byte for byte
    MISSING = 2
    FAILED = 3
    HASH_MISMATCH = 4
    TRANSFER_INTEGRITY_FAILED = 5

    @property
    def symbol(self) -> str:
        return SYMBOLS[self]

    @property
    def css(self) -> str:
        return self.name.lower().replace("_", "-")

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")

    @property
    def problem(self) -> bool:
        return self >= Verdict.MISSING


SYMBOLS = {
    Verdict.NONE: "·",
    Verdict.PENDING: "…",
    Verdict.OK: "✓",
    Verdict.UNCHANGED: "=",
    Verdict.MISSING: "?",
    Verdict.FAILED: "✗",
    Verdict.HASH_MISMATCH: "≠",
    Verdict.TRANSFER_INTEGRITY_FAILED: "!",
}
CSS = {v: v.css for v in Verdict}
LABELS = {v: v.label for v in Verdict}
RANKED = [v for v in Verdict if v >= Verdict.OK]
BY_RANK = {int(v): v for v in Verdict}
PROBLEM_STATUSES = frozenset(
    {
        JobStatus.MISSING,
        JobStatus.FAILED,
        JobStatus.HASH_MISMATCH,
        JobStatus.TRANSFER_INTEGRITY_FAILED,
    }
)


def verdict_of(status: JobStatus, unchanged: bool = False) -> Verdict | None:
    """A job's current status as a verdict (None: it never reported)."""
    if status is JobStatus.UNKNOWN:
        return None
    if status is JobStatus.OK:
        return Verdict.UNCHANGED if unchanged else Verdict.OK
    return Verdict[status.value]


@dataclass(frozen=True)
class DayCount:
    """One (site or job, day) group of the window: how many cycles had each verdict."""

    day: date
    counts: dict[Verdict, int]
    worst: Verdict = field(init=False, compare=False)
    cycles: int = field(init=False, compare=False)
    ok: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        # Computed once: a page reads them for every one of its 14,000 cells.
        worst = max(self.counts, default=Verdict.NONE)  # the query only counts what it saw
        object.__setattr__(self, "worst", worst)
        object.__setattr__(self, "cycles", sum(self.counts.values()))
        ok = self.counts.get(Verdict.OK, 0) + self.counts.get(Verdict.UNCHANGED, 0)
        object.__setattr__(self, "ok", ok)


@dataclass(frozen=True)
class Cell:
    day: date
    verdict: Verdict
    title: str


@dataclass
class Row:
    """One site (or, on a site's page, one job) and its cells, oldest day first."""

    key: tuple[str, ...]
    name: str
    jobs: list[JobView]
    cells: list[Cell] = field(default_factory=list)
    cycles: int = 0
    ok: int = 0
    html: str = ""  # the cells' markup (`cells_html`)

    def show(self, found: Stretch) -> None:
        self.cells, self.cycles, self.ok = found.cells, found.cycles, found.ok
        self.html = found.html

    @property
    def current(self) -> Verdict | None:
        found = [verdict_of(j.current_status, j.unchanged) for j in self.jobs if j.active]
        return max((v for v in found if v is not None), default=None)

    @property
    def problem(self) -> bool:
        current = self.current
        return (current is not None and current.problem) or any(
            c.verdict.problem for c in self.cells
        )

    @property
    def paused(self) -> int:
        return sum(1 for j in self.jobs if j.paused)

    @property
    def acked(self) -> int:
        return sum(1 for j in self.jobs if j.acked_at is not None)


@dataclass
class Company:
    name: str
    rows: list[Row]

    @property
    def compliance(self) -> float | None:
        cycles = sum(r.cycles for r in self.rows)
        return None if cycles == 0 else sum(r.ok for r in self.rows) / cycles


def window(now: datetime, days: int = DAYS) -> list[date]:
    """The UTC days of the grid, oldest first, today last."""
    today = now.date()
    return [today - timedelta(days=n) for n in range(days - 1, -1, -1)]


def _day_expression(dialect: str, column: Any) -> Any:
    """The UTC day of a naive-UTC timestamp, as `YYYY-MM-DD` text on both databases."""
    if dialect == "postgresql":
        return func.to_char(column, "YYYY-MM-DD")
    return func.substr(column, 1, 10)


def day_counts(
    store: Store, days: Sequence[date], site: tuple[str, str, str] | None = None
) -> dict[tuple[Any, ...], list[DayCount]]:
    """The one aggregated query of a page: verdict counts per (site, day), or per (job, day)
    for the jobs of `site`. A cycle's verdict is its newest real entry (a report's outcome
    outranks the MISSING flag of the same cycle, as in `status`), MISSING when it has none."""
    e, j = BackupEntry, ExpectedBackupJob
    start = datetime.combine(days[0], time(), tzinfo=UTC)
    end = datetime.combine(days[-1] + timedelta(days=1), time(), tzinfo=UTC)
    # Each real entry's id and grade packed in one number: the largest is the newest real
    # entry, its grade the remainder. One GROUP BY, no join back to the entries.
    grade = case(
        (
            e.status == BackupEntryStatus.SUCCESS,
            case((e.unchanged_since_last_success, int(Verdict.UNCHANGED)), else_=0),
        ),
        *[(e.status == BackupEntryStatus(v.name), int(v)) for v in RANKED if v >= Verdict.FAILED],
        else_=int(Verdict.FAILED),
    )
    packed = cast(e.id, BigInteger) * PACK + grade
    real = func.max(case((e.status != BackupEntryStatus.MISSING, packed)))
    per_cycle = (
        select(e.job_id, e.cycle, real.label("packed"))
        .where(e.cycle >= start, e.cycle < end)
        .group_by(e.cycle, e.job_id)  # the index's order: no sort
        .subquery()
    )
    rank = func.coalesce(per_cycle.c.packed % PACK, int(Verdict.MISSING)).label("rank")
    day = _day_expression(store.engine.dialect.name, per_cycle.c.cycle).label("day")
    keys: list[Any] = [j.id] if site is not None else [j.company_name, j.city, j.neighborhood]
    query = (
        select(*keys, day, rank, func.count())
        .select_from(per_cycle)
        .join(j, j.id == per_cycle.c.job_id)
        .where(j.active.is_(True))
        .group_by(*keys, day, rank)
    )
    if site is not None:
        query = query.where(j.company_name == site[0], j.city == site[1], j.neighborhood == site[2])
    found: dict[tuple[Any, ...], dict[str, dict[Verdict, int]]] = {}
    with store.reader.begin() as connection:
        rows = connection.execute(query).all()
        for row in rows:
            *key, day_text, rank_value, count = row
            cell = found.setdefault(tuple(key), {}).setdefault(str(day_text), {})
            cell[BY_RANK[int(rank_value)]] = int(count)
    return {
        key: [DayCount(date.fromisoformat(d), counts) for d, counts in per_day.items()]
        for key, per_day in found.items()
    }


def pending_today(jobs: Iterable[JobView], now: datetime) -> bool:
    """An active, unpaused job whose next deadline falls today is still awaited today.

    (A cycle late in the evening whose window ends after midnight counts for the next day's
    column until it is settled: the view knows the deadline, not the window.)"""
    today = now.date()
    return any(
        job.active
        and not job.paused
        and job.next_deadline is not None
        and job.next_deadline.date() <= today
        for job in jobs
    )


def cells_for(
    counts: Sequence[DayCount], days: Sequence[date], pending: bool, name: str
) -> tuple[list[Cell], int, int]:
    """The row's cells (one per day), its cycles in the window and how many were OK."""
    found = stretch(counts, days, pending, name, today=days[-1])
    return found.cells, found.cycles, found.ok


@dataclass(frozen=True)
class Stretch:
    """A row's cells over consecutive days, with their markup and totals: the past days' part
    of every row is kept between pages (`pastdays`), today's is made for each page."""

    cells: list[Cell]
    cycles: int
    ok: int
    html: str

    def __add__(self, other: Stretch) -> Stretch:
        return Stretch(
            self.cells + other.cells,
            self.cycles + other.cycles,
            self.ok + other.ok,
            self.html + other.html,
        )


def stretch(
    counts: Iterable[DayCount], days: Sequence[date], pending: bool, name: str, today: date
) -> Stretch:
    """A row's cells for `days` (a cycle still awaited `today` shows as such there)."""
    by_day = {c.day: c for c in counts if days[0] <= c.day <= days[-1]}
    cells = []
    cycles = ok = 0
    for day in days:
        count = by_day.get(day)
        awaited = pending and day == today
        verdict = count.worst if count is not None else Verdict.NONE
        if awaited and verdict < Verdict.MISSING:
            verdict = Verdict.PENDING
        summary = _summary(tuple(count.counts.items()) if count else (), awaited)
        cells.append(Cell(day, verdict, f"{name} · {day.isoformat()}: {summary}"))
        if count is not None:
            cycles += count.cycles
            ok += count.ok
    return Stretch(cells, cycles, ok, cells_html(cells, today))


def cells_html(cells: Iterable[Cell], today: date) -> str:
    """Day cells as markup, built here rather than in a template macro: 14,000 cells for
    1,000 sites, where a macro call per cell costs more than the page's query. The title is
    the one part that names what job files name: escaped."""
    return "".join(
        f"{(CELL_START_TODAY if cell.day == today else CELL_START)[cell.verdict]}"
        f'data-day="{cell.day.isoformat()}" '
        f'title="{escape(cell.title)}">{SYMBOLS[cell.verdict]}</td>'
        for cell in cells
    )


CELL_START = {v: f'<td class="cell v-{CSS[v]}" data-verdict="{v.name}" ' for v in Verdict}
CELL_START_TODAY = {
    v: f'<td class="cell v-{CSS[v]} today" data-verdict="{v.name}" ' for v in Verdict
}


@functools.lru_cache(maxsize=4096)
def _summary(counts: tuple[tuple[Verdict, int], ...], pending: bool) -> str:
    """A cell's details, e.g. `3 cycles, 1 FAILED, 2 OK` (few distinct ones: cached)."""
    parts = []
    if counts:
        cycles = sum(n for _, n in counts)
        parts.append(f"{cycles} cycle{'s' if cycles != 1 else ''}")
        parts.extend(f"{n} {LABELS[v]}" for v, n in sorted(counts, reverse=True) if n)
    if pending:
        parts.append("a cycle still awaited today")
    if not parts:
        parts.append("no cycle expected")
    return ", ".join(parts)


@dataclass
class Board:
    """Everything the status page shows."""

    now: datetime
    days: list[date]
    companies: list[Company]
    totals: dict[str, int]
    sites: int
    shown: int

    @property
    def generated(self) -> str:
        return format_z(self.now) or ""


def board(
    views: Sequence[JobView],
    counts: dict[tuple[Any, ...], list[DayCount]],
    now: datetime,
    problems_only: bool = False,
    past: Mapping[tuple[str, ...], Stretch] | None = None,
) -> Board:
    """The grid from the job rows (`status`'s) and the page's aggregated query: `counts` over
    the whole window, or over today only with the past days' part of each row in `past`."""
    days = window(now)
    today = days[-1]
    sites = sites_of(views)
    companies: dict[str, list[Row]] = {}
    shown = 0
    for key, jobs in sites.items():
        name = "/".join(key)
        row = Row(key, name, jobs)
        pending = pending_today(jobs, now)
        if past is None:
            row.show(stretch(counts.get(key, ()), days, pending, name, today))
        else:
            head = past.get(key) or stretch((), days[:-1], False, name, today)
            row.show(head + stretch(counts.get(key, ()), days[-1:], pending, name, today))
        if problems_only and not row.problem:
            companies.setdefault(key[0], [])
            continue
        shown += 1
        companies.setdefault(key[0], []).append(row)
    return Board(
        now=now,
        days=days,
        companies=[Company(name, rows) for name, rows in companies.items() if rows],
        totals=totals(views, now),
        sites=len(sites),
        shown=shown,
    )


def sites_of(views: Iterable[JobView]) -> dict[tuple[str, str, str], list[JobView]]:
    """The active jobs per site, in the views' order."""
    sites: dict[tuple[str, str, str], list[JobView]] = {}
    for view in views:
        if view.active:
            sites.setdefault((view.company_name, view.city, view.neighborhood), []).append(view)
    return sites


def site_rows(
    jobs: Sequence[JobView], counts: dict[tuple[Any, ...], list[DayCount]], now: datetime
) -> list[Row]:
    """One row per job of a site (its page)."""
    days = window(now)
    rows = []
    for job in jobs:
        row = Row((str(job.id),), job.database_name, [job])
        found = counts.get((job.id,), ())
        row.show(stretch(found, days, pending_today([job], now), job.database_name, days[-1]))
        rows.append(row)
    return rows


def totals(views: Iterable[JobView], now: datetime) -> dict[str, int]:
    """Active jobs per current status, then how many are paused and acknowledged."""
    found = {status.value: 0 for status in JobStatus}
    paused = acked = 0
    for view in views:
        if not view.active:
            continue
        found[view.current_status.value] += 1
        paused += view.paused
        acked += view.acked_at is not None
    return {**found, "PAUSED": paused, "ACKNOWLEDGED": acked}
