"""A wave of deadlines: N jobs whose deadlines all passed at once, settled by the MISSING timer.

    .venv/bin/python bench/wave.py [--jobs 100000] [--sites 30000] [--history-days 7]
                                   [--database sqlite|postgresql] [--timers 1]

Builds the jobs as `bench/scale.py` does (HOURLY, ±30 min, instance "bench", history of daily
SUCCESS entries), with one alert channel configured so that every MISSING also writes its alert
event and its delivery row, as an installation with alerts does. Then moves every job's cursor
back to the last cycle whose deadline has passed and runs `MissingTimer.run_once(now)`, the step
the daemon's timer thread runs, in `--timers` processes at once (several daemons of one instance:
PostgreSQL only). Measures the wall time until every process is done, counts the MISSING entries
and the alert events, and checks that no (job, cycle) has two MISSING. The daemon adds nothing
to this step but its deferral of busy sites (none here).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from common import BenchDatabase, machine, wait_quiet, workspace, write_config
from scale import INSTANCE, build_jobs, seed
from sqlalchemy import text, update

from backupwatch.alerting import DEFAULT_CHANNEL, routing
from backupwatch.logsetup import LogTarget, configure_logging
from backupwatch.store import ExpectedBackupJob, Store
from backupwatch.timer import MissingTimer


def rewind(url: str, now: datetime) -> datetime:
    """Every job's cursor on the latest cycle whose deadline (cycle + 30 min) has passed."""
    hour = now.replace(minute=0, second=0)
    cycle = hour - (timedelta() if now.minute >= 30 else timedelta(hours=1))
    store = Store(url, create=False)
    with store.engine.begin() as connection:  # through the model: SQLite compares text
        connection.execute(
            update(ExpectedBackupJob).values(
                next_cycle_at=cycle,
                next_deadline_at=cycle + timedelta(minutes=30),
                activated_at=cycle - timedelta(minutes=1),
            )
        )
    store.dispose()
    return cycle


def settle(url: str, now: datetime, start: Any, results: Any) -> None:
    """One daemon's timer step on the rewound database; puts how many cycles it flagged."""
    # JSON lines, as the daemon writes them (one per MISSING), to a file nobody reads.
    configure_logging(LogTarget.JSON, stream=open(os.devnull, "w"))  # noqa: SIM115
    store = Store(url, create=False)
    store.instance = INSTANCE
    store.routing = routing([DEFAULT_CHANNEL], ["MISSING", "FAILED", "RECOVERED"], 24, None)
    timer = MissingTimer(store, lambda: now, timedelta(days=1))
    start.wait()
    cpu = time.process_time()  # every thread of this process: the settlers included
    flagged = len(timer.run_once(now))
    results.put((flagged, time.process_time() - cpu))
    store.dispose()


def count(url: str) -> dict[str, int]:
    queries = {
        "missing": "SELECT count(*) FROM backup_entries WHERE status = 'MISSING'",
        "twice": "SELECT count(*) FROM (SELECT job_id, cycle FROM backup_entries"
        " WHERE status = 'MISSING' GROUP BY job_id, cycle HAVING count(*) > 1) AS twice",
        "events": "SELECT count(*) FROM alert_events WHERE kind = 'MISSING'",
        "deliveries": "SELECT count(*) FROM alert_deliveries",
    }
    store = Store(url, create=False)
    with store.engine.connect() as connection:
        found = {key: connection.execute(text(sql)).scalar_one() for key, sql in queries.items()}
    store.dispose()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--sites", type=int, default=30_000)
    parser.add_argument("--history-days", type=int, default=7)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--timers", type=int, default=1, help="processes settling at once")
    parser.add_argument("--no-wait", action="store_true", help="measure at once, even if busy")
    args = parser.parse_args()
    if args.timers > 1 and args.database == "sqlite":
        raise SystemExit("several timers on one database: PostgreSQL only (SPEC §15)")
    with workspace() as (base, run_dir):
        database = BenchDatabase.create(args.database, base)
        try:
            sites = [f"S{i:05d}" for i in range(args.sites)]
            config = write_config(
                base, database.url, build_jobs(sites, args.jobs), run_dir / "c.sock"
            )
            with config.open("a") as file:
                file.write(f'instance = "{INSTANCE}"\n')
            jobs, entries, seeded = seed(config, args.history_days)
            print(f"seeded {jobs} jobs, {entries} entries in {seeded:.0f} s", file=sys.stderr)
            measure(database.url, jobs, args)
        finally:
            database.drop()


def measure(url: str, jobs: int, args: argparse.Namespace) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    rewind(url, now)
    if not args.no_wait:
        wait_quiet()
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    timers = [
        context.Process(target=settle, args=(url, now, start, results)) for _ in range(args.timers)
    ]
    for timer in timers:
        timer.start()
    time.sleep(1.0)  # every process has its engine and is waiting
    started = time.monotonic()
    start.set()
    settled = [results.get() for _ in timers]
    took = time.monotonic() - started
    flagged = [count for count, _cpu in settled]
    cpu = sum(cpu for _count, cpu in settled)
    for timer in timers:
        timer.join()
    found = count(url)
    print(f"machine: {machine()}")
    print(
        "| database | jobs | history days | timers | wall | jobs/s | timers' CPU | MISSING"
        " | twice | events |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| {args.database} | {jobs:,} | {args.history_days} | {args.timers} | {took:.1f} s"
        f" | {jobs / took:,.0f} | {cpu:.1f} s | {found['missing']:,} | {found['twice']}"
        f" | {found['events']:,} |"
    )
    print(f"flagged per timer: {flagged}; deliveries: {found['deliveries']:,}", file=sys.stderr)
    if found["twice"] or found["missing"] != jobs or sum(flagged) != jobs:
        raise SystemExit("the wave flagged a cycle twice or missed one")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
