"""SPEC §3, §5 and §9 through `process_path`: real files under tmp_path, SQLite and PostgreSQL.

Every bad input ends rejected with a reason and records nothing; every staged-file verdict follows
§5's order; promotion never overwrites and never follows a symlink out of D; and a crash at any
point between reading and archiving loses nothing and records nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from support import World, database, drop, job_block, report, stage, utc

import backupwatch.pipeline as pipeline
import backupwatch.promotion as promotion
from backupwatch.arrivals import Arrivals
from backupwatch.enums import BackupEntryStatus
from backupwatch.fsutil import copy_hashing
from backupwatch.pipeline import (
    Outcome,
    Result,
    Settled,
    StagedFacts,
    agent_verdict,
    decide,
    file_verdict,
    process_path,
)
from backupwatch.readiness import Wait, Writer
from backupwatch.report import DatabaseReport
from backupwatch.store import BackupEntry, ProcessedReport, Store

ACTIVATED = utc(2026, 11, 24, 0, 0)
AGENT = "ACME_Lyon_Part-Dieu"
SALES, HR = "ACME/Lyon/Part-Dieu/sales", "ACME/Lyon/Part-Dieu/hr"
JOBS = job_block("ACME", "Lyon", "Part-Dieu", "sales") + job_block(
    "ACME", "Lyon", "Part-Dieu", "hr"
)
CYCLE = utc(2026, 11, 24, 13, 0)
WHEN = utc(2026, 11, 24, 13, 10)  # the report's operation_timestamp
NOW = utc(2026, 11, 24, 13, 15)  # the server's clock
DUMP = b"-- sales dump\n" * 800
STAGED = "database/sales.sql.gz"
FINAL = "ACME/Lyon/Part-Dieu/sales/20261124T1300Z_sales.sql.gz"


def world(tmp_path: Path, url: str, **overrides: Any) -> World:
    return World.create(tmp_path, url, JOBS, ACTIVATED, **overrides)


def sales_report(when: Any = WHEN, staged: str = STAGED, **block: Any) -> dict[str, Any]:
    return report(AGENT, when, {"sales": database(staged, DUMP, **block)})


def all_entries(w: World) -> list[BackupEntry]:
    with w.store.session() as session:
        return list(session.scalars(select(BackupEntry).order_by(BackupEntry.id)))


def processed_count(w: World) -> int:
    with w.store.session() as session:
        return int(session.scalar(select(func.count()).select_from(ProcessedReport)) or 0)


def files_under(folder: Path) -> list[str]:
    """Every non-directory below `folder`, relative, symlinks not followed."""
    if not folder.exists():
        return []
    found = []
    for dirpath, _dirs, names in os.walk(folder):
        found += [str(Path(dirpath, name).relative_to(folder)) for name in names]
    return sorted(found)


def snapshot(base: Path, *skip: Path) -> dict[str, tuple[Any, ...]]:
    """What lies under `base` (but not under `skip`), precise enough to see any change."""
    seen: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirs, names in os.walk(base):
        here = Path(dirpath)
        dirs[:] = [d for d in dirs if here / d not in skip]
        for name in dirs + names:
            path = here / name
            if path in skip or name.startswith("backupwatch.db"):
                continue
            st = path.lstat()
            key = str(path.relative_to(base))
            if stat.S_ISLNK(st.st_mode):
                seen[key] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                seen[key] = ("dir",)
            elif stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                seen[key] = ("file", digest, st.st_nlink, st.st_mtime_ns)
            else:
                seen[key] = ("special", stat.S_IFMT(st.st_mode))
    return seen


def bounded(call: Callable[[], Result], fifo: Path, timeout: float = 10.0) -> Result:
    """Run `call`, failing (not hanging) if it blocks on the FIFO at `fifo`."""
    results: list[Result] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(call())
        except BaseException as exc:  # pragma: no cover - re-raised below
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():  # pragma: no cover - the bug this guards against
        os.close(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))  # a writer: the blocked open returns
        pytest.fail(f"processing blocked on the FIFO {fifo}")
    if errors:
        raise errors[0]
    return results[0]


def assert_rejected(w: World, result: Result, original: Path, folder: Path, reason: str) -> None:
    """SPEC §3: moved to FOLDER/_rejected/ with NAME.reason.txt stating why; nothing recorded."""
    assert result.outcome is Outcome.REJECTED, result
    assert reason in (result.reason or "")
    assert not os.path.lexists(original)
    assert os.path.lexists(folder / "_rejected" / original.name)
    name = str(original.relative_to(w.deposit))
    text = (folder / "_rejected" / f"{original.name}.reason.txt").read_text()
    assert text == f"{name} was rejected: {result.reason}\n"
    assert reason in text
    assert all_entries(w) == []
    assert processed_count(w) == 0
    assert files_under(folder / "_archive") == []


@pytest.fixture
def w(tmp_path: Path, database_url: str) -> Iterator[World]:
    created = world(tmp_path, database_url)
    yield created
    created.store.dispose()


@pytest.fixture
def site(w: World) -> Path:
    return w.site(AGENT)


# ======================================================================= bad reports (§3, §9)


def _edit(change: Callable[[dict[str, Any]], None], **kwargs: Any) -> bytes:
    body = sales_report(**kwargs)
    change(body)
    return json.dumps(body).encode()


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(body: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for key in parents:
            body = body[key]
        if value is DELETE:
            del body[last]
        else:
            body[last] = value

    return change


DELETE = object()
SALES_BLOCK = "databases.sales"
BAD_REPORTS: dict[str, tuple[Callable[[Path], bytes], str]] = {
    "malformed JSON": (
        lambda _: b'{"agent_id": "ACME_Lyon_Part-Dieu", oops}',
        "not valid JSON: line 1 column 37: Expecting property name",
    ),
    "truncated JSON": (
        lambda _: json.dumps(sales_report()).encode()[:-40],
        "not valid JSON",
    ),
    "not an object": (lambda _: b"[1, 2]", "top level must be a JSON object, got an array"),
    "empty file": (lambda _: b"", "not valid JSON: the file is empty"),
    "wrong type": (
        lambda _: _edit(_set(f"{SALES_BLOCK}.backup_process.status", "yes")),
        'databases.sales.backup_process.status: must be true or false, got string "yes"',
    ),
    "wrong size type": (
        lambda _: _edit(_set(f"{SALES_BLOCK}.compress_process.size_bytes", "12")),
        'databases.sales.compress_process.size_bytes: must be a whole number, got string "12"',
    ),
    "time as a number": (
        lambda _: _edit(_set("operation_timestamp", 12345)),
        "operation_timestamp: must be an ISO 8601 time string, got number 12345",
    ),
    "missing timestamp": (
        lambda _: _edit(_set("operation_timestamp", DELETE)),
        "operation_timestamp: required",
    ),
    "missing step": (
        lambda _: _edit(_set(f"{SALES_BLOCK}.transfer_process", DELETE)),
        "databases.sales.transfer_process: required",
    ),
    "no databases": (
        lambda _: _edit(_set("databases", {})),
        "databases: must contain at least one database",
    ),
    "success without checksum": (
        lambda _: _edit(_set(f"{SALES_BLOCK}.compress_process.sha256_checksum", DELETE)),
        "databases.sales.compress_process.sha256_checksum: required when all three steps",
    ),
    "traversal": (
        lambda _: json.dumps(sales_report(staged="../../etc/passwd")).encode(),
        "databases.sales.staged_file_name: must not contain a '..' component",
    ),
    "absolute staged path": (
        lambda base: json.dumps(sales_report(staged=str(base / "etc" / "passwd"))).encode(),
        "databases.sales.staged_file_name: must be a path relative to the deposit folder",
    ),
    "foreign agent": (
        lambda _: json.dumps(report("EVIL_Corp_X", WHEN, sales_report()["databases"])).encode(),
        "agent_id 'EVIL_Corp_X' is not this site's (ACME_Lyon_Part-Dieu)",
    ),
    "stale": (
        lambda _: json.dumps(sales_report(when=NOW - timedelta(days=1, seconds=1))).encode(),
        "operation_timestamp 2026-11-23T13:14:59Z is older than 1 day(s)",
    ),
    "future": (
        lambda _: json.dumps(sales_report(when=NOW + timedelta(minutes=5, seconds=1))).encode(),
        "operation_timestamp 2026-11-24T13:20:01Z is more than 5 minutes in the future",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REPORTS))
def test_bad_report_is_rejected_with_its_reason(
    w: World, site: Path, tmp_path: Path, case: str
) -> None:
    build, reason = BAD_REPORTS[case]
    stage(site, STAGED, DUMP)
    # The file a traversal or an absolute path would reach holds exactly what the report claims.
    stage(tmp_path, "etc/passwd", DUMP)
    path = drop(site, build(tmp_path))
    before = snapshot(tmp_path, site)

    result = w.process(path, NOW)

    assert_rejected(w, result, path, site, reason)
    assert snapshot(tmp_path, site) == before  # nothing outside D touched, nothing promoted
    assert files_under(w.validated) == []
    assert (site / STAGED).read_bytes() == DUMP


def test_reports_at_the_freshness_bounds_are_accepted(w: World, site: Path) -> None:
    stage(site, STAGED, DUMP)
    oldest = drop(site, sales_report(when=CYCLE + timedelta(minutes=50)), "old.json")
    newest = drop(site, sales_report(when=CYCLE - timedelta(minutes=55)), "new.json")

    assert w.process(oldest, CYCLE + timedelta(days=1, minutes=50)).outcome is Outcome.ACCEPTED
    assert w.process(newest, CYCLE - timedelta(minutes=60)).outcome is Outcome.ACCEPTED


def test_a_report_without_agent_id_is_accepted(w: World, site: Path) -> None:
    stage(site, STAGED, DUMP)
    body = sales_report()
    del body["agent_id"]

    result = w.process(drop(site, body), NOW)

    assert result.outcome is Outcome.ACCEPTED
    assert [e.status for e in result.entries] == [BackupEntryStatus.SUCCESS]


def test_oversize_report_is_rejected_unread(
    tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world(tmp_path, database_url, report_max_bytes=4096)
    site = w.site(AGENT)
    site.mkdir(parents=True)
    path = site / "STATUS.json"
    with path.open("wb") as sparse:
        sparse.write(b"{")
        sparse.truncate(100 * 1024 * 1024)  # 100 MiB, nearly all holes: cheap to make
    inode = path.stat().st_ino
    read: list[int] = []
    real_read, real_readv = os.read, os.readv

    def counted_read(fd: int, n: int) -> bytes:
        read.append(n)
        return real_read(fd, n)

    def counted_readv(fd: int, bufs: Sequence[bytearray | memoryview]) -> int:
        read.append(-1)
        return real_readv(fd, bufs)

    monkeypatch.setattr(os, "read", counted_read)
    monkeypatch.setattr(os, "readv", counted_readv)

    result = w.process(path, NOW)

    assert read == []  # refused on its size alone: not one byte read
    reason = f"it is {100 * 1024 * 1024} bytes, over report_max_bytes (4096)"
    assert_rejected(w, result, path, site, reason)
    assert (site / "_rejected" / "STATUS.json").stat().st_ino == inode  # moved, not copied


def test_report_of_exactly_report_max_bytes_is_read(tmp_path: Path, database_url: str) -> None:
    w = world(tmp_path, database_url, report_max_bytes=4096)
    site = w.site(AGENT)
    stage(site, STAGED, DUMP)
    data = json.dumps(sales_report()).encode()
    exact = drop(site, data + b" " * (4096 - len(data)), "exact.json")
    over = drop(site, data + b" " * (4097 - len(data)), "over.json")

    assert w.process(exact, NOW).outcome is Outcome.ACCEPTED
    rejected = w.process(over, NOW)
    assert rejected.outcome is Outcome.REJECTED
    assert rejected.reason == "it is 4097 bytes, over report_max_bytes (4096)"


def test_symlinked_report_is_rejected_without_reading_its_target(
    w: World, site: Path, tmp_path: Path
) -> None:
    stage(site, STAGED, DUMP)
    target = tmp_path / "outside" / "STATUS.json"
    target.parent.mkdir()
    target.write_text(json.dumps(sales_report()))  # a valid report: reading it would accept it
    path = site / "STATUS.json"
    path.symlink_to(target)
    before = snapshot(tmp_path, site)

    result = w.process(path, NOW)

    reason = "it is not a regular file inside the deposit folder (STATUS.json is a symlink)"
    assert_rejected(w, result, path, site, reason)
    assert os.readlink(site / "_rejected" / "STATUS.json") == str(target)  # the link itself
    assert snapshot(tmp_path, site) == before
    assert (site / STAGED).read_bytes() == DUMP


@pytest.mark.parametrize("kind", ["fifo", "socket"])
def test_special_file_named_like_a_report_is_rejected_without_blocking(
    w: World, site: Path, kind: str
) -> None:
    site.mkdir(parents=True)
    path = site / "STATUS.json"
    with socket.socket(socket.AF_UNIX) as server:
        if kind == "fifo":
            os.mkfifo(path)
        else:
            server.bind(str(path))

        result = bounded(lambda: w.process(path, NOW), path)

    reason = "it is not a regular file inside the deposit folder (STATUS.json is not a regular"
    assert_rejected(w, result, path, site, reason)


def test_folder_named_like_a_report_is_ignored(w: World, site: Path) -> None:
    (site / "STATUS.json").mkdir(parents=True)
    (site / "STATUS.json" / "inner").write_bytes(b"agent data")

    result = w.process(site / "STATUS.json", NOW)

    assert result.outcome is Outcome.IGNORED
    assert (site / "STATUS.json" / "inner").read_bytes() == b"agent data"
    assert not (site / "_rejected").exists()


def test_report_in_a_folder_no_job_uses_is_rejected_there(w: World, tmp_path: Path) -> None:
    stray_folder = w.deposit / "Unknown_Site"
    stage(stray_folder, STAGED, DUMP)
    path = drop(stray_folder, report("Unknown_Site", WHEN, sales_report()["databases"]))
    before = snapshot(tmp_path, stray_folder)

    result = w.process(path, NOW)

    assert_rejected(w, result, path, stray_folder, "it lies in a folder that no active job uses")
    assert snapshot(tmp_path, stray_folder) == before
    assert (stray_folder / STAGED).read_bytes() == DUMP


@pytest.mark.parametrize(
    "relative", [".STATUS.json", "log/.STATUS.json", "_archive/STATUS.json", "_rejected/x.json"]
)
def test_reports_never_read(w: World, site: Path, tmp_path: Path, relative: str) -> None:
    stage(site, STAGED, DUMP)
    path = stage(site, relative, json.dumps(sales_report()).encode())
    before = snapshot(tmp_path)

    result = w.process(path, NOW)

    assert result.outcome is Outcome.IGNORED
    assert snapshot(tmp_path) == before
    assert all_entries(w) == []


def test_paths_outside_the_root_are_ignored(w: World, tmp_path: Path) -> None:
    path = stage(tmp_path, "elsewhere/STATUS.json", json.dumps(sales_report()).encode())

    assert w.process(path, NOW).outcome is Outcome.IGNORED
    assert path.exists()


def test_a_vanished_report_is_gone(w: World, site: Path) -> None:
    assert w.process(site / "STATUS.json", NOW).outcome is Outcome.GONE


def test_report_in_d_log_is_processed_and_archived_in_d(w: World, site: Path) -> None:
    stage(site, STAGED, DUMP)
    path = drop(site / "log", sales_report())

    result = w.process(path, NOW)

    assert result.outcome is Outcome.ACCEPTED
    assert not path.exists()
    assert files_under(site / "_archive") == ["STATUS.json"]
    assert not (site / "log" / "_archive").exists()
    (entry,) = all_entries(w)
    assert entry.status is BackupEntryStatus.SUCCESS
    assert entry.report_name == f"{AGENT}/log/STATUS.json"


def test_report_behind_a_symlinked_log_folder_is_not_touched(
    w: World, site: Path, tmp_path: Path
) -> None:
    stage(site, STAGED, DUMP)
    outside = tmp_path / "outside"
    drop(outside, sales_report())
    (site / "log").symlink_to(outside, target_is_directory=True)
    before = snapshot(tmp_path, site)

    result = w.process(site / "log" / "STATUS.json", NOW)

    assert result.outcome is Outcome.IGNORED
    assert snapshot(tmp_path, site) == before
    assert all_entries(w) == []
    assert not (site / "_rejected").exists()


class WriterOpen(Settled):
    """The daemon saw the report created and no close yet."""

    def writer(self, path: Path) -> Writer:
        return Writer(open=True)


def test_not_yet_valid_json_waits_while_its_writer_holds_it_open(w: World, site: Path) -> None:
    data = json.dumps(sales_report()).encode()
    path = site / "STATUS.json"
    stage(site, "STATUS.json", data[:100])
    w.ctx.observer = WriterOpen()

    result = process_path(w.ctx, path, NOW)

    assert result.outcome is Outcome.WAIT
    assert result.wait == Wait(None, "its writer still holds it open")  # only an event ends it
    assert path.read_bytes() == data[:100]
    assert not (site / "_rejected").exists()
    stage(site, "STATUS.json", b'{"databases": {}}')  # complete JSON: schema errors are final
    result = process_path(w.ctx, path, NOW)
    assert result.outcome is Outcome.REJECTED


def test_not_json_is_rejected_once_its_writer_is_done(w: World, site: Path) -> None:
    path = stage(site, "STATUS.json", b'{"operation_timestamp": ')
    result = process_path(w.ctx, path, NOW)  # Settled: closed long ago, unchanged since
    assert result.outcome is Outcome.REJECTED
    assert result.reason is not None
    assert result.reason.startswith("not valid JSON")


class UnobservedWriter(Settled):
    """What the daemon knows of a file found at start: no writer seen; here just changed."""

    def writer(self, path: Path) -> Writer:
        return Writer.unobserved()

    def unchanged_for(self, path: Path, st: os.stat_result) -> float:
        return 0.0


def test_a_report_nested_too_deeply_is_rejected_at_once(w: World, site: Path) -> None:
    """Issue 11 item 9: 100,000-deep brackets gave ~6 s of tracebacks before the rejection."""
    path = stage(site, "STATUS.json", b"[" * 100_000 + b"]" * 100_000)
    w.ctx.observer = UnobservedWriter()  # even a report still settling: no wait for this one
    result = process_path(w.ctx, path, NOW)
    assert result.outcome is Outcome.REJECTED
    assert result.reason == "JSON not accepted: nested too deeply"


def test_a_not_json_report_with_a_future_mtime_waits_only_on_the_daemons_clock(
    w: World, site: Path
) -> None:
    """Issue 11 item 7: an agent-set mtime in the future kept it 'being written' forever."""
    path = stage(site, "STATUS.json", b"{ not json")
    future = path.stat().st_mtime + 10 * 365 * 86400
    os.utime(path, (future, future))
    arrivals = Arrivals()
    w.ctx.observer = arrivals

    result = process_path(w.ctx, path, NOW)  # its ctime is now: settling starts now

    assert result.outcome is Outcome.WAIT
    assert result.wait is not None
    assert result.wait.recheck_in is not None
    assert result.wait.recheck_in <= w.ctx.settle
    old = path.stat().st_ctime - w.ctx.settle - 1
    assert arrivals.unchanged_for(path, os.stat_result((*path.stat()[:9], old))) > w.ctx.settle


def test_a_report_whose_name_is_not_utf8_is_recorded_under_an_escaped_name(
    w: World, site: Path
) -> None:
    """Issue 11 item 8: the commit failed on the surrogates, the worker died, and the staged
    files stayed linked into final storage with no entry."""
    stage(site, STAGED, DUMP)
    name = os.fsdecode(b"STATUS-\xe9t\xe9.json")
    path = drop(site, sales_report(), name)

    result = process_path(w.ctx, path, NOW)

    assert result.outcome is Outcome.ACCEPTED
    (entry,) = all_entries(w)
    assert entry.report_name == f"{AGENT}/STATUS-\\xe9t\\xe9.json"
    assert entry.status is BackupEntryStatus.SUCCESS
    assert os.listdir(os.fsencode(site / "_archive")) == [b"STATUS-\xe9t\xe9.json"]


def test_names_near_name_max_are_archived_rejected_and_promoted(w: World, site: Path) -> None:
    """Issue 11 item 8: names over ~244 bytes gave archive and reason names over NAME_MAX."""
    long_staged = "database/" + "s" * 240 + ".sql.gz"
    stage(site, long_staged, DUMP)
    report_name = "R" * 245 + ".json"
    body = report(AGENT, WHEN, {"sales": database(long_staged, DUMP)})
    path = stage(site, report_name, json.dumps(body).encode())
    assert process_path(w.ctx, path, NOW).outcome is Outcome.ACCEPTED
    (entry,) = all_entries(w)
    assert entry.final_path is not None
    assert Path(entry.final_path).read_bytes() == DUMP
    bad = stage(site, report_name, b"[1]")
    assert process_path(w.ctx, bad, NOW).outcome is Outcome.REJECTED
    (reason,) = (site / "_rejected").glob("*.reason.txt")
    assert "top level must be a JSON object" in reason.read_text()
    assert len(os.listdir(site / "_archive")) == 1


# ====================================================================== staged files (§5)


def judge(w: World, site: Path, **block: Any) -> tuple[Result, BackupEntry]:
    """Process a sales-only report; the report always ends archived, with one entry."""
    path = drop(site, sales_report(**block))
    result = w.process(path, NOW)
    assert result.outcome is Outcome.ACCEPTED
    assert not path.exists()
    assert files_under(site / "_archive") == ["STATUS.json"]
    (entry,) = all_entries(w)
    assert entry.cycle == CYCLE
    assert entry.report_name == f"{AGENT}/STATUS.json"
    return result, entry


def assert_not_promoted(w: World, entry: BackupEntry) -> None:
    assert entry.final_path is None
    assert files_under(w.validated) == []
    assert processed_count(w) == 1


def test_absent_staged_file(w: World, site: Path) -> None:
    _result, entry = judge(w, site)

    assert entry.status is BackupEntryStatus.TRANSFER_INTEGRITY_FAILED
    assert entry.message == f"staged file {STAGED}: absent"
    assert entry.server_sha256 is None
    assert entry.server_size is None
    assert_not_promoted(w, entry)


def test_staged_path_is_a_directory(w: World, site: Path) -> None:
    (site / STAGED).mkdir(parents=True)

    _result, entry = judge(w, site)

    assert entry.status is BackupEntryStatus.TRANSFER_INTEGRITY_FAILED
    assert entry.message == f"staged file {STAGED}: refused: sales.sql.gz is not a regular file"
    assert_not_promoted(w, entry)
    assert (site / STAGED).is_dir()


def test_staged_symlink_to_a_good_file_outside_d(w: World, site: Path, tmp_path: Path) -> None:
    outside = stage(tmp_path, "outside/sales.sql.gz", DUMP)  # the right size and SHA-256
    (site / "database").mkdir(parents=True)
    (site / STAGED).symlink_to(outside)
    before = snapshot(tmp_path, site)

    _result, entry = judge(w, site)

    assert entry.status is BackupEntryStatus.TRANSFER_INTEGRITY_FAILED
    assert entry.message == f"staged file {STAGED}: refused: sales.sql.gz is a symlink"
    assert_not_promoted(w, entry)
    assert snapshot(tmp_path, site) == before
    assert outside.stat().st_nlink == 1  # never linked into final storage
    assert os.readlink(site / STAGED) == str(outside)


def test_staged_file_behind_a_symlinked_folder(w: World, site: Path, tmp_path: Path) -> None:
    outside = stage(tmp_path, "outside/sales.sql.gz", DUMP)
    site.mkdir(parents=True)
    (site / "database").symlink_to(outside.parent, target_is_directory=True)
    before = snapshot(tmp_path, site)

    _result, entry = judge(w, site)

    assert entry.status is BackupEntryStatus.TRANSFER_INTEGRITY_FAILED
    assert entry.message == (
        f"staged file {STAGED}: refused: database is a symlink or not a directory"
    )
    assert_not_promoted(w, entry)
    assert snapshot(tmp_path, site) == before
    assert outside.stat().st_nlink == 1


def test_staged_fifo_does_not_hang(w: World, site: Path) -> None:
    (site / "database").mkdir(parents=True)
    os.mkfifo(site / STAGED)

    path = drop(site, sales_report())
    result = bounded(lambda: w.process(path, NOW), site / STAGED)

    (entry,) = result.entries
    assert entry.status is BackupEntryStatus.TRANSFER_INTEGRITY_FAILED
    assert entry.message == f"staged file {STAGED}: refused: sales.sql.gz is not a regular file"
    assert stat.S_ISFIFO((site / STAGED).lstat().st_mode)
    assert files_under(w.validated) == []


def test_staged_file_of_another_size(w: World, site: Path) -> None:
    stage(site, STAGED, DUMP[:-1])

    _result, entry = judge(w, site)

    assert entry.status is BackupEntryStatus.TRANSFER_INTEGRITY_FAILED
    assert entry.message == (
        f"staged file {STAGED} is {len(DUMP) - 1} bytes, the agent reported {len(DUMP)}"
    )
    assert entry.server_size == len(DUMP) - 1
    assert entry.server_sha256 is None  # no need to hash once the size differs
    assert entry.agent_size == len(DUMP)
    assert_not_promoted(w, entry)
    assert (site / STAGED).read_bytes() == DUMP[:-1]


def test_staged_file_of_the_same_size_with_other_bytes(w: World, site: Path) -> None:
    corrupt = DUMP[:-1] + b"X"
    stage(site, STAGED, corrupt)
    actual = hashlib.sha256(corrupt).hexdigest()

    _result, entry = judge(w, site)

    assert entry.status is BackupEntryStatus.HASH_MISMATCH
    assert entry.message == (
        f"staged file {STAGED} has SHA-256 {actual}, "
        f"the agent reported {hashlib.sha256(DUMP).hexdigest()}"
    )
    assert entry.server_sha256 == actual
    assert entry.agent_sha256 == hashlib.sha256(DUMP).hexdigest()
    assert_not_promoted(w, entry)
    assert (site / STAGED).read_bytes() == corrupt


def test_failed_transfer_keeps_its_error_message(w: World, site: Path) -> None:
    stage(site, STAGED, DUMP)

    _result, entry = judge(w, site, transfer=False, error="scp: disk full on the agent")

    assert entry.status is BackupEntryStatus.FAILED
    assert entry.message == "the agent reports its transfer failed: scp: disk full on the agent"
    assert (entry.backup_ok, entry.compress_ok, entry.transfer_ok) == (True, True, False)
    assert_not_promoted(w, entry)
    assert (site / STAGED).read_bytes() == DUMP  # a failed database's file stays in place


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"compress": False}, "the agent reports its compress step failed"),
        ({"backup": False}, "the agent reports its backup step failed"),
        ({"backup": False, "compress": False}, "the agent reports its backup and compress step"),
        ({"compress": False, "transfer": False}, "the agent reports its compress step failed"),
    ],
)
def test_failed_agent_steps(w: World, site: Path, block: dict[str, bool], message: str) -> None:
    stage(site, STAGED, DUMP)  # a perfect file does not override what the agent says

    _result, entry = judge(w, site, **block)

    assert entry.status is BackupEntryStatus.FAILED
    assert entry.message.startswith(message)
    assert entry.server_sha256 is None
    assert_not_promoted(w, entry)
    assert (site / STAGED).read_bytes() == DUMP


def test_unreadable_staged_file_fails_only_its_database(
    w: World, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tests run as root, which reads anything: EACCES is simulated for one file only."""
    stage(site, STAGED, DUMP)
    stage(site, "database/hr.sql.gz", b"hr dump")
    real_open = os.open

    def open_denied(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if path == "sales.sql.gz":
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_denied)
    body = report(
        AGENT,
        WHEN,
        {
            "sales": database(STAGED, DUMP),
            "hr": database("database/hr.sql.gz", b"hr dump"),
        },
    )

    result = w.process(drop(site, body), NOW)

    assert result.outcome is Outcome.ACCEPTED
    sales, hr = w.history(SALES), w.history(HR)
    assert [e.status for e in sales] == [BackupEntryStatus.TRANSFER_INTEGRITY_FAILED]
    assert sales[0].message.startswith(
        f"staged file {STAGED}: it is not readable by the daemon's user (permission denied"
    )
    assert "Agents' upload accounts" in sales[0].message  # what to fix, and where to read how
    assert [e.status for e in hr] == [BackupEntryStatus.SUCCESS]
    assert (site / STAGED).exists()


