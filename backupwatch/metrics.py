"""SPEC §12: `/metrics`, Prometheus exposition through prometheus_client.

The registry is this module's own (never the library's global one), so nothing else in the
process adds series to it. Two collectors feed it at scrape time: `StoreCollector` reads the
database (jobs per status, per-job series, entries, alert deliveries) with one short read-only
transaction per scrape on the web listener's own engine, and `RuntimeCollector` reads what the
daemon counts in memory. The processing-time histogram is the one instrument the daemon updates
as it goes (`Instruments`).
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from backupwatch import __version__
from backupwatch.enums import BackupEntryStatus, JobStatus
from backupwatch.pipeline import Outcome
from backupwatch.store import AlertDelivery, BackupEntry, JobView, Store

JOB_LABELS = ("company", "city", "neighborhood", "database", "instance")
OUTCOMES = tuple(outcome.value for outcome in Outcome)
DELIVERY_STATES = ("pending", "sending", "sent", "failed")
# Report processing: from a millisecond (a rejection) to minutes (hashing a large backup).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class Instruments:
    """What the daemon records while it works (a histogram is not a question for the store)."""

    def __init__(self) -> None:
        self.processing = Histogram(
            "backupwatch_report_processing_seconds",
            "Time a worker spent on one report, from reading it to its verdict recorded.",
            buckets=BUCKETS,
            registry=None,
        )

    def observe_processing(self, seconds: float) -> None:
        self.processing.observe(seconds)


@dataclass(frozen=True)
class Runtime:
    """The daemon's in-memory counters at one instant (see `Daemon.runtime`)."""

    outcomes: dict[str, int] = field(default_factory=dict)
    hashed_bytes: int = 0
    queue_depth: int = 0
    waiting: int = 0
    rescans: int = 0
    overflows: int = 0
    rebuilds: int = 0
    healthy: bool = True


class RuntimeCollector(Collector):
    """Counters the daemon keeps since its start (they restart at zero with it, as Prometheus
    counters may)."""

    def __init__(self, runtime: Callable[[], Runtime]) -> None:
        self._runtime = runtime

    def collect(self) -> Iterator[Metric]:
        now = self._runtime()
        reports = CounterMetricFamily(
            "backupwatch_reports",
            "Reports handled since start, by outcome (accepted, rejected, duplicate, wait, ...).",
            labels=["outcome"],
        )
        for outcome in OUTCOMES:
            reports.add_metric([outcome], now.outcomes.get(outcome, 0))
        yield reports
        yield CounterMetricFamily(
            "backupwatch_hashed_bytes",
            "Bytes of staged backup files hashed (SHA-256) since start.",
            value=now.hashed_bytes,
        )
        yield GaugeMetricFamily(
            "backupwatch_queue_depth",
            "Reports queued or in a worker's hands now.",
            value=now.queue_depth,
        )
        yield GaugeMetricFamily(
            "backupwatch_reports_waiting",
            "Reports seen but not judged yet (a writer still has them, or their staged file).",
            value=now.waiting,
        )
        yield CounterMetricFamily(
            "backupwatch_rescans",
            "Reconciliation scans of every deposit folder since start.",
            value=now.rescans,
        )
        yield CounterMetricFamily(
            "backupwatch_inotify_overflows",
            "inotify queue overflows (IN_Q_OVERFLOW) since start; each is followed by a rescan.",
            value=now.overflows,
        )
        yield GaugeMetricFamily(
            "backupwatch_healthy",
            "1 while every loop of the daemon is alive (what /healthz answers 200 for), else 0.",
            value=int(now.healthy),
        )
        info = InfoMetricFamily("backupwatch_build", "The running backupwatch's version.")
        info.add_metric([], {"version": __version__, "python": platform.python_version()})
        yield info


class StoreCollector(Collector):
    """Series read from the database at scrape time; per-job ones unless `per_job` is off."""

    def __init__(
        self, store: Store, clock: Callable[[], datetime], per_job: Callable[[], bool]
    ) -> None:
        self._store = store
        self._clock = clock
        self._per_job = per_job

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "backupwatch_database_up",
            "1 when this scrape could read the database, else 0 (the other series are absent).",
        )
        try:
            metrics = list(self._read())
        except SQLAlchemyError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from metrics

    def _read(self) -> Iterator[Metric]:
        now = self._clock()
        views = self._store.job_states(now)
        jobs = GaugeMetricFamily(
            "backupwatch_jobs",
            "Active jobs by current status (the newest cycle's verdict; UNKNOWN: never reported).",
            labels=["status"],
        )
        per_status = {status.value: 0 for status in JobStatus}
        for view in views:
            per_status[view.current_status.value] += 1
        for status, count in per_status.items():
            jobs.add_metric([status], count)
        yield jobs
        yield GaugeMetricFamily(
            "backupwatch_jobs_paused",
            "Active jobs paused now (backupwatchctl pause): never flagged MISSING meanwhile.",
            value=sum(1 for view in views if view.paused),
        )
        yield GaugeMetricFamily(
            "backupwatch_jobs_acknowledged",
            "Active jobs whose not-OK state is acknowledged (backupwatchctl ack).",
            value=sum(1 for view in views if view.acked_at is not None),
        )
        if self._per_job():
            yield from _per_job(views)
        yield from self._entries()
        yield from self._alerts()

    def _entries(self) -> Iterator[Metric]:
        e = BackupEntry
        with self._store.reader.begin() as connection:
            rows = connection.execute(select(e.status, func.count()).group_by(e.status)).all()
        found = {str(getattr(status, "value", status)): int(n) for status, n in rows}
        entries = CounterMetricFamily(
            "backupwatch_entries",
            "Entries recorded in the jobs' history, by status (MISSING included).",
            labels=["status"],
        )
        for status in BackupEntryStatus:
            entries.add_metric([status.value], found.get(status.value, 0))
        yield entries

    def _alerts(self) -> Iterator[Metric]:
        d = AlertDelivery
        query = select(d.channel, d.state, func.count()).group_by(d.channel, d.state)
        with self._store.reader.begin() as connection:
            rows = connection.execute(query).all()
        alerts = CounterMetricFamily(
            "backupwatch_alerts",
            "Alert deliveries by channel and result (sent, failed) in the outbox.",
            labels=["channel", "result"],
        )
        pending = GaugeMetricFamily(
            "backupwatch_alerts_pending",
            "Alert deliveries by channel not done yet (pending or being sent).",
            labels=["channel"],
        )
        waiting: dict[str, int] = {}
        for channel, state, count in rows:
            if state in ("sent", "failed"):
                alerts.add_metric([channel, state], int(count))
            else:
                waiting[channel] = waiting.get(channel, 0) + int(count)
        for channel, count in sorted(waiting.items()):
            pending.add_metric([channel], count)
        yield alerts
        yield pending


