"""SPEC §10: which state changes are alert events, their keys, where they go, what they say.

Pure: the store writes events in the transaction that changes a job's state and asks this
module what to write; the delivery loop asks it what to send. An event's unique `dedupe_key`
is what makes it exactly-once in the outbox: every path that could write the same event
(two workers, two daemons, a retry after a crash) computes the same key, and the second
insert does nothing.
"""

from __future__ import annotations

import enum
import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from backupwatch.enums import JobStatus
from backupwatch.names import visible

DEFAULT_CHANNEL = "default"  # the unnamed channel of `[alerts]`
FLOOD_THRESHOLD = 5  # SPEC §10: more than this many in a minute for one channel: one message
FLOOD_WINDOW = timedelta(minutes=1)


class Kind(enum.StrEnum):
    MISSING = "MISSING"
    FAILED = "FAILED"
    HASH_MISMATCH = "HASH_MISMATCH"
    TRANSFER_INTEGRITY_FAILED = "TRANSFER_INTEGRITY_FAILED"
    RECOVERED = "RECOVERED"
    UNCHANGED = "UNCHANGED"
    SUSPICIOUS = "SUSPICIOUS"
    REJECTED = "REJECTED"
    REMINDER = "REMINDER"  # a job still not OK after `repeat_hours` (sent if its status is `on`)
    DIGEST = "DIGEST"  # the daily summary (sent when `digest_hour_utc` is set)


# The kinds an operator may list in `on` (SPEC §10); reminders and digests have their own keys.
EVENT_KINDS: tuple[Kind, ...] = tuple(Kind)[:8]
NOT_OK_KINDS = frozenset(
    {Kind.MISSING, Kind.FAILED, Kind.HASH_MISMATCH, Kind.TRANSFER_INTEGRITY_FAILED}
)


def transition(before: JobStatus, after: JobStatus) -> Kind | None:
    """The event of a job's `current_status` changing from `before` to `after`, if any.

    Turning into a not-OK status is that status's event (from OK, from UNKNOWN, or from another
    not-OK status); back to OK after a not-OK status is RECOVERED; UNKNOWN → OK is no event.
    """
    if before == after or after is JobStatus.UNKNOWN:
        return None
    if after is JobStatus.OK:
        return None if before is JobStatus.UNKNOWN else Kind.RECOVERED
    return Kind(after.value)


# --------------------------------------------------------------------------- dedupe keys


def _stamp(instant: datetime) -> str:
    return instant.strftime("%Y%m%dT%H%M%SZ")


def job_event_key(job_id: int, kind: Kind, cycle: datetime) -> str:
    """One event per (job, kind, cycle): whoever records the transition, it is written once."""
    return f"job:{job_id}:{kind.value}:{_stamp(cycle)}"


def rejected_key(site: str, now: datetime) -> str:
    """At most one REJECTED per site per UTC hour (SPEC §10); the site's path may be long."""
    digest = hashlib.sha256(site.encode("utf-8", "surrogateescape")).hexdigest()[:24]
    return f"site:{digest}:REJECTED:{now:%Y%m%dT%H}"


def reminder_key(job_id: int, since: datetime, number: int) -> str:
    return f"job:{job_id}:REMINDER:{_stamp(since)}:{number}"


def digest_key(day: datetime) -> str:
    return f"digest:{day:%Y-%m-%d}"


# --------------------------------------------------------------------------- routing