def test_databases_are_independent_and_unexpected_ones_are_counted(w: World, site: Path) -> None:
    stage(site, STAGED, DUMP)
    body = report(
        AGENT,
        WHEN,
        {
            "sales": database(STAGED, DUMP),
            "hr": database("database/hr.sql.gz", b"never staged"),
            "ghost": database("database/ghost.sql.gz", b"whatever"),
        },
    )

    result = w.process(drop(site, body), NOW)

    assert result.outcome is Outcome.ACCEPTED
    assert result.unexpected == ["ghost"]
    assert [e.status for e in w.history(SALES)] == [BackupEntryStatus.SUCCESS]
    assert [e.status for e in w.history(HR)] == [BackupEntryStatus.TRANSFER_INTEGRITY_FAILED]
    assert files_under(w.validated) == [FINAL]


# ========================================================================== promotion (§5.6)


def test_success_links_into_final_storage(
    w: World, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staged = stage(site, STAGED, DUMP)
    inode = staged.stat().st_ino
    final = w.validated / FINAL
    at_commit: list[tuple[bool, bool]] = []
    real_record = Store.record_report

    def spy(self: Store, *args: Any) -> bool:
        at_commit.append((staged.exists(), final.exists()))
        return real_record(self, *args)

    monkeypatch.setattr(Store, "record_report", spy)

    result, entry = judge(w, site)

    assert at_commit == [(True, True)]  # linked before the commit, unlinked after it
    assert entry.status is BackupEntryStatus.SUCCESS
    assert entry.message == (
        f"staged file {STAGED} verified ({len(DUMP)} bytes); stored at {final}"
    )
    assert entry.final_path == str(final)
    assert entry.staged_path == str(site / STAGED)
    assert final.read_bytes() == DUMP
    assert final.stat().st_ino == inode  # a rename-like link on one filesystem, no copy
    assert final.stat().st_nlink == 1
    assert not staged.exists()
    assert (site / "database").is_dir()
    digest = hashlib.sha256(DUMP).hexdigest()
    assert (entry.agent_sha256, entry.server_sha256) == (digest, digest)
    assert (entry.agent_size, entry.server_size) == (len(DUMP), len(DUMP))
    assert (entry.backup_ok, entry.compress_ok, entry.transfer_ok) == (True, True, True)
    assert entry.operation_timestamp == WHEN
    assert entry.unchanged_since_last_success is False
    assert entry.details is not None
    assert entry.details["server"]["promotion"] == "link"
    assert result.entries[0].final_path == str(final)
    assert files_under(w.validated) == [FINAL]


def test_an_existing_final_file_is_never_overwritten(w: World, site: Path) -> None:
    stage(site, STAGED, DUMP)
    existing = stage(w.validated, FINAL, b"an older backup")

    _result, entry = judge(w, site)

    fresh = existing.with_name("20261124T1300Z_sales-2.sql.gz")
    assert entry.status is BackupEntryStatus.SUCCESS
    assert entry.final_path == str(fresh)
    assert entry.message.endswith(
        f"stored at {fresh} (20261124T1300Z_sales.sql.gz already existed, so a new name was used)"
    )
    assert existing.read_bytes() == b"an older backup"
    assert fresh.read_bytes() == DUMP


def test_a_symlink_in_final_storage_is_refused(w: World, site: Path, tmp_path: Path) -> None:
    """A name already taken by a symlink is skipped like any other, never written through."""
    stage(site, STAGED, DUMP)
    victim = stage(tmp_path, "outside/victim", b"do not touch")
    (w.validated / FINAL).parent.mkdir(parents=True)
    (w.validated / FINAL).symlink_to(victim)

    _result, entry = judge(w, site)

    assert entry.final_path == str((w.validated / FINAL).with_name("20261124T1300Z_sales-2.sql.gz"))
    assert victim.read_bytes() == b"do not touch"
    assert victim.stat().st_nlink == 1


def test_across_filesystems_the_copy_is_verified_and_staged_removed_after_commit(
    tmp_path: Path, database_url: str, other_filesystem: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = world(tmp_path, database_url, validated_backups_base_path=str(other_filesystem))
    site = w.site(AGENT)
    staged = stage(site, STAGED, DUMP)
    final = other_filesystem / FINAL
    at_commit: list[tuple[bool, bytes]] = []
    real_record = Store.record_report

    def spy(self: Store, *args: Any) -> bool:
        at_commit.append((staged.exists(), final.read_bytes()))
        return real_record(self, *args)

    monkeypatch.setattr(Store, "record_report", spy)

    _result, entry = judge(w, site)

    assert at_commit == [(True, DUMP)]  # the verified copy is in place before the commit
    assert entry.status is BackupEntryStatus.SUCCESS
    assert entry.final_path == str(final)
    assert entry.details is not None
    assert entry.details["server"]["promotion"] == "copy"
    assert final.read_bytes() == DUMP
    assert final.stat().st_dev != tmp_path.stat().st_dev
    assert files_under(other_filesystem) == [FINAL]  # no temporary file left behind
    assert not staged.exists()


def test_across_filesystems_a_file_changed_during_the_copy_is_not_promoted(
    tmp_path: Path, database_url: str, other_filesystem: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent rewriting its file in place between the hash and the copy."""
    w = world(tmp_path, database_url, validated_backups_base_path=str(other_filesystem))
    site = w.site(AGENT)
    staged = stage(site, STAGED, DUMP)
    real_copy = copy_hashing

    def rewrite_then_copy(*args: Any, **kwargs: Any) -> tuple[str, int]:
        with staged.open("r+b") as out:
            out.write(b"REWRITTEN")
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(promotion, "copy_hashing", rewrite_then_copy)

    _result, entry = judge(w, site)

    assert entry.status is BackupEntryStatus.TRANSFER_INTEGRITY_FAILED
    assert entry.message == (
        f"staged file {STAGED} changed while it was being copied to final storage"
    )
    assert entry.final_path is None
    assert files_under(other_filesystem) == []
    assert staged.read_bytes().startswith(b"REWRITTEN")


def test_unchanged_backup_is_noted_and_warned(w: World, site: Path) -> None:
    def day(offset: int, content: bytes) -> BackupEntry:
        stage(site, STAGED, content)
        body = report(AGENT, WHEN + timedelta(days=offset), {"sales": database(STAGED, content)})
        with structlog.testing.capture_logs() as logs:
            w.process(drop(site, body), NOW + timedelta(days=offset))
        (recorded,) = [log for log in logs if log["event"] == "entry.recorded"]
        entry = w.history(SALES)[0]
        assert recorded["log_level"] == (
            "warning" if entry.unchanged_since_last_success else "info"
        )
        return entry

    first, second, third = day(0, DUMP), day(1, DUMP), day(2, DUMP + b"a new dump")

    assert first.unchanged_since_last_success is False
    assert second.unchanged_since_last_success is True
    assert second.status is BackupEntryStatus.SUCCESS
    assert second.message.endswith(
        "; WARNING: identical to the previous successful backup (SHA-256 unchanged)"
    )
    assert third.unchanged_since_last_success is False
    assert "WARNING" not in third.message
    assert files_under(w.validated / "ACME/Lyon/Part-Dieu/sales") == [
        "20261124T1300Z_sales.sql.gz",
        "20261125T1300Z_sales.sql.gz",
        "20261126T1300Z_sales.sql.gz",
    ]


# ================================================= idempotency: nothing lost, nothing twice


def test_the_same_report_bytes_twice_record_nothing_new(w: World, site: Path) -> None:
    stage(site, STAGED, DUMP)
    path = drop(site, sales_report())
    data = path.read_bytes()
    assert w.process(path, NOW).outcome is Outcome.ACCEPTED
    stage(site, STAGED, b"a new dump, same name")  # not the file that was validated

    again = w.process(drop(site, data), NOW + timedelta(minutes=5))

    assert again.outcome is Outcome.DUPLICATE
    assert again.entries == []
    assert len(all_entries(w)) == 1
    assert processed_count(w) == 1
    assert not path.exists()
    assert files_under(site / "_archive") == ["STATUS-2.json", "STATUS.json"]
    assert (site / "_archive" / "STATUS-2.json").read_bytes() == data
    assert (site / STAGED).read_bytes() == b"a new dump, same name"  # left alone
    assert files_under(w.validated) == [FINAL]


def test_crash_between_commit_and_cleanup_is_finished_by_the_retry(w: World, site: Path) -> None:
    """Replays the disk as a crash right after the commit leaves it: report and staged link back."""
    stage(site, STAGED, DUMP)
    path = drop(site, sales_report())
    data = path.read_bytes()
    w.process(path, NOW)
    final = w.validated / FINAL
    drop(site, data)
    os.link(final, site / STAGED)  # the staged name still held the promoted inode

    result = w.process(path, NOW)

    assert result.outcome is Outcome.DUPLICATE
    assert len(all_entries(w)) == 1
    assert not (site / STAGED).exists()
    assert final.read_bytes() == DUMP
    assert final.stat().st_nlink == 1
    assert not path.exists()
    assert len(files_under(site / "_archive")) == 2


def test_crash_before_archive_is_finished_by_the_retry(
    w: World, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stage(site, STAGED, DUMP)
    path = drop(site, sales_report())
    real_archive = pipeline.archive
    crashes = [OSError("power cut")]

    def archive_once(*args: Any) -> str | None:
        if crashes:
            raise crashes.pop()
        return real_archive(*args)

    monkeypatch.setattr(pipeline, "archive", archive_once)
    with pytest.raises(OSError, match="power cut"):
        w.process(path, NOW)
    assert path.exists()
    assert len(all_entries(w)) == 1

    result = w.process(path, NOW)

    assert result.outcome is Outcome.DUPLICATE
    assert len(all_entries(w)) == 1
    assert files_under(site / "_archive") == ["STATUS.json"]
    assert not path.exists()
    assert not (site / STAGED).exists()
    assert (w.validated / FINAL).read_bytes() == DUMP


def test_crash_after_link_before_commit_reuses_the_final_name(
    w: World, site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staged = stage(site, STAGED, DUMP)
    path = drop(site, sales_report())
    final = w.validated / FINAL
    real_record = Store.record_report
    crashes = [RuntimeError("power cut")]

    def record_once(self: Store, *args: Any) -> bool:
        if crashes:
            raise crashes.pop()
        return real_record(self, *args)

    monkeypatch.setattr(Store, "record_report", record_once)
    monkeypatch.setattr(pipeline, "_undo", lambda _judged: None)  # a kill -9: no clean-up runs
    with pytest.raises(RuntimeError, match="power cut"):
        w.process(path, NOW)
    monkeypatch.undo()
    assert final.stat().st_nlink == 2  # linked, not yet committed
    assert staged.exists()
    assert path.exists()
    assert all_entries(w) == []

    result = w.process(path, NOW)

    assert result.outcome is Outcome.ACCEPTED
    (entry,) = all_entries(w)
    assert entry.status is BackupEntryStatus.SUCCESS
    assert entry.final_path == str(final)
    assert "already existed" not in entry.message
    assert files_under(w.validated) == [FINAL]  # no -2 copy
    assert final.stat().st_nlink == 1
    assert not staged.exists()


@pytest.mark.parametrize("layout", ["database/sales.sql.gz", "dumps/daily/sales.sql.gz"])
def test_cleanup_never_follows_a_symlink_swapped_in_after_the_commit(
    w: World, site: Path, tmp_path: Path, layout: str
) -> None:
    """An agent replaces the staged file's folder by a symlink to a folder that holds a link to
    the promoted inode: the retried clean-up must not unlink anything through that symlink."""
    stage(site, layout, DUMP)
    path = drop(site, report(AGENT, WHEN, {"sales": database(layout, DUMP)}))
    data = path.read_bytes()
    w.process(path, NOW)
    final = w.validated / FINAL
    top = layout.split("/")[0]
    shutil.rmtree(site / top)
    outside = tmp_path / "outside"
    bait = outside / Path(layout).relative_to(top)
    bait.parent.mkdir(parents=True)
    os.link(final, bait)
    (site / top).symlink_to(outside, target_is_directory=True)
    drop(site, data)
    before = snapshot(tmp_path, site, w.validated, outside)
    bait_before = bait.stat()

    result = w.process(path, NOW)

    assert result.outcome is Outcome.DUPLICATE
    assert snapshot(tmp_path, site, w.validated, outside) == before
    assert bait.read_bytes() == DUMP
    assert bait.stat().st_mtime_ns == bait_before.st_mtime_ns
    # Issue 6 item 6: final storage keeps a verified copy of its own, reachable from nowhere else.
    assert final.read_bytes() == DUMP
    assert final.stat().st_nlink == 1
    assert bait.stat().st_nlink == 1
    assert not path.exists()
    assert len(all_entries(w)) == 1


def test_two_workers_racing_on_one_report_record_one_set_of_entries(w: World, site: Path) -> None:
    stage(site, STAGED, DUMP)
    stage(site, "database/hr.sql.gz", b"hr dump")
    body = report(
        AGENT,
        WHEN,
        {"sales": database(STAGED, DUMP), "hr": database("database/hr.sql.gz", b"hr dump")},
    )
    path = drop(site, body)
    start = threading.Barrier(2)
    results: list[Result] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            start.wait(timeout=10)
            results.append(process_path(w.ctx, path, NOW))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    outcomes = sorted(r.outcome.value for r in results)
    assert outcomes.count(Outcome.ACCEPTED.value) == 1
    assert set(outcomes) - {Outcome.ACCEPTED.value} <= {
        Outcome.DUPLICATE.value,
        Outcome.GONE.value,
    }
    for result in results:
        if result.outcome is not Outcome.ACCEPTED:
            assert result.entries == []  # nothing claimed that was not recorded
    entries = all_entries(w)
    assert sorted(e.status for e in entries) == [BackupEntryStatus.SUCCESS] * 2
    assert len({e.job_id for e in entries}) == 2
    assert processed_count(w) == 1
    assert files_under(w.validated) == sorted(
        [FINAL, "ACME/Lyon/Part-Dieu/hr/20261124T1300Z_hr.sql.gz"]
    )
    assert files_under(site / "_archive") == ["STATUS.json"]
    assert not path.exists()
    assert files_under(site / "database") == []


# ============================================================= the decision table (pure, §5)


def block_of(**kwargs: Any) -> DatabaseReport:
    return DatabaseReport.model_validate(database(STAGED, DUMP, **kwargs))


GOOD_SHA = hashlib.sha256(DUMP).hexdigest()
BAD_SHA = hashlib.sha256(b"other").hexdigest()
S = BackupEntryStatus


@pytest.mark.parametrize(
    ("block", "facts", "status", "message"),
    [
        ({"backup": False}, None, S.FAILED, "the agent reports its backup step failed"),
        (
            {"transfer": False},
            StagedFacts(STAGED, problem="absent"),
            S.FAILED,
            "the agent reports its transfer failed: no error message given",
        ),
        ({}, StagedFacts(STAGED, problem="absent"), S.TRANSFER_INTEGRITY_FAILED, "absent"),
        (
            {},
            StagedFacts(STAGED, size=1, sha256=GOOD_SHA),
            S.TRANSFER_INTEGRITY_FAILED,
            f"staged file {STAGED} is 1 bytes, the agent reported {len(DUMP)}",
        ),
        ({}, StagedFacts(STAGED, size=len(DUMP), sha256=BAD_SHA), S.HASH_MISMATCH, BAD_SHA),
        (
            {},
            StagedFacts(STAGED, size=len(DUMP), sha256=GOOD_SHA),
            S.SUCCESS,
            f"staged file {STAGED} verified ({len(DUMP)} bytes)",
        ),
    ],
)
def test_decision_table(
    block: dict[str, Any], facts: StagedFacts | None, status: S, message: str
) -> None:
    verdict = decide(block_of(**block), facts)
    assert verdict.status is status
    assert message in verdict.message


def test_decide_needs_the_staged_file_once_the_agent_succeeded() -> None:
    with pytest.raises(ValueError, match="must be inspected"):
        decide(block_of(), None)


@settings(max_examples=400, deadline=None)
@given(
    backup=st.booleans(),
    compress=st.booleans(),
    transfer=st.booleans(),
    error=st.none() | st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30),
    problem=st.none() | st.sampled_from(["absent", "refused: sales.sql.gz is a symlink"]),
    size=st.sampled_from([0, len(DUMP) - 1, len(DUMP), len(DUMP) + 1]),
    sha=st.none() | st.sampled_from([GOOD_SHA, BAD_SHA]),
)
def test_verdict_follows_the_spec_order(
    backup: bool,
    compress: bool,
    transfer: bool,
    error: str | None,
    problem: str | None,
    size: int,
    sha: str | None,
) -> None:
    db = block_of(backup=backup, compress=compress, transfer=transfer, error=error)
    if problem is None:
        facts = StagedFacts(STAGED, size=size, sha256=sha)
    else:
        facts = StagedFacts(STAGED, problem=problem)

    verdict = decide(db, facts)

    # SPEC §5, written out independently: the first rule that applies decides.
    if not backup or not compress:
        assert verdict.status is S.FAILED
        assert "the agent reports its" in verdict.message
        assert "transfer" not in verdict.message
    elif not transfer:
        assert verdict.status is S.FAILED
        assert verdict.message.endswith(error or "no error message given")
    elif problem is not None:
        assert verdict.status is S.TRANSFER_INTEGRITY_FAILED
        assert verdict.message == f"staged file {STAGED}: {problem}"
    elif size != len(DUMP):
        assert verdict.status is S.TRANSFER_INTEGRITY_FAILED
        assert f"is {size} bytes" in verdict.message
    elif sha != GOOD_SHA:
        assert verdict.status is S.HASH_MISMATCH
    else:
        assert verdict.status is S.SUCCESS
    assert (agent_verdict(db) is None) == (backup and compress and transfer)
    if agent_verdict(db) is None:
        assert file_verdict(db, facts) == verdict