class Rendered(Metric):
    """A family whose sample lines are made already, in the text format's exact syntax.

    prometheus_client formats a sample in ~15 µs (a label name check and three escapes per
    label, each time): 30,000 per-job samples took most of a 10,000-job scrape. Rendered
    families are written as they are by `exposition` (never expose a registry holding them with
    `generate_latest`, which would print their HELP and TYPE lines only)."""

    def __init__(self, name: str, documentation: str, typ: str, lines: list[str]) -> None:
        super().__init__(name, documentation, typ)
        self.lines = lines


class _Single(Collector):
    """One family, for prometheus_client's formatting of the families not `Rendered`."""

    def __init__(self, metric: Metric) -> None:
        self._metric = metric

    def collect(self) -> Iterator[Metric]:
        yield self._metric


def exposition(source: Collector) -> bytes:
    """The text format 0.0.4 of `source`'s families (prometheus_client's `generate_latest`,
    except that `Rendered` families are written as made)."""
    parts: list[str] = []
    for metric in source.collect():
        if isinstance(metric, Rendered):
            help_text = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
            parts.append(f"# HELP {metric.name} {help_text}\n# TYPE {metric.name} {metric.type}\n")
            parts.extend(metric.lines)
        else:
            parts.append(generate_latest(_Single(metric)).decode())
    return "".join(parts).encode()


def _label(value: str) -> str:
    """A label value as the text format quotes it (prometheus_client's escaping)."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _per_job(views: list[JobView]) -> Iterator[Metric]:
    """The four per-job families, each job's label set made once for all of them (labels in
    name order, values as `floatToGoString` writes them: what `generate_latest` would print)."""
    status: list[str] = []
    last: list[str] = []
    deadline: list[str] = []
    paused: list[str] = []
    values: dict[float, str] = {}  # many jobs share a deadline: formatted once

    def number(instant: datetime) -> str:
        seconds = instant.timestamp()
        found = values.get(seconds)
        if found is None:
            # prometheus_client leaves it unannotated; it returns the Go-style float text
            found = values[seconds] = str(floatToGoString(seconds))  # type: ignore[no-untyped-call]
        return found

    for view in views:
        labels = (
            f'city="{_label(view.city)}",company="{_label(view.company_name)}",'
            f'database="{_label(view.database_name)}",instance="{_label(view.instance or "")}",'
            f'neighborhood="{_label(view.neighborhood)}"'
        )
        status.append(
            f'backupwatch_job_status{{{labels},status="{view.current_status.value}"}} 1.0\n'
        )
        if view.last_success_at is not None:
            last.append(
                f"backupwatch_job_last_success_timestamp_seconds{{{labels}}} "
                f"{number(view.last_success_at)}\n"
            )
        if view.next_deadline is not None:
            deadline.append(
                f"backupwatch_job_next_deadline_timestamp_seconds{{{labels}}} "
                f"{number(view.next_deadline)}\n"
            )
        if view.paused:
            paused.append(f"backupwatch_job_paused{{{labels}}} 1.0\n")
    yield Rendered(
        "backupwatch_job_status",
        "1 for each active job, labelled with its current status.",
        "gauge",
        status,
    )
    yield Rendered(
        "backupwatch_job_last_success_timestamp_seconds",
        "The agent's time of the job's newest successful backup (Unix time).",
        "gauge",
        last,
    )
    yield Rendered(
        "backupwatch_job_next_deadline_timestamp_seconds",
        "When the job's next expected cycle closes (Unix time); absent when none is expected.",
        "gauge",
        deadline,
    )
    yield Rendered(
        "backupwatch_job_paused",
        "1 for each paused job (absent when not paused: 10,000 zeros would cost every scrape).",
        "gauge",
        paused,
    )


def registry(
    store: Store,
    clock: Callable[[], datetime],
    per_job: Callable[[], bool],
    runtime: Callable[[], Runtime],
    instruments: Instruments,
) -> CollectorRegistry:
    """The listener's own registry: the store's series, the daemon's counters, the histogram."""
    found = CollectorRegistry(auto_describe=False)
    found.register(StoreCollector(store, clock, per_job))
    found.register(RuntimeCollector(runtime))
    found.register(instruments.processing)
    return found
