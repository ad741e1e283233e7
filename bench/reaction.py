"""Reaction time: from the rename of a STATUS.json into a deposit folder to its entry committed.

    .venv/bin/python bench/reaction.py [--reports 1000] [--database sqlite|postgresql]

Starts the real `backupwatchd` (JSON logs to a file, READY=1 awaited on a NOTIFY_SOCKET bound
here), then drops the reports one at a time, each describing one small staged file of its own,
spread round-robin over SITES x DATABASES hourly jobs (window +-30 min, so any report time is
relevant). For each report:

- t0 = time.time() right before os.rename() of `.STATUS-i.json.part` to `STATUS-i.json`;
- committed: a separate database connection polls `processed_reports` (committed in the same
  transaction as the report's entries) for the report's SHA-256 every --poll-ms; the first
  time the row is visible is the commit, seen (an upper bound: it is late by at most one poll
  interval plus one query);
- logged: the daemon's own `entry.recorded` log line (written after commit and archive);
- picked up: `processed_at` (equal to the entries' `recorded_at`), which is the daemon's clock
  when the worker *started* the report, not the commit time: `processed_at - t0` is the
  inotify + queue delay alone.

The next report is dropped once the previous one is archived, so each one meets an idle daemon.
--warmup reports go first and are not counted. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import (
    BenchDaemon,
    BenchDatabase,
    cpu_busy_ticks,
    database_block,
    jobs_toml,
    machine,
    others_cpu,
    own_cpu,
    parse_ts,
    postgres_cpu,
    report_bytes,
    summary_ms,
    wait_quiet,
    workspace,
    write_config,
    write_file,
)
from sqlalchemy import text

# processed_reports is keyed by the report's SHA-256 and committed in the same transaction as
# its entries; backup_entries has no index that starts with report_sha256 (a full scan per poll).
QUERY = text("SELECT processed_at FROM processed_reports WHERE sha256 = :sha")


def as_epoch(value: datetime | str) -> float:
    """A timestamp column read raw: a naive UTC datetime (psycopg2) or its text (sqlite3)."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.replace(tzinfo=UTC).timestamp()


def run(args: argparse.Namespace) -> dict[str, Any]:
    sites = [f"site{i:03d}" for i in range(args.sites)]
    databases = [f"db{j}" for j in range(args.databases)]
    with workspace(args.keep) as (base, run_dir):
        db = BenchDatabase.create(args.database, base)
        try:
            config = write_config(base, db.url, jobs_toml(sites, databases), run_dir / "ctl.sock")
            deposit = base / "deposit"
            for site in sites:
                (deposit / f"Bench_City_{site}").mkdir(parents=True, exist_ok=True)
            daemon = BenchDaemon(config, run_dir, base / "daemon.log")
            daemon.start()
            try:
                quiet = wait_quiet()
                busy, own, cpu_ready = cpu_busy_ticks(), own_cpu(), daemon.cpu_seconds()
                pg_ready = postgres_cpu()
                samples = drop_all(args, daemon, db, deposit, sites, databases)
                cpu = daemon.cpu_seconds() - cpu_ready
                pg = postgres_cpu() - pg_ready
                others = others_cpu(busy, cpu + own_cpu() - own + pg)
            finally:
                daemon.stop()
            logged = {
                record["report"]: parse_ts(record["timestamp"])
                for record in daemon.logs()
                if record.get("event") == "entry.recorded"
            }
        finally:
            db.drop()
    counted = samples[args.warmup :]
    committed = [(s["seen"] - s["t0"]) * 1000 for s in counted]
    picked = [(s["processed_at"] - s["t0"]) * 1000 for s in counted]
    log_lat = [(logged[s["name"]] - s["t0"]) * 1000 for s in counted if s["name"] in logged]
    names = [s["name"] for s in counted]
    worst = sorted(zip(committed, picked, names, strict=True), reverse=True)[:3]
    return {
        "worst": worst,
        "committed": summary_ms(committed),
        "picked": summary_ms(picked),
        "logged": summary_ms(log_lat) if log_lat else None,
        "logged_n": len(log_lat),
        "n": len(counted),
        "cpu": cpu,
        "quiet": quiet,
        "others": others,
        "postgres": pg,
        "ready_after": daemon.ready_after,
    }


