"""Hypothesis strategies for schedules as job files can write them, instants around them, and the
oracle the MISSING properties are checked against.

Windows are whole minutes (`collection_window_minutes`), and the fields each frequency uses follow
the job file's rules, so a drawn schedule can also be synced as a `JobSpec`.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from hypothesis import strategies as st

from backupwatch.enums import BackupFrequency
from backupwatch.jobs import JobSpec
from backupwatch.schedule import Schedule, cycles_between, deadline

F = BackupFrequency
BASE = datetime(2026, 11, 20, tzinfo=UTC)  # a Friday; every instant below lies within 12 days
SPAN = timedelta(days=12)

windows = st.one_of(
    st.integers(1, 2 * 24 * 60),
    st.sampled_from([15, 30, 60, 90, 12 * 60]),
).map(lambda minutes: timedelta(minutes=minutes))
day_sets = st.frozensets(st.integers(0, 6), min_size=1)


@st.composite
def schedules(draw: st.DrawFn) -> Schedule:
    """Any of the five frequencies; ONCE and MONTHLY days fall inside the span of the instants."""
    frequency = draw(st.sampled_from(F))
    days = None
    if frequency is F.WEEKLY:
        days = draw(day_sets)
    elif frequency in (F.DAILY, F.HOURLY):
        days = draw(st.none() | day_sets)
    return Schedule(
        frequency=frequency,
        hour=None if frequency is F.HOURLY else draw(st.integers(0, 23)),
        minute=draw(st.integers(0, 59)),
        days_of_week=days,
        day_of_month=draw(st.integers(1, 31)) if frequency is F.MONTHLY else None,
        expected_date=draw(st.dates(date(2026, 11, 19), date(2026, 12, 3)))
        if frequency is F.ONCE
        else None,
        window=draw(windows),
    )


def instants(low: datetime = BASE, high: datetime = BASE + SPAN) -> st.SearchStrategy[datetime]:
    """Whole seconds mostly, sometimes exactly on a minute (where cycles and deadlines fall)."""
    seconds = int((high - low).total_seconds())
    return st.one_of(
        st.integers(0, seconds).map(lambda s: low + timedelta(seconds=s)),
        st.integers(0, seconds // 60).map(lambda m: low + timedelta(minutes=m)),
    )


def gaps(most: timedelta) -> st.SearchStrategy[timedelta]:
    """A span between two events, up to `most`: minutes (on cycle marks) or seconds."""
    seconds = int(most.total_seconds())
    return st.one_of(
        st.integers(0, seconds // 60).map(lambda m: timedelta(minutes=m)),
        st.integers(0, seconds).map(lambda s: timedelta(seconds=s)),
    )


def downtimes() -> st.SearchStrategy[timedelta]:
    """Hours to days, where hypothesis's taste for short spans would rarely close a cycle."""
    return st.tuples(st.sampled_from([1, 5, 11, 23, 25, 47, 71]), st.integers(0, 3599)).map(
        lambda pair: timedelta(hours=pair[0], seconds=pair[1])
    )


def moments(count: int, most: timedelta = timedelta(days=3)) -> st.SearchStrategy[list[datetime]]:
    """`count` increasing instants: the first within a day of BASE, each then up to `most` on."""
    return st.tuples(instants(BASE, BASE + timedelta(days=1)), *[gaps(most)] * (count - 1)).map(
        lambda drawn: [drawn[0] + sum(drawn[1 : i + 1], timedelta(0)) for i in range(count)]
    )


def job_spec(schedule: Schedule, database: str) -> JobSpec:
    """The job file's version of `schedule`, for a job of the ACME Lyon Part-Dieu site."""
    days = schedule.days_of_week
    return JobSpec(
        company_name="ACME",
        city="Lyon",
        neighborhood="Part-Dieu",
        database_name=database,
        frequency=schedule.frequency,
        expected_hour_utc=schedule.hour,
        expected_minute_utc=schedule.minute,
        days_of_week=tuple(sorted(days)) if days is not None else None,
        day_of_month=schedule.day_of_month,
        expected_date=schedule.expected_date,
        collection_window_minutes=int(schedule.window // timedelta(minutes=1)),
    )


def closed(
    s: Schedule, activated: datetime, after: datetime | None, until: datetime
) -> set[datetime]:
    """The oracle: cycles of `s` at or after activation whose deadline fell in (after, until]."""
    cycles = cycles_between(s, activated, until - s.window)
    return {c for c in cycles if after is None or deadline(s, c) > after}


def first_open(s: Schedule, now: datetime, activated: datetime) -> datetime | None:
    """The oracle: the first cycle >= activation whose deadline is after `now`, walking forward."""
    start = max(activated, now - s.window)
    following = cycles_between(s, start, start + timedelta(days=400))
    return next((c for c in following if c + s.window > now), None)
