"""Scale: the real daemon with N sites and M jobs (default 30,000 / 100,000) and their history.

    .venv/bin/python bench/scale.py [--sites 30000] [--jobs 100000] [--history-days 7]
                                    [--database sqlite|postgresql]

Builds the jobs (HOURLY, ±30 min: `jobs_toml`; the first sites get one database more until
there are --jobs of them), every site folder with its `log/`, and --history-days of daily
SUCCESS entries per job, written in-process through the store (the sync a first start does,
then Core inserts). Then, with the real `backupwatchd` (instance "bench"):

- READY after: start to READY=1 with every job in the database already (a restart), and the
  daemon's RSS at READY;
- `backupwatchctl status --json` and `reload` wall time (nothing changed), then `reload` with
  one job changed (its minute);
- MISSING timer pass when nothing is due: `MissingTimer.run_once` + `seconds_until_next` on the
  same database, in this process (median and max of 20);
- deadlines passing at once: every job's timer cursor is moved back one hour (its deadline
  passed), the timer is woken by SIGHUP, and the MISSING entries are counted until there is one
  per job; then "each once": no (job, cycle) with two MISSING;
- peak RSS (VmHWM) of the daemon over all of it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from common import (
    BIN,
    BenchDaemon,
    BenchDatabase,
    agent_id,
    jobs_toml,
    machine,
    wait_quiet,
    workspace,
    write_config,
)
from sqlalchemy import insert, text, update

from backupwatch.config import load_settings
from backupwatch.enums import BackupEntryStatus
from backupwatch.jobs import load_jobs
from backupwatch.store import BackupEntry, ExpectedBackupJob, Store
from backupwatch.timer import MissingTimer

INSTANCE = "bench"
WAVE_LIMIT = 300.0  # seconds: the wave is reported as far as it got by then


def timed_ctl(config: Path, *args: str) -> tuple[float, int]:
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "backupwatchctl"), "--config", str(config), *args],
        capture_output=True,
        text=True,
        check=False,
    )
    return time.monotonic() - started, result.returncode


def build_jobs(sites: list[str], jobs: int) -> str:
    """`jobs` jobs over `sites`: every site has jobs // sites databases, the first ones one more."""
    per, extra = divmod(jobs, len(sites))
    names = [f"db{n}" for n in range(per + 1)]
    text_ = jobs_toml(sites[:extra], names) if extra else ""
    rest = jobs_toml(sites[extra:], names[:per])
    if text_:
        rest = rest.split("\n", 4)[4]  # one [defaults] table per file
    return text_ + "\n" + rest


def seed(config: Path, history_days: int) -> tuple[int, int, float]:
    """The jobs and their history, as a first start and days of reports would leave them."""
    settings = load_settings(config, {})
    store = Store(settings.database_url)
    store.instance = INSTANCE
    store.migrate()
    now = datetime.now(UTC).replace(microsecond=0)
    store.sync_jobs(load_jobs(settings), settings.scanner_report_collection_window_minutes, now)
    started = time.monotonic()
    with store.engine.begin() as connection:
        ids = [row[0] for row in connection.execute(text("SELECT id FROM expected_backup_jobs"))]
    entries = 0
    day = now.replace(minute=0, second=0)
    for back in range(1, history_days + 1):
        cycle = day - timedelta(days=back)
        rows = [
            {
                "job_id": job_id,
                "cycle": cycle,
                "status": BackupEntryStatus.SUCCESS,
                "message": "ok",
                "recorded_at": cycle + timedelta(minutes=5),
                "report_name": "STATUS.json",
                "report_sha256": f"{job_id:032x}{back:032x}",
                "operation_timestamp": cycle,
                "server_sha256": f"{back:064x}",
                "server_size": 4096,
                "unchanged_since_last_success": False,
            }
            for job_id in ids
        ]
        for start in range(0, len(rows), 10_000):
            with store.engine.begin() as connection:
                connection.execute(insert(BackupEntry), rows[start : start + 10_000])
        entries += len(rows)
    store.dispose()
    return len(ids), entries, time.monotonic() - started


def timer_pass(url: str, samples: int = 20) -> tuple[float, float]:
    """The MISSING timer's step with nothing due: (median, max) in ms."""
    store = Store(url, create=False)
    store.instance = INSTANCE
    timer = MissingTimer(store, lambda: datetime.now(UTC), timedelta(days=1))
    times = []
    for _ in range(samples):
        now = datetime.now(UTC)
        started = time.perf_counter()
        flagged = timer.run_once(now)
        timer.seconds_until_next(now)
        times.append((time.perf_counter() - started) * 1000)
        assert not flagged, "something was due: the timer pass is not the idle one"
    store.dispose()
    return statistics.median(times), max(times)


