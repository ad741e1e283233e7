"""SPEC §2, §4: the pure MISSING policy (`backupwatch/missing.py`), concrete cases then properties.

`Daemon` below is the store and the timer reduced to the policy (a timeline, a cursor, entries per
cycle, the timer's "deadline passed" index test), so hypothesis can try thousands of schedule
pairs and downtimes in seconds; tests/unit/test_schedule_change.py runs the same properties
through the real store on SQLite and PostgreSQL. The oracle is `closed()`: the cycles of one
schedule, at or after activation, whose deadline fell in a span, from `cycles_between` (itself
checked against a day-by-day walk in test_schedule.py), and `first_open()`.
"""

from __future__ import annotations

import itertools
import json
import operator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import event, given
from hypothesis import strategies as st
from strategies import closed, downtimes, first_open, instants, moments, schedules

from backupwatch.enums import BackupFrequency
from backupwatch.missing import (
    Change,
    Cursor,
    Due,
    Era,
    Timeline,
    assign_cycle,
    change_schedule,
    describe,
    eras_from_json,
    eras_to_json,
    first_pending,
    fresh_cursor,
    settle,
)
from backupwatch.schedule import Schedule, cycle_for, cycles_between

F = BackupFrequency
H = timedelta(hours=1)
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # `oldest` when the catch-up limit plays no part


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def daily(hour: int, window: int = 60) -> Schedule:
    return Schedule(F.DAILY, hour, window=timedelta(minutes=window))


@dataclass
class Daemon:
    """What the store and the timer do with the policy, minus SQL: one job's life."""

    timeline: Timeline
    cursor: Cursor
    entries: dict[datetime, list[str]] = field(default_factory=dict)

    @classmethod
    def activate(cls, schedule: Schedule, at: datetime) -> Daemon:
        timeline = Timeline(schedule, at)
        return cls(timeline, fresh_cursor(timeline, at))

    def tick(self, now: datetime, oldest: datetime = EPOCH) -> list[datetime]:
        """`Store.due_jobs` then `Store.settle_jobs`: MISSING for each due cycle without entry."""
        if self.cursor.cycle is None or self.cursor.deadline is None or self.cursor.deadline > now:
            return []
        plan = settle(self.timeline, self.cursor.cycle, now, oldest)
        flagged = [due.cycle for due in plan.due if due.cycle not in self.entries]
        for cycle in flagged:
            self.entries[cycle] = ["MISSING"]
        self.cursor = plan.cursor
        self.timeline = Timeline(self.timeline.schedule, self.timeline.activated_at)
        return flagged

    def sync(self, schedule: Schedule, now: datetime) -> Change:
        change = change_schedule(self.timeline, self.cursor.cycle, schedule, now)
        self.timeline, self.cursor = change.timeline, change.cursor
        return change

    def report(self, made: datetime) -> datetime | None:
        cycle = assign_cycle(self.timeline.schedule, self.timeline.previous, made)
        if cycle is not None:
            self.entries.setdefault(cycle, []).append("SUCCESS")
        return cycle


# --------------------------------------------------------------------------- the case


ACTIVATED, STOPPED, RESTARTED = (
    utc(2026, 11, 24, 10),
    utc(2026, 11, 24, 10, 0, 10),
    utc(2026, 11, 24, 20),
)


def test_13h_moved_to_11h_during_downtime_owes_13h_and_counts_11h_from_tomorrow() -> None:
    job = Daemon.activate(daily(13), ACTIVATED)
    assert job.tick(STOPPED) == []

    change = job.sync(daily(11), RESTARTED)

    assert change.owed == 1
    assert change.first_cycle == utc(2026, 11, 25, 11)
    assert change.timeline.previous == (Era(daily(13), utc(2026, 11, 24, 13), RESTARTED),)
    assert change.cursor == Cursor(utc(2026, 11, 24, 13), utc(2026, 11, 24, 14))  # due at once
    assert job.tick(RESTARTED) == [utc(2026, 11, 24, 13)]
    assert job.cursor == Cursor(utc(2026, 11, 25, 11), utc(2026, 11, 25, 12))
    assert job.timeline.previous == ()


