"""Alerts and the control tool (issue 7): deadline-to-webhook latency, `status` wall time.

    .venv/bin/python bench/alerts.py [--jobs 100] [--per-minute 20] [--status-jobs 1000]
                                     [--runs 10] [--database sqlite|postgresql] [--skip-latency]

1. **MISSING deadline -> webhook.** The real `backupwatchd` with `--jobs` ONCE jobs (one-minute
   window), `--per-minute` of them sharing each deadline, the first deadline about two minutes
   after READY; `[alerts]` points at a JSON webhook served here on loopback. No report ever
   arrives, so each job is flagged MISSING at its deadline (c + W, on a minute boundary) and
   alerted. Per job: the time the webhook received the message that names it (a grouped one
   names every job it carries) minus its deadline. More than 5 per minute are one grouped
   message per deadline (SPEC §10); `--per-minute 4` measures single messages.
2. **`backupwatchctl status` wall time**, `--status-jobs` jobs, `--runs` runs each: with the
   daemon up (answered over the control socket), then down (the tool reads the database
   itself), against `systemctl --version` in the same run as the floor of starting a program.

Prints markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from common import (
    BIN,
    BenchDaemon,
    BenchDatabase,
    machine,
    percentile,
    toml_value,
    wait_quiet,
    workspace,
    write_config,
)


class Receiver:
    """A JSON webhook (Apprise's json://) that notes when each message arrived."""

    def __init__(self) -> None:
        self.received: list[tuple[float, dict[str, Any]]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length))
                receiver.received.append((time.time(), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"json://127.0.0.1:{self.server.server_port}/bench"


def once_jobs(count: int, per_minute: int, first: datetime) -> tuple[str, dict[str, float]]:
    """ONCE jobs whose cycles fall `per_minute` to a minute from `first`; their deadlines."""
    blocks, deadlines = [], {}
    for n in range(count):
        cycle = first + timedelta(minutes=n // per_minute)
        site = f"N{n:03d}"
        values = {
            "company_name": "Bench",
            "city": "City",
            "neighborhood": site,
            "database_name": "db",
            "frequency": "ONCE",
            "expected_date": cycle.date().isoformat(),
            "expected_hour_utc": cycle.hour,
            "expected_minute_utc": cycle.minute,
            "collection_window_minutes": 1,
        }
        blocks.append("[[job]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
        deadlines[f"Bench/City/{site}"] = (cycle + timedelta(minutes=1)).timestamp()
    return "\n".join(blocks), deadlines


def sites_in(body: dict[str, Any]) -> list[str]:
    """The sites a message names: `Site: S (agent …)` alone, `  S: n MISSING` when grouped."""
    found = []
    for line in str(body["message"]).splitlines():
        if line.startswith("Site: "):
            found.append(line[6:].split(" (")[0])
        elif line.startswith("  ") and ": " in line:
            found.append(line.strip().split(": ")[0])
    return found


def latency(args: argparse.Namespace) -> None:
    receiver = Receiver()
    with workspace() as (base, run_dir):
        database = BenchDatabase.create(args.database, base)
        try:
            start = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(minutes=2)
            jobs, deadlines = once_jobs(args.jobs, args.per_minute, start)
            config = write_config(base, database.url, jobs, run_dir / "control.sock")
            with config.open("a") as out:
                out.write(f'\n[alerts]\nurls = ["{receiver.url}"]\nrepeat_hours = 0\n')
            wait_quiet()
            daemon = BenchDaemon(config, run_dir, base / "daemon.log")
            daemon.start()
            last = max(deadlines.values())
            print(
                f"waiting for {len(deadlines)} deadlines until {last - time.time():.0f} s from now",
                file=sys.stderr,
            )
            arrived: dict[str, float] = {}
            while len(arrived) < len(deadlines) and time.time() < last + 60:
                for when, body in list(receiver.received):
                    for site in sites_in(body):
                        arrived.setdefault(site, when)
                time.sleep(0.2)
            daemon.stop()
        finally:
            database.drop()
    receiver.server.shutdown()
    values = [arrived[site] - deadline for site, deadline in deadlines.items() if site in arrived]
    print(
        f"\n### MISSING deadline -> webhook ({args.database}, {args.jobs} jobs, "
        f"{args.per_minute} per deadline)\n"
    )
    print("| jobs alerted | messages | p50 | p99 | max |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| {len(values)} of {len(deadlines)} | {len(receiver.received)} | "
        f"{percentile(values, 50):.2f} s | {percentile(values, 99):.2f} s | {max(values):.2f} s |"
    )


def timed(command: list[str], runs: int) -> list[float]:
    walls = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        walls.append(time.perf_counter() - started)
    return walls


def status_times(args: argparse.Namespace) -> None:
    jobs = "".join(
        "[[job]]\n"
        + "".join(
            f"{k} = {toml_value(v)}\n"
            for k, v in {
                "company_name": f"C{n % 20}",
                "city": "City",
                "neighborhood": f"N{n:04d}",
                "database_name": "db",
                "expected_hour_utc": n % 24,
            }.items()
        )
        for n in range(args.status_jobs)
    )
    with workspace() as (base, run_dir):
        database = BenchDatabase.create(args.database, base)
        try:
            config = write_config(base, database.url, jobs, run_dir / "control.sock")
            ctl = [str(BIN / "backupwatchctl"), "--config", str(config), "status"]
            daemon = BenchDaemon(config, run_dir, base / "daemon.log")
            daemon.start()
            timed(ctl, 1)  # warm the page cache and the bytecode
            wait_quiet()
            floor = timed(["systemctl", "--version"], args.runs)
            up = timed(ctl, args.runs)
            up_json = timed([*ctl, "--json"], args.runs)
            daemon.stop()
            wait_quiet()
            down = timed(ctl, args.runs)
        finally:
            database.drop()
    print(
        f"\n### `backupwatchctl status`, {args.status_jobs} jobs ({args.database}), "
        f"{args.runs} runs each\n"
    )
    print("| command | median | min | max |")
    print("| --- | ---: | ---: | ---: |")
    for name, walls in (
        ("`systemctl --version` (the floor)", floor),
        ("`backupwatchctl status`, daemon up", up),
        ("`backupwatchctl status --json`, daemon up", up_json),
        ("`backupwatchctl status`, daemon down", down),
    ):
        print(
            f"| {name} | {statistics.median(walls) * 1000:.0f} ms | {min(walls) * 1000:.0f} ms "
            f"| {max(walls) * 1000:.0f} ms |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--per-minute", type=int, default=20)
    parser.add_argument("--status-jobs", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--database", default="sqlite")
    parser.add_argument("--skip-latency", action="store_true")
    args = parser.parse_args()
    print(f"machine: {machine()}", file=sys.stderr)
    status_times(args)
    if not args.skip_latency:
        latency(args)


if __name__ == "__main__":
    main()
