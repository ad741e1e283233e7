"""Builders for the files agents and operators write: configs, job files, reports, staged files."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import socket
import struct
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy

from backupwatch.config import Settings, load_settings
from backupwatch.enums import JobStatus
from backupwatch.jobs import load_jobs
from backupwatch.pipeline import Context, Result, process_path, registry_of
from backupwatch.store import MIGRATIONS_DIR, BackupEntry, Store
from backupwatch.timer import Flagged, MissingTimer

PG_URL = os.environ.get(
    "BACKUPWATCH_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)


def utc(
    year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def iso(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def job_block(company: str, city: str, neighborhood: str, database: str, **keys: Any) -> str:
    keys.setdefault("expected_hour_utc", 13)
    lines = ["[[job]]"]
    items = {
        "company_name": company,
        "city": city,
        "neighborhood": neighborhood,
        "database_name": database,
        **keys,
    }
    lines += [f"{key} = {toml_value(value)}" for key, value in items.items() if value is not None]
    return "\n".join(lines) + "\n\n"


def write_config(base: Path, database_url: str, jobs: str, **overrides: Any) -> Path:
    """A config under `base` with deposit/, validated/, jobs.d/ and a short control socket;
    `extra_toml` is appended as it is (tables such as `[alerts]`).

    `archive_test` is off unless a test turns it on: most tests stage a few bytes of text under
    a `.gz` name, and SPEC §13's test has tests of its own (test_archivetest.py)."""
    extra = str(overrides.pop("extra_toml", ""))
    (base / "deposit").mkdir(parents=True, exist_ok=True)
    (base / "validated").mkdir(parents=True, exist_ok=True)
    (base / "jobs.d").mkdir(parents=True, exist_ok=True)
    (base / "jobs.d" / "jobs.toml").write_text(jobs)
    values = {
        "backup_storage_root": "deposit",
        "validated_backups_base_path": "validated",
        "jobs_path": "jobs.d",
        "database_url": database_url,
        "control_socket": str(base / "control.sock"),
        "http_listen": "",  # off unless a test asks: parallel daemons would share its port
        "archive_test": False,
        **overrides,
    }
    path = base / "backupwatch.toml"
    lines = "".join(f"{key} = {toml_value(value)}\n" for key, value in values.items())
    path.write_text(lines + extra)
    return path


