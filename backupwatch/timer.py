"""SPEC §4: the timer that flags MISSING within seconds of a deadline.

It sleeps until the earliest `next_deadline_at` (an index lookup), then settles the jobs whose
deadline passed. `run_once(now)` is the whole step, so tests drive it with an injected clock and
the thread is only a loop around it. A job whose site has a report queued or being processed is
deferred for a little while: that report may well be the one the deadline is waiting for.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

import structlog
from sqlalchemy.exc import SQLAlchemyError

from backupwatch.outage import OutageLog
from backupwatch.store import DueJob, Store

log = structlog.get_logger(__name__)

MAX_SLEEP = 10.0  # re-read the deadline index (other daemons, reloads) and beat the heart
DEFER_LIMIT = timedelta(seconds=60)  # how long a busy site may hold its own deadline back
BUSY_POLL = 1.0
ERROR_BACKOFF = 5.0
SETTLERS = 2  # pages settled at once on PostgreSQL, by helper threads
WAVE_LINES = 20  # MISSING lines logged one by one per page; more: one line for the page


@dataclass(frozen=True)
class Flagged:
    job_id: int
    label: str
    site: str
    cycle: datetime


@dataclass(frozen=True)
class _Page:
    """A page of due jobs being settled (`Store.settle_jobs`), in this thread or beside it."""

    jobs: list[DueJob]
    settled: Future[dict[int, list[datetime]]]

    def flagged(self) -> list[Flagged]:
        """What the page flagged (raising what its transaction raised), logged in page order."""
        found = self.settled.result()
        flagged = [
            Flagged(job.id, job.label, job.agent_id, cycle)
            for job in self.jobs
            for cycle in found.get(job.id, ())
        ]
        _log_flagged(flagged)
        return flagged


class MissingTimer:
    def __init__(
        self,
        store: Store,
        clock: Callable[[], datetime],
        max_age: timedelta,
        site_busy: Callable[[DueJob], bool] | None = None,
        outage: OutageLog | None = None,
    ) -> None:
        self.store = store
        self.outage = outage or OutageLog()
        self.clock = clock
        self.max_age = max_age
        self.site_busy = site_busy or (lambda _job: False)
        self.heartbeat = time.monotonic()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._deferred = False
        # PostgreSQL: pages settled two at a time by helper threads (see `run_once`); SQLite
        # (one writer): one at a time, in this thread.
        self._settlers = SETTLERS if store.engine.dialect.name == "postgresql" else 1
        self._pool = (
            ThreadPoolExecutor(self._settlers, thread_name_prefix="missing-settle")
            if self._settlers > 1
            else None
        )

    # ------------------------------------------------------------------ the step

    def run_once(self, now: datetime) -> list[Flagged]:
        """Flag every due cycle as of `now`; the clock is read by the caller, once.

        On PostgreSQL two pages are settled at once by helper threads while the next one is
        read (the GIL is released while each transaction waits for the server): pages are
        disjoint keyset ranges, each locks its own rows in id order. Their flags are logged in
        page order. SQLite has one writer: one page at a time, in this thread.
        """
        flagged: list[Flagged] = []
        self._deferred = False
        oldest = now - self.max_age
        after: tuple[datetime, int] | None = None
        in_flight: deque[_Page] = deque()
        try:
            while page := self.store.due_jobs(now, after=after):
                # A wave of deadlines is a minute of pages: each one is progress, not a wedge.
                self.heartbeat = time.monotonic()
                last = page[-1]
                assert last.next_deadline_at is not None
                after = (last.next_deadline_at, last.id)
                ready = [job for job in page if not self._defer(job, now)]
                in_flight.append(self._submit(ready, now, oldest))
                if len(in_flight) >= self._settlers:
                    flagged.extend(in_flight.popleft().flagged())
            while in_flight:
                flagged.extend(in_flight.popleft().flagged())
        finally:
            for pending in in_flight:  # after an error: the others finish, their flags logged
                if pending.settled.exception() is None:
                    pending.flagged()
        return flagged

    def _submit(self, jobs: list[DueJob], now: datetime, oldest: datetime) -> _Page:
        if self._pool is None:
            done: Future[dict[int, list[datetime]]] = Future()
            done.set_result(self.store.settle_jobs(jobs, now, oldest) if jobs else {})
            return _Page(jobs, done)
        return _Page(jobs, self._pool.submit(self.store.settle_jobs, jobs, now, oldest))

    def _defer(self, job: DueJob, now: datetime) -> bool:
        assert job.next_deadline_at is not None
        if now - job.next_deadline_at > DEFER_LIMIT or not self.site_busy(job):
            return False
        self._deferred = True
        return True

    def seconds_until_next(self, now: datetime) -> float:
        if self._deferred:
            return BUSY_POLL
        upcoming = self.store.earliest_deadline()
        if upcoming is None:
            return MAX_SLEEP
        return max(0.0, min(MAX_SLEEP, (upcoming - now).total_seconds()))

    # ------------------------------------------------------------------ the thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="missing-timer", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Re-read the deadline index now (after a reload changed the schedules)."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                now = self.clock()
                self.run_once(now)
                delay = self.seconds_until_next(now)
                self.outage.ok()
            except SQLAlchemyError as exc:
                self.outage.failed(exc, loop="missing-timer")
                delay = ERROR_BACKOFF
            except Exception:
                # A dead timer would never flag MISSING again: log, back off, go on.
                log.exception("timer.internal_error")
                delay = ERROR_BACKOFF
            self._wake.wait(max(delay, 0.05))
            self._wake.clear()


def _log_flagged(flagged: list[Flagged]) -> None:
    """One `entry.recorded` line per MISSING, as for a report's entries; but a page that flags
    more than `WAVE_LINES` (a network outage: thousands of deadlines at once) says so in one
    `entry.recorded_many` line with the count and the first sites. journald keeps at most
    10,000 lines per 30 s of a service by default and would drop most of a wave's, and a line
    costs about as much as settling its job; every entry is in the database (`status`,
    `history`, the page)."""
    if len(flagged) > WAVE_LINES:
        sites = sorted({flag.site for flag in flagged})
        cycles = sorted({flag.cycle for flag in flagged})
        log.warning(
            "entry.recorded_many",
            status="MISSING",
            count=len(flagged),
            sites=len(sites),
            first_sites=sites[:WAVE_LINES],
            cycles=[cycle.isoformat() for cycle in cycles[:WAVE_LINES]],
            message=f"{len(flagged)} cycles had no report before their deadline",
        )
        return
    for flag in flagged:
        log.warning(
            "entry.recorded",
            job=flag.label,
            site=flag.site,
            status="MISSING",
            cycle=flag.cycle.isoformat(),
            message=f"no report before the deadline of the {flag.cycle:%Y-%m-%d %H:%M}Z cycle",
        )
