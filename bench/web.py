"""The HTTP listener (issue 8, SPEC §12): status page and /metrics server time, and whether
scraping slows report processing.

    .venv/bin/python bench/web.py [--database sqlite|postgresql] [--page-sites 1000]
                                  [--metrics-sites 3334] [--runs 20] [--bursts 2] [--reports 2000]
                                  [--scrape-interval 0]

1. **`/` with 1,000 sites x 3 databases x 14 days of history**: the jobs synced as the daemon
   does, 14 daily entries per job inserted in bulk (90 % SUCCESS, the rest FAILED, MISSING,
   HASH_MISMATCH), then the WSGI application called in-process `--runs` times: server time
   (query + template), p50/p99. Target < 300 ms.
2. **`/metrics` with 10,000 jobs** (3,334 sites x 3, same history): scrape time in-process,
   per-job series on. Target < 1 s.
3. **Report throughput with continuous scraping vs without**, in the same run: the real
   `backupwatchd` on database 2 with its listener on; `--bursts` pairs of bursts of
   `--reports` reports (3 databases each, a staged file per database), alternately with no
   client and with two clients fetching `/metrics` and `/` back to back (already running when
   the burst is dropped; a burst lasts longer than a page is reused, so the pages are made
   again during it). Throughput = reports / (last accepted - first dropped). Target: ratio
   >= 0.9.

Prints markdown tables on stdout.
"""

from __future__ import annotations

import argparse
import http.client
import os
import random
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from common import (
    BenchDaemon,
    BenchDatabase,
    agent_id,
    database_block,
    machine,
    percentile,
    report_bytes,
    wait_quiet,
    workspace,
    write_config,
    write_file,
)
from sqlalchemy import insert

from backupwatch.config import load_settings
from backupwatch.control import call
from backupwatch.enums import BackupEntryStatus
from backupwatch.jobs import load_jobs
from backupwatch.metrics import Instruments, Runtime
from backupwatch.pastdays import PastDays
from backupwatch.store import BackupEntry, Store
from backupwatch.web import WebApp

DATABASES = ("sales", "hr", "crm")
DAYS = 14


def jobs_toml(sites: int, now: datetime) -> str:
    """DAILY jobs over `sites` sites in 10 companies, their cycle 6 h from now with a ±10 h
    window: a report made now counts for it, and no deadline falls during the run."""
    hour = (now + timedelta(hours=6)).hour
    out = [f"[defaults]\nexpected_hour_utc = {hour}\ncollection_window_minutes = 600\n"]
    for n in range(sites):
        for name in DATABASES:
            out.append(
                f'[[job]]\ncompany_name = "Company{n % 10:02d}"\ncity = "City"\n'
                f'neighborhood = "Site{n:05d}"\ndatabase_name = "{name}"\n'
                f'agent_id = "Bench_City_Site{n:05d}"\n'
            )
    return "\n".join(out)


def populate(base: Path, kind: str, sites: int, now: datetime) -> tuple[BenchDatabase, Path]:
    """A database with the jobs synced and 14 days of daily entries per job."""
    base.mkdir(parents=True, exist_ok=True)
    database = BenchDatabase.create(kind, base)
    config = write_config(base, database.url, jobs_toml(sites, now), base / "control.sock")
    settings = load_settings(config, {})
    store = Store(settings.database_url)
    store.migrate()
    started = time.monotonic()
    store.sync_jobs(load_jobs(settings), 60, now)
    synced = time.monotonic() - started
    random.seed(8)
    weights = [(BackupEntryStatus.SUCCESS, 90), (BackupEntryStatus.FAILED, 4)]
    weights += [(BackupEntryStatus.MISSING, 4), (BackupEntryStatus.HASH_MISMATCH, 2)]
    statuses = [s for s, w in weights for _ in range(w)]
    rows: list[dict[str, Any]] = []
    job_ids = [job.id for job in store.all_jobs()]
    for job_id in job_ids:
        for day in range(DAYS):
            cycle = (now - timedelta(days=day)).replace(hour=13, minute=0, second=0)
            status = random.choice(statuses)
            rows.append(
                {
                    "job_id": job_id,
                    "cycle": cycle,
                    "status": status,
                    "message": f"bench {status.value}",
                    "recorded_at": cycle + timedelta(minutes=10),
                }
            )
    with store.session() as session:
        for start in range(0, len(rows), 5000):
            session.execute(insert(BackupEntry), rows[start : start + 5000])
    store.dispose()
    print(
        f"<!-- {kind}: {len(job_ids)} jobs synced in {synced:.1f} s, {len(rows)} entries -->",
        file=sys.stderr,
    )
    return database, config


