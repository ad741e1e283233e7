"""The kill -9 harness: a burst whose outcome is known in advance, and a comparison with it.

Shared by `tests/integration/test_crash.py` (a few seeds, ~60 sites) and `bench/crash.py` (many
iterations, 300 sites), so it does not import pytest; and it never asks the daemon's code for a
verdict: the truth is written here from SPEC §3-§5, not computed by the code under test (only
`config_overrides` looks at which config keys this daemon knows).

A run: start the daemon on a tree of HOURLY sites, drop the burst (reports renamed into place as
agents do), SIGKILL the daemon one to three times at moments drawn from a seeded RNG, restart it,
wait until it is idle, stop it, then compare every report, reason file, entry, staged file and
stored file with the truth. `compare` returns differences as sentences; an empty list is a
clean run.
"""

from __future__ import annotations

import enum
import functools
import gzip
import hashlib
import json
import math
import os
import random
import stat
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Protocol

import sqlalchemy

COMPANY = "Crash"
CITY = "City"
DATABASES = ("sales", "hr", "crm", "stock")  # the jobs of every site
WINDOW_MINUTES = 30  # HOURLY, ±30 min: every instant belongs to the nearest hour's cycle
SETTLE_SECONDS = 1  # report_settle_seconds, where the daemon knows that key
ARCHIVE = "_archive"
REJECTED = "_rejected"
REASON_SUFFIX = ".reason.txt"


# ----------------------------------------------------------------------------- the tree


def site_name(index: int) -> str:
    return f"site{index:04d}"


def agent_id(index: int) -> str:
    """The default agent_id and deposit folder: `{company_name}_{city}_{neighborhood}`."""
    return f"{COMPANY}_{CITY}_{site_name(index)}"


def job_label(index: int, database: str) -> str:
    return f"{COMPANY}/{CITY}/{site_name(index)}/{database}"


def jobs_toml(sites: int) -> str:
    """Every site expects the four DATABASES hourly, with a ±30 min window."""
    lines = [
        "[defaults]",
        'frequency = "HOURLY"',
        f"collection_window_minutes = {WINDOW_MINUTES}",
        "",
    ]
    for index in range(sites):
        for database in DATABASES:
            lines += [
                "[[job]]",
                f'company_name = "{COMPANY}"',
                f'city = "{CITY}"',
                f'neighborhood = "{site_name(index)}"',
                f'database_name = "{database}"',
                "",
            ]
    return "\n".join(lines)


def config_overrides() -> dict[str, object]:
    """Keys the harness sets when this daemon knows them (an unknown key is a config error).

    A staged file that is absent waits for D to be quiet for `report_settle_seconds` once
    issue 6 item 3 is fixed; the SPEC default (120 s) would make every run wait two minutes.
    """
    from backupwatch.config import Settings  # the key's presence only, never a verdict

    found: dict[str, object] = {}
    if "report_settle_seconds" in Settings.model_fields:
        found["report_settle_seconds"] = SETTLE_SECONDS
    if "http_listen" in Settings.model_fields:
        found["http_listen"] = ""  # several daemons at once would share its default port
    return found


def nearest_cycle(when: datetime) -> datetime:
    """SPEC §4 for an HOURLY job with W = 30 min: the nearest hour, a tie to the earlier."""
    floor = when.replace(minute=0, second=0, microsecond=0)
    return (
        floor if when - floor <= timedelta(minutes=WINDOW_MINUTES) else floor + timedelta(hours=1)
    )


def iso(value: datetime) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------- the truth


class Fate(enum.Enum):
    ARCHIVED = ARCHIVE
    REJECTED = REJECTED


@dataclass(frozen=True)
class Staged:
    """A file an agent put in D; `promoted` ones must leave D for final storage."""

    folder: str  # D, relative to the deposit root
    name: str  # relative to D
    data: bytes
    promoted: bool

    @property
    def relpath(self) -> str:
        return f"{self.folder}/{self.name}"