def database(
    staged: str | None,
    content: bytes | None,
    *,
    backup: bool = True,
    compress: bool = True,
    transfer: bool = True,
    sha256: str | None = None,
    size: int | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """One entry of a report's `databases`, describing `content` unless told otherwise."""
    digest = sha256 or (hashlib.sha256(content).hexdigest() if content is not None else None)
    length = size if size is not None else (len(content) if content is not None else None)
    compress_step: dict[str, Any] = {"status": compress, "timestamp": "2026-11-24T13:00:00Z"}
    if digest is not None:
        compress_step["sha256_checksum"] = digest
    if length is not None:
        compress_step["size_bytes"] = length
    block: dict[str, Any] = {
        "backup_process": {"status": backup, "timestamp": "2026-11-24T12:59:00Z"},
        "compress_process": compress_step,
        "transfer_process": {"status": transfer, "error_message": error},
        "logs_summary": "ok",
    }
    if staged is not None:
        block["staged_file_name"] = staged
    return block


def report(agent_id: str, when: datetime, databases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "agent_id": agent_id,
        "operation_start_time": iso(when.replace(minute=0)),
        "operation_timestamp": iso(when),
        "overall_status": "completed",
        "databases": databases,
    }


def stage(site: Path, name: str, content: bytes) -> Path:
    path = site / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def drop(site: Path, body: dict[str, Any] | bytes, name: str = "STATUS.json") -> Path:
    """Write a report the way well-behaved agents do: a dot-file, then a rename into place."""
    site.mkdir(parents=True, exist_ok=True)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    temp = site / f".{name}.part"
    temp.write_bytes(data)
    os.rename(temp, site / name)
    return site / name


@dataclass
class World:
    """A configured storage host driven in-process with an injected clock (no daemon)."""

    base: Path
    settings: Settings
    store: Store
    ctx: Context = field(init=False)

    @classmethod
    def create(
        cls, base: Path, database_url: str, jobs: str, activated: datetime, **overrides: Any
    ) -> World:
        config = write_config(base, database_url, jobs, **overrides)
        settings = load_settings(config, {})
        store = Store(settings.database_url)
        store.instance = settings.instance  # as the daemon does (SPEC §15)
        store.migrate()
        store.sync_jobs(
            load_jobs(settings), settings.scanner_report_collection_window_minutes, activated
        )
        world = cls(base, settings, store)
        world.ctx = Context(store, settings, registry_of(settings, store))
        return world

    def restart(self, jobs: str, now: datetime) -> None:
        """Start again at `now` with `jobs` as the job file: sync, then a fresh registry.

        The daemon's start sequence does the same before it processes the waiting reports.
        """
        (self.base / "jobs.d" / "jobs.toml").write_text(jobs)
        self.store.sync_jobs(
            load_jobs(self.settings), self.settings.scanner_report_collection_window_minutes, now
        )
        self.ctx = Context(self.store, self.settings, registry_of(self.settings, self.store))

    @property
    def deposit(self) -> Path:
        return self.settings.backup_storage_root

    @property
    def validated(self) -> Path:
        return self.settings.validated_backups_base_path

    def site(self, agent_id: str) -> Path:
        return self.deposit / agent_id

    def process(self, path: Path, now: datetime) -> Result:
        return process_path(self.ctx, path, now)

    def tick(self, now: datetime) -> list[Flagged]:
        timer = MissingTimer(self.store, lambda: now, self.ctx.max_age)
        return timer.run_once(now)

    def status(self, label: str, now: datetime) -> JobStatus:
        for view in self.store.job_views(now):
            if f"{view.company_name}/{view.city}/{view.neighborhood}/{view.database_name}" == label:
                return view.current_status
        raise KeyError(label)

    def history(self, label: str) -> list[BackupEntry]:
        job = self.store.find_job(label)
        assert job is not None
        return self.store.history(job.id, None)


class TcpProxy:
    """A loopback TCP forwarder to a real server that a test can cut and restore: a database
    outage as the daemon sees it (connections reset, new ones refused), with nothing mocked."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._up = threading.Event()
        self._up.set()
        self._closed = False
        threading.Thread(target=self._accept, name="tcp-proxy", daemon=True).start()

    def url_for(self, database_url: str) -> str:
        """`database_url` (PostgreSQL on `target`) rewritten to go through this proxy."""
        host, port = self.target
        return database_url.replace(f"{host}:{port}", f"127.0.0.1:{self.port}")

    def cut(self) -> None:
        """Reset every connection and refuse new ones until `restore()`."""
        self._up.clear()
        with self._lock:
            sockets, self._open = self._open, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._closed = True
        self.cut()
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if not self._up.is_set():
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._open += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


@functools.cache
def postgres_unavailable() -> str | None:
    engine = sqlalchemy.create_engine(PG_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
    except sqlalchemy.exc.OperationalError as exc:
        return f"PostgreSQL unreachable at {PG_URL}: {str(exc).splitlines()[0]}"
    finally:
        engine.dispose()
    return None


def require_postgres() -> None:
    reason = postgres_unavailable()
    if reason is None:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the PostgreSQL tests)")
    pytest.skip(reason)


@contextlib.contextmanager
def postgres_schema() -> Iterator[str]:
    """A PostgreSQL URL confined to a fresh schema, dropped afterwards (skips without a server,
    fails under CI)."""
    require_postgres()
    schema = f"bw_{uuid.uuid4().hex[:16]}"
    admin = sqlalchemy.create_engine(PG_URL)
    with admin.begin() as connection:
        connection.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.begin() as connection:
            connection.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def run_alembic(store: Store, step: Any, revision: str) -> None:
    """An Alembic command (`command.upgrade`, `command.downgrade`) on `store`'s database."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with store.engine.begin() as connection:
        config.attributes["connection"] = connection
        step(config, revision)