class Idle:
    """The daemon's side of the listener, for an in-process app (nothing is processed)."""

    def status_answer(self, store: Store) -> dict[str, Any]:
        return {"ok": True}

    def failing_loops(self) -> list[str]:
        return []

    def runtime(self) -> Runtime:
        return Runtime()


def server_times(
    app: WebApp, path: str, runs: int, cold: bool = False
) -> tuple[list[float], list[float]]:
    """Wall and CPU (this thread: Python, SQLite, psycopg2's side) seconds per request;
    `cold`: the page's past days made again for each (as after a late report for one)."""
    times = []
    cpu = []
    path, _, query = path.partition("?")
    environ = {"REQUEST_METHOD": "GET", "REQUEST_URI": path, "QUERY_STRING": query}
    status: list[str] = []
    for _ in range(runs + 1):
        if cold:
            app.past = PastDays()
        started, started_cpu = time.perf_counter(), time.thread_time()
        body = b"".join(app(environ, lambda s, h: status.append(s)))
        times.append(time.perf_counter() - started)
        cpu.append(time.thread_time() - started_cpu)
        app.renders.clear()  # each call measures a page made, not one reused
        assert status.pop() == "200 OK", body[:200]
    return times[1:], cpu[1:]  # the first compiles the templates too


def in_process(
    config: Path, path: str, runs: int, cold: bool = False
) -> tuple[list[float], list[float]]:
    settings = load_settings(config, {})
    store = Store(settings.database_url, create=False)
    try:
        app = WebApp(store, Idle(), lambda: datetime.now(UTC), lambda: True, Instruments())
        return server_times(app, path, runs, cold)
    finally:
        store.dispose()


def row(label: str, measured: tuple[list[float], list[float]]) -> str:
    ms = [t * 1000 for t in measured[0]]
    cpu = [t * 1000 for t in measured[1]]
    return (
        f"| {label} | {len(ms)} | {percentile(ms, 50):.0f} ms | {percentile(ms, 99):.0f} ms "
        f"| {max(ms):.0f} ms | {percentile(cpu, 50):.0f} ms |"
    )


# ---------------------------------------------------------------- throughput


class Scraper:
    """Clients fetching `paths` back to back until stopped."""

    def __init__(self, host: str, port: int, paths: list[str], interval: float = 0.0) -> None:
        self.host, self.port, self.paths = host, port, paths
        self.interval = interval
        self.stopping = threading.Event()
        self.fetched = 0
        self.refused = 0  # 429 answers (the listener's per-client limit)
        self.threads = [threading.Thread(target=self._run, args=(p,)) for p in paths]

    def _run(self, path: str) -> None:
        while not self.stopping.is_set():
            connection = http.client.HTTPConnection(self.host, self.port, timeout=30)
            connection.request("GET", path, headers={"Accept-Encoding": "gzip"})  # as Prometheus
            response = connection.getresponse()
            response.read()
            connection.close()
            self.fetched += 1
            self.refused += response.status == 429
            self.stopping.wait(self.interval)

    def __enter__(self) -> Scraper:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join()


def burst(daemon_dir: Path, socket_path: Path, first: int, count: int, sites: int) -> float:
    """Drop `count` reports (one per site from `first` on, wrapping around) and wait for all
    of them: reports/s. Each burst's staged files and reports are new bytes."""
    before = call(socket_path, "status")["counters"].get("accepted", 0)
    when = datetime.now(UTC).replace(microsecond=0)
    deposit = daemon_dir / "deposit"
    payloads = []
    for n in range(first, first + count):
        site = f"Site{n % sites:05d}"
        folder = deposit / agent_id(site)
        blocks = {}
        for name in DATABASES:
            content = f"{site}/{name}/{when}/{n}".encode() * 200
            staged = f"staged/{name}-{n}.gz"
            write_file(folder / staged, content)
            blocks[name] = database_block(staged, content, when)
        payloads.append((folder, report_bytes(site, when, blocks)))
    started = time.monotonic()
    for folder, data in payloads:
        temp = folder / ".STATUS.json.part"
        temp.write_bytes(data)
        temp.rename(folder / "STATUS.json")
    while call(socket_path, "status")["counters"].get("accepted", 0) < before + count:
        time.sleep(0.02)
    return count / (time.monotonic() - started)


