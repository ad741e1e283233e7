"""SPEC §10: the delivery side of the outbox, in SQL.

A delivery (one event, one channel) is `pending` until a daemon claims it with one conditional
UPDATE (`sending`, `claimed_by`, a lease in `claimed_until`); on PostgreSQL the candidate rows
are picked `FOR UPDATE SKIP LOCKED`, and the UPDATE re-checks the state, so two daemons never
both claim one row. The message goes out outside any transaction; then a second conditional
UPDATE (still claimed by us) records `sent`, or the next attempt, or `failed`. A daemon that
dies holding a claim leaves `sending` rows: a daemon on the same host frees them at start when
their process is gone, anyone else once the lease has run out. Such a row may have been sent
already (the crash came between the send and its record): that send is repeated, once per
crash. At-least-once across a crash; exactly once otherwise.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, or_, select, update

from backupwatch.alerting import (
    NOT_OK_KINDS,
    DigestJob,
    EventText,
    Kind,
    Routing,
    digest_key,
    reminder_key,
)
from backupwatch.enums import BackupEntryStatus, JobStatus
from backupwatch.store import (
    AlertDelivery,
    AlertEvent,
    BackupEntry,
    ExpectedBackupJob,
    Pause,
    Store,
    _current_status,
    _emit,
)

LEASE = timedelta(minutes=2)  # longer than any send: Apprise's timeouts are seconds
CLAIM_LIMIT = 500
DIGEST_DAYS = 14  # SPEC §12: compliance over the last 14 days


def _reminder_due(row: Any, now: datetime, routing: Routing) -> bool:
    """Still not OK, not paused, and `repeat_hours` (or a multiple) since it became so."""
    if row.status is None or JobStatus.from_entry(row.status) is JobStatus.OK:
        return False
    if Pause(row.paused_at, row.paused_until).covers(now):
        return False
    assert routing.repeat is not None
    return bool(now - row.created_at >= routing.repeat)


def _reminder_key(row: Any, now: datetime, routing: Routing) -> str:
    """Reminders are numbered from the event that made the job not OK."""
    assert routing.repeat is not None
    return reminder_key(row.job_id, row.created_at, int((now - row.created_at) / routing.repeat))


def identity() -> str:
    """Who claims: host, pid, and a token that tells this process from one with a reused pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class Due:
    channel: str
    count: int
    oldest: datetime | None  # of the new events (not retries) among them
    newest: datetime | None


@dataclass
class Claimed:
    id: int
    attempts: int
    done: set[str]
    event: EventText
    event_id: int
    created_at: datetime
    job_id: int | None


@dataclass
class Outcome:
    """What one send did to one claimed delivery."""

    done: set[str] = field(default_factory=set)
    error: str | None = None
    complete: bool = False
    batch: str | None = None


@dataclass(frozen=True)
class DeliveryRow:
    channel: str
    state: str
    attempts: int
    last_error: str | None
    sent_at: datetime | None
    next_attempt_at: datetime


@dataclass(frozen=True)
class EventRow:
    id: int
    text: EventText
    created_at: datetime
    deliveries: list[DeliveryRow]


def _text(event: AlertEvent) -> EventText:
    return EventText(
        kind=Kind(event.kind),
        company=event.company,
        site=event.site,
        job=event.job_label,
        agent_id=event.agent_id,
        status=event.status,
        cycle=event.cycle,
        since=event.since,
        message=event.message,
        instance=event.instance,
    )


