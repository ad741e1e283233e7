"""SPEC §14: what retention keeps, as pure functions of the facts and `now`.

The grandfather-father-son rule over a job's validated backups: of the successes still in final
storage, the newest of each of the `daily` most recent days that have one, of the `weekly` most
recent ISO weeks, and of the `monthly` most recent months are kept, and always the newest of all.
Everything else may be pruned. Counting periods that *have* a backup (not calendar periods back
from `now`) means a job that stopped sending keeps its last backups instead of losing them all,
and makes the rule idempotent: applied to what it kept, it keeps all of it.

The adapter (`pruning`) gathers the facts and acts; nothing here touches a file or the database.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class Keep:
    """How many periods of each kind keep their newest backup (0: none of that kind)."""

    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    @classmethod
    def resolve(cls, job: Sequence[int | None], default: Sequence[int | None]) -> Keep | None:
        """A job's own counts over the config's; None when neither asks for pruning at all
        (SPEC §14: validated backups are pruned only when a job asks for it)."""
        pairs = zip(job, default, strict=True)
        counts = [own if own is not None else fallback for own, fallback in pairs]
        if all(count is None for count in counts):
            return None
        daily, weekly, monthly = (count or 0 for count in counts)
        return cls(daily, weekly, monthly)


@dataclass(frozen=True)
class Backup:
    """One success whose file may still be in final storage: what the rule looks at."""

    id: int
    cycle: datetime  # aware UTC


def _day(b: Backup) -> Hashable:
    return b.cycle.date()


def _week(b: Backup) -> Hashable:
    year, week, _ = b.cycle.isocalendar()
    return (year, week)


def _month(b: Backup) -> Hashable:
    return (b.cycle.year, b.cycle.month)


def _newest_per_period(
    ordered: Sequence[Backup], period: Callable[[Backup], Hashable], count: int
) -> Iterable[int]:
    """The newest backup of each of the `count` most recent periods that have one."""
    seen: set[Hashable] = set()
    for backup in ordered:
        if len(seen) >= count:
            return
        key = period(backup)
        if key not in seen:
            seen.add(key)
            yield backup.id


def newest_first(backups: Iterable[Backup]) -> list[Backup]:
    return sorted(backups, key=lambda b: (b.cycle, b.id), reverse=True)


def gfs_keep(backups: Iterable[Backup], keep: Keep) -> set[int]:
    """The ids the rule keeps: never fewer than the newest, never more than
    daily + weekly + monthly (+1 for the newest when every count is 0)."""
    ordered = newest_first(backups)
    if not ordered:
        return set()
    kept = {ordered[0].id}
    kept.update(_newest_per_period(ordered, _day, keep.daily))
    kept.update(_newest_per_period(ordered, _week, keep.weekly))
    kept.update(_newest_per_period(ordered, _month, keep.monthly))
    return kept


def gfs_prune(backups: Iterable[Backup], keep: Keep) -> list[Backup]:
    """The backups the rule lets go, oldest first."""
    listed = list(backups)
    kept = gfs_keep(listed, keep)
    return sorted((b for b in listed if b.id not in kept), key=lambda b: (b.cycle, b.id))


@dataclass(frozen=True)
class Cutoffs:
    """The instants before which each kind of thing is old enough to go (SPEC §14)."""

    entries: datetime  # entries whose cycle is older (each job keeps its newest)
    reports: datetime  # processed_reports rows (never younger than a report may be accepted)
    alerts: datetime  # alert events, once delivered (their keys, as long as the reports')
    moved: datetime  # files in _archive/ and _rejected/, by when they were moved there
    stale: datetime  # uploads in D that no report claimed since


def cutoffs(
    now: datetime,
    history_days: float,
    archive_days: float,
    stale_upload_hours: float,
    max_report_age_days: float,
) -> Cutoffs:
    """A report's bytes must stay known while the same report could still be accepted (its
    freshness limit plus a day): forgetting them sooner would let it be recorded twice. An
    alert event's key (a job, a kind, a cycle) likewise: a cycle makes events as long as its
    reports can come."""
    history = now - timedelta(days=history_days)
    idempotency = now - timedelta(days=max_report_age_days + 1)
    return Cutoffs(
        entries=history,
        reports=min(history, idempotency),
        alerts=min(history, idempotency),
        moved=now - timedelta(days=archive_days),
        stale=now - timedelta(hours=stale_upload_hours),
    )


@dataclass(frozen=True)
class Placed:
    """What the daemon recorded of a file it placed, and what the disk shows now."""

    dev: int | None
    ino: int | None
    size: int | None


def same_file(recorded: Placed, found: Placed) -> bool:
    """Only the very file the daemon placed is removed: same device, inode and size."""
    if None in (recorded.dev, recorded.ino, recorded.size):
        return False
    return recorded == found