@pytest.mark.parametrize(
    ("made", "cycle"),
    [
        (utc(2026, 11, 24, 13, 10), utc(2026, 11, 24, 13)),  # under the old schedule: owed 13:00
        (utc(2026, 11, 24, 11, 5), utc(2026, 11, 24, 11)),  # under the new one: its 11:00
        (utc(2026, 11, 24, 9, 0), None),  # 13:00's window opens at 12:00, 11:00's at 10:00
        (utc(2026, 11, 24, 12, 0), utc(2026, 11, 24, 13)),  # both windows: the owed one wins
    ],
)
def test_a_report_waiting_in_d_counts_for_the_owed_cycle_first(
    made: datetime, cycle: datetime | None
) -> None:
    job = Daemon.activate(daily(13), ACTIVATED)
    job.sync(daily(11), RESTARTED)

    assert job.report(made) == cycle


def test_the_owed_cycle_without_report_is_flagged_beside_the_new_schedules_entry() -> None:
    """The 11:05 report: 11:00 is recorded, 13:00 is still MISSING (nothing in its window)."""
    job = Daemon.activate(daily(13), ACTIVATED)
    job.sync(daily(11), RESTARTED)
    job.report(utc(2026, 11, 24, 11, 5))

    assert job.tick(RESTARTED) == [utc(2026, 11, 24, 13)]
    assert job.entries == {utc(2026, 11, 24, 11): ["SUCCESS"], utc(2026, 11, 24, 13): ["MISSING"]}


def test_a_live_reload_owes_nothing_and_moves_the_cursor_as_before() -> None:
    job = Daemon.activate(daily(13), utc(2026, 11, 24))
    now = utc(2026, 11, 24, 9, 30)

    change = job.sync(daily(9), now)  # 09:00's window is still open: it counts

    assert (change.owed, change.timeline.previous) == (0, ())
    assert change.cursor == Cursor(utc(2026, 11, 24, 9), utc(2026, 11, 24, 10))


def test_a_second_change_before_the_catch_up_carries_the_owed_cycles() -> None:
    """13:00 → 11:00 at 20:00 (13:00 owed); the daemon dies before its catch-up; at the next
    start (the 26th, 08:00) 11:00 → 06:00: 13:00 of the 24th and 11:00 of the 25th are owed."""
    job = Daemon.activate(daily(13), ACTIVATED)
    job.sync(daily(11), RESTARTED)

    change = job.sync(daily(6), utc(2026, 11, 26, 8))

    assert [era.schedule for era in change.timeline.previous] == [daily(13), daily(11)]
    assert change.owed == 2
    assert change.first_cycle == utc(2026, 11, 27, 6)  # the 26th's 06:00 closed at 07:00
    assert job.report(utc(2026, 11, 25, 11, 20)) == utc(2026, 11, 25, 11)  # made under 11:00
    assert job.tick(utc(2026, 11, 26, 8)) == [utc(2026, 11, 24, 13)]
    assert sorted(job.entries) == [utc(2026, 11, 24, 13), utc(2026, 11, 25, 11)]
    assert job.cursor.cycle == utc(2026, 11, 27, 6)


def test_the_catch_up_limit_applies_to_owed_cycles_too() -> None:
    job = Daemon.activate(daily(13), utc(2026, 11, 20))
    job.sync(daily(11), RESTARTED)  # owed: 13:00 of the 20th to the 24th

    flagged = job.tick(RESTARTED, oldest=RESTARTED - timedelta(days=2))

    assert flagged == [utc(2026, 11, 23, 13), utc(2026, 11, 24, 13)]
    assert job.timeline.previous == ()


def test_owed_and_new_cycles_at_the_same_instant_are_due_once() -> None:
    """13:00 (W 60) → 13:00 (W 600) at 20:00: the old 13:00 is owed, the new 13:00 still open."""
    job = Daemon.activate(daily(13), ACTIVATED)
    job.sync(daily(13, window=600), RESTARTED)

    assert job.tick(RESTARTED) == [utc(2026, 11, 24, 13)]
    assert job.cursor == Cursor(utc(2026, 11, 24, 13), utc(2026, 11, 24, 23))
    assert job.tick(utc(2026, 11, 24, 23)) == []  # the same cycle has its entry: never twice


