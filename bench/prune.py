"""Retention (SPEC §14): pruning a million old entries while reports keep arriving.

    .venv/bin/python bench/prune.py [--entries 1000000] [--database sqlite|postgresql]

Starts the real `backupwatchd` (as bench/reaction.py does), inserts --entries FAILED entries
two years old spread over its jobs (one INSERT ... SELECT over a generated series), drops
--before reports one at a time and measures their reaction (rename to commit seen, as
reaction.py), then runs `backupwatchctl prune` (the same `Pruner` as the daemon's hourly step)
and keeps dropping reports, one at a time, until it exits. Prints the prune's wall time and the
reaction before and during it: the batches (1,000 rows per short transaction) must leave the
workers the database between them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from argparse import Namespace

from common import (
    BIN,
    BenchDaemon,
    BenchDatabase,
    jobs_toml,
    machine,
    summary_ms,
    wait_quiet,
    workspace,
    write_config,
)
from reaction import drop_all
from sqlalchemy import text

SQLITE_FILL = """
WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < :count)
INSERT INTO backup_entries (job_id, cycle, status, message, recorded_at,
                            unchanged_since_last_success)
SELECT 1 + (x % :jobs),
       strftime('%Y-%m-%d %H:%M:%S.000000', '2023-01-01', '+' || x || ' minutes'),
       'FAILED', 'old failure ' || x,
       strftime('%Y-%m-%d %H:%M:%S.000000', '2023-01-01', '+' || x || ' minutes'), 0
FROM n
"""
POSTGRES_FILL = """
INSERT INTO backup_entries (job_id, cycle, status, message, recorded_at,
                            unchanged_since_last_success)
SELECT 1 + (x % :jobs), timestamp '2023-01-01' + x * interval '1 minute',
       'FAILED', 'old failure ' || x, timestamp '2023-01-01' + x * interval '1 minute', false
FROM generate_series(1, :count) AS x
"""


def reactions(samples: list[dict[str, float]]) -> dict[str, float]:
    return summary_ms([(s["seen"] - s["t0"]) * 1000 for s in samples])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--before", type=int, default=100, help="reports timed before the prune")
    args = parser.parse_args()
    sites, databases = [f"site{i:03d}" for i in range(10)], [f"db{j}" for j in range(5)]
    drop = Namespace(warmup=0, reports=1, size=4096, poll_ms=1.0, timeout=60.0, gap_ms=0.0)
    print(f"<!-- {machine()} -->")
    with workspace() as (base, run_dir):
        db = BenchDatabase.create(args.database, base)
        try:
            config = write_config(base, db.url, jobs_toml(sites, databases), run_dir / "ctl.sock")
            deposit = base / "deposit"
            for site in sites:
                (deposit / f"Bench_City_{site}").mkdir(parents=True, exist_ok=True)
            daemon = BenchDaemon(config, run_dir, base / "daemon.log")
            daemon.start()
            try:
                # The daemon's own first retention run comes 10 minutes after READY: the prune
                # measured is backupwatchctl's (the daemon's would join it after that).
                engine = db.engine()
                fill = SQLITE_FILL if args.database == "sqlite" else POSTGRES_FILL
                started = time.monotonic()
                with engine.begin() as connection:
                    connection.execute(text(fill), {"count": args.entries, "jobs": 50})
                print(f"filled {args.entries} entries in {time.monotonic() - started:.1f} s")
                engine.dispose()
                wait_quiet(0.2, 120)
                drop.reports = args.before
                before = drop_all(drop, daemon, db, deposit, sites, databases)
                prune_started = time.monotonic()
                output = (base / "prune.out").open("w")  # not a pipe: nobody reads it meanwhile
                prune = subprocess.Popen(
                    [str(BIN / "backupwatchctl"), "--config", str(config), "prune"],
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    text=True,
                )
                during: list[dict[str, float]] = []
                drop.reports = 5
                while prune.poll() is None:
                    during += drop_all(drop, daemon, db, deposit, sites, databases)
                wall = time.monotonic() - prune_started
                output.close()
                out = (base / "prune.out").read_text()
            finally:
                daemon.stop()
        finally:
            db.drop()
    summary = [line for line in out.splitlines() if line.startswith("removed:")]
    print(f"prune: {wall:.1f} s wall, exit {prune.returncode}; {' '.join(summary)}")
    print("| reports | n | p50 | p90 | p99 | max |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, samples in (("before the prune", before), ("during the prune", during)):
        r = reactions(samples)
        print(
            f"| {label} ({args.database}) | {len(samples)} | {r['p50']:.1f} ms "
            f"| {r['p90']:.1f} ms | {r['p99']:.1f} ms | {r['max']:.1f} ms |"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
