"""SPEC §4: the MISSING policy. Which cycles are due, where the cursor moves, what MISSING says.

Pure: every function takes `now`. The store keeps only the compare-and-swap of a job's cursor and
the insert of a MISSING entry; the timer is only the loop around them.

The cursor is the earliest cycle the timer has not settled yet, and its deadline (indexed, so the
timer finds due jobs without a scan). A cycle is settled once its deadline has passed: it then has
an entry (a report's outcome) or gets MISSING, and the cursor moves past it.

A schedule change takes effect when the daemon syncs the job files (at start or on a reload), at
that sync's `now`, `changed_at`; the daemon cannot know when someone edited the file, and this is
the one instant that every daemon, restart and test agrees on. Then:

- the replaced schedule's cycles at or after activation, from its cursor on, whose deadline passed
  at or before `changed_at` are still owed (an `Era`): after the reports waiting in the deposit
  folders are processed (SPEC §4: the sync at start comes before them, the timer after), each of
  them gets MISSING unless it has an entry. A report made under the replaced schedule still counts
  for its owed cycle (`assign_cycle`): its time is at most that cycle's deadline, so at most
  `changed_at`, when that schedule was still the one in force.
- the new schedule counts from the change: its first cycle is the first one (at or after
  activation) whose deadline is after `changed_at`, the rule a live reload has always used. Its
  cycles that closed before the change were never expected.

So no cycle that closed while the daemon was down is silently skipped. A second change while
cycles are still owed keeps them: each replaced schedule becomes one more era, until the timer
settles them all at once and the job is back to a single schedule.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from backupwatch.enums import WEEKDAYS, BackupFrequency
from backupwatch.schedule import (
    Schedule,
    cycle_for,
    cycles_between,
    deadline,
    next_cycle_at_or_after,
)

_MINUTE = timedelta(minutes=1)


@dataclass(frozen=True)
class Era:
    """A replaced schedule whose cycles are still owed: those from `first` with deadline <= `until`.

    `first` is where that schedule's own count stood when it was replaced (its cursor), so cycles
    it had already settled are never owed twice; `until` is when it was replaced.
    """

    schedule: Schedule
    first: datetime
    until: datetime

    def owes(self, cycle: datetime) -> bool:
        return cycle >= self.first and deadline(self.schedule, cycle) <= self.until

    def owed(self) -> Iterator[datetime]:
        return cycles_between(self.schedule, self.first, self.until - self.schedule.window)


@dataclass(frozen=True)
class Timeline:
    """What the policy knows of one job: its schedule, activation and the eras it still owes.

    `changed_at` is when the current schedule took effect, kept while eras are owed (the last
    era may have ended earlier: a schedule that owed nothing when it was replaced leaves none).
    """

    schedule: Schedule
    activated_at: datetime
    previous: tuple[Era, ...] = ()
    changed_at: datetime | None = None


@dataclass(frozen=True)
class Cursor:
    """The timer's place in a job: the earliest unsettled cycle and its deadline (None: done)."""

    cycle: datetime | None
    deadline: datetime | None

    @classmethod
    def at(cls, schedule: Schedule, cycle: datetime | None) -> Cursor:
        return cls(cycle, deadline(schedule, cycle) if cycle is not None else None)


@dataclass(frozen=True)
class Change:
    """A schedule change as the sync applies it."""

    timeline: Timeline
    cursor: Cursor
    owed: int  # cycles of replaced schedules still owed (the timer applies its catch-up limit)
    first_cycle: datetime | None  # the new schedule's first expected cycle


@dataclass(frozen=True)
class Due:
    """A cycle whose deadline has passed: MISSING unless it has an entry."""

    cycle: datetime
    schedule: Schedule
    era: Era | None = None  # set when the cycle belongs to a replaced schedule

    @property
    def deadline(self) -> datetime:
        return deadline(self.schedule, self.cycle)

    def message(self, agent_id: str) -> str:
        text = (
            f"no report for the cycle of {self.cycle:%Y-%m-%d %H:%M}Z arrived before its "
            f"deadline (window ±{_minutes(self.schedule.window)} min)"
        )
        if self.era is not None:
            text += (
                f"; a cycle of the previous schedule ({describe(self.era.schedule)}), "
                f"replaced at {self.era.until:%Y-%m-%d %H:%M}Z"
            )
        return f"{text}; check the agent of site {agent_id}"


