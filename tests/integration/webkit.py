"""A real daemon with a history made of real reports and MISSING flags, for the HTTP tests.

Two weeks of history need cycles that were expected two weeks ago: the daemon is started once
(schema and jobs), stopped, and its jobs' activation and MISSING cursor are moved back 13 days
in the database, as if it had been running since. Reports for those days are then dropped in
the deposit folders; the second start processes them and flags the cycles that have none as
MISSING, exactly as after a downtime (SPEC §7's start sequence).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy
from daemonkit import Daemon, wait_for
from support import database, drop, job_block, postgres_schema, report, write_config

from backupwatch.config import load_settings
from backupwatch.control import call
from backupwatch.jobs import load_jobs
from backupwatch.store import ExpectedBackupJob, Store

DAYS = 14
WINDOW = 60
# (company, city, neighborhood) -> databases
SITES: dict[tuple[str, str, str], tuple[str, ...]] = {
    ("ACME", "Lyon", "Part-Dieu"): ("sales", "hr"),
    ("ACME", "Lyon", "Confluence"): ("sales",),
    ("Globex", "Paris", "Bastille"): ("crm",),
    ("Globex", "Nantes", "Centre"): ("crm",),
    ("Initech", "Lille", "Gare"): ("erp",),  # activated now, its cycle later: pending only
}
FRESH = ("Initech", "Lille", "Gare")
# What each backdated site's cycle k days before the newest one gets (default OK).
PLAN: dict[tuple[str, str, str], dict[int, str]] = {
    ("ACME", "Lyon", "Part-Dieu"): {},
    ("ACME", "Lyon", "Confluence"): {2: "FAILED", 5: "MISSING"},
    ("Globex", "Paris", "Bastille"): {1: "HASH_MISMATCH"},
    ("Globex", "Nantes", "Centre"): {0: "FAILED", **{k: "MISSING" for k in range(4, DAYS)}},
}


def agent(site: tuple[str, str, str]) -> str:
    return "_".join(site)


@dataclass
class WebWorld:
    daemon: Daemon
    control: Path
    url: str
    host: str
    port: int
    now: datetime
    newest: datetime  # the newest settled cycle of the backdated jobs
    fresh_cycle: datetime  # the fresh job's first cycle
    expected: dict[tuple[str, date], str] = field(default_factory=dict)

    def request(
        self, method: str, path: str, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str], bytes]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=20)
        try:
            connection.request(method, path, headers=headers or {})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    def get(self, path: str) -> bytes:
        status, _, body = self.request("GET", path)
        assert status == 200, (path, status, body[:300])
        return body

    def status(self) -> dict[str, Any]:
        answer: dict[str, Any] = call(self.control, "status")
        return answer

    def job_id(self, label: str) -> int:
        rows = json.loads(self.get("/api/status"))["jobs"]
        for row in rows:
            name = "/".join(
                row[k] for k in ("company_name", "city", "neighborhood", "database_name")
            )
            if name == label:
                return int(row["id"])
        raise KeyError(label)


def jobs_toml(now: datetime) -> str:
    hour = (now - timedelta(hours=2)).hour
    fresh_hour = (now + timedelta(hours=3)).hour
    blocks = []
    for site, databases in SITES.items():
        for name in databases:
            blocks.append(
                job_block(
                    *site,
                    name,
                    expected_hour_utc=fresh_hour if site == FRESH else hour,
                    collection_window_minutes=WINDOW,
                )
            )
    return "".join(blocks)


def _content(site: tuple[str, str, str], name: str, k: int) -> bytes:
    return f"{agent(site)}/{name}/{k}\n".encode() * 50


def drop_history(daemon: Daemon, newest: datetime) -> dict[tuple[str, date], str]:
    """One report per site and cycle following PLAN; returns the expected cell per site/day."""
    expected: dict[tuple[str, date], str] = {}
    for site, plan in PLAN.items():
        folder = daemon.deposit / agent(site)
        for k in range(DAYS):
            cycle = newest - timedelta(days=k)
            verdict = plan.get(k, "OK")
            expected["/".join(site), cycle.date()] = verdict
            if verdict == "MISSING":
                continue
            blocks = {}
            for name in SITES[site]:
                if verdict == "FAILED":
                    blocks[name] = database(None, None, transfer=False, error="disk full")
                    continue
                content = _content(site, name, k)
                staged = f"staged/{name}-{k}.sql.gz"
                path = folder / staged
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
                sha = hashlib.sha256(b"other" + content).hexdigest()
                blocks[name] = database(
                    staged, content, sha256=sha if verdict == "HASH_MISMATCH" else None
                )
            body = report(agent(site), cycle + timedelta(minutes=5), blocks)
            drop(folder, body, f"STATUS-{k:02d}.json")
    return expected


def prepare(config: Path, newest: datetime) -> None:
    """The schema and jobs as the daemon's start makes them (`migrate`, `sync_jobs`), then as
    if it had run for two weeks: activation and MISSING cursor 13 days back."""
    settings = load_settings(config, {})
    first = newest - timedelta(days=DAYS - 1)
    store = Store(settings.database_url)
    j = ExpectedBackupJob
    try:
        store.migrate()
        store.sync_jobs(
            load_jobs(settings), settings.scanner_report_collection_window_minutes, newest
        )
        with store.session() as session:
            session.execute(
                sqlalchemy.update(j)
                .where(j.company_name != FRESH[0])
                .values(
                    activated_at=first - timedelta(minutes=1),
                    next_cycle_at=first,
                    next_deadline_at=first + timedelta(minutes=WINDOW),
                )
            )
    finally:
        store.dispose()


def module_database(kind: str, base: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{base}/backupwatch.db"
        return
    with postgres_schema() as url:
        yield url


def build(kind: str, base: Path) -> Iterator[WebWorld]:
    """Start, backdate, drop two weeks of reports, start again; yields the running world."""
    run_dir = Path(tempfile.mkdtemp(prefix="bw-", dir="/tmp"))
    databases = module_database(kind, base)
    url = next(databases)
    now = datetime.now(UTC).replace(microsecond=0)
    newest = (now - timedelta(hours=2)).replace(minute=0, second=0)
    config = write_config(
        base,
        url,
        jobs_toml(now),
        control_socket=str(run_dir / "control.sock"),
        http_listen="127.0.0.1:0",
        max_status_file_age_days=DAYS + 1,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUPWATCH_", "NOTIFY_"))}
    daemon = Daemon(base, config, run_dir, env)
    try:
        prepare(config, newest)
        expected = drop_history(daemon, newest)
        daemon.start()
        address = call(run_dir / "control.sock", "status")["http"]
        host, port = address.rsplit(":", 1)
        fresh_cycle = now.replace(minute=0, second=0) + timedelta(hours=3)
        world = WebWorld(
            daemon,
            run_dir / "control.sock",
            url,
            host,
            int(port),
            now,
            newest,
            fresh_cycle,
            expected,
        )
        wait_for(lambda: world.status()["pending_reports"] == 0, what="reports processed")
        yield world
    finally:
        if daemon.process and daemon.process.poll() is None:
            daemon.stop()
        shutil.rmtree(run_dir, ignore_errors=True)
        for _ in databases:
            pass