class Outbox:
    def __init__(self, store: Store) -> None:
        self.store = store

    # ------------------------------------------------------------------ claiming

    def _claimable(self, now: datetime) -> Any:
        d = AlertDelivery
        return and_(
            d.next_attempt_at <= now,
            or_(d.state == "pending", and_(d.state == "sending", d.claimed_until < now)),
        )

    def due(self, now: datetime, channels: Iterable[str]) -> list[Due]:
        """Per channel of ours, how many deliveries may be claimed now, the oldest and newest."""
        d = AlertDelivery
        fresh = case((d.attempts == 0, d.next_attempt_at))  # new events, not retries
        query = (
            select(d.channel, func.count(), func.min(fresh), func.max(fresh))
            .where(self._claimable(now), d.channel.in_(list(channels)))
            .group_by(d.channel)
        )
        with self.store.reader.begin() as connection:
            return [Due(*row) for row in connection.execute(query)]

    def claim(self, channel: str, now: datetime, me: str) -> list[Claimed]:
        """Take every claimable delivery of `channel` (up to CLAIM_LIMIT) in one UPDATE."""
        d = AlertDelivery
        candidates = (
            select(d.id)
            .where(d.channel == channel, self._claimable(now))
            .order_by(d.id)
            .limit(CLAIM_LIMIT)
            .with_for_update(skip_locked=True)
        )
        with self.store.engine.begin() as connection:
            ids = [row.id for row in connection.execute(candidates)]
            if not ids:
                return []
            claimed = connection.execute(
                update(d)
                .where(d.id.in_(ids), self._claimable(now))
                .values(state="sending", claimed_by=me, claimed_until=now + LEASE)
                .returning(d.id)
            )
            taken = [row.id for row in claimed]
        return self._load(taken)

    def _load(self, ids: Sequence[int]) -> list[Claimed]:
        if not ids:
            return []
        d, e = AlertDelivery, AlertEvent
        query = (
            select(d, e)
            .join(e, e.id == d.event_id)
            .where(d.id.in_(list(ids)))
            .order_by(e.created_at, d.id)
        )
        with self.store.reading() as session:
            return [
                Claimed(
                    id=delivery.id,
                    attempts=delivery.attempts,
                    done=set(delivery.done_urls or ()),
                    event=_text(event),
                    event_id=event.id,
                    created_at=event.created_at,
                    job_id=event.job_id,
                )
                for delivery, event in session.execute(query)
            ]

    def sent_recently(self, channel: str, since: datetime) -> int:
        """Messages sent one by one to `channel` since then (the flood window)."""
        d = AlertDelivery
        query = select(func.count()).where(
            d.channel == channel, d.sent_at >= since, d.batch.is_(None)
        )
        with self.store.reader.begin() as connection:
            return int(connection.execute(query).scalar() or 0)

    def record(
        self, claimed: Claimed, me: str, outcome: Outcome, now: datetime, retry: datetime | None
    ) -> bool:
        """The result of one attempt, if the claim is still ours; False: it was not."""
        d = AlertDelivery
        done = sorted(claimed.done | outcome.done)
        values: dict[str, Any] = {"done_urls": done, "claimed_by": None, "claimed_until": None}
        if outcome.complete:
            values |= {"state": "sent", "sent_at": now, "batch": outcome.batch}
            values["last_error"] = None
        else:
            values |= {"attempts": claimed.attempts + 1, "last_error": outcome.error}
            if retry is None:
                values["state"] = "failed"
            else:
                values |= {"state": "pending", "next_attempt_at": retry}
        with self.store.engine.begin() as connection:
            result = connection.execute(
                update(d)
                .where(d.id == claimed.id, d.claimed_by == me, d.state == "sending")
                .values(**values)
            )
        return bool(result.rowcount == 1)

    def release_dead_claims(self, host: str, alive: Any) -> int:
        """At start: claims of this host's processes that are gone are not in flight any more."""
        d = AlertDelivery
        with self.store.reader.begin() as connection:  # SQLite: no write lock unless needed
            owners = connection.execute(
                select(d.claimed_by).where(d.state == "sending").distinct()
            ).scalars()
            dead = [o for o in owners if o and o.split(":")[0] == host and not alive(o)]
        if not dead:
            return 0
        with self.store.engine.begin() as connection:
            result = connection.execute(
                update(d)
                .where(d.state == "sending", d.claimed_by.in_(dead))
                .values(state="pending", claimed_by=None, claimed_until=None)
            )
        return int(result.rowcount)

    # ------------------------------------------------------------------ planning

    def plan_reminders(self, now: datetime, routing: Routing) -> int:
        """SPEC §10: a reminder every `repeat_hours` for each job still not OK (none for an
        acknowledged or paused one). Numbered from the event that made the job not OK, so
        every daemon computes the same key and a catch-up sends only the latest one."""
        if routing.repeat is None:
            return 0
        j, e = ExpectedBackupJob, AlertEvent
        anchors = (
            select(e.job_id, func.max(e.id).label("event_id"))
            .where(e.kind.in_([kind.value for kind in NOT_OK_KINDS]))
            .group_by(e.job_id)
            .subquery()
        )
        query = (
            select(
                j.id.label("job_id"),
                j.company_name,
                j.city,
                j.neighborhood,
                j.database_name,
                j.agent_id,
                j.alert_channels,
                j.paused_at,
                j.paused_until,
                j.instance,
                _current_status().label("status"),
                e.created_at,
                e.cycle,
                e.since,
                e.message,
            )
            .join(anchors, anchors.c.job_id == j.id)
            .join(e, e.id == anchors.c.event_id)
            .where(j.active.is_(True), j.acked_at.is_(None))
        )
        # Read first: on SQLite a write transaction takes the lock, and this runs every minute.
        with self.store.reader.begin() as connection:
            due = [row for row in connection.execute(query) if _reminder_due(row, now, routing)]
            keys = [_reminder_key(row, now, routing) for row in due]
            done = set(
                connection.execute(select(e.dedupe_key).where(e.dedupe_key.in_(keys))).scalars()
            )
        due = [row for row, key in zip(due, keys, strict=True) if key not in done]
        if not due:
            return 0
        planned = 0
        with self.store.engine.begin() as connection:
            for row in due:
                planned += self._remind(connection, row, now, routing)
        return planned

    def _remind(self, connection: Any, row: Any, now: datetime, routing: Routing) -> int:
        status = JobStatus.from_entry(row.status)
        label = f"{row.company_name}/{row.city}/{row.neighborhood}/{row.database_name}"
        event = {
            "dedupe_key": _reminder_key(row, now, routing),
            "kind": Kind.REMINDER.value,
            "job_id": row.job_id,
            "company": row.company_name,
            "site": f"{row.company_name}/{row.city}/{row.neighborhood}",
            "job_label": label,
            "agent_id": row.agent_id,
            "status": status.value,
            "cycle": row.cycle,
            "since": row.since,
            "message": row.message,
            "created_at": now,
            "instance": row.instance,
        }
        targets = routing.targets(Kind.REMINDER, row.alert_channels, Kind(status.value))
        return int(_emit(connection, event, targets, now))

    def plan_digest(self, now: datetime, routing: Routing) -> bool:
        """SPEC §10: one summary a day per channel, in the hour `digest_hour_utc`."""
        if routing.digest_hour_utc is None or now.hour != routing.digest_hour_utc:
            return False
        event = {
            "dedupe_key": digest_key(now),
            "kind": Kind.DIGEST.value,
            "job_id": None,
            "company": None,
            "site": "*",
            "job_label": None,
            "agent_id": None,
            "status": None,
            "cycle": None,
            "since": None,
            "message": f"daily summary of {now:%Y-%m-%d}",
            "created_at": now,
        }
        targets = routing.targets(Kind.DIGEST, sorted(routing.channels))
        with self.store.engine.begin() as connection:
            return _emit(connection, event, targets, now)

    # ------------------------------------------------------------------ reading

    def digest_jobs(self, now: datetime, days: int = DIGEST_DAYS) -> list[DigestJob]:
        """Every active job with its status and, over `days` days, cycles expected and OK."""
        from backupwatch.schedule import cycles_between, deadline

        j, b = ExpectedBackupJob, BackupEntry
        start = now - timedelta(days=days)
        with self.store.reading() as session:
            rows = session.execute(
                select(j, _current_status()).where(j.active.is_(True)).order_by(j.id)
            ).all()
            successes = select(b.job_id, b.cycle).where(
                b.status == BackupEntryStatus.SUCCESS, b.cycle >= start
            )
            ok_cycles = {(row.job_id, row.cycle) for row in session.execute(successes)}
        found = []
        for job, latest in rows:
            schedule = job.schedule
            pause = Pause(job.paused_at, job.paused_until)
            expected = [
                c
                for c in cycles_between(
                    schedule, max(start, job.activated_at), now - schedule.window
                )
                if not pause.covers(deadline(schedule, c))
            ]
            ok = sum(1 for c in expected if (job.id, c) in ok_cycles)
            found.append(
                DigestJob(
                    label=job.label,
                    company=job.company_name,
                    channels=job.alert_channels,
                    status=JobStatus.from_entry(latest),
                    paused=pause.covers(now),
                    expected=len(expected),
                    ok=ok,
                    instance=job.instance,
                )
            )
        return found

    def recent(self, limit: int) -> list[EventRow]:
        """The newest events and their deliveries, for `backupwatchctl alerts`."""
        e, d = AlertEvent, AlertDelivery
        with self.store.reading() as session:
            events = list(session.scalars(select(e).order_by(e.id.desc()).limit(limit)))
            ids = [event.id for event in events]
            deliveries: dict[int, list[DeliveryRow]] = {}
            for row in session.scalars(select(d).where(d.event_id.in_(ids)).order_by(d.id)):
                deliveries.setdefault(row.event_id, []).append(
                    DeliveryRow(
                        row.channel,
                        row.state,
                        row.attempts,
                        row.last_error,
                        row.sent_at,
                        row.next_attempt_at,
                    )
                )
        return [
            EventRow(ev.id, _text(ev), ev.created_at, deliveries.get(ev.id, [])) for ev in events
        ]

    def counts(self) -> dict[str, int]:
        """Deliveries per state (pending, sending, sent, failed)."""
        d = AlertDelivery
        with self.store.reader.begin() as connection:
            rows = connection.execute(select(d.state, func.count()).group_by(d.state)).all()
        return {state: int(count) for state, count in rows}
