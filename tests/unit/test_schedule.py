"""SPEC §4: cycles, windows, deadlines. Concrete calendars first, then properties that compare the
jump arithmetic of `schedule.py` with a day-by-day oracle written independently below."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from backupwatch.enums import WEEKDAYS, BackupFrequency
from backupwatch.schedule import (
    Schedule,
    cycle_for,
    cycles_between,
    deadline,
    due_cycles,
    next_cycle_at_or_after,
    next_deadline,
    previous_cycle_at_or_before,
)

F = BackupFrequency
MO, TU, WE, TH, FR, SA, SU = range(7)
H = timedelta(hours=1)
M = timedelta(minutes=1)
US = timedelta(microseconds=1)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def days(*names: str) -> frozenset[int]:
    return frozenset(WEEKDAYS.index(n) for n in names)


def between(s: Schedule, start: datetime, end: datetime) -> list[datetime]:
    return list(cycles_between(s, start, end))


# --- the oracle: walk every day, apply SPEC §4 literally --------------------------------------


def _last_day_of_month(day: date) -> int:
    first_of_next = date(day.year + day.month // 12, day.month % 12 + 1, 1)
    return (first_of_next - timedelta(days=1)).day


def _oracle_day(s: Schedule, day: date) -> list[datetime]:
    def at(hour: int) -> datetime:
        return utc(day.year, day.month, day.day, hour, s.minute)

    if s.frequency is F.ONCE:
        return [at(s.hour or 0)] if day == s.expected_date else []
    if s.frequency is F.MONTHLY:
        wanted = min(s.day_of_month or 0, _last_day_of_month(day))
        return [at(s.hour or 0)] if day.day == wanted else []
    if s.days_of_week is not None and day.weekday() not in s.days_of_week:
        return []
    if s.frequency is F.HOURLY:
        return [at(hour) for hour in range(24)]
    return [at(s.hour or 0)]


def oracle(s: Schedule, start: datetime, end: datetime) -> list[datetime]:
    found: list[datetime] = []
    day = start.date()
    while day <= end.date():
        found.extend(c for c in _oracle_day(s, day) if start <= c <= end)
        day += timedelta(days=1)
    return found


# --- strategies ------------------------------------------------------------------------------

any_frequency = st.sampled_from(BackupFrequency)
day_sets = st.frozensets(st.integers(0, 6), min_size=1)
windows = st.one_of(
    st.integers(1, 3 * 24 * 60).map(lambda m: timedelta(minutes=m)),
    st.sampled_from([timedelta(minutes=30), timedelta(minutes=60), timedelta(hours=12)]),
    st.timedeltas(min_value=US, max_value=timedelta(days=3)),
)
_LOW, _HIGH = datetime(2000, 1, 1), datetime(2099, 12, 1)
instants = st.one_of(
    st.datetimes(_LOW, _HIGH, timezones=st.just(UTC)),
    # whole minutes land on cycles, window edges and exact ties far more often
    st.datetimes(_LOW, _HIGH, timezones=st.just(UTC)).map(
        lambda t: t.replace(second=0, microsecond=0)
    ),
)


@st.composite
def schedules(
    draw: st.DrawFn,
    frequencies: st.SearchStrategy[BackupFrequency] = any_frequency,
    window: st.SearchStrategy[timedelta] = windows,
) -> Schedule:
    frequency = draw(frequencies)
    return Schedule(
        frequency=frequency,
        hour=None if frequency is F.HOURLY else draw(st.integers(0, 23)),
        minute=draw(st.integers(0, 59)),
        days_of_week=(
            draw(day_sets)
            if frequency is F.WEEKLY
            else draw(st.none() | day_sets)
            if frequency in (F.DAILY, F.HOURLY)
            else None
        ),
        day_of_month=draw(st.integers(1, 31)) if frequency is F.MONTHLY else None,
        expected_date=(draw(st.dates(_LOW.date(), _HIGH.date())) if frequency is F.ONCE else None),
        window=draw(window),
    )


fast = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- Schedule validation ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"frequency": F.DAILY, "hour": None}, "hour: required for a DAILY"),
        ({"frequency": F.WEEKLY, "hour": None, "days_of_week": days("MO")}, "hour: required"),
        ({"frequency": F.WEEKLY, "hour": 1}, "days_of_week: required for a WEEKLY"),
        ({"frequency": F.MONTHLY, "hour": 1}, "day_of_month: required for a MONTHLY"),
        ({"frequency": F.ONCE, "hour": 1}, "expected_date: required for a ONCE"),
        ({"frequency": F.DAILY, "hour": 24}, "hour: 24 is out of range 0-23"),
        ({"frequency": F.DAILY, "hour": -1}, "hour: -1 is out of range"),
        ({"frequency": F.DAILY, "hour": 1, "minute": 60}, "minute: 60 is out of range 0-59"),
        ({"frequency": F.HOURLY, "hour": None, "minute": -1}, "minute: -1 is out of range"),
        ({"frequency": F.MONTHLY, "hour": 1, "day_of_month": 0}, "day_of_month: 0 is out"),
        ({"frequency": F.MONTHLY, "hour": 1, "day_of_month": 32}, "day_of_month: 32 is out"),
        ({"frequency": F.DAILY, "hour": 1, "days_of_week": frozenset({7})}, "days_of_week: 7"),
        ({"frequency": F.DAILY, "hour": 1, "days_of_week": frozenset()}, "days_of_week: empty"),
        ({"frequency": F.WEEKLY, "hour": 1, "days_of_week": frozenset()}, "days_of_week: empty"),
        ({"frequency": F.DAILY, "hour": 1, "window": timedelta(0)}, "window: must be a positive"),
        ({"frequency": F.DAILY, "hour": 1, "window": -M}, "window: must be a positive"),
        ({"frequency": F.DAILY, "hour": True}, "hour: must be an integer"),
        ({"frequency": F.DAILY, "hour": 1.5}, "hour: must be an integer"),
        ({"frequency": "FORTNIGHTLY", "hour": 1}, "frequency: unknown 'FORTNIGHTLY'"),
        (
            {"frequency": F.ONCE, "hour": 1, "expected_date": utc(2026, 1, 1)},
            "expected_date: must be a date",
        ),
    ],
)
def test_invalid_schedule_is_refused_with_a_reason(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="invalid schedule") as caught:
        Schedule(**kwargs)
    assert message in str(caught.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ValueError, match=r"hour: 25.*minute: 61.*day_of_month: required"):
        Schedule(F.MONTHLY, hour=25, minute=61)


def test_valid_schedules_are_normalised_and_hashable() -> None:
    # a str and a list, as a TOML file gives them: the types say what they are normalised to
    s = Schedule("WEEKLY", hour=3, days_of_week=[MO, MO, FR])  # type: ignore[arg-type]
    assert s.frequency is F.WEEKLY
    assert s.days_of_week == frozenset({MO, FR})
    assert s.window == timedelta(minutes=60)
    assert hash(s) == hash(Schedule(F.WEEKLY, hour=3, days_of_week=frozenset({FR, MO})))
    assert Schedule(F.HOURLY, hour=None).hour is None


def test_schedule_is_frozen() -> None:
    s = Schedule(F.DAILY, hour=1)
    with pytest.raises(AttributeError):
        s.hour = 2  # type: ignore[misc]  # frozen: what this test checks


# --- aware UTC only --------------------------------------------------------------------------

S_DAILY = Schedule(F.DAILY, hour=13)
NAIVE = datetime(2026, 11, 24, 13, 0)
AWARE = utc(2026, 11, 24, 13, 0)

CALLS: list[Callable[[datetime], object]] = [
    lambda t: cycles_between(S_DAILY, t, AWARE),
    lambda t: cycles_between(S_DAILY, AWARE, t),
    lambda t: next_cycle_at_or_after(S_DAILY, t),
    lambda t: previous_cycle_at_or_before(S_DAILY, t),
    lambda t: cycle_for(S_DAILY, t),
    lambda t: deadline(S_DAILY, t),
    lambda t: next_deadline(S_DAILY, t, AWARE),
    lambda t: next_deadline(S_DAILY, AWARE, t),
    lambda t: due_cycles(S_DAILY, t, AWARE, AWARE),
    lambda t: due_cycles(S_DAILY, AWARE, t, AWARE),
    lambda t: due_cycles(S_DAILY, AWARE, AWARE, t),
]


@pytest.mark.parametrize("call", CALLS)
def test_naive_datetimes_are_refused_at_the_call(call: Callable[[datetime], object]) -> None:
    with pytest.raises(ValueError, match="naive datetime"):
        call(NAIVE)  # the iterators too: before their first next()


def test_other_offsets_are_converted_and_results_are_utc() -> None:
    paris = timezone(timedelta(hours=1))
    t = datetime(2026, 11, 24, 14, 30, tzinfo=paris)  # 13:30Z
    following = next_cycle_at_or_after(S_DAILY, t)
    assert following == utc(2026, 11, 25, 13)
    assert previous_cycle_at_or_before(S_DAILY, t) == utc(2026, 11, 24, 13)
    assert cycle_for(S_DAILY, t) == utc(2026, 11, 24, 13)
    assert following is not None
    assert following.tzinfo is UTC
    assert deadline(S_DAILY, t).tzinfo is UTC


@given(schedules(), instants, st.integers(-14 * 60, 14 * 60))
@fast
def test_offset_does_not_change_any_answer(s: Schedule, t: datetime, offset: int) -> None:
    shifted = t.astimezone(timezone(timedelta(minutes=offset)))
    assert next_cycle_at_or_after(s, shifted) == next_cycle_at_or_after(s, t)
    assert previous_cycle_at_or_before(s, shifted) == previous_cycle_at_or_before(s, t)
    assert cycle_for(s, shifted) == cycle_for(s, t)


# --- DAILY -----------------------------------------------------------------------------------


def test_daily_cycles_every_day_at_the_expected_time() -> None:
    s = Schedule(F.DAILY, hour=13, minute=5)
    assert between(s, utc(2026, 11, 23), utc(2026, 11, 26)) == [
        utc(2026, 11, 23, 13, 5),
        utc(2026, 11, 24, 13, 5),
        utc(2026, 11, 25, 13, 5),
    ]


def test_daily_bounds_are_inclusive() -> None:
    s = Schedule(F.DAILY, hour=13)
    c = utc(2026, 11, 24, 13)
    assert between(s, c, c) == [c]
    assert between(s, c + US, c + timedelta(days=1) - US) == []
    assert between(s, c, c - US) == []


def test_daily_day_filter_skips_the_weekend() -> None:
    s = Schedule(F.DAILY, hour=2, days_of_week=days("MO", "TU", "WE", "TH", "FR"))
    found = between(s, utc(2026, 11, 20), utc(2026, 11, 30, 23, 59))  # Fri 20 .. Mon 30
    assert [c.day for c in found] == [20, 23, 24, 25, 26, 27, 30]
    assert next_cycle_at_or_after(s, utc(2026, 11, 20, 2, 0, 1)) == utc(2026, 11, 23, 2)
    assert previous_cycle_at_or_before(s, utc(2026, 11, 23, 1, 59)) == utc(2026, 11, 20, 2)


def test_daily_next_and_previous_around_the_cycle() -> None:
    s = Schedule(F.DAILY, hour=13)
    c = utc(2026, 11, 24, 13)
    assert next_cycle_at_or_after(s, c) == c
    assert next_cycle_at_or_after(s, c - US) == c
    assert next_cycle_at_or_after(s, c + US) == c + timedelta(days=1)
    assert previous_cycle_at_or_before(s, c) == c
    assert previous_cycle_at_or_before(s, c + US) == c
    assert previous_cycle_at_or_before(s, c - US) == c - timedelta(days=1)


def test_daily_across_year_end_and_leap_day() -> None:
    s = Schedule(F.DAILY, hour=0)
    assert [c.date() for c in between(s, utc(2028, 2, 28), utc(2028, 3, 1))] == [
        date(2028, 2, 28),
        date(2028, 2, 29),
        date(2028, 3, 1),
    ]
    assert next_cycle_at_or_after(s, utc(2026, 12, 31, 0, 1)) == utc(2027, 1, 1)


# --- WEEKLY ----------------------------------------------------------------------------------


def test_weekly_only_on_the_listed_days() -> None:
    s = Schedule(F.WEEKLY, hour=22, minute=30, days_of_week=days("MO", "TH"))
    found = between(s, utc(2026, 11, 1), utc(2026, 11, 30, 23, 59))
    assert [c.day for c in found] == [2, 5, 9, 12, 16, 19, 23, 26, 30]
    assert {c.weekday() for c in found} == {MO, TH}
    assert all((c.hour, c.minute) == (22, 30) for c in found)


def test_weekly_single_day_jumps_a_whole_week() -> None:
    s = Schedule(F.WEEKLY, hour=6, days_of_week=days("SU"))
    sunday = utc(2026, 11, 29, 6)
    assert next_cycle_at_or_after(s, sunday + US) == sunday + timedelta(days=7)
    assert previous_cycle_at_or_before(s, sunday - US) == sunday - timedelta(days=7)


# --- MONTHLY ---------------------------------------------------------------------------------


def test_monthly_day_31_uses_the_last_day_of_short_months() -> None:
    s = Schedule(F.MONTHLY, hour=4, day_of_month=31)
    found = between(s, utc(2027, 1, 1), utc(2027, 12, 31, 23))
    assert [c.date() for c in found] == [
        date(2027, 1, 31),
        date(2027, 2, 28),
        date(2027, 3, 31),
        date(2027, 4, 30),
        date(2027, 5, 31),
        date(2027, 6, 30),
        date(2027, 7, 31),
        date(2027, 8, 31),
        date(2027, 9, 30),
        date(2027, 10, 31),
        date(2027, 11, 30),
        date(2027, 12, 31),
    ]


@pytest.mark.parametrize(
    ("day_of_month", "year", "expected_day"),
    [
        (31, 2027, 28),
        (29, 2027, 28),
        (31, 2028, 29),
        (30, 2028, 29),
        (29, 2028, 29),
        (28, 2028, 28),
    ],
)
def test_monthly_february(day_of_month: int, year: int, expected_day: int) -> None:
    s = Schedule(F.MONTHLY, hour=4, day_of_month=day_of_month)
    assert between(s, utc(year, 2, 1), utc(year, 3, 1) - US) == [utc(year, 2, expected_day, 4)]


def test_monthly_next_and_previous_cross_months() -> None:
    s = Schedule(F.MONTHLY, hour=4, day_of_month=31)
    assert next_cycle_at_or_after(s, utc(2027, 1, 31, 4, 1)) == utc(2027, 2, 28, 4)
    assert next_cycle_at_or_after(s, utc(2027, 2, 28, 4, 1)) == utc(2027, 3, 31, 4)
    assert next_cycle_at_or_after(s, utc(2027, 12, 31, 5)) == utc(2028, 1, 31, 4)
    assert previous_cycle_at_or_before(s, utc(2027, 3, 30)) == utc(2027, 2, 28, 4)
    assert previous_cycle_at_or_before(s, utc(2028, 1, 31, 3)) == utc(2027, 12, 31, 4)
    s15 = Schedule(F.MONTHLY, hour=4, day_of_month=15)
    assert next_cycle_at_or_after(s15, utc(2027, 1, 15, 4)) == utc(2027, 1, 15, 4)
    assert previous_cycle_at_or_before(s15, utc(2027, 1, 15, 3)) == utc(2026, 12, 15, 4)


def test_monthly_ignores_a_day_filter() -> None:
    s = Schedule(F.MONTHLY, hour=4, day_of_month=1, days_of_week=days("SU"))
    assert len(between(s, utc(2027, 1, 1), utc(2027, 12, 31))) == 12


# --- HOURLY ----------------------------------------------------------------------------------


def test_hourly_every_hour_at_the_minute() -> None:
    s = Schedule(F.HOURLY, hour=None, minute=15)
    found = between(s, utc(2026, 11, 24, 22), utc(2026, 11, 25, 2))
    assert found == [
        utc(2026, 11, 24, 22, 15),
        utc(2026, 11, 24, 23, 15),
        utc(2026, 11, 25, 0, 15),
        utc(2026, 11, 25, 1, 15),
    ]
    assert len(between(s, utc(2026, 11, 24), utc(2026, 11, 25) - US)) == 24


def test_hourly_with_a_day_filter() -> None:
    s = Schedule(F.HOURLY, hour=None, minute=30, days_of_week=days("SA", "SU"))
    fri, sat, mon = utc(2026, 11, 27), utc(2026, 11, 28), utc(2026, 11, 30)
    found = between(s, fri, mon + timedelta(days=1))
    assert len(found) == 48
    assert found[0] == sat + timedelta(minutes=30)
    assert found[-1] == utc(2026, 11, 29, 23, 30)
    assert next_cycle_at_or_after(s, utc(2026, 11, 29, 23, 31)) == utc(2026, 12, 5, 0, 30)
    assert previous_cycle_at_or_before(s, utc(2026, 12, 5, 0, 29)) == utc(2026, 11, 29, 23, 30)
    assert next_cycle_at_or_after(s, fri) == sat + timedelta(minutes=30)


def test_hourly_ignores_a_given_hour() -> None:
    s = Schedule(F.HOURLY, hour=13, minute=0)
    assert len(between(s, utc(2026, 11, 24), utc(2026, 11, 24, 23, 59))) == 24


def test_hourly_over_a_century_is_lazy() -> None:
    s = Schedule(F.HOURLY, hour=None)
    it = cycles_between(s, utc(2000, 1, 1), utc(2100, 1, 1))
    assert isinstance(it, Iterator)
    assert list(itertools.islice(it, 3)) == [utc(2000, 1, 1, h) for h in range(3)]


# --- ONCE ------------------------------------------------------------------------------------

S_ONCE = Schedule(F.ONCE, hour=9, minute=45, expected_date=date(2026, 12, 1))
ONCE_AT = utc(2026, 12, 1, 9, 45)


def test_once_before_its_date() -> None:
    assert next_cycle_at_or_after(S_ONCE, utc(2000, 1, 1)) == ONCE_AT
    assert next_cycle_at_or_after(S_ONCE, ONCE_AT) == ONCE_AT
    assert previous_cycle_at_or_before(S_ONCE, ONCE_AT - US) is None
    assert between(S_ONCE, utc(2000, 1, 1), utc(2099, 1, 1)) == [ONCE_AT]


def test_once_after_its_date() -> None:
    assert next_cycle_at_or_after(S_ONCE, ONCE_AT + US) is None
    assert previous_cycle_at_or_before(S_ONCE, utc(2099, 1, 1)) == ONCE_AT
    assert between(S_ONCE, ONCE_AT + US, utc(9999, 12, 31)) == []
    assert next_deadline(S_ONCE, ONCE_AT + H, ONCE_AT - H) is None
    assert next_deadline(S_ONCE, ONCE_AT + H - US, ONCE_AT - H) == ONCE_AT + H


def test_once_ignores_a_day_filter() -> None:
    s = Schedule(F.ONCE, hour=9, expected_date=date(2026, 12, 1), days_of_week=days("SU"))
    assert next_cycle_at_or_after(s, utc(2026, 1, 1)) == utc(2026, 12, 1, 9)


def test_calendar_ends_give_none_instead_of_overflow() -> None:
    daily = Schedule(F.DAILY, hour=12)
    monthly = Schedule(F.MONTHLY, hour=12, day_of_month=31)
    assert next_cycle_at_or_after(daily, utc(9999, 12, 31, 12, 1)) is None
    assert next_cycle_at_or_after(monthly, utc(9999, 12, 31, 12, 1)) is None
    assert previous_cycle_at_or_before(daily, utc(1, 1, 1, 11)) is None
    assert previous_cycle_at_or_before(monthly, utc(1, 1, 31, 11)) is None
    assert cycle_for(daily, utc(9999, 12, 31, 23, 59)) is None
    assert cycle_for(daily, utc(1, 1, 1, 0, 0)) is None
    assert between(daily, utc(9999, 12, 31), datetime.max.replace(tzinfo=UTC)) == [
        utc(9999, 12, 31, 12)
    ]


# --- windows: cycle_for ----------------------------------------------------------------------


def test_window_edges_are_inclusive() -> None:
    s = Schedule(F.DAILY, hour=13, window=timedelta(minutes=60))
    c = utc(2026, 11, 24, 13)
    assert cycle_for(s, c) == c
    assert cycle_for(s, c - H) == c
    assert cycle_for(s, c + H) == c
    assert cycle_for(s, c - H - US) is None
    assert cycle_for(s, c + H + US) is None
    assert cycle_for(s, c + timedelta(hours=12)) is None  # seed scenario 6: not relevant


def test_window_reaches_across_midnight() -> None:
    s = Schedule(F.DAILY, hour=23, minute=30, window=timedelta(minutes=60))
    assert cycle_for(s, utc(2026, 11, 25, 0, 20)) == utc(2026, 11, 24, 23, 30)
    assert cycle_for(s, utc(2026, 11, 24, 22, 40)) == utc(2026, 11, 24, 23, 30)


def test_day_filter_excludes_reports_near_a_missing_day() -> None:
    s = Schedule(F.WEEKLY, hour=0, minute=10, days_of_week=days("MO"))
    assert cycle_for(s, utc(2026, 11, 22, 23, 30)) == utc(2026, 11, 23, 0, 10)  # Sun night
    assert cycle_for(s, utc(2026, 11, 24, 0, 10)) is None  # Tuesday has no cycle


def test_hourly_overlapping_windows_pick_the_nearest_and_ties_go_earlier() -> None:
    s = Schedule(F.HOURLY, hour=None, minute=0, window=timedelta(minutes=60))
    ten, eleven = utc(2026, 11, 24, 10), utc(2026, 11, 24, 11)
    assert cycle_for(s, ten + timedelta(minutes=29)) == ten
    assert cycle_for(s, ten + timedelta(minutes=30)) == ten  # tie: the earlier cycle
    assert cycle_for(s, ten + timedelta(minutes=30) + US) == eleven
    assert cycle_for(s, eleven) == eleven
    assert cycle_for(s, eleven - US) == eleven


def test_hourly_window_at_the_edge_of_a_filtered_day() -> None:
    s = Schedule(F.HOURLY, hour=None, minute=0, days_of_week=days("MO"), window=H)
    assert cycle_for(s, utc(2026, 11, 22, 23, 1)) == utc(2026, 11, 23, 0)  # Sunday 23:01
    assert cycle_for(s, utc(2026, 11, 22, 22, 59)) is None
    assert cycle_for(s, utc(2026, 11, 23, 23, 30)) == utc(2026, 11, 23, 23)  # Tue 00:00 absent
    assert cycle_for(s, utc(2026, 11, 24, 0, 0)) == utc(2026, 11, 23, 23)
    assert cycle_for(s, utc(2026, 11, 24, 0, 0, 1)) is None


def test_wide_windows_overlap_between_days() -> None:
    s = Schedule(F.DAILY, hour=12, window=timedelta(hours=36))
    assert cycle_for(s, utc(2026, 11, 25, 0)) == utc(2026, 11, 24, 12)  # 12 h each side: tie
    assert cycle_for(s, utc(2026, 11, 25, 1)) == utc(2026, 11, 25, 12)
    assert cycle_for(s, utc(2026, 11, 24, 23)) == utc(2026, 11, 24, 12)


def test_tie_at_exactly_w_from_both_cycles() -> None:
    s = Schedule(F.DAILY, hour=0, window=timedelta(hours=12))
    assert cycle_for(s, utc(2026, 11, 24, 12)) == utc(2026, 11, 24)


def test_monthly_window_uses_the_clamped_day() -> None:
    s = Schedule(F.MONTHLY, hour=23, minute=30, day_of_month=31, window=H)
    assert cycle_for(s, utc(2027, 3, 1, 0, 15)) == utc(2027, 2, 28, 23, 30)
    assert cycle_for(s, utc(2027, 3, 31, 0, 15)) is None


def test_once_window() -> None:
    assert cycle_for(S_ONCE, ONCE_AT - H) == ONCE_AT
    assert cycle_for(S_ONCE, ONCE_AT + H) == ONCE_AT
    assert cycle_for(S_ONCE, ONCE_AT + H + US) is None
    assert cycle_for(S_ONCE, ONCE_AT - timedelta(days=1)) is None


# --- deadlines -------------------------------------------------------------------------------


def test_deadline_is_cycle_plus_window() -> None:
    s = Schedule(F.DAILY, hour=13, window=timedelta(minutes=45))
    assert deadline(s, utc(2026, 11, 24, 13)) == utc(2026, 11, 24, 13, 45)


def test_next_deadline_with_activation() -> None:
    s = Schedule(F.DAILY, hour=13)  # W = 60 min
    day = utc(2026, 11, 24)
    at_13, at_14 = day + timedelta(hours=13), day + timedelta(hours=14)
    tomorrow_14 = at_14 + timedelta(days=1)
    assert next_deadline(s, day, activated_at=day) == at_14
    assert next_deadline(s, at_13 + M, activated_at=day) == at_14  # inside the window
    assert next_deadline(s, at_14 - US, activated_at=day) == at_14
    assert next_deadline(s, at_14, activated_at=day) == tomorrow_14  # deadline must be > now
    # activated after today's cycle: today's cycle never counts, even inside its window
    assert next_deadline(s, at_13 + M, activated_at=at_13 + US) == tomorrow_14
    assert next_deadline(s, at_13 + M, activated_at=at_13) == at_14  # activation at c counts
    # activation in the future (a job not yet started): its first cycle after activation
    assert next_deadline(s, day, activated_at=day + timedelta(days=3)) == at_14 + timedelta(3)


def test_next_deadline_monthly_skips_to_the_clamped_day() -> None:
    s = Schedule(F.MONTHLY, hour=4, day_of_month=31, window=timedelta(hours=2))
    assert next_deadline(s, utc(2027, 2, 1), utc(2027, 1, 1)) == utc(2027, 2, 28, 6)
    assert next_deadline(s, utc(2027, 2, 28, 6), utc(2027, 1, 1)) == utc(2027, 3, 31, 6)


# --- due_cycles: the timer's catch-up --------------------------------------------------------


def test_due_cycles_boundaries() -> None:
    s = Schedule(F.DAILY, hour=13)  # deadlines at 14:00
    d24, d25 = utc(2026, 11, 24, 14), utc(2026, 11, 25, 14)
    act = utc(2026, 1, 1)
    assert list(due_cycles(s, d24 - US, d24, act)) == [d24 - H]  # deadline == now: due
    assert list(due_cycles(s, d24, d25 - US, act)) == []  # deadline == after: already done
    assert list(due_cycles(s, d24, d24, act)) == []
    assert list(due_cycles(s, d25, d24, act)) == []  # a clock that went backwards


def test_due_cycles_after_downtime_respects_activation() -> None:
    s = Schedule(F.DAILY, hour=13)
    after, now = utc(2026, 11, 20, 15), utc(2026, 11, 24, 15)
    assert list(due_cycles(s, after, now, utc(2026, 1, 1))) == [
        utc(2026, 11, d, 13) for d in (21, 22, 23, 24)
    ]
    assert list(due_cycles(s, after, now, utc(2026, 11, 22, 13))) == [
        utc(2026, 11, d, 13) for d in (22, 23, 24)
    ]
    assert list(due_cycles(s, after, now, utc(2026, 11, 22, 13, 0, 1))) == [
        utc(2026, 11, d, 13) for d in (23, 24)
    ]


def test_due_cycles_hourly_with_overlapping_windows() -> None:
    s = Schedule(F.HOURLY, hour=None, minute=0, window=timedelta(minutes=90))
    after, now = utc(2026, 11, 24, 12), utc(2026, 11, 24, 15)
    # deadlines c + 1h30 in (12:00, 15:00]: cycles 11:00, 12:00, 13:00
    assert list(due_cycles(s, after, now, utc(2026, 1, 1))) == [
        utc(2026, 11, 24, h) for h in (11, 12, 13)
    ]


def test_due_cycles_once() -> None:
    act = utc(2026, 1, 1)
    assert list(due_cycles(S_ONCE, ONCE_AT, ONCE_AT + H, act)) == [ONCE_AT]
    assert list(due_cycles(S_ONCE, ONCE_AT + H, utc(2099, 1, 1), act)) == []
    assert list(due_cycles(S_ONCE, ONCE_AT, ONCE_AT + H, ONCE_AT + US)) == []


# --- efficiency ------------------------------------------------------------------------------


def test_thirty_thousand_jobs_are_cheap() -> None:
    """A minute-by-minute walk would take minutes here; the jump arithmetic takes well under 1 s."""
    jobs = [
        Schedule(F.MONTHLY, hour=23, minute=59, day_of_month=31),
        Schedule(F.WEEKLY, hour=0, days_of_week=days("SU")),
        Schedule(F.HOURLY, hour=None, minute=59, days_of_week=days("MO")),
        Schedule(F.DAILY, hour=5, days_of_week=days("SA")),
        S_ONCE,
    ] * 6000
    now, act = utc(2027, 2, 1), utc(2026, 1, 1)
    started = time.perf_counter()
    for s in jobs:
        next_deadline(s, now, act)
        cycle_for(s, now)
    assert time.perf_counter() - started < 10  # generous: a shared CI box must not flake


# --- properties against the oracle -----------------------------------------------------------


@given(schedules(), instants, st.timedeltas(timedelta(0), timedelta(days=40)))
@fast
def test_cycles_between_matches_the_oracle(s: Schedule, start: datetime, span: timedelta) -> None:
    found = between(s, start, start + span)
    assert found == oracle(s, start, start + span)
    assert all(a < b for a, b in itertools.pairwise(found))
    assert all(c.tzinfo is UTC and c.second == c.microsecond == 0 for c in found)


@given(schedules(), instants, st.timedeltas(timedelta(0), timedelta(days=40)))
@fast
def test_every_deadline_follows_its_cycle(s: Schedule, start: datetime, span: timedelta) -> None:
    for c in cycles_between(s, start, start + span):
        assert deadline(s, c) == c + s.window
        assert deadline(s, c) > c
        assert cycle_for(s, c) == c  # a report at the cycle itself always belongs to it


@given(
    schedules(st.just(F.MONTHLY)),
    st.integers(2000, 2090),
    st.integers(1, 12),
    st.integers(1, 36),
)
@fast
def test_monthly_clamps_to_the_end_of_each_month(
    s: Schedule, year: int, month: int, months: int
) -> None:
    start = utc(year, month, 1)
    end_year, end_month = divmod(month - 1 + months, 12)
    end = utc(year + end_year, end_month + 1, 1) - US
    found = between(s, start, end)
    assert len(found) == months  # exactly one per month
    for c in found:
        assert c.day == min(s.day_of_month or 0, _last_day_of_month(c.date()))
        assert (c.hour, c.minute) == (s.hour, s.minute)
    assert found == oracle(s, start, end)


@given(schedules(st.just(F.WEEKLY)), instants, st.integers(1, 12))
@fast
def test_weekly_only_on_listed_days(s: Schedule, start: datetime, weeks: int) -> None:
    assert s.days_of_week is not None
    found = between(s, start, start + timedelta(weeks=weeks) - US)
    assert len(found) == weeks * len(s.days_of_week)  # every listed day, once a week
    assert all(c.weekday() in s.days_of_week for c in found)


@given(schedules(st.sampled_from([F.DAILY, F.HOURLY])), instants, st.integers(1, 3))
@fast
def test_day_filters_of_daily_and_hourly(s: Schedule, start: datetime, weeks: int) -> None:
    allowed = s.days_of_week if s.days_of_week is not None else frozenset(range(7))
    per_day = 24 if s.frequency is F.HOURLY else 1
    found = between(s, start, start + timedelta(weeks=weeks) - US)
    assert len(found) == weeks * len(allowed) * per_day
    assert all(c.weekday() in allowed for c in found)


def _brute_force_cycle_for(s: Schedule, t: datetime) -> datetime | None:
    inside = between(s, t - s.window, t + s.window)
    return min(inside, key=lambda c: (abs(c - t), c)) if inside else None


@given(schedules(), instants)
@fast
def test_cycle_for_is_the_nearest_cycle_whose_window_holds_t(s: Schedule, t: datetime) -> None:
    assert cycle_for(s, t) == _brute_force_cycle_for(s, t)


@given(schedules(), instants, st.data())
@fast
def test_reports_near_a_cycle_map_to_exactly_one_cycle(
    s: Schedule, t: datetime, data: st.DataObject
) -> None:
    """Aim at the interesting places: window edges and midpoints between neighbouring cycles."""
    near = next_cycle_at_or_after(s, t) or previous_cycle_at_or_before(s, t)
    assert near is not None
    following = next_cycle_at_or_after(s, near + US)
    targets = [near - s.window, near + s.window, near - s.window - US, near + s.window + US]
    if following is not None:
        targets.append(near + (following - near) / 2)
    report_at = data.draw(st.sampled_from(targets))
    expected = _brute_force_cycle_for(s, report_at)
    assert cycle_for(s, report_at) == expected
    if expected is not None:
        assert abs(expected - report_at) <= s.window


@given(schedules(), instants)
@fast
def test_next_and_previous_agree_with_cycles_between(s: Schedule, t: datetime) -> None:
    after = next_cycle_at_or_after(s, t)
    before = previous_cycle_at_or_before(s, t)
    if after is None:
        assert s.frequency is F.ONCE
        assert between(s, t, utc(9999, 12, 31)) == []
    else:
        assert after >= t
        assert between(s, t, after) == [after]
        assert next_cycle_at_or_after(s, after) == after
    if before is None:
        assert s.frequency is F.ONCE
        assert between(s, utc(1, 1, 1), t) == []
    else:
        assert before <= t
        assert between(s, before, t) == [before]
        assert previous_cycle_at_or_before(s, before) == before


@given(schedules(), instants, st.timedeltas(-timedelta(days=20), timedelta(days=20)))
@fast
def test_next_deadline_matches_brute_force(s: Schedule, now: datetime, shift: timedelta) -> None:
    activated_at = now + shift
    start = max(activated_at, now - s.window)
    horizon = start + timedelta(days=40)  # no gap between cycles is longer, except ONCE's
    if s.frequency is F.ONCE:
        assert s.expected_date is not None
        assert s.hour is not None
        when = s.expected_date
        horizon = max(horizon, utc(when.year, when.month, when.day, s.hour, s.minute))
    candidates = [c for c in oracle(s, start, horizon) if c + s.window > now]
    expected = candidates[0] + s.window if candidates else None
    if expected is None:
        assert s.frequency is F.ONCE
    assert next_deadline(s, now, activated_at) == expected
    if expected is not None:
        assert expected > now


@given(
    schedules(),
    instants,
    st.timedeltas(timedelta(0), timedelta(days=10)),
    st.timedeltas(-timedelta(days=20), timedelta(days=10)),
)
@fast
def test_due_cycles_matches_brute_force(
    s: Schedule, after: datetime, span: timedelta, shift: timedelta
) -> None:
    now, activated_at = after + span, after + shift
    expected = [
        c
        for c in oracle(s, after - s.window, now)
        if c >= activated_at and after < c + s.window <= now
    ]
    assert list(due_cycles(s, after, now, activated_at)) == expected


@given(
    schedules(),
    instants,
    st.timedeltas(timedelta(0), timedelta(days=5)),
    st.timedeltas(timedelta(0), timedelta(days=5)),
)
@fast
def test_due_cycles_is_seamless_across_timer_wakeups(
    s: Schedule, a: datetime, first: timedelta, second: timedelta
) -> None:
    """Whatever the timer's sleeps are, every deadline is flagged once and none is lost."""
    b, c = a + first, a + first + second
    act = a - timedelta(days=30)
    split = list(due_cycles(s, a, b, act)) + list(due_cycles(s, b, c, act))
    assert split == list(due_cycles(s, a, c, act))


@given(schedules(), instants, st.timedeltas(-timedelta(days=5), timedelta(days=5)))
@fast
def test_next_deadline_is_the_first_deadline_due_cycles_will_flag(
    s: Schedule, now: datetime, shift: timedelta
) -> None:
    activated_at = now + shift
    upcoming = next_deadline(s, now, activated_at)
    assume(upcoming is not None)
    assert upcoming is not None
    assert list(due_cycles(s, now, upcoming - US, activated_at)) == []
    flagged = list(due_cycles(s, now, upcoming, activated_at))
    assert [deadline(s, c) for c in flagged] == [upcoming]
