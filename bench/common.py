"""Shared pieces of the benchmarks: a real `backupwatchd`, its config, reports, databases, stats.

Benchmarks measure, they do not assert: nothing here is collected by pytest (bench/ is outside
`testpaths` and no file is named test_*.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, text

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent
# The daemon command; override it to compare an experimental build with the same benchmark.
DAEMON = shlex.split(os.environ.get("BACKUPWATCH_BENCH_DAEMON", str(BIN / "backupwatchd")))
POSTGRES_URL = os.environ.get(
    "BACKUPWATCH_BENCH_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
)


# ------------------------------------------------------------------------------- machine


def machine() -> str:
    """One line naming what the numbers were measured on."""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    distro = "?"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    return (
        f"{os.cpu_count()} cores ({cpu}), {distro}, kernel {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def cpu_busy_ticks() -> int:
    """Machine-wide busy CPU time (every core, in clock ticks) from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle


def wait_quiet(threshold: float = 0.10, timeout: float = 600.0) -> float:
    """Wait until the machine is nearly idle (busy < threshold of all cores over 2 s).

    Other people's test runs share these cores; a measurement taken under their load says
    more about them than about backupwatch. Returns the busy fraction last seen.
    """
    ticks, cores = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
    deadline = time.monotonic() + timeout
    while True:
        before = cpu_busy_ticks()
        time.sleep(2.0)
        busy = (cpu_busy_ticks() - before) / ticks / 2.0 / cores
        if busy < threshold:
            return busy
        if time.monotonic() > deadline:
            print(f"machine still {busy:.0%} busy after {timeout:.0f} s: measuring anyway",
                  file=sys.stderr)  # fmt: skip
            return busy
        print(f"machine {busy:.0%} busy (other processes): waiting", file=sys.stderr)


def others_cpu(busy_ticks: int, own_seconds: float) -> float:
    """CPU seconds that processes other than ours used since `busy_ticks` was read."""
    used = (cpu_busy_ticks() - busy_ticks) / os.sysconf("SC_CLK_TCK")
    return max(0.0, used - own_seconds)


def postgres_cpu() -> float:
    """CPU seconds used so far by every live `postgres` process (the server and its backends).

    A backend that exits in between takes its time with it, so read this while the daemon's
    connections are still open.
    """
    ticks, total = os.sysconf("SC_CLK_TCK"), 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            head, tail = (entry / "stat").read_text().rsplit(")", 1)
            if head.split("(", 1)[1] == "postgres":
                fields = tail.split()
                total += int(fields[11]) + int(fields[12])
    return total / ticks


def own_cpu() -> float:
    """CPU seconds of this process and its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


# ------------------------------------------------------------------------------- stats


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): a value that was actually observed."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def summary_ms(values: Sequence[float]) -> dict[str, float]:
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


def parse_ts(value: str) -> float:
    """structlog's ISO timestamp (UTC) to a POSIX time, comparable with time.time()."""
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------- databases


@dataclass
class BenchDatabase:
    """A fresh SQLite file or PostgreSQL schema; `drop()` removes the PostgreSQL schema."""

    kind: str
    url: str
    schema: str | None = None

    @classmethod
    def create(cls, kind: str, base: Path) -> BenchDatabase:
        if kind == "sqlite":
            return cls(kind, f"sqlite:///{base / 'state' / 'backupwatch.db'}")
        if kind != "postgresql":
            raise SystemExit(f"unknown database {kind!r}: sqlite or postgresql")
        schema = f"bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        admin = create_engine(POSTGRES_URL)
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        admin.dispose()
        return cls(kind, f"{POSTGRES_URL}?options=-csearch_path%3D{schema}", schema)

    def engine(self) -> Engine:
        """A separate observer connection (autocommit, so every poll sees the latest commit)."""
        if self.kind == "sqlite":
            return create_engine(self.url, isolation_level="AUTOCOMMIT")
        return create_engine(self.url, isolation_level="AUTOCOMMIT", pool_size=1)

    def drop(self) -> None:
        if self.schema is None:
            return
        admin = create_engine(POSTGRES_URL)
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
        admin.dispose()


# ------------------------------------------------------------------------------- files


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))


def jobs_toml(sites: Sequence[str], databases: Sequence[str], window_minutes: int = 30) -> str:
    """HOURLY jobs with a ±30 min window: every instant belongs to some cycle of each job."""
    company = "Bench"
    out = [
        "[defaults]",
        'frequency = "HOURLY"',
        f"collection_window_minutes = {window_minutes}",
        "",
    ]
    for site in sites:
        for database in databases:
            out += [
                "[[job]]",
                f"company_name = {toml_value(company)}",
                'city = "City"',
                f"neighborhood = {toml_value(site)}",
                f"database_name = {toml_value(database)}",
                "",
            ]
    return "\n".join(out)