@dataclass(frozen=True)
class Settlement:
    """What one timer step does to one job: flag `due` (those without an entry), move `cursor`."""

    due: tuple[Due, ...]
    cursor: Cursor


# --------------------------------------------------------------------------- the policy


def first_pending(schedule: Schedule, now: datetime, activated_at: datetime) -> datetime | None:
    """The earliest cycle >= activation whose deadline is still ahead of `now`."""
    candidate = next_cycle_at_or_after(schedule, max(activated_at, now - schedule.window))
    while candidate is not None and deadline(schedule, candidate) <= now:
        candidate = next_cycle_at_or_after(schedule, candidate + _MINUTE)
    return candidate


def fresh_cursor(timeline: Timeline, now: datetime) -> Cursor:
    """A job added or reactivated at `now`: nothing is owed, the first deadline ahead counts."""
    schedule = timeline.schedule
    return Cursor.at(schedule, first_pending(schedule, now, timeline.activated_at))


def change_schedule(
    old: Timeline, cursor: datetime | None, new: Schedule, changed_at: datetime
) -> Change:
    """The transition of a sync that changes an active job's schedule at `changed_at`.

    The replaced schedule's owed cycles become an era (earlier eras are carried, never dropped);
    while any are owed, the cursor points at the first era's first owed cycle, whose deadline
    has passed, so the timer's next step (after the waiting reports) settles them. Otherwise the
    cursor is the new schedule's first cycle with a deadline after `changed_at`.
    """
    eras = old.previous
    replaced = _replaced_era(old, cursor, changed_at)
    if replaced is not None:
        eras = (*eras, replaced)
    first = first_pending(new, changed_at, old.activated_at)
    owed = sum(1 for era in eras for _ in era.owed())
    if not eras:
        return Change(Timeline(new, old.activated_at), Cursor.at(new, first), owed, first)
    timeline = Timeline(new, old.activated_at, eras, changed_at)
    return Change(timeline, Cursor.at(eras[0].schedule, eras[0].first), owed, first)


def _replaced_era(old: Timeline, cursor: datetime | None, changed_at: datetime) -> Era | None:
    """The replaced schedule's owed cycles, or None when it owes none.

    Its count starts at the cursor, or, if the cursor is still held by an earlier era, at the
    first cycle it expected when it took effect itself.
    """
    start = cursor
    if old.changed_at is not None:
        start = first_pending(old.schedule, old.changed_at, old.activated_at)
    if start is None:
        return None
    first = next_cycle_at_or_after(old.schedule, max(start, old.activated_at))
    if first is None or deadline(old.schedule, first) > changed_at:
        return None
    return Era(old.schedule, first, changed_at)


def settle(timeline: Timeline, cursor: datetime, now: datetime, oldest: datetime) -> Settlement:
    """One timer step for one job at `now`, from its cursor.

    Due: every owed cycle of every era, then the current schedule's cycles from its count's start
    (the cursor, or its first cycle after the change) whose deadline passed by `now`, each once,
    in cycle order. Deadlines before `oldest` (the catch-up limit, `max_status_file_age_days`)
    are skipped: reports that old would be rejected anyway. The cursor moves to the current
    schedule's first cycle with a deadline still ahead, and the eras are done with.
    """
    schedule, activated_at = timeline.schedule, timeline.activated_at
    found: dict[datetime, Due] = {}
    for era in timeline.previous:
        for cycle in era.owed():
            found.setdefault(cycle, Due(cycle, era.schedule, era))
    start: datetime | None = cursor
    reference = now
    if timeline.changed_at is not None:
        start = first_pending(schedule, timeline.changed_at, activated_at)
        reference = max(now, timeline.changed_at)  # a clock stepped back expects nothing twice
    if start is not None:
        for cycle in cycles_between(schedule, max(start, activated_at), now - schedule.window):
            found.setdefault(cycle, Due(cycle, schedule))
    due = tuple(found[c] for c in sorted(found) if found[c].deadline >= oldest)
    return Settlement(due, Cursor.at(schedule, first_pending(schedule, reference, activated_at)))


