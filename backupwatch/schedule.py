"""SPEC §4: a job's cycles, the window around each one, and the deadlines that drive MISSING.

Everything here is pure: the caller passes `now`, so the timer, the store and the tests all agree
on the same arithmetic. Cycles are whole minutes in UTC, at most one hour apart within a day, so
every search below jumps straight to the right day (weekday or month arithmetic) and then to the
right hour; none of them walks minute by minute, which matters with 30,000 jobs.
"""

from __future__ import annotations

import calendar
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import MAXYEAR, MINYEAR, UTC, date, datetime, timedelta

from backupwatch.enums import BackupFrequency

# datetime resolves to 1 µs, so "strictly after x" is exactly "at or after x + 1 µs".
_TICK = timedelta(microseconds=1)
_DEFAULT_WINDOW = timedelta(minutes=60)


@dataclass(frozen=True, slots=True)
class Schedule:
    """When a job is expected. Fields that do not apply to the frequency are ignored.

    Validation happens here, once, so that every function below may trust the fields (an empty
    day filter, for example, would make the searches below find nothing forever).
    """

    frequency: BackupFrequency
    hour: int | None
    minute: int = 0
    days_of_week: frozenset[int] | None = None
    day_of_month: int | None = None
    expected_date: date | None = None
    window: timedelta = _DEFAULT_WINDOW

    def __post_init__(self) -> None:
        try:
            frequency = BackupFrequency(self.frequency)
        except ValueError:
            raise ValueError(f"invalid schedule: frequency: unknown {self.frequency!r}") from None
        object.__setattr__(self, "frequency", frequency)
        if self.days_of_week is not None:
            object.__setattr__(self, "days_of_week", frozenset(self.days_of_week))
        problems = list(_problems(self))
        if problems:
            raise ValueError("invalid schedule: " + "; ".join(problems))


def _problems(s: Schedule) -> Iterator[str]:
    """Every reason the schedule is unusable, so one error message fixes a job file in one go."""
    freq = s.frequency.value
    yield from _range_problems("hour", s.hour, 0, 23)
    yield from _range_problems("minute", s.minute, 0, 59)
    yield from _range_problems("day_of_month", s.day_of_month, 1, 31)
    if s.hour is None and s.frequency is not BackupFrequency.HOURLY:
        yield f"hour: required for a {freq} schedule"
    if s.days_of_week is not None:
        if not s.days_of_week:
            yield "days_of_week: empty; a schedule needs at least one day"
        for day in sorted(s.days_of_week, key=repr):
            yield from _range_problems("days_of_week", day, 0, 6)
    if s.frequency is BackupFrequency.WEEKLY and s.days_of_week is None:
        yield "days_of_week: required for a WEEKLY schedule"
    if s.frequency is BackupFrequency.MONTHLY and s.day_of_month is None:
        yield "day_of_month: required for a MONTHLY schedule"
    if s.expected_date is not None and (
        isinstance(s.expected_date, datetime) or not isinstance(s.expected_date, date)
    ):
        yield f"expected_date: must be a date, got {s.expected_date!r}"
    if s.frequency is BackupFrequency.ONCE and s.expected_date is None:
        yield "expected_date: required for a ONCE schedule"
    if not isinstance(s.window, timedelta) or s.window <= timedelta(0):
        yield f"window: must be a positive duration, got {s.window!r}"


