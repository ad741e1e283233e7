"""The status page's past days, kept between pages (SPEC §12, issue 8's speed).

Thirteen of the grid's fourteen columns are past UTC days. Their cells change only when an
entry of one of those days is recorded (a late report, a MISSING flag) or deleted (history
retention), or when the set of active jobs changes. So each page reads today's counts, plus a
mark of the past days' entries (their number, the sum and the largest of their ids: one index
range scan, a few milliseconds for 40,000 entries), and makes the past days' cells again only
when that mark, the window or the active jobs differ from the ones they were made for.

Why the mark cannot miss a change: entries are never updated in a way that changes a verdict
(only their removal columns change), so the past days' counts change only by inserting or
deleting entries of those days, which changes their number, unless as many are inserted as
deleted; an insertion takes a new id (a sequence on PostgreSQL; on SQLite the largest rowid + 1,
an id used before only if the newest entry of all was deleted) and then changes the sum of the
ids unless deletions in the same interval make up for it exactly. That coincidence is bounded
anyway: the cells are made again at least every `MAX_AGE` seconds.

The mark is read before the counts it keys: an entry committed between the two reads is in the
counts and not in the mark, so the next page sees another mark and reads again (never the
other way round, which could keep a stale verdict).
"""

from __future__ import annotations

import threading
import time as clock
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time

from sqlalchemy import func, select

from backupwatch.grid import Stretch, day_counts, sites_of, stretch, window
from backupwatch.store import BackupEntry, JobView, Store

MAX_AGE = 600.0  # seconds: past days' cells are made again at least this often


@dataclass(frozen=True)
class EntriesMark:
    """What changes whenever entries of a range of cycles are recorded or deleted."""

    count: int
    id_sum: int
    id_max: int


@dataclass(frozen=True)
class PastKey:
    """Everything the past days' cells depend on."""

    first: date
    today: date
    jobs: tuple[tuple[int, str, str, str], ...]  # active job ids and their sites
    entries: EntriesMark


def entries_mark(store: Store, start: datetime, end: datetime) -> EntriesMark:
    """The mark of the entries whose cycle is in [start, end) (the grid's covering index)."""
    e = BackupEntry
    query = select(func.count(), func.sum(e.id), func.max(e.id)).where(
        e.cycle >= start, e.cycle < end
    )
    with store.reader.begin() as connection:
        count, id_sum, id_max = connection.execute(query).one()
    return EntriesMark(int(count or 0), int(id_sum or 0), int(id_max or 0))


class PastDays:
    """The past days' part of every site's row, made again only when it may have changed."""

    def __init__(self, max_age: float = MAX_AGE) -> None:
        self._max_age = max_age
        self._lock = threading.Lock()
        self._key: PastKey | None = None
        self._made = 0.0
        self._rows: dict[tuple[str, ...], Stretch] = {}
        self.made = 0  # how many times the cells were made (tests)

    def rows(
        self, store: Store, views: Sequence[JobView], now: datetime
    ) -> dict[tuple[str, ...], Stretch]:
        """Per site (of the active `views`), its cells for the window's days before today."""
        days = window(now)
        start = datetime.combine(days[0], time(), tzinfo=UTC)
        today = datetime.combine(days[-1], time(), tzinfo=UTC)
        jobs = tuple((v.id, v.company_name, v.city, v.neighborhood) for v in views if v.active)
        with self._lock:
            key = PastKey(days[0], days[-1], jobs, entries_mark(store, start, today))
            if key == self._key and clock.monotonic() - self._made < self._max_age:
                return self._rows
            counts = day_counts(store, days[:-1])
            self._rows = {
                site: stretch(counts.get(site, ()), days[:-1], False, "/".join(site), days[-1])
                for site in sites_of(views)
            }
            self._key, self._made = key, clock.monotonic()
            self.made += 1
            return self._rows