def deadline_wave(daemon: BenchDaemon, database: BenchDatabase, jobs: int) -> tuple[float, int]:
    """Every job's cursor one cycle back (its deadline passed), SIGHUP, count MISSING."""
    engine = database.engine()
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    # the latest cycle whose deadline (cycle + 30 min) has passed: one due cycle per job
    cycle = now.replace(minute=0) - (timedelta() if now.minute >= 30 else timedelta(hours=1))
    with engine.begin() as connection:  # through the model: SQLite compares datetimes as text
        connection.execute(
            update(ExpectedBackupJob).values(
                next_cycle_at=cycle,
                next_deadline_at=cycle + timedelta(minutes=30),
                activated_at=cycle - timedelta(minutes=1),
            )
        )
    started = time.monotonic()
    os.kill(daemon.pid, signal.SIGHUP)
    count = "SELECT count(*) FROM backup_entries WHERE status = 'MISSING'"
    flagged = 0
    while time.monotonic() - started < WAVE_LIMIT:
        with engine.connect() as connection:
            flagged = int(connection.execute(text(count)).scalar_one())
        if flagged >= jobs:
            break
        time.sleep(0.5)
    took = time.monotonic() - started
    twice = (
        "SELECT count(*) FROM (SELECT job_id, cycle FROM backup_entries WHERE status = 'MISSING'"
        " GROUP BY job_id, cycle HAVING count(*) > 1) AS twice"
    )
    with engine.connect() as connection:
        doubled = int(connection.execute(text(twice)).scalar_one())
    engine.dispose()
    assert doubled == 0, f"{doubled} cycles flagged twice"
    return took, flagged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", type=int, default=30_000)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--history-days", type=int, default=7)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--skip-wave", action="store_true")
    parser.add_argument(
        "--no-wait", action="store_true", help="measure at once, even on a busy machine"
    )
    args = parser.parse_args()
    row: dict[str, str] = {"database": args.database, "sites": f"{args.sites:,}"}
    with workspace() as (base, run_dir):
        database = BenchDatabase.create(args.database, base)
        sites = [f"S{i:05d}" for i in range(args.sites)]
        jobs_text = build_jobs(sites, args.jobs)
        config = write_config(base, database.url, jobs_text, run_dir / "c.sock")
        with config.open("a") as file:
            file.write(f'instance = "{INSTANCE}"\n')
        for site in sites:
            (base / "deposit" / agent_id(site) / "log").mkdir(parents=True)
        jobs, entries, seeded = seed(config, args.history_days)
        row |= {"jobs": f"{jobs:,}", "history entries": f"{entries:,}"}
        print(f"seeded {jobs} jobs, {entries} entries in {seeded:.0f} s", file=sys.stderr)
        if not args.no_wait:
            wait_quiet()
        daemon = BenchDaemon(config, run_dir, base / "daemon.log")
        try:
            daemon.start(timeout=900)
            print_phases(base / "daemon.log")
            row["READY after"] = f"{daemon.ready_after:.1f} s"
            row["RSS at READY"] = f"{daemon.proc_status('VmRSS') // 1024} MiB"
            took, code = timed_ctl(config, "status", "--json")
            row["status --json"] = f"{took:.1f} s"
            took, code = timed_ctl(config, "reload")
            row["reload (no change)"] = f"{took:.1f} s" + ("" if code == 0 else f" exit {code}")
            changed = jobs_text.replace(
                'database_name = "db0"\n', 'database_name = "db0"\nexpected_minute_utc = 7\n', 1
            )
            (base / "jobs.d" / "jobs.toml").write_text(changed)
            took, code = timed_ctl(config, "reload")
            row["reload (1 job changed)"] = f"{took:.1f} s" + ("" if code == 0 else f" exit {code}")
            median, worst = timer_pass(database.url)
            row["timer pass, nothing due"] = f"{median:.1f} ms (max {worst:.1f})"
            if not args.skip_wave:
                took, flagged = deadline_wave(daemon, database, jobs)
                row["deadlines at once"] = (
                    f"{flagged:,} of {jobs:,} MISSING in {took:.0f} s, none twice"
                )
            row["peak RSS"] = f"{daemon.proc_status('VmHWM') // 1024} MiB"
        finally:
            row["exit"] = str(daemon.stop(timeout=60))
            database.drop()
    print(f"machine: {machine()}")
    print("| " + " | ".join(row) + " |")
    print("|" + " --- |" * len(row))
    print("| " + " | ".join(row.values()) + " |")


def print_phases(log_path: Path) -> None:
    """How long each step of the start took (the daemon's `daemon.phase` lines, to READY), so
    that a READY figure says where its time went."""
    deadline = time.monotonic() + 5.0  # READY=1 is sent just before the line is written
    while '"daemon.ready"' not in log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    marks: list[tuple[str, datetime]] = []
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") in ("daemon.phase", "daemon.ready"):
            name = record.get("phase", "READY")
            marks.append((name, datetime.fromisoformat(record["timestamp"])))
    for (name, at), (_next, then) in itertools.pairwise(marks):
        print(f"  phase {name}: {(then - at).total_seconds():.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