@dataclass(frozen=True)
class Routing:
    """What the configuration says about fanning an event out (SPEC §10).

    `channels`: the names of the channels that have at least one URL; `on`: the kinds sent.
    A job's `alert_channels` (None: the default channel) picks among them; a name no longer
    configured is skipped (a job row of another host, or a channel removed by a reload).
    """

    channels: frozenset[str] = frozenset()
    on: frozenset[Kind] = frozenset(EVENT_KINDS)
    repeat: timedelta | None = timedelta(hours=24)
    digest_hour_utc: int | None = None

    def targets(
        self, kind: Kind, job_channels: Sequence[str] | None, status: Kind | None = None
    ) -> list[str]:
        """The channels an event of `kind` goes to; a REMINDER follows its status's `on`."""
        sent = status if kind is Kind.REMINDER else kind
        if kind is not Kind.DIGEST and (sent is None or sent not in self.on):
            return []
        wanted = list(job_channels) if job_channels else [DEFAULT_CHANNEL]
        return sorted({name for name in wanted if name in self.channels})


def routing(
    channels: Iterable[str], on: Iterable[str], repeat_hours: float, digest_hour_utc: int | None
) -> Routing:
    """The `Routing` of an `[alerts]` table (`config.AlertSettings`)."""
    return Routing(
        channels=frozenset(channels),
        on=frozenset(Kind(kind) for kind in on),
        repeat=timedelta(hours=repeat_hours) if repeat_hours else None,
        digest_hour_utc=digest_hour_utc,
    )


def site_channels(job_channels: Iterable[Sequence[str] | None]) -> list[str] | None:
    """A site's channels for REJECTED: those of every job in its folder (None: the default)."""
    names: set[str] = set()
    for channels in job_channels:
        names.update(channels or [DEFAULT_CHANNEL])
    return sorted(names) or None


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class EventText:
    """What an event row holds for its message (SPEC §10: what a person needs to act)."""

    kind: Kind
    company: str | None
    site: str  # company/city/neighborhood, or the folder of a REJECTED report
    job: str | None  # company/city/neighborhood/database
    agent_id: str | None
    status: str | None  # the job's status this event is about
    cycle: datetime | None
    since: datetime | None
    message: str
    instance: str | None = None  # SPEC §15: the daemon whose job or deposit folder it is


@dataclass(frozen=True)
class Message:
    title: str
    body: str


def _z(instant: datetime | None) -> str:
    return "-" if instant is None else instant.strftime("%Y-%m-%d %H:%MZ")


def single(event: EventText) -> Message:
    """One event, one message: a short title and plain-text lines."""
    subject = event.job or event.site
    label = event.kind.value if event.kind is not Kind.REMINDER else f"still {event.status}"
    title = f"backupwatch: {label}: {subject}"
    lines = []
    if event.job:
        lines.append(f"Job: {event.job}")
    site = event.site if not event.agent_id else f"{event.site} (agent {event.agent_id})"
    lines.append(f"Site: {site}")
    if event.instance:
        lines.append(f"Instance: {visible(event.instance)}")
    if event.status:
        since = (
            f" since {_z(event.since)}" if event.since and event.kind is not Kind.RECOVERED else ""
        )
        lines.append(f"Status: {event.status}{since}")
    if event.kind is Kind.RECOVERED and event.since:
        lines.append(f"Not OK since: {_z(event.since)}")
    if event.cycle:
        lines.append(f"Cycle: {_z(event.cycle)}")
    lines.append(f"What happened: {visible(event.message)}")
    lines.append(f"See more: {more_command(event)}")
    return Message(title, "\n".join(lines))


def more_command(event: EventText) -> str:
    if event.job:
        return f"backupwatchctl history {event.job}"
    if event.kind is Kind.REJECTED:
        return "backupwatchctl rejected"
    return "backupwatchctl status"


def grouped(events: Sequence[EventText], catch_up: bool = False) -> Message:
    """Many events for one channel: one message, by company and site, with counts."""
    kinds = Counter(_shown_kind(e) for e in events)
    summary = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
    title = f"backupwatch: {len(events)} alerts ({summary})"
    lines = []
    if catch_up:
        lines.append("Catch-up after the daemon was down or busy:")
    by_company: dict[str, dict[str, Counter[str]]] = {}
    several = len({event.instance for event in events}) > 1
    for event in events:
        company = by_company.setdefault(event.company or "-", {})
        site = f"{event.site} [{event.instance or '-'}]" if several else event.site
        company.setdefault(site, Counter())[_shown_kind(event)] += 1
    for name, sites in sorted(by_company.items()):
        total = sum(sum(counts.values()) for counts in sites.values())
        lines.append(f"{name} ({total})")
        for site, counts in sorted(sites.items()):
            text = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items()))
            lines.append(f"  {visible(site)}: {text}")
    lines.append("See more: backupwatchctl status; backupwatchctl alerts")
    return Message(title, "\n".join(lines))


