"""A token bucket per client address for the HTTP listener (SPEC §12, issue 8).

The listener runs in the daemon's interpreter: every request it serves, even a reused page,
takes the GIL from report processing for a millisecond or two. Two clients fetching `/` and
`/metrics` back to back made ~250 requests a second and cut report throughput by half. So each
peer address gets `RATE` requests a second, with bursts of `BURST` (a browser, a Prometheus
scraping every 15 s, a few people behind one reverse proxy stay far below). A request beyond
that is first made to wait for its token, in its waitress thread without holding the GIL, when
the wait is short (`MAX_WAIT`) and few threads wait already (a thread is left for the others,
`/healthz` among them); otherwise it is answered `429 Too Many Requests` with `Retry-After`.
A client that hammers the listener is thus slowed down to `RATE`, and the daemon is not.

Decisions are pure functions of the bucket and a monotonic `now` (tests give the clock).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

RATE = 10.0  # requests a second per client address, sustained
BURST = 40  # requests a client may make at once after a quiet while
MAX_WAIT = 2.0  # seconds a request may be held for its token; beyond, 429
MAX_CLIENTS = 4096  # buckets kept; full ones (idle clients) are forgotten first


@dataclass(frozen=True)
class Decision:
    """Serve after `wait` seconds (0: now), or refuse with `Retry-After: retry_after`."""

    wait: float = 0.0
    retry_after: int | None = None

    @property
    def refused(self) -> bool:
        return self.retry_after is not None


@dataclass
class Bucket:
    tokens: float
    updated: float


class Limiter:
    """Per-client token buckets; `admit` reserves a token, `waited` frees a waiting slot."""

    def __init__(
        self,
        rate: float = RATE,
        burst: int = BURST,
        max_wait: float = MAX_WAIT,
        waiters: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate, self.burst, self.max_wait, self.waiters = rate, burst, max_wait, waiters
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, Bucket] = {}
        self._waiting = 0

    def admit(self, client: str) -> Decision:
        """Take a token of `client`'s bucket, now or after a short wait, or refuse."""
        with self._lock:
            now = self._clock()
            bucket = self._bucket(client, now)
            bucket.tokens -= 1
            if bucket.tokens >= 0:
                return Decision()
            wait = -bucket.tokens / self.rate
            if wait <= self.max_wait and self._waiting < self.waiters:
                self._waiting += 1  # the caller calls `waited` after its wait
                return Decision(wait=wait)
            bucket.tokens += 1  # refused: no token taken
            return Decision(retry_after=max(1, math.ceil((1 - bucket.tokens) / self.rate)))

    def waited(self) -> None:
        with self._lock:
            self._waiting -= 1

    def _bucket(self, client: str, now: float) -> Bucket:
        bucket = self._buckets.get(client)
        if bucket is None:
            if len(self._buckets) >= MAX_CLIENTS:
                self._forget(now)
            bucket = self._buckets[client] = Bucket(float(self.burst), now)
        else:
            refill = (now - bucket.updated) * self.rate
            bucket.tokens = min(float(self.burst), bucket.tokens + refill)
            bucket.updated = now
        return bucket

    def _forget(self, now: float) -> None:
        """Drop the buckets that have refilled (their clients start afresh anyway), then, if
        a crowd of addresses is still there, the oldest."""
        for client, bucket in list(self._buckets.items()):
            if bucket.tokens + (now - bucket.updated) * self.rate >= self.burst:
                del self._buckets[client]
        while len(self._buckets) >= MAX_CLIENTS:
            del self._buckets[min(self._buckets, key=lambda c: self._buckets[c].updated)]
