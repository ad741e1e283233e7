"""One log line when the database goes away, a summary while it stays away, one when it is back.

Every worker retries its report every few seconds during an outage and the timer its pass;
logging each failure gave thousands of lines a minute (issue 11 item 10). The threads report
here instead, and this decides what is worth a line.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

SUMMARY_EVERY = 60.0  # seconds between "still unreachable" lines


class OutageLog:
    def __init__(self, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._since: float | None = None
        self._failures = 0
        self._last_line = 0.0

    def failed(self, error: BaseException, **context: object) -> None:
        """A database operation failed; `context` (what was tried) goes on the first line."""
        now = self._monotonic()
        with self._lock:
            self._failures += 1
            if self._since is None:
                self._since, self._last_line = now, now
                first = True
            elif now - self._last_line >= SUMMARY_EVERY:
                self._last_line = now
                first = False
            else:
                return
            since, failures = self._since, self._failures
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        if first:
            log.error("database.unreachable", error=detail, action="retrying", **context)
        else:
            log.error(
                "database.still_unreachable",
                error=detail,
                down_s=round(now - since),
                failed_attempts=failures,
            )

    def ok(self) -> None:
        """A database operation succeeded: end the outage, if there was one."""
        with self._lock:
            if self._since is None:
                return
            down, failures = self._monotonic() - self._since, self._failures
            self._since, self._failures = None, 0
        log.info("database.back", down_s=round(down, 1), failed_attempts=failures)

    @property
    def down(self) -> bool:
        with self._lock:
            return self._since is not None