@dataclass(frozen=True)
class ExpectedEntry:
    """One entry the job must have; a SUCCESS has its staged file and its final path."""

    job: str
    cycle: datetime
    status: str
    staged: Staged | None = None
    final: str | None = None  # relative to final storage

    @property
    def key(self) -> tuple[str, datetime, str]:
        return (self.job, self.cycle, self.status)


@dataclass(frozen=True)
class ExpectedReport:
    """One report dropped into `folder`; where it must end and, if rejected, why."""

    kind: str
    folder: str  # D (or a folder no job uses), relative to the deposit root
    name: str  # relative to folder: "STATUS.json" or "log/STATUS-resent.json"
    data: bytes
    fate: Fate
    reason_words: tuple[str, ...] = ()

    @property
    def relpath(self) -> str:
        return f"{self.folder}/{self.name}"

    @property
    def final_name(self) -> str:
        """Its name in `folder/_archive/` or `folder/_rejected/` (names are unique per site)."""
        return PurePosixPath(self.name).name


@dataclass
class Truth:
    reports: list[ExpectedReport] = field(default_factory=list)
    entries: list[ExpectedEntry] = field(default_factory=list)
    staged: list[Staged] = field(default_factory=list)
    folders: set[str] = field(default_factory=set)  # every D and stray folder of the burst

    def describe(self) -> str:
        kinds = Counter(report.kind for report in self.reports)
        parts = ", ".join(f"{count} {kind}" for kind, count in sorted(kinds.items()))
        return f"{len(self.reports)} reports ({parts}), {len(self.entries)} entries"


def _database(staged: str | None, data: bytes | None, **overrides: object) -> dict[str, object]:
    """One `databases` block describing `data`; overrides replace the steps' fields."""
    stamp = "2026-11-24T13:00:00Z"
    compress: dict[str, object] = {"status": overrides.get("compress", True), "timestamp": stamp}
    if data is not None:
        compress["sha256_checksum"] = overrides.get("sha256", hashlib.sha256(data).hexdigest())
        compress["size_bytes"] = len(data)
    block: dict[str, object] = {
        "backup_process": {"status": overrides.get("backup", True), "timestamp": stamp},
        "compress_process": compress,
        "transfer_process": {"status": True, "timestamp": stamp, "error_message": None},
        "logs_summary": "crash harness",
    }
    if staged is not None:
        block["staged_file_name"] = staged
    return block