def assign_cycle(schedule: Schedule, previous: tuple[Era, ...], t: datetime) -> datetime | None:
    """The cycle a report made at `t` belongs to, or None when it is not relevant.

    A job that still owes cycles of a replaced schedule asks that schedule first: when its nearest
    cycle (SPEC §4) is owed, the report counts for it, because such a report was made at most at
    that cycle's deadline, before the change took effect, under the schedule then in force.
    If several eras claim it, the nearest cycle wins (a tie: the earlier). Otherwise the current
    schedule decides, as for any job.
    """
    owed = [c for era in previous if (c := cycle_for(era.schedule, t)) is not None and era.owes(c)]
    if owed:
        return min(owed, key=lambda c: (abs(c - t), c))
    return cycle_for(schedule, t)


# --------------------------------------------------------------------------- words and storage


def describe(schedule: Schedule) -> str:
    """One line an operator recognises from the job file, e.g. `DAILY at 13:00, window ±60 min`."""
    at = f"{schedule.hour or 0:02d}:{schedule.minute:02d}"
    frequency = schedule.frequency
    if frequency is BackupFrequency.HOURLY:
        when = f"at :{schedule.minute:02d}"
    elif frequency is BackupFrequency.MONTHLY:
        when = f"on day {schedule.day_of_month} at {at}"
    elif frequency is BackupFrequency.ONCE:
        when = f"on {schedule.expected_date} at {at}"
    else:
        when = f"at {at}"
    days = schedule.days_of_week
    if days is not None and frequency not in (BackupFrequency.MONTHLY, BackupFrequency.ONCE):
        when += " on " + ",".join(WEEKDAYS[d] for d in sorted(days))
    return f"{frequency.value} {when}, window ±{_minutes(schedule.window)} min"


def eras_to_json(eras: tuple[Era, ...]) -> list[dict[str, Any]] | None:
    """The eras as the store's JSON column holds them; None when nothing is owed."""
    if not eras:
        return None
    return [
        {
            "schedule": _schedule_to_json(era.schedule),
            "first": era.first.isoformat(),
            "until": era.until.isoformat(),
        }
        for era in eras
    ]


def eras_from_json(data: Sequence[Mapping[str, Any]] | None) -> tuple[Era, ...]:
    if not data:
        return ()
    return tuple(
        Era(
            _schedule_from_json(item["schedule"]),
            datetime.fromisoformat(item["first"]),
            datetime.fromisoformat(item["until"]),
        )
        for item in data
    )


def _schedule_to_json(schedule: Schedule) -> dict[str, Any]:
    if schedule.window % _MINUTE:
        raise ValueError(f"a stored window is whole minutes, got {schedule.window}")
    days = schedule.days_of_week
    return {
        "frequency": schedule.frequency.value,
        "hour": schedule.hour,
        "minute": schedule.minute,
        "days_of_week": sorted(days) if days is not None else None,
        "day_of_month": schedule.day_of_month,
        "expected_date": schedule.expected_date.isoformat() if schedule.expected_date else None,
        "window_minutes": _minutes(schedule.window),
    }


def _schedule_from_json(data: Mapping[str, Any]) -> Schedule:
    days = data["days_of_week"]
    expected = data["expected_date"]
    return Schedule(
        frequency=BackupFrequency(data["frequency"]),
        hour=data["hour"],
        minute=data["minute"],
        days_of_week=frozenset(days) if days is not None else None,
        day_of_month=data["day_of_month"],
        expected_date=date.fromisoformat(expected) if expected else None,
        window=timedelta(minutes=data["window_minutes"]),
    )


def _minutes(window: timedelta) -> int:
    return int(window // _MINUTE)