def agent_id(site: str) -> str:
    return f"Bench_City_{site}"


def write_config(base: Path, database_url: str, jobs: str, control_socket: Path) -> Path:
    for folder in ("deposit", "validated", "jobs.d"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    (base / "jobs.d" / "jobs.toml").write_text(jobs)
    values = {
        "backup_storage_root": "deposit",
        "validated_backups_base_path": "validated",
        "jobs_path": "jobs.d",
        "database_url": database_url,
        "control_socket": str(control_socket),
        "http_listen": "",
        # The benches stage random bytes under .gz names: SPEC §13's archive test would make
        # every one FAILED (and skip promotion). bench/archive.py measures the test itself.
        "archive_test": False,
    }
    path = base / "backupwatch.toml"
    path.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in values.items()))
    return path


def database_block(staged_name: str, content: bytes, when: datetime) -> dict[str, Any]:
    stamp = iso(when)
    return {
        "backup_process": {"status": True, "timestamp": stamp},
        "compress_process": {
            "status": True,
            "timestamp": stamp,
            "sha256_checksum": hashlib.sha256(content).hexdigest(),
            "size_bytes": len(content),
        },
        "transfer_process": {"status": True, "timestamp": stamp, "error_message": None},
        "staged_file_name": staged_name,
        "logs_summary": "bench",
    }


def report_bytes(site: str, when: datetime, databases: dict[str, dict[str, Any]]) -> bytes:
    body = {
        "agent_id": agent_id(site),
        "operation_start_time": iso(when),
        "operation_timestamp": iso(when),
        "overall_status": "completed",
        "databases": databases,
    }
    return json.dumps(body).encode()


def write_file(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        out.write(data)


# ------------------------------------------------------------------------------- daemon


class NotifySocket:
    """The systemd side of sd_notify: a datagram socket the daemon reports to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def expect(self, needle: str, timeout: float, process: subprocess.Popen[bytes]) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages:
                if needle in message:
                    self.messages.remove(message)
                    return message
            if process.poll() is not None:
                raise RuntimeError(f"backupwatchd exited with {process.returncode}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no sd_notify {needle!r} in {timeout} s: {self.messages}")
            self.sock.settimeout(min(remaining, 0.5))
            with contextlib.suppress(TimeoutError):
                self.messages.append(self.sock.recv(65536).decode())

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


@dataclass
class BenchDaemon:
    """A real `backupwatchd` subprocess with JSON logs to a file, ready once READY=1 arrives."""

    config: Path
    run_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    notify: NotifySocket | None = None
    started_at: float = 0.0
    ready_after: float = 0.0
    extra_env: dict[str, str] = field(default_factory=dict)

    def start(self, timeout: float = 120.0) -> None:
        self.notify = NotifySocket(self.run_dir / "notify.sock")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUPWATCH_", "NOTIFY_"))}
        env.update(self.extra_env, NOTIFY_SOCKET=str(self.notify.path))
        command = [*DAEMON, "--config", str(self.config), "--log-target", "json"]
        self.started_at = time.monotonic()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        self.notify.expect("READY=1", timeout, self.process)
        self.ready_after = time.monotonic() - self.started_at

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def proc_status(self, key: str) -> int:
        """A /proc/PID/status field in KiB (VmHWM, VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
        raise KeyError(key)

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds used by the daemon so far, all threads."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return int(fields[11]) / ticks, int(fields[12]) / ticks

    def cpu_seconds(self) -> float:
        return sum(self.cpu_times())

    def stop(self, timeout: float = 15.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.notify:
            self.notify.close()
        return self.process.returncode

    def logs(self) -> Iterator[dict[str, Any]]:
        with self.log_path.open() as lines:
            for line in lines:
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        yield json.loads(line)


@contextlib.contextmanager
def workspace(keep: bool = False) -> Iterator[tuple[Path, Path]]:
    """(base, run_dir): a disk-backed work tree and a short /tmp folder for Unix sockets."""
    base = Path(tempfile.mkdtemp(prefix="backupwatch-bench-", dir="/var/tmp"))
    run_dir = Path(tempfile.mkdtemp(prefix="bwb-", dir="/tmp"))
    try:
        yield base, run_dir
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        if keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