class BurstBuilder:
    """Writes the truth of one burst: every report, entry and staged file, known in advance."""

    def __init__(self, rng: random.Random, now: datetime) -> None:
        self.rng = rng
        self.when = (now - timedelta(minutes=2)).replace(microsecond=0)
        self.truth = Truth()

    # --- pieces

    def _payload(self) -> bytes:
        """A real gzip stream (SPEC §13's archive test may read it), unique per file."""
        raw = self.rng.randbytes(self.rng.randint(200, 6000))
        return gzip.compress(raw, mtime=0)

    def _staged(self, site: int, name: str, promoted: bool, data: bytes | None = None) -> Staged:
        staged = Staged(agent_id(site), name, data or self._payload(), promoted)
        self.truth.staged.append(staged)
        return staged

    def _success(self, site: int, database: str, tag: str, when: datetime) -> dict[str, object]:
        staged = self._staged(site, f"database/{database}-{tag}.sql.gz", promoted=True)
        cycle = nearest_cycle(when)
        final = (
            f"{COMPANY}/{CITY}/{site_name(site)}/{database}/"
            f"{cycle:%Y%m%dT%H%MZ}_{PurePosixPath(staged.name).name}"
        )
        self.truth.entries.append(
            ExpectedEntry(job_label(site, database), cycle, "SUCCESS", staged, final)
        )
        return _database(staged.name, staged.data)

    def _entry(self, site: int, database: str, when: datetime, status: str) -> None:
        self.truth.entries.append(
            ExpectedEntry(job_label(site, database), nearest_cycle(when), status)
        )

    def _report(
        self,
        kind: str,
        folder: str,
        name: str,
        body: Mapping[str, object] | bytes,
        fate: Fate = Fate.ARCHIVED,
        words: tuple[str, ...] = (),
    ) -> ExpectedReport:
        data = body if isinstance(body, bytes) else json.dumps(body, indent=1).encode()
        report = ExpectedReport(kind, folder, name, data, fate, words)
        self.truth.reports.append(report)
        self.truth.folders.add(folder)
        return report

    def _body(
        self, site: int, when: datetime, databases: Mapping[str, object]
    ) -> dict[str, object]:
        return {
            "agent_id": agent_id(site),
            "operation_start_time": iso(when - timedelta(minutes=5)),
            "operation_timestamp": iso(when),
            "overall_status": "completed",
            "databases": databases,
        }

    # --- the scenarios, one per site

    def valid(self, site: int) -> None:
        """Two databases, both verified: SUCCESS, promoted, report archived."""
        databases = {db: self._success(site, db, "valid", self.when) for db in ("sales", "hr")}
        self._report("valid", agent_id(site), "STATUS.json", self._body(site, self.when, databases))

    def mixed(self, site: int) -> None:
        """FAILED by the agent, HASH_MISMATCH, absent staged file, SUCCESS, and an unexpected
        database: only the SUCCESS leaves D."""
        failed = self._staged(site, "database/sales-mixed.sql.gz", promoted=False)
        wrong = self._staged(site, "database/hr-mixed.sql.gz", promoted=False)
        extra = self._staged(site, "database/extra-mixed.sql.gz", promoted=False)
        databases = {
            "sales": _database(failed.name, failed.data, backup=False),
            "hr": _database(wrong.name, wrong.data, sha256="0" * 64),
            "crm": _database("database/crm-mixed.sql.gz", self._payload()),  # never written
            "stock": self._success(site, "stock", "mixed", self.when),
            "extra": _database(extra.name, extra.data),  # no job expects it
        }
        self._entry(site, "sales", self.when, "FAILED")
        self._entry(site, "hr", self.when, "HASH_MISMATCH")
        self._entry(site, "crm", self.when, "TRANSFER_INTEGRITY_FAILED")
        self._report("mixed", agent_id(site), "STATUS.json", self._body(site, self.when, databases))

    def duplicate(self, site: int) -> None:
        """The same bytes twice (a resend): recorded once, both copies archived."""
        databases = {db: self._success(site, db, "dup", self.when) for db in ("sales", "crm")}
        body = self._body(site, self.when, databases)
        self._report("duplicate", agent_id(site), "STATUS.json", body)
        self._report("duplicate", agent_id(site), "log/STATUS-resent.json", body)

    def cycles(self, site: int) -> None:
        """Three reports for three cycles of one job, one of them in log/."""
        for hours, name in ((0, "STATUS.json"), (1, "log/STATUS-1h.json"), (2, "STATUS-2h.json")):
            when = self.when - timedelta(hours=hours)
            databases = {"stock": self._success(site, "stock", f"{hours}h", when)}
            self._report("cycles", agent_id(site), name, self._body(site, when, databases))

    def broken(self, site: int) -> None:
        """Not JSON, a schema error, too old: all rejected with a reason; and one valid."""
        folder = agent_id(site)
        self._report(
            "broken", folder, "garbage.json", b"this is not JSON {\n", Fate.REJECTED, ("json",)
        )
        schema = {"agent_id": agent_id(site), "operation_timestamp": iso(self.when)}
        self._report("broken", folder, "schema.json", schema, Fate.REJECTED, ("databases",))
        old_when = self.when - timedelta(days=3)
        old = self._staged(site, "database/hr-old.sql.gz", promoted=False)
        body = self._body(site, old_when, {"hr": _database(old.name, old.data)})
        self._report("broken", folder, "log/old.json", body, Fate.REJECTED, ("older",))
        databases = {"crm": self._success(site, "crm", "broken", self.when)}
        self._report("valid", folder, "STATUS.json", self._body(site, self.when, databases))

    def foreign(self, site: int, other: int) -> None:
        """Another site's agent_id: rejected, its staged file stays."""
        staged = self._staged(site, "database/sales-foreign.sql.gz", promoted=False)
        body = self._body(site, self.when, {"sales": _database(staged.name, staged.data)})
        body["agent_id"] = agent_id(other)
        self._report("foreign", agent_id(site), "STATUS.json", body, Fate.REJECTED, ("agent_id",))

    def stray(self, index: int) -> None:
        """A report in a folder that no job uses: rejected in that folder."""
        body = self._body(index, self.when, {"sales": _database("database/x.sql.gz", b"x")})
        words = ("folder", "job")
        self._report("stray", f"nowhere{index:04d}", "STATUS.json", body, Fate.REJECTED, words)