def throughput(
    base: Path,
    run_dir: Path,
    config: Path,
    bursts: int,
    reports: int,
    sites: int,
    interval: float,
) -> list[tuple[str, float, int, int]]:
    text = config.read_text().replace('http_listen = ""', 'http_listen = "127.0.0.1:0"')
    config.write_text(text)
    socket_path = base / "control.sock"
    daemon = BenchDaemon(config, run_dir, base / "daemon.log")
    daemon.start(timeout=600)
    results: list[tuple[str, float, int, int]] = []
    try:
        host, port = call(socket_path, "status")["http"].rsplit(":", 1)
        site = 0
        for _ in range(bursts):
            wait_quiet(timeout=60)
            results.append(("no client", burst(base, socket_path, site, reports, sites), 0, 0))
            site += reports
            wait_quiet(timeout=60)
            with Scraper(host, int(port), ["/metrics", "/"], interval) as scraper:
                while scraper.fetched < 2:  # clients already at it when the reports come
                    time.sleep(0.1)
                before, refused = scraper.fetched, scraper.refused
                rate = burst(base, socket_path, site, reports, sites)
                fetched, refused = scraper.fetched - before, scraper.refused - refused
            how = f"every {interval:g} s" if interval else "back to back"
            results.append((f"scraping /metrics and / {how}", rate, fetched, refused))
            site += reports
    finally:
        daemon.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--database", default="sqlite", choices=["sqlite", "postgresql"])
    parser.add_argument("--page-sites", type=int, default=1000)
    parser.add_argument("--metrics-sites", type=int, default=3334)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--bursts", type=int, default=2)
    parser.add_argument("--reports", type=int, default=2000)
    parser.add_argument(
        "--scrape-interval", type=float, default=0.0, help="seconds between a client's fetches"
    )
    args = parser.parse_args()
    now = datetime.now(UTC)
    print(machine())
    with workspace() as (base, run_dir):
        page_db, page_config = populate(base / "page", args.database, args.page_sites, now)
        metrics_db, metrics_config = populate(
            base / "metrics", args.database, args.metrics_sites, now
        )
        try:
            wait_quiet(timeout=120)
            print(f"load average: {os.getloadavg()}")
            print(f"\n**{args.database}**, server time in-process, first call left out\n")
            print("| request | runs | p50 | p99 | max | CPU p50 |")
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            jobs = args.page_sites * len(DATABASES)
            label = f"`/`, {args.page_sites} sites, {jobs} jobs, {DAYS} days"
            print(row(label, in_process(page_config, "/", args.runs)))
            label = "`/`, same, its past days made again for each (a late entry)"
            print(row(label, in_process(page_config, "/", args.runs, cold=True)))
            label = f"`/?problems=1`, {args.page_sites} sites"
            print(row(label, in_process(page_config, "/?problems=1", args.runs)))
            jobs = args.metrics_sites * len(DATABASES)
            label = f"`/metrics`, {jobs} jobs, per-job series on"
            print(row(label, in_process(metrics_config, "/metrics", max(5, args.runs // 2))))
            results = throughput(
                base / "metrics",
                run_dir,
                metrics_config,
                args.bursts,
                args.reports,
                args.metrics_sites,
                args.scrape_interval,
            )
            print(f"\n**report throughput**, {args.reports} reports x 3 databases per burst\n")
            print("| burst | reports/s | requests during the burst | of which 429 |")
            print("| --- | ---: | ---: | ---: |")
            for label, rate, fetched, refused in results:
                print(f"| {label} | {rate:.1f} | {fetched} | {refused} |")
            plain = [r for label, r, _, _ in results if label == "no client"]
            scraped = [r for label, r, _, _ in results if label != "no client"]
            ratio = (sum(scraped) / len(scraped)) / (sum(plain) / len(plain))
            print(f"\nratio (mean with scraping / mean without): **{ratio:.2f}**")
            print(f"load average at the end: {os.getloadavg()}")
        finally:
            page_db.drop()
            metrics_db.drop()


if __name__ == "__main__":
    main()