def drop_all(
    args: argparse.Namespace,
    daemon: BenchDaemon,
    db: BenchDatabase,
    deposit: Path,
    sites: list[str],
    databases: list[str],
) -> list[dict[str, Any]]:
    engine = db.engine()
    poll = args.poll_ms / 1000
    samples = []
    try:
        with engine.connect() as conn:
            for i in range(args.warmup + args.reports):
                site = sites[i % len(sites)]
                database = databases[(i // len(sites)) % len(databases)]
                folder = deposit / f"Bench_City_{site}"
                content = os.urandom(args.size)
                staged = f"data/{database}-{i:05d}.sql.gz"
                write_file(folder / staged, content)
                when = datetime.now(UTC)
                data = report_bytes(site, when, {database: database_block(staged, content, when)})
                sha = hashlib.sha256(data).hexdigest()
                name = f"STATUS-{i:05d}.json"
                temp, final = folder / f".{name}.part", folder / name
                write_file(temp, data)
                t0 = time.time()
                os.rename(temp, final)
                assert daemon.process is not None
                deadline = time.monotonic() + args.timeout
                while (row := conn.execute(QUERY, {"sha": sha}).first()) is None:
                    if time.monotonic() > deadline or daemon.process.poll() is not None:
                        raise SystemExit(f"report {final} not committed in {args.timeout} s")
                    time.sleep(poll)
                seen = time.time()
                while os.path.lexists(final) and time.monotonic() < deadline:
                    time.sleep(poll)  # archived: the daemon is idle again
                samples.append(
                    {
                        "t0": t0,
                        "seen": seen,
                        "processed_at": as_epoch(row[0]),
                        "name": f"Bench_City_{site}/{name}",
                    }
                )
                if args.gap_ms:
                    time.sleep(args.gap_ms / 1000)
    finally:
        engine.dispose()
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reports", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=20, help="reports dropped first, not counted")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--sites", type=int, default=10)
    parser.add_argument("--databases", type=int, default=5, help="jobs (databases) per site")
    parser.add_argument("--size", type=int, default=4096, help="bytes per staged file")
    parser.add_argument("--poll-ms", type=float, default=1.0)
    parser.add_argument("--gap-ms", type=float, default=0.0, help="pause between reports")
    parser.add_argument("--timeout", type=float, default=30.0, help="per report, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the work tree and daemon log")
    parser.add_argument("--header", action="store_true", help="print the table header first")
    args = parser.parse_args()
    started = time.monotonic()
    result = run(args)
    c, p, lg = result["committed"], result["picked"], result["logged"]
    if args.header:
        print(f"<!-- {machine()} -->")
        print(
            "| database | reports | commit p50 | p90 | p99 | max "
            "| picked up p50 / p99 | log line p50 / p99 |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    log_cell = f"{lg['p50']:.1f} / {lg['p99']:.1f}" if lg else "n/a"
    print(
        f"| {args.database} | {result['n']} | {c['p50']:.1f} ms | {c['p90']:.1f} ms "
        f"| {c['p99']:.1f} ms | {c['max']:.1f} ms | {p['p50']:.1f} / {p['p99']:.1f} ms "
        f"| {log_cell} ms |"
    )
    sys.stdout.flush()
    worst = ", ".join(
        f"{name} {c:.0f} ms (picked up after {p:.0f} ms)" for c, p, name in result["worst"]
    )
    print(f"slowest commits: {worst}", file=sys.stderr)
    print(
        f"daemon ready in {result['ready_after']:.1f} s; daemon CPU {result['cpu']:.1f} s; "
        f"machine {result['quiet']:.0%} busy before; during the run PostgreSQL used "
        f"{result['postgres']:.1f} CPU s, other processes {result['others']:.1f} CPU s; "
        f"log lines matched {result['logged_n']}/{result['n']}; "
        f"wall {time.monotonic() - started:.0f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