SCENARIOS = ("valid", "mixed", "duplicate", "cycles", "broken", "foreign")


def build_burst(sites: int, seed: int, now: datetime) -> Truth:
    """Site i plays scenario i mod 6; one folder that no job uses per 10 sites."""
    rng = random.Random(seed)
    builder = BurstBuilder(rng, now)
    for index in range(sites):
        scenario = SCENARIOS[index % len(SCENARIOS)]
        if scenario == "foreign":
            builder.foreign(index, (index + 1) % sites)
        else:
            getattr(builder, scenario)(index)
    for index in range(max(1, sites // 10)):
        builder.stray(index)
    return builder.truth


# ----------------------------------------------------------------------------- the agents


def write_staged(truth: Truth, deposit: Path) -> None:
    """Staged files land before their reports, as a well-behaved agent uploads them."""
    for staged in truth.staged:
        path = deposit / staged.relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(staged.data)
    for folder in truth.folders:
        (deposit / folder / "log").mkdir(parents=True, exist_ok=True)


def drop_reports(truth: Truth, deposit: Path, rng: random.Random) -> None:
    """Every report written under a dot-name, then renamed into place, in a seeded order."""
    order = list(truth.reports)
    rng.shuffle(order)
    for report in order:
        target = deposit / report.relpath
        temp = target.parent / f".{target.name}.part"
        temp.write_bytes(report.data)
        os.rename(temp, target)


def progress(truth: Truth, deposit: Path) -> int:
    """How many reports have left the place they were dropped in."""
    return sum(not (deposit / report.relpath).exists() for report in truth.reports)


def waiting_reports(truth: Truth, deposit: Path) -> list[str]:
    """Report-like files still in a D, D/log or stray folder (SPEC §3's report places)."""
    found = []
    for folder in sorted(truth.folders):
        for place in (deposit / folder, deposit / folder / "log"):
            found += [
                str(path.relative_to(deposit))
                for path in _listing(place)
                if path.name.endswith(".json") and not path.name.startswith(".")
            ]
    return found


def _listing(folder: Path) -> list[Path]:
    try:
        return [entry for entry in folder.iterdir() if not entry.is_dir()]
    except (FileNotFoundError, NotADirectoryError):
        return []


# ----------------------------------------------------------------------------- the daemon


class DaemonControl(Protocol):
    """What a run needs of the daemon under test, whoever started it."""

    def start(self, wait_ready: bool, prefix: list[str] | None = None) -> None: ...
    def alive(self) -> bool: ...
    def kill(self) -> None: ...
    def pending(self) -> int | None: ...  # `status`'s pending_reports; None if it does not answer
    def stop(self) -> int: ...


@dataclass(frozen=True)
class Kill:
    """Where a kill landed: after `reached` reports had left their drop place."""

    reached: int
    target: int | None = None  # random kills: the progress it waited for
    delay: float = 0.0  # random kills: seconds slept after the target
    point: str | None = None  # named points: which one
    happened: bool = True  # named points: False when the daemon never reached it

    def __str__(self) -> str:
        if self.point is not None:
            if not self.happened:
                return f"{self.point}: never reached, no kill"
            return f"killed at {self.point} after {self.reached} reports"
        return f"kill at {self.reached} (target {self.target}, +{self.delay * 1000:.0f} ms)"


@dataclass
class Run:
    seed: int
    kills: list[Kill] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return not self.differences

    def summary(self, limit: int = 12) -> str:
        head = f"seed {self.seed}: {'; '.join(map(str, self.kills)) or 'no kill'}"
        if self.clean:
            return f"{head}: clean"
        shown = self.differences[:limit]
        more = len(self.differences) - len(shown)
        tail = f"\n  ... and {more} more" if more else ""
        return head + f": {len(self.differences)} differences\n  " + "\n  ".join(shown) + tail


@dataclass(frozen=True)
class Tree:
    deposit: Path
    validated: Path
    database_url: str


def poll(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Deadline-poll: True as soon as `predicate` holds, False once `timeout` has passed."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def crash_run(
    truth: Truth,
    tree: Tree,
    daemon: DaemonControl,
    seed: int,
    kills: int,
    idle_timeout: float = 90.0,
) -> Run:
    """Start, drop the burst, kill `kills` times at seeded moments, restart, settle, compare."""
    rng = random.Random(seed * 7919 + kills)
    run = Run(seed)
    started = time.monotonic()
    total = len(truth.reports)
    write_staged(truth, tree.deposit)
    daemon.start(wait_ready=True)
    drop_reports(truth, tree.deposit, rng)
    for number in range(kills):
        done = progress(truth, tree.deposit)
        target = done + math.ceil(rng.random() * (total - done))
        poll(functools.partial(_reached, truth, tree.deposit, target), timeout=idle_timeout)
        delay = rng.uniform(0.0, 0.05)
        time.sleep(delay)
        daemon.kill()
        run.kills.append(Kill(progress(truth, tree.deposit), target, delay))
        daemon.start(wait_ready=number == kills - 1)  # later kills land in the start-up scan
    _settle(truth, tree, daemon, run, idle_timeout)
    run.seconds = time.monotonic() - started
    return run


def _reached(truth: Truth, deposit: Path, target: int) -> bool:
    return progress(truth, deposit) >= target


def _idle(truth: Truth, tree: Tree, daemon: DaemonControl) -> bool:
    return not waiting_reports(truth, tree.deposit) and daemon.pending() == 0


def _settle(truth: Truth, tree: Tree, daemon: DaemonControl, run: Run, timeout: float) -> None:
    """Wait until idle, stop with SIGTERM, compare: the end of every run."""
    if not poll(lambda: _idle(truth, tree, daemon), timeout=timeout, interval=0.2):
        left = waiting_reports(truth, tree.deposit)
        shown = ", ".join(left[:5]) + (" ..." if len(left) > 5 else "")
        run.differences.append(
            f"not idle {timeout:g} s after the last restart: pending={daemon.pending()}, "
            f"{len(left)} reports still waiting: {shown}"
        )
    code = daemon.stop()
    if code != 0:
        run.differences.append(f"the daemon exited {code} on SIGTERM")
    run.differences += compare(truth, tree)


# ----------------------------------------------------------------------------- named kill points


@dataclass(frozen=True)
class KillPoint:
    """A SIGKILL delivered by strace when a daemon thread enters `syscall` on `path` (the
    path itself, or a descriptor or directory descriptor open on it), the `when`-th time in
    that thread. The syscall does not run. Random kills rarely land in a window of a few
    microseconds; these land there every time, whatever the code around them looks like.
    """

    name: str
    syscall: str
    path: Callable[[Tree, Truth], Path]
    when: int = 1

    def strace(self, tree: Tree, truth: Truth) -> list[str]:
        return [
            "strace", "-f", "-qq", "-o", "/dev/null",
            "-P", str(self.path(tree, truth)),
            "-e", f"trace={self.syscall}",
            "-e", f"inject={self.syscall}:signal=KILL:when={self.when}",
        ]  # fmt: skip


def point_run(
    truth: Truth,
    tree: Tree,
    daemon: DaemonControl,
    point: KillPoint,
    seed: int,
    timeout: float = 60.0,
) -> Run:
    """Start under strace, drop the burst, let the point kill the daemon, restart, compare.

    If the point is never reached (the code no longer makes that call), the run goes on to
    the comparison without a kill, and says so in `kills`.
    """
    rng = random.Random(seed)
    run = Run(seed)
    started = time.monotonic()
    write_staged(truth, tree.deposit)
    daemon.start(wait_ready=True, prefix=point.strace(tree, truth))
    drop_reports(truth, tree.deposit, rng)
    poll(lambda: not daemon.alive() or _idle(truth, tree, daemon), timeout=timeout, interval=0.05)
    done = progress(truth, tree.deposit)
    if daemon.alive():
        run.kills.append(Kill(done, point=point.name, happened=False))
    else:
        daemon.kill()  # reap it
        run.kills.append(Kill(done, point=point.name))
        daemon.start(wait_ready=True)
    _settle(truth, tree, daemon, run, timeout)
    run.seconds = time.monotonic() - started
    return run


# ----------------------------------------------------------------------------- the comparison


def compare(truth: Truth, tree: Tree) -> list[str]:
    """Every difference between the tree, the database and the truth, as sentences."""
    differences = check_reports(truth, tree.deposit)
    differences += check_deposits(truth, tree.deposit)
    rows = read_entries(tree.database_url)
    differences += check_entries(truth, rows)
    differences += check_final_storage(truth, rows, tree.validated)
    return differences


def check_reports(truth: Truth, deposit: Path) -> list[str]:
    """Each report in `_archive/` or `_rejected/` exactly once, with its bytes; every rejected
    one with a whole reason naming why; nothing else there (no orphan reason file)."""
    differences = []
    expected: dict[Path, set[str]] = {}
    for report in truth.reports:
        folder = deposit / report.folder / report.fate.value
        expected.setdefault(folder, set()).add(report.final_name)
        other = deposit / report.folder / _other(report.fate).value / report.final_name
        path = folder / report.final_name
        if other.exists():
            differences.append(f"{report.relpath} ({report.kind}): in {other.parent.name}/, "
                               f"expected in {report.fate.value}/")  # fmt: skip
        if not path.is_file():
            if not other.exists():
                differences.append(f"{report.relpath} ({report.kind}): not in {report.fate.value}/")
            continue
        if path.read_bytes() != report.data:
            differences.append(f"{report.relpath}: {path.relative_to(deposit)} has other bytes")
        if report.fate is Fate.REJECTED:
            expected[folder].add(report.final_name + REASON_SUFFIX)
            differences += _check_reason(report, path.with_name(path.name + REASON_SUFFIX))
    for folder_name in sorted(truth.folders):
        for fate in Fate:
            folder = deposit / folder_name / fate.value
            names = {entry.name for entry in _listing(folder)}
            for extra in sorted(names - expected.get(folder, set())):
                what = "orphan reason file" if extra.endswith(REASON_SUFFIX) else "unexpected file"
                differences.append(f"{folder_name}/{fate.value}/{extra}: {what}")
    return differences


def _other(fate: Fate) -> Fate:
    return Fate.REJECTED if fate is Fate.ARCHIVED else Fate.ARCHIVED


def _check_reason(report: ExpectedReport, path: Path) -> list[str]:
    where = f"{report.relpath} ({report.kind})"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [f"{where}: rejected without {path.name}"]
    if not text.strip():
        return [f"{where}: {path.name} is empty"]
    if not text.endswith("\n"):
        return [f"{where}: {path.name} is cut short: {text!r}"]
    missing = [word for word in report.reason_words if word.lower() not in text.lower()]
    if missing:
        return [f"{where}: the reason does not say {missing}: {text.strip()!r}"]
    return []


def check_deposits(truth: Truth, deposit: Path) -> list[str]:
    """What stays in D: only staged files that were not promoted, with their bytes."""
    differences = []
    expected = {s.relpath: s for s in truth.staged if not s.promoted}
    promoted = {s.relpath for s in truth.staged if s.promoted}
    found = set()
    for folder in sorted(truth.folders):
        for path in _files_under(deposit / folder, skip=(ARCHIVE, REJECTED)):
            relpath = str(path.relative_to(deposit))
            found.add(relpath)
            if relpath in promoted:
                differences.append(f"{relpath}: staged file of a SUCCESS left in D")
            elif relpath not in expected:
                differences.append(f"{relpath}: unexpected file left in D")
            elif path.read_bytes() != expected[relpath].data:
                differences.append(f"{relpath}: a staged file that stays was changed")
    for relpath in sorted(set(expected) - found):
        differences.append(f"{relpath}: staged file of a database that was not SUCCESS is gone")
    return differences


def _files_under(root: Path, skip: Iterable[str] = ()) -> list[Path]:
    """Every non-directory under `root` (dot-files included), symlinks not followed."""
    found = []
    skipped = set(skip)
    for folder, dirs, files in os.walk(root):
        if Path(folder) == root:
            dirs[:] = [d for d in dirs if d not in skipped]
        found += [Path(folder) / name for name in files]
        found += [Path(folder) / d for d in dirs if os.path.islink(Path(folder) / d)]
    return found


@dataclass(frozen=True)
class EntryRow:
    """One row of `backup_entries`, as read straight from the database."""

    job: str
    cycle: datetime
    status: str
    final_path: str | None
    server_sha256: str | None
    server_size: int | None


def read_entries(database_url: str) -> list[EntryRow]:
    """Read the entries with SQLAlchemy, not through the daemon or `backupwatchctl`."""
    engine = sqlalchemy.create_engine(database_url)
    query = sqlalchemy.text(
        "SELECT j.company_name, j.city, j.neighborhood, j.database_name, e.cycle, e.status, "
        "e.final_path, e.server_sha256, e.server_size "
        "FROM backup_entries e JOIN expected_backup_jobs j ON j.id = e.job_id"
    )
    try:
        with engine.connect() as connection:
            rows = connection.execute(query).all()
    finally:
        engine.dispose()
    return [
        EntryRow(
            "/".join(row[0:4]),
            _aware(row[4]),
            str(row[5]),
            row[6],
            row[7],
            row[8],
        )
        for row in rows
    ]


def _aware(value: datetime | str) -> datetime:
    """Entries keep naive UTC; SQLite may hand back text."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def check_entries(truth: Truth, rows: list[EntryRow]) -> list[str]:
    """Per job, exactly the entries of the truth: status per cycle, none twice, none missing."""
    expected = Counter(entry.key for entry in truth.entries)
    found = Counter((row.job, row.cycle, row.status) for row in rows)
    differences = []
    for key in sorted(set(expected) | set(found)):
        want, got = expected[key], found[key]
        if want != got:
            job, cycle, status = key
            differences.append(
                f"{job} cycle {iso(cycle)}: {got} {status} entr{'y' if got == 1 else 'ies'}, "
                f"expected {want}"
            )
    return differences


def check_final_storage(truth: Truth, rows: list[EntryRow], validated: Path) -> list[str]:
    """Every SUCCESS stored at its name with the verified bytes, nlink 1; nothing else."""
    differences = []
    wanted = {(e.job, e.cycle): e for e in truth.entries if e.status == "SUCCESS"}
    recorded: set[Path] = set()
    for row in rows:
        entry = wanted.get((row.job, row.cycle))
        if row.status != "SUCCESS" or entry is None or entry.staged is None:
            continue
        if row.final_path is None:
            differences.append(f"{row.job} cycle {iso(row.cycle)}: SUCCESS without a final path")
            continue
        path = Path(row.final_path)
        recorded.add(path)
        differences += _check_stored(entry, entry.staged, row, path, validated)
    for path in sorted(_files_under(validated)):
        if path not in recorded:
            differences.append(
                f"final storage: {path.relative_to(validated)} is no entry's file (an orphan)"
            )
    return differences


def _check_stored(
    entry: ExpectedEntry, staged: Staged, row: EntryRow, path: Path, validated: Path
) -> list[str]:
    where = f"{entry.job} cycle {iso(entry.cycle)}"
    sha = hashlib.sha256(staged.data).hexdigest()
    if (row.server_sha256, row.server_size) != (sha, len(staged.data)):
        return [f"{where}: recorded {row.server_sha256} / {row.server_size} bytes, not the staged"]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return [f"{where}: final path {path} does not exist"]
    differences = []
    if entry.final is not None and path != validated / entry.final:
        differences.append(f"{where}: stored as {path.name}, expected {Path(entry.final).name}")
    if not stat.S_ISREG(st.st_mode):
        differences.append(f"{where}: {path} is not a regular file")
    elif path.read_bytes() != staged.data:
        differences.append(f"{where}: {path} does not hold the verified bytes")
    if st.st_nlink != 1:
        differences.append(f"{where}: {path} has {st.st_nlink} links, expected 1")
    return differences


CATEGORIES = (
    ("is no entry's file", "orphan file in final storage"),
    ("stored as", "stored under another name (a -2 copy recorded)"),
    ("links, expected 1", "stored file with more than one link"),
    ("rejected without", "rejected report without its reason file"),
    ("is empty", "empty reason file"),
    ("is cut short", "reason file cut short"),
    ("the reason does not say", "reason file without the reason"),
    ("orphan reason file", "orphan reason file"),
    ("entr", "entries differ from the truth"),
    ("staged file of a SUCCESS left in D", "staged file of a SUCCESS left in D"),
    ("unexpected file left in D", "unexpected file left in D"),
    ("is gone", "a staged file that stays is gone"),
    ("not in _archive/", "report not archived"),
    ("not in _rejected/", "report not rejected"),
    ("expected in", "report archived where it should be rejected or the reverse"),
    ("not idle", "not idle after the restart"),
    ("exited", "daemon exit code on SIGTERM"),
    ("the run stopped", "run stopped (no READY=1?)"),
)


def category(difference: str) -> str:
    """A difference's kind, for the bench's summary table."""
    return next((kind for needle, kind in CATEGORIES if needle in difference), difference[:60])


def tmpfs_unusable(path: Path = Path("/dev/shm"), other: Path | None = None) -> str | None:
    """Why `path` cannot serve as final storage on another filesystem, or None."""
    mounts = Path("/proc/mounts").read_text().splitlines()
    kinds = {line.split()[1]: line.split()[2] for line in mounts if len(line.split()) > 2}
    if kinds.get(str(path)) != "tmpfs":
        return f"{path} is not a tmpfs mount here"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    if other is not None and os.stat(other).st_dev == os.stat(path).st_dev:
        return f"{path} is on the same filesystem as {other}"
    return None


def final_path(tree: Tree, truth: Truth, job: str) -> Path:
    """Where the first SUCCESS of `job` must be stored."""
    entry = next(e for e in truth.entries if e.job == job and e.final is not None)
    assert entry.final is not None
    return tree.validated / entry.final


def now_utc() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)