def _shown_kind(event: EventText) -> str:
    if event.kind is Kind.REMINDER:
        return f"still {event.status}"
    return event.kind.value


# --------------------------------------------------------------------------- retries

GIVE_UP_AFTER = timedelta(hours=24)  # SPEC §10: retried with backoff for up to 24 h
FIRST_RETRY = timedelta(seconds=10)
LONGEST_WAIT = timedelta(hours=1)


def retry_at(attempts: int, created_at: datetime, now: datetime) -> datetime | None:
    """When to try again after `attempts` failed sends, or None: give up (the event is then
    `failed`: logged, and shown by `backupwatchctl alerts`)."""
    if now - created_at >= GIVE_UP_AFTER:
        return None
    wait: timedelta = min(FIRST_RETRY * 2 ** max(attempts - 1, 0), LONGEST_WAIT)
    last: datetime = created_at + GIVE_UP_AFTER
    return min(now + wait, last)


def should_group(batch: int, sent_in_window: int) -> bool:
    """SPEC §10: more than FLOOD_THRESHOLD messages for one channel within a minute go out as
    one: the events due now, counted with those already sent one by one in the last minute."""
    return batch > 1 and batch + sent_in_window > FLOOD_THRESHOLD


# --------------------------------------------------------------------------- the digest


@dataclass(frozen=True)
class DigestJob:
    """One job as the daily digest sees it (SPEC §10, §12's compliance)."""

    label: str
    company: str
    channels: Sequence[str] | None
    status: JobStatus
    paused: bool
    expected: int  # cycles whose deadline passed in the period (paused ones left out)
    ok: int  # of those, the cycles with a successful backup
    instance: str | None = None


def routed_to(job: DigestJob, channel: str) -> bool:
    return channel in (job.channels or [DEFAULT_CHANNEL])


def digest(jobs: Sequence[DigestJob], day: datetime, days: int = 14) -> Message:
    """Per company: the jobs not OK, and compliance = cycles OK ÷ cycles expected."""
    by_company: dict[str, list[DigestJob]] = {}
    for job in jobs:
        by_company.setdefault(job.company, []).append(job)
    problems = sum(1 for job in jobs if _not_ok(job))
    title = f"backupwatch: daily summary {day:%Y-%m-%d}: {problems} of {len(jobs)} jobs not OK"
    several = len({job.instance for job in jobs}) > 1  # SPEC §15: marked by instance

    def name(job: DigestJob) -> str:
        label = visible(job.label)
        return f"{label} [{visible(job.instance or '-')}]" if several else label

    lines = []
    for company, members in sorted(by_company.items()):
        expected = sum(job.expected for job in members)
        ok = sum(job.ok for job in members)
        rate = f"{100 * ok / expected:.1f}%" if expected else "n/a"
        lines.append(f"{company}: compliance over {days} days {rate} ({ok}/{expected} cycles OK)")
        for job in members:
            if _not_ok(job):
                lines.append(f"  {name(job)}: {job.status.value}")
        paused = [job for job in members if job.paused]
        if paused:
            lines.append(f"  paused: {', '.join(name(job) for job in paused)}")
    lines.append("See more: backupwatchctl status")
    return Message(title, "\n".join(lines))


def _not_ok(job: DigestJob) -> bool:
    return job.status not in (JobStatus.OK, JobStatus.UNKNOWN)