def _range_problems(name: str, value: object, low: int, high: int) -> Iterator[str]:
    """bool is an int in Python, but `hour = true` in a job file is a mistake, not 1 o'clock."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        yield f"{name}: must be an integer, got {value!r}"
    elif not low <= value <= high:
        yield f"{name}: {value} is out of range {low}-{high}"


# --- public API ---------------------------------------------------------------------------


def cycles_between(s: Schedule, start: datetime, end: datetime) -> Iterator[datetime]:
    """Every cycle in [start, end], increasing, one at a time (an HOURLY year is 8,760 cycles).

    Not a generator itself, so that naive input fails at the call, not at the first `next()`.
    """
    return _iter_cycles(s, _utc(start, "start"), _utc(end, "end"))


def next_cycle_at_or_after(s: Schedule, t: datetime) -> datetime | None:
    """The first cycle >= t; None once a ONCE schedule is behind t."""
    t = _utc(t, "t")
    day = t.date()
    if _next_cycle_day(s, day) == day:
        found = _first_on_day_at_or_after(s, day, t)
        if found is not None:
            return found
    following = _next_cycle_day(s, _add_days(day, 1))
    return None if following is None else _at(following, _hours(s)[0], s.minute)


def previous_cycle_at_or_before(s: Schedule, t: datetime) -> datetime | None:
    """The last cycle <= t; None while a ONCE schedule is still ahead of t."""
    t = _utc(t, "t")
    day = t.date()
    if _previous_cycle_day(s, day) == day:
        found = _last_on_day_at_or_before(s, day, t)
        if found is not None:
            return found
    preceding = _previous_cycle_day(s, _add_days(day, -1))
    return None if preceding is None else _at(preceding, _hours(s)[1], s.minute)


def cycle_for(s: Schedule, t: datetime) -> datetime | None:
    """The cycle a report made at t belongs to, or None when it is not relevant (seed scenario 6).

    Only the cycles just before and just after t can be nearest; whichever of them is nearer is
    also inside its window whenever any cycle's window holds t, so two look-ups decide it.
    """
    t = _utc(t, "t")
    best: datetime | None = None
    before = previous_cycle_at_or_before(s, t)
    if before is not None and t - before <= s.window:
        best = before
    after = next_cycle_at_or_after(s, t)
    if after is not None and after - t <= s.window and (best is None or after - t < t - best):
        best = after
    return best


def deadline(s: Schedule, cycle: datetime) -> datetime:
    """After c + W, no report can belong to c any more, so a cycle without an entry is MISSING."""
    return _utc(cycle, "cycle") + s.window


def next_deadline(s: Schedule, now: datetime, activated_at: datetime) -> datetime | None:
    """SPEC §8: the deadline still ahead of now, of a cycle the job was active for.

    deadline(c) > now means c > now - W; cycles before activation never count (SPEC §4).
    """
    now = _utc(now, "now")
    earliest = max(_utc(activated_at, "activated_at"), now - s.window + _TICK)
    cycle = next_cycle_at_or_after(s, earliest)
    return None if cycle is None else cycle + s.window


def due_cycles(
    s: Schedule, after: datetime, now: datetime, activated_at: datetime
) -> Iterator[datetime]:
    """The cycles whose deadline passed in (after, now]: what the timer flags after a sleep.

    after < c + W <= now is after - W < c <= now - W, so this is one `cycles_between` (empty
    when now <= after, e.g. a clock stepped back).
    """
    after, now = _utc(after, "after"), _utc(now, "now")
    start = max(_utc(activated_at, "activated_at"), after - s.window + _TICK)
    return _iter_cycles(s, start, now - s.window)


# --- helpers ------------------------------------------------------------------------------


def _utc(value: datetime, name: str) -> datetime:
    """A naive time here is a bug upstream (the report parser already made its times aware)."""
    if not isinstance(value, datetime):
        raise TypeError(f"{name}: expected a datetime, got {value!r}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name}: naive datetime {value.isoformat()}; expected aware UTC")
    return value if value.tzinfo is UTC else value.astimezone(UTC)


def _iter_cycles(s: Schedule, start: datetime, end: datetime) -> Iterator[datetime]:
    cycle = next_cycle_at_or_after(s, start)
    while cycle is not None and cycle <= end:
        yield cycle
        cycle = next_cycle_at_or_after(s, cycle + _TICK)


def _hours(s: Schedule) -> tuple[int, int]:
    """First and last hour of the cycles on a cycle day: one hour, or all 24 for HOURLY."""
    if s.frequency is BackupFrequency.HOURLY:
        return 0, 23
    assert s.hour is not None  # guaranteed by Schedule.__post_init__
    return s.hour, s.hour


def _at(day: date, hour: int, minute: int) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)


def _first_on_day_at_or_after(s: Schedule, day: date, t: datetime) -> datetime | None:
    """t lies on `day`; the cycle hour is t's own hour unless t is past that hour's minute."""
    first, last = _hours(s)
    past = (t.minute, t.second, t.microsecond) > (s.minute, 0, 0)
    hour = max(first, t.hour + 1 if past else t.hour)
    return _at(day, hour, s.minute) if hour <= last else None


def _last_on_day_at_or_before(s: Schedule, day: date, t: datetime) -> datetime | None:
    first, last = _hours(s)
    early = (t.minute, t.second, t.microsecond) < (s.minute, 0, 0)
    hour = min(last, t.hour - 1 if early else t.hour)
    return _at(day, hour, s.minute) if hour >= first else None


def _add_days(day: date | None, days: int) -> date | None:
    """None past the ends of the calendar, so that searches there end instead of raising."""
    if day is None:
        return None
    try:
        return day + timedelta(days=days)
    except OverflowError:
        return None


def _next_cycle_day(s: Schedule, day: date | None) -> date | None:
    """The first day >= `day` that has cycles: weekday or month arithmetic, no day-by-day walk."""
    if day is None:
        return None
    if s.frequency is BackupFrequency.ONCE:
        assert s.expected_date is not None
        return s.expected_date if s.expected_date >= day else None
    if s.frequency is BackupFrequency.MONTHLY:
        return _monthly_on_or_after(s, day)
    if s.days_of_week is None:
        return day
    return _add_days(day, min((d - day.weekday()) % 7 for d in s.days_of_week))


def _previous_cycle_day(s: Schedule, day: date | None) -> date | None:
    """The last day <= `day` that has cycles; the mirror of `_next_cycle_day`."""
    if day is None:
        return None
    if s.frequency is BackupFrequency.ONCE:
        assert s.expected_date is not None
        return s.expected_date if s.expected_date <= day else None
    if s.frequency is BackupFrequency.MONTHLY:
        return _monthly_on_or_before(s, day)
    if s.days_of_week is None:
        return day
    return _add_days(day, -min((day.weekday() - d) % 7 for d in s.days_of_week))


def _monthly_day(s: Schedule, year: int, month: int) -> date:
    """SPEC §2: a month without day_of_month uses its last day (31 → 28 or 29 in February)."""
    assert s.day_of_month is not None
    return date(year, month, min(s.day_of_month, calendar.monthrange(year, month)[1]))


def _monthly_on_or_after(s: Schedule, day: date) -> date | None:
    this_month = _monthly_day(s, day.year, day.month)
    if this_month >= day:
        return this_month
    year, month = (day.year + 1, 1) if day.month == 12 else (day.year, day.month + 1)
    return None if year > MAXYEAR else _monthly_day(s, year, month)


def _monthly_on_or_before(s: Schedule, day: date) -> date | None:
    this_month = _monthly_day(s, day.year, day.month)
    if this_month <= day:
        return this_month
    year, month = (day.year - 1, 12) if day.month == 1 else (day.year, day.month - 1)
    return None if year < MINYEAR else _monthly_day(s, year, month)