def test_a_clock_stepped_back_after_the_change_expects_nothing_twice() -> None:
    job = Daemon.activate(daily(13), ACTIVATED)
    job.sync(daily(11), RESTARTED)

    plan = settle(job.timeline, utc(2026, 11, 24, 13), RESTARTED - H, EPOCH)

    assert [due.cycle for due in plan.due] == [utc(2026, 11, 24, 13)]
    assert plan.cursor.cycle == utc(2026, 11, 25, 11)


# --------------------------------------------------------------------------- words


def test_the_missing_message_names_the_cycle_the_window_the_site_and_a_replaced_schedule() -> None:
    cycle = utc(2026, 11, 24, 13)
    era = Era(daily(13), cycle, RESTARTED)

    plain = Due(cycle, daily(13)).message("ACME_Lyon_Part-Dieu")
    owed = Due(cycle, daily(13), era).message("ACME_Lyon_Part-Dieu")

    assert plain == (
        "no report for the cycle of 2026-11-24 13:00Z arrived before its deadline "
        "(window ±60 min); check the agent of site ACME_Lyon_Part-Dieu"
    )
    assert owed == (
        "no report for the cycle of 2026-11-24 13:00Z arrived before its deadline "
        "(window ±60 min); a cycle of the previous schedule (DAILY at 13:00, window ±60 min), "
        "replaced at 2026-11-24 20:00Z; check the agent of site ACME_Lyon_Part-Dieu"
    )


@pytest.mark.parametrize(
    ("schedule", "text"),
    [
        (daily(13), "DAILY at 13:00, window ±60 min"),
        (Schedule(F.HOURLY, None, 5, frozenset({0, 4})), "HOURLY at :05 on MO,FR, window ±60 min"),
        (Schedule(F.WEEKLY, 6, 30, frozenset({3})), "WEEKLY at 06:30 on TH, window ±60 min"),
        (Schedule(F.MONTHLY, 1, day_of_month=31), "MONTHLY on day 31 at 01:00, window ±60 min"),
        (
            Schedule(F.ONCE, 23, 59, expected_date=date(2026, 12, 1), window=timedelta(hours=12)),
            "ONCE on 2026-12-01 at 23:59, window ±720 min",
        ),
    ],
)
def test_describe_reads_like_the_job_file(schedule: Schedule, text: str) -> None:
    assert describe(schedule) == text


# --------------------------------------------------------------------------- properties

times = moments(4)


@given(first=schedules(), changes=st.lists(schedules(), min_size=1, max_size=3), data=st.data())
def test_every_cycle_that_closed_before_each_change_gets_exactly_one_entry(
    first: Schedule, changes: list[Schedule], data: st.DataObject
) -> None:
    """Activation, a running daemon until a stop, then one or more changes synced before the
    catch-up (a restart, or restarts that died before it), some owed cycles reported: every cycle
    of each schedule that closed while it was in force has exactly one entry, no other cycle has
    one, and the cursor is the last schedule's first cycle with a deadline after the last change."""
    activated, stopped = data.draw(moments(2))
    synced: list[datetime] = list(
        itertools.accumulate(
            data.draw(st.lists(downtimes(), min_size=len(changes), max_size=len(changes))),
            operator.add,
            initial=stopped,
        )
    )[1:]
    job = Daemon.activate(first, activated)
    job.tick(stopped)
    in_force = [first, *changes]
    for schedule, at in zip(changes, synced, strict=True):
        job.sync(schedule, at)
    owed = [c for era in job.timeline.previous for c in era.owed()]
    event(f"{len(job.timeline.previous)} era(s) owed")
    reported = data.draw(st.sets(st.sampled_from(owed)) if owed else st.just(set[datetime]()))
    for cycle in sorted(reported):
        assert job.report(cycle) == cycle  # a report made at an owed cycle counts for it

    job.tick(synced[-1])

    starts = [None, *synced[:-1]]
    expected: set[datetime] = set()
    for schedule, after, until in zip(in_force[:-1], starts, synced, strict=True):
        expected |= closed(schedule, activated, after, until)
    assert set(job.entries) == expected
    assert all(len(found) == 1 for found in job.entries.values())
    assert {c for c, found in job.entries.items() if found == ["SUCCESS"]} == reported
    last = changes[-1]
    assert job.cursor == Cursor.at(last, first_open(last, synced[-1], activated))
    assert job.timeline.previous == ()


