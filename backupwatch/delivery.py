"""SPEC §10: the daemon's alert delivery loop, a thread of its own.

`run_once(now)` is the whole step (tests drive it with an injected clock; the thread is a loop
around it, as healthchecks' `sendalerts` is): plan the reminders and the digest, then per
channel claim what is due (see `outbox`), send it outside any transaction, record each
attempt. No floods: while events keep arriving for a channel (the timer flagging every job of
one deadline) the loop waits until they stop, up to a few seconds, and what is due then goes
out as one grouped message when it would make more than FLOOD_THRESHOLD messages in a minute;
so does the catch-up after a downtime.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta

import structlog
from sqlalchemy.exc import SQLAlchemyError

from backupwatch.alerting import (
    FLOOD_WINDOW,
    Kind,
    Message,
    digest,
    grouped,
    retry_at,
    routed_to,
    should_group,
    single,
)
from backupwatch.channels import Channels
from backupwatch.config import AlertSettings
from backupwatch.outage import OutageLog
from backupwatch.outbox import Claimed, Due, Outbox, Outcome, identity
from backupwatch.store import Store

log = structlog.get_logger(__name__)

POLL = 0.5  # seconds between looks at the outbox when idle
GATHER_QUIET = timedelta(seconds=0.5)  # a channel's events stopped arriving this long ago: go
GATHER_LIMIT = timedelta(seconds=5)  # ... or its oldest waits this long: go anyway
PLAN_EVERY = timedelta(minutes=1)  # reminders and the digest
ERROR_BACKOFF = 5.0
STALE = 60.0  # a send may take Apprise's timeouts (SMTP: 15 s) per URL


class DeliveryLoop:
    def __init__(
        self,
        store: Store,
        clock: Callable[[], datetime],
        alerts: AlertSettings,
        outage: OutageLog | None = None,
        me: str | None = None,
    ) -> None:
        self.outbox = Outbox(store)
        self.clock = clock
        self.outage = outage or OutageLog()
        self.me = me or identity()
        self.heartbeat = time.monotonic()
        self.catching_up = True  # the first delivery after start is the catch-up
        self._config = (alerts.routing(), Channels(alerts.channel_urls()))
        self._planned_at: datetime | None = None
        self._gathering = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def configure(self, alerts: AlertSettings) -> None:
        """A reload's `[alerts]`: swapped in one assignment, used from the next step on."""
        self._config = (alerts.routing(), Channels(alerts.channel_urls()))

    # ------------------------------------------------------------------ the step

    def run_once(self, now: datetime) -> bool:
        """Plan, then deliver what is due; True when something was sent (or tried)."""
        routing, channels = self._config
        planned = 0
        if self._planned_at is None or now - self._planned_at >= PLAN_EVERY:
            self._planned_at = now
            planned += self.outbox.plan_reminders(now, routing)
            planned += self.outbox.plan_digest(now, routing)
        worked, self._gathering = False, False
        for due in self.outbox.due(now, channels.names()):
            # What this step planned is all in: only other threads' bursts are waited for.
            if not planned and _still_arriving(due, now):
                self._gathering = True
                continue
            worked |= self._deliver(due.channel, now, channels)
        if worked:
            self.catching_up = False
        return worked

    def release_dead_claims(self) -> int:
        """At start: deliveries this host's dead processes had claimed are sent again now
        (see `outbox`: at most one resend for a crash between a send and its record)."""
        host = self.me.split(":")[0]
        released = self.outbox.release_dead_claims(host, self._claimant_alive)
        if released:
            log.warning("alert.claims_released", deliveries=released)
        return released

    def _claimant_alive(self, claimant: str) -> bool:
        try:
            _host, pid_text, _token = claimant.split(":")
            pid = int(pid_text)
        except ValueError:
            return True  # not ours to judge: the lease decides
        if pid == os.getpid():
            return claimant == self.me
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _deliver(self, channel: str, now: datetime, channels: Channels) -> bool:
        claimed = self.outbox.claim(channel, now, self.me)
        if not claimed:
            return False
        digests = [c for c in claimed if c.event.kind is Kind.DIGEST]
        others = [c for c in claimed if c.event.kind is not Kind.DIGEST]
        for claim in digests:
            self._send(channel, [claim], self._digest(channel, now), channels, now)
        recent = self.outbox.sent_recently(channel, now - FLOOD_WINDOW)
        if should_group(len(others), recent):
            self._send(channel, others, None, channels, now, grouped_as=uuid.uuid4().hex)
        else:
            for claim in others:
                self._send(channel, [claim], None, channels, now)
        return True

    def _digest(self, channel: str, now: datetime) -> Message:
        jobs = [job for job in self.outbox.digest_jobs(now) if routed_to(job, channel)]
        return digest(jobs, now)

    def _send(
        self,
        channel: str,
        claims: list[Claimed],
        message: Message | None,
        channels: Channels,
        now: datetime,
        grouped_as: str | None = None,
    ) -> None:
        """Each URL of the channel gets the claims it has not taken yet, in one message."""
        urls = channels.url_ids(channel)
        outcomes = {claim.id: Outcome(batch=grouped_as) for claim in claims}
        for ident in urls:
            todo = [claim for claim in claims if ident not in claim.done]
            if not todo:
                continue
            text = message or self._message(todo, grouped_as is not None)
            for result in channels.send(channel, text, only={ident}):
                for claim in todo:
                    if result.ok:
                        outcomes[claim.id].done.add(ident)
                    else:
                        outcomes[claim.id].error = f"{result.shown}: {result.error}"
            self.heartbeat = time.monotonic()
        for claim in claims:
            outcome = outcomes[claim.id]
            outcome.complete = set(urls) <= claim.done | outcome.done
            retry = None
            if not outcome.complete:
                retry = retry_at(claim.attempts + 1, claim.created_at, now)
            if not self.outbox.record(claim, self.me, outcome, now, retry):
                log.warning("alert.claim_lost", channel=channel, event=claim.event_id)
            self._log(channel, claim, outcome, retry)

    def _message(self, claims: list[Claimed], group: bool) -> Message:
        if group and len(claims) > 1:
            return grouped([claim.event for claim in claims], catch_up=self.catching_up)
        return single(claims[0].event)

    def _log(self, channel: str, claim: Claimed, outcome: Outcome, retry: datetime | None) -> None:
        event = claim.event
        fields = {
            "channel": channel,
            "kind": event.kind.value,
            "job": event.job,
            "site": event.site,
            "grouped": outcome.batch is not None,
        }
        if outcome.complete:
            log.info("alert.sent", **fields)
        elif retry is not None:
            log.warning("alert.retry", error=outcome.error, retry_at=retry.isoformat(), **fields)
        else:
            log.error("alert.failed", error=outcome.error, attempts=claim.attempts + 1, **fields)

    # ------------------------------------------------------------------ the thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="alert-delivery", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def healthy(self, stale_after: float) -> bool:
        return self.is_alive() and time.monotonic() - self.heartbeat < max(stale_after, STALE)

    def _loop(self) -> None:
        released = False
        while not self._stop.is_set():
            self.heartbeat = time.monotonic()
            try:
                if not released:
                    self.release_dead_claims()
                    released = True
                worked = self.run_once(self.clock())
                self.outage.ok()
                delay = 0.0 if worked else (0.1 if self._gathering else POLL)
            except SQLAlchemyError as exc:
                self.outage.failed(exc, loop="alert-delivery")
                delay = ERROR_BACKOFF
            except Exception:
                # A dead loop would never alert again: log, back off, go on.
                log.exception("alert.internal_error")
                delay = ERROR_BACKOFF
            self._wake.wait(delay)
            self._wake.clear()


def _still_arriving(due: Due, now: datetime) -> bool:
    """Events for this channel came in a moment ago and the oldest has not waited long."""
    if due.newest is None or due.oldest is None:
        return False
    return now - due.newest < GATHER_QUIET and now - due.oldest < GATHER_LIMIT


__all__ = ["DeliveryLoop"]