@given(old=schedules(), new=schedules(), when=times)
def test_after_the_catch_up_the_new_schedule_counts_every_cycle_from_the_change(
    old: Schedule, new: Schedule, when: list[datetime]
) -> None:
    activated, stopped, changed, later = when[0], when[1], when[-2], when[-1]
    job = Daemon.activate(old, activated)
    job.tick(stopped)
    job.sync(new, changed)
    job.tick(changed)
    before = set(job.entries)

    flagged = job.tick(later)

    assert set(flagged) == closed(new, activated, changed, later) - before
    assert len(flagged) == len(set(flagged))


@given(old=schedules(), new=schedules(), when=times)
def test_a_live_reload_behaves_as_before(
    old: Schedule, new: Schedule, when: list[datetime]
) -> None:
    """No downtime: the timer has settled every deadline up to the reload, so nothing is owed
    and the cursor is the new schedule's first cycle (at or after activation) still open."""
    activated, reloaded = when[0], when[1]
    job = Daemon.activate(old, activated)
    job.tick(reloaded)
    settled = dict(job.entries)

    change = job.sync(new, reloaded)

    assert (change.owed, change.timeline.previous) == (0, ())
    assert change.cursor == Cursor.at(new, first_open(new, reloaded, activated))
    assert job.tick(reloaded) == []
    assert job.entries == settled


@given(schedule=schedules(), now=instants(), activated=instants())
def test_first_pending_is_the_first_cycle_after_activation_still_open(
    schedule: Schedule, now: datetime, activated: datetime
) -> None:
    assert first_pending(schedule, now, activated) == first_open(schedule, now, activated)


@given(old=schedules(), new=schedules(), when=times)
def test_a_change_owes_exactly_the_old_cycles_closed_since_the_cursor(
    old: Schedule, new: Schedule, when: list[datetime]
) -> None:
    activated, stopped, changed = when[0], when[1], when[2]
    job = Daemon.activate(old, activated)
    job.tick(stopped)
    cursor = job.cursor

    change = job.sync(new, changed)

    owed = closed(old, activated, stopped, changed)
    assert change.owed == len(owed)
    assert {c for era in change.timeline.previous for c in era.owed()} == owed
    assert change.first_cycle == first_open(new, changed, activated)
    if owed:
        assert change.cursor == cursor  # the old cursor: its deadline passed, due at once
        assert change.cursor.deadline is not None
        assert change.cursor.deadline <= changed
    else:
        assert change.cursor == Cursor.at(new, change.first_cycle)


@st.composite
def eras(draw: st.DrawFn) -> Era:
    schedule = draw(schedules())
    start, until = sorted(draw(st.lists(instants(), min_size=2, max_size=2)))
    first = next(iter(cycles_between(schedule, start, until)), None)
    return Era(schedule, first or start, until)


@given(current=schedules(), previous=st.lists(eras(), max_size=3).map(tuple), made=instants())
def test_a_report_counts_for_an_owed_cycle_when_its_schedule_says_so_else_as_always(
    current: Schedule, previous: tuple[Era, ...], made: datetime
) -> None:
    """SPEC §4's nearest-cycle rule, asked of each replaced schedule first: an owed cycle that is
    the nearest of its schedule wins (the nearest of those if several), else the current one's."""
    cycle = assign_cycle(current, previous, made)

    claims = [c for era in previous if (c := cycle_for(era.schedule, made)) and era.owes(c)]
    if claims:
        assert cycle in claims
        assert abs(cycle - made) == min(abs(c - made) for c in claims)
    else:
        assert cycle == cycle_for(current, made)
    assert assign_cycle(current, (), made) == cycle_for(current, made)  # no change: as always


@given(previous=st.lists(eras(), max_size=3).map(tuple))
def test_eras_survive_the_json_column(previous: tuple[Era, ...]) -> None:
    stored = json.loads(json.dumps(eras_to_json(previous)))

    assert eras_from_json(stored) == previous
