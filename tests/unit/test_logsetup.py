"""Logging configuration: console and JSON lines as written, stdlib records routed through the
same renderer, and journal entries as journald receives them on its native socket (inside a
private mount namespace, so no systemd is needed and the host's /run is untouched)."""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog

import backupwatch
from backupwatch import logsetup
from backupwatch.logsetup import (
    LogTarget,
    configure_logging,
    journal_field_name,
    journal_fields,
    resolve_target,
)

REPO_ROOT = Path(backupwatch.__file__).resolve().parent.parent
ACCEPTED = {
    "job": "ACME/Lyon/Part-Dieu/sales",
    "site": "ACME_Lyon_Part-Dieu",
    "status": "SUCCESS",
    "report": "STATUS.json",
}
log = structlog.get_logger("backupwatch.tests")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state; give the next test what it had."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    libraries = {
        name: logging.getLogger(name).level for name in ("sqlalchemy", "alembic", "watchdog")
    }
    config = structlog.get_config()
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    for name, library_level in libraries.items():
        logging.getLogger(name).setLevel(library_level)
    logging.captureWarnings(False)
    structlog.configure(**config)


def configured(target: LogTarget, level: str = "INFO") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(target, level, stream)
    return stream


def parse_z(text: str) -> datetime:
    assert text.endswith("Z"), text
    parsed = datetime.fromisoformat(text)
    assert parsed.utcoffset() is not None
    return parsed


# --------------------------------------------------------------------------- console


def test_console_line_has_timestamp_level_event_and_fields() -> None:
    stream = configured(LogTarget.CONSOLE)
    log.info("report.accepted", **ACCEPTED)
    (line,) = stream.getvalue().splitlines()
    timestamp, rest = line.split(" ", 1)
    assert abs((parse_z(timestamp) - datetime.now(UTC)).total_seconds()) < 60
    assert "info" in rest
    assert "report.accepted" in rest
    for key, value in ACCEPTED.items():
        assert f"{key}={value}" in rest
    assert "\x1b[" not in line  # no colours, even on a terminal


def test_console_renders_exceptions_as_plain_traceback() -> None:
    stream = configured(LogTarget.CONSOLE)
    try:
        raise ValueError("broken report")
    except ValueError:
        log.exception("report.crashed", job="j")
    output = stream.getvalue()
    assert "report.crashed" in output
    assert "Traceback (most recent call last)" in output
    assert "ValueError: broken report" in output
    assert "\x1b[" not in output


# --------------------------------------------------------------------------- JSON


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_one_object_per_line() -> None:
    stream = configured(LogTarget.JSON)
    log.info("report.accepted", **ACCEPTED)
    log.warning("report.late", job="j", delay_s=12.5, when=datetime(2024, 1, 1, tzinfo=UTC))
    first, second = json_lines(stream)
    assert first["event"] == "report.accepted"
    assert first["level"] == "info"
    assert first["logger"] == "backupwatch.tests"
    assert first.items() >= ACCEPTED.items()
    parse_z(first["timestamp"])
    assert second["level"] == "warning"
    assert second["delay_s"] == 12.5
    assert second["when"] == "2024-01-01 00:00:00+00:00"  # non-JSON types are stringified


def test_json_exception_is_a_string_field() -> None:
    stream = configured(LogTarget.JSON)
    try:
        raise KeyError("db")
    except KeyError:
        log.exception("report.crashed")
    (entry,) = json_lines(stream)
    assert entry["level"] == "error"
    assert "KeyError: 'db'" in entry["exception"]


def test_json_includes_bound_and_context_fields() -> None:
    stream = configured(LogTarget.JSON)
    structlog.contextvars.bind_contextvars(scan="reconcile")
    try:
        log.bind(site="S").info("scan.done", found=3)
    finally:
        structlog.contextvars.clear_contextvars()
    (entry,) = json_lines(stream)
    assert entry.items() >= {"scan": "reconcile", "site": "S", "found": 3}.items()


# --------------------------------------------------------------------------- stdlib routing


def test_stdlib_records_use_the_same_renderer() -> None:
    stream = configured(LogTarget.JSON)
    logging.getLogger("watchdog.observers").warning("queue %s", "overflow")
    logging.getLogger("backupwatch.migrations").info("upgraded to %s", "0002")
    entries = json_lines(stream)
    assert [(e["logger"], e["level"], e["event"]) for e in entries] == [
        ("watchdog.observers", "warning", "queue overflow"),
        ("backupwatch.migrations", "info", "upgraded to 0002"),
    ]
    for entry in entries:
        parse_z(entry["timestamp"])


def test_third_party_loggers_only_from_warning() -> None:
    stream = configured(LogTarget.JSON, level="DEBUG")
    for name in ("watchdog", "alembic.runtime.migration", "sqlalchemy.engine"):
        logging.getLogger(name).info("chatter")
        logging.getLogger(name).debug("chatter")
    logging.getLogger("sqlalchemy.engine").error("real problem")
    log.debug("ours.debug")
    assert [e["event"] for e in json_lines(stream)] == ["real problem", "ours.debug"]


def test_sqlalchemy_is_not_asked_to_log_statements() -> None:
    """SQLAlchemy builds per-statement INFO records whenever its logger is enabled for INFO."""
    configured(LogTarget.CONSOLE, level="DEBUG")
    assert not logging.getLogger("sqlalchemy.engine.Engine").isEnabledFor(logging.INFO)
    assert logging.getLogger("backupwatch.store").isEnabledFor(logging.DEBUG)


def test_positional_arguments_are_interpolated() -> None:
    stream = configured(LogTarget.JSON)
    log.info("scanned %d folders", 3)
    (entry,) = json_lines(stream)
    assert entry["event"] == "scanned 3 folders"
    assert list(entry)[:4] == ["timestamp", "level", "event", "logger"]


def test_python_warnings_are_logged() -> None:
    stream = configured(LogTarget.JSON)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("deprecated thing", DeprecationWarning, stacklevel=1)
    (entry,) = json_lines(stream)
    assert entry["logger"] == "py.warnings"
    assert "deprecated thing" in entry["event"]


def test_stdlib_exception_info_is_kept() -> None:
    stream = configured(LogTarget.JSON)
    try:
        raise OSError("disk")
    except OSError:
        logging.getLogger("alembic").exception("migration failed")
    (entry,) = json_lines(stream)
    assert "OSError: disk" in entry["exception"]


# --------------------------------------------------------------------------- levels, reload


def test_level_filters_our_events() -> None:
    stream = configured(LogTarget.JSON, level="WARNING")
    log.info("hidden")
    log.warning("shown")
    assert [e["event"] for e in json_lines(stream)] == ["shown"]


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ValueError, match="LOUD"):
        configure_logging(LogTarget.CONSOLE, "LOUD", io.StringIO())


def test_reconfiguring_replaces_the_handler() -> None:
    """SIGHUP reload calls configure_logging again: one line per event, new target and level."""
    first = configured(LogTarget.CONSOLE)
    configure_logging(LogTarget.CONSOLE, "INFO", first)
    log.info("once")
    assert first.getvalue().count("once") == 1

    second = configured(LogTarget.JSON, level="DEBUG")
    log.debug("after.reload")
    logging.getLogger("watchdog").warning("third")
    assert "after.reload" not in first.getvalue()
    assert [e["event"] for e in json_lines(second)] == ["after.reload", "third"]
    ours = [h for h in logging.getLogger().handlers if h.get_name() == "backupwatch"]
    assert len(ours) == 1


def test_foreign_root_handlers_are_left_alone() -> None:
    foreign = logging.NullHandler()
    logging.getLogger().addHandler(foreign)
    configured(LogTarget.CONSOLE)
    configured(LogTarget.JSON)
    assert foreign in logging.getLogger().handlers


def test_default_stream_is_stderr_at_call_time(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(LogTarget.CONSOLE)
    log.info("to.stderr")
    assert "to.stderr" in capsys.readouterr().err


# --------------------------------------------------------------------------- resolve_target


@pytest.fixture
def journal_available(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Pretend journald is reachable; entries are recorded instead of sent."""
    sent: list[dict[str, Any]] = []

    def send(message: str, **fields: Any) -> None:
        sent.append({"MESSAGE": message, **fields})

    monkeypatch.setattr(logsetup, "journal_send", lambda: send)
    return sent


def stream_id(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_dev}:{stat.st_ino}"


@pytest.mark.usefixtures("journal_available")
def test_auto_is_journal_when_stderr_is_the_journal_stream(tmp_path: Path) -> None:
    stderr = tmp_path / "stderr"
    stderr.touch()
    with stderr.open() as f:
        environ = {"JOURNAL_STREAM": stream_id(stderr)}
        assert resolve_target(LogTarget.AUTO, environ, f.fileno()) is LogTarget.JOURNAL


@pytest.mark.usefixtures("journal_available")
@pytest.mark.parametrize("journal_stream", [None, "", "garbage", "1:2", "12"])
def test_auto_is_console_otherwise(tmp_path: Path, journal_stream: str | None) -> None:
    """An inherited JOURNAL_STREAM (a terminal started by a user service) is not ours."""
    environ = {} if journal_stream is None else {"JOURNAL_STREAM": journal_stream}
    with (tmp_path / "stderr").open("w") as f:
        assert resolve_target(LogTarget.AUTO, environ, f.fileno()) is LogTarget.CONSOLE


def test_auto_is_console_without_systemd_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logsetup, "journal_send", lambda: None)
    stderr = tmp_path / "stderr"
    stderr.touch()
    with stderr.open() as f:
        environ = {"JOURNAL_STREAM": stream_id(stderr)}
        assert resolve_target(LogTarget.AUTO, environ, f.fileno()) is LogTarget.CONSOLE


@pytest.mark.parametrize("target", [LogTarget.CONSOLE, LogTarget.JSON, LogTarget.JOURNAL])
def test_explicit_targets_are_kept(target: LogTarget) -> None:
    assert resolve_target(target, {"JOURNAL_STREAM": "1:2"}) is target


def test_targets_parse_from_config_strings() -> None:
    assert [LogTarget(v) for v in ("auto", "console", "json", "journal")] == list(LogTarget)


# --------------------------------------------------------------------------- journal fields


def test_journal_fields_for_an_event() -> None:
    fields = journal_fields(
        {"event": "report.accepted", "level": "info", "logger": "backupwatch.x", **ACCEPTED}
    )
    assert fields == {
        "MESSAGE": "report.accepted job=ACME/Lyon/Part-Dieu/sales site=ACME_Lyon_Part-Dieu "
        "status=SUCCESS report=STATUS.json",
        "PRIORITY": "6",
        "SYSLOG_IDENTIFIER": "backupwatch",
        "LOGGER": "backupwatch.x",
        "JOB": "ACME/Lyon/Part-Dieu/sales",
        "SITE": "ACME_Lyon_Part-Dieu",
        "STATUS": "SUCCESS",
        "REPORT": "STATUS.json",
    }


@pytest.mark.parametrize(
    ("level", "priority"),
    [("debug", "7"), ("info", "6"), ("warning", "4"), ("error", "3"), ("critical", "2")],
)
def test_journal_priority_follows_level(level: str, priority: str) -> None:
    assert journal_fields({"event": "e", "level": level})["PRIORITY"] == priority


def test_journal_values_are_stringified_and_quoted_in_message() -> None:
    fields = journal_fields(
        {"event": "e", "level": "info", "count": 3, "path": "/a b/c", "none": None}
    )
    assert fields["COUNT"] == "3"
    assert fields["PATH"] == "/a b/c"
    assert fields["NONE"] == "None"
    assert fields["MESSAGE"] == 'e count=3 path="/a b/c" none=None'


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("job", "JOB"),
        ("job-id", "JOB_ID"),
        ("db.name", "DB_NAME"),
        ("_private", "PRIVATE"),
        ("__x", "X"),
        ("2fa", "F_2FA"),
        ("été", "T_"),
        ("___", "F_"),
        ("x" * 80, "X" * 64),
    ],
)
def test_journal_field_names_are_valid(key: str, name: str) -> None:
    assert journal_field_name(key) == name


def test_journal_fields_never_override_ours() -> None:
    fields = journal_fields(
        {"event": "e", "level": "error", "message": "m", "priority": "7", "syslog-identifier": "x"}
    )
    assert fields["PRIORITY"] == "3"
    assert fields["SYSLOG_IDENTIFIER"] == "backupwatch"
    assert fields["MESSAGE"] == "e message=m priority=7 syslog-identifier=x"


def test_journal_fields_carry_the_traceback() -> None:
    trace = "Traceback (most recent call last):\n  ...\nValueError: x"
    fields = journal_fields({"event": "crash", "level": "error", "job": "j", "exception": trace})
    assert fields["MESSAGE"] == f"crash job=j\n{trace}"
    assert fields["TRACEBACK"] == trace
    assert "EXCEPTION" not in fields


def test_journal_handler_sends_events_and_stdlib_records(
    journal_available: list[dict[str, Any]],
) -> None:
    stream = configured(LogTarget.JOURNAL)
    log.info("report.accepted", **ACCEPTED)
    logging.getLogger("watchdog").warning("overflow")
    accepted, overflow = journal_available
    assert accepted.items() >= {**{k.upper(): v for k, v in ACCEPTED.items()}}.items()
    assert accepted["CODE_FILE"] == __file__
    assert accepted["CODE_FUNC"] == "test_journal_handler_sends_events_and_stdlib_records"
    assert overflow["MESSAGE"] == "overflow"
    assert overflow["PRIORITY"] == "4"
    assert overflow["LOGGER"] == "watchdog"
    assert stream.getvalue() == ""


def test_journal_unreachable_falls_back_to_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    def send(message: str, **fields: Any) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(logsetup, "journal_send", lambda: send)
    stream = configured(LogTarget.JOURNAL)
    log.info("first", job="a")
    log.error("second")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert "journal unreachable" in lines[0]
    assert lines[1:] == ["<6>first job=a", "<3>second"]


def test_journal_unavailable_falls_back_to_console_with_warning(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(logsetup, "journal_send", lambda: None)
    stream = configured(LogTarget.JOURNAL)
    log.info("report.accepted", **ACCEPTED)
    warning, accepted = stream.getvalue().splitlines()
    assert "logging.journal_unavailable" in warning
    assert "warning" in warning
    assert "report.accepted" in accepted
    assert "job=ACME/Lyon/Part-Dieu/sales" in accepted


# --------------------------------------------------------------------------- journal wire


def decode_journal_datagram(data: bytes) -> dict[str, str]:
    """journald's native protocol: `KEY=VALUE\\n`, or `KEY\\n<u64 LE size><value>\\n`."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        end = data.index(b"\n", pos)
        line = data[pos:end]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            pos = end + 1
        else:
            key = line
            size = int.from_bytes(data[end + 1 : end + 9], "little")
            value = data[end + 9 : end + 9 + size]
            assert data[end + 9 + size : end + 10 + size] == b"\n"
            pos = end + 10 + size
        fields[key.decode()] = value.decode()
    return fields


def test_decode_journal_datagram() -> None:
    value = b"two\nlines"
    data = b"A=1\nMESSAGE\n" + len(value).to_bytes(8, "little") + value + b"\nB=x=y\n"
    assert decode_journal_datagram(data) == {"A": "1", "MESSAGE": "two\nlines", "B": "x=y"}


JOURNAL_HELPER = textwrap.dedent(
    """
    import base64, json, logging, socket, sys

    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind("/run/systemd/journal/socket")

    import structlog
    from backupwatch.logsetup import LogTarget, configure_logging

    configure_logging(LogTarget.JOURNAL, "INFO", sys.stderr)
    log = structlog.get_logger("backupwatch.pipeline")
    log.info("report.accepted", job="ACME/Lyon/Part-Dieu/sales", site="ACME_Lyon_Part-Dieu",
             status="SUCCESS", report="STATUS.json")
    log.warning("job.missing", job="ACME/Lyon/Part-Dieu/sales", status="MISSING",
                **{"cycle-at": "2024-05-01T02:00:00Z"})
    try:
        raise RuntimeError("disk on fire")
    except RuntimeError:
        log.exception("report.crashed", report="STATUS.json")
    logging.getLogger("watchdog.observers").warning("inotify %s", "overflow")

    # journal.send() returns after sendmsg(): every datagram is already queued.
    journal.setblocking(False)
    datagrams = []
    while True:
        try:
            data, ancdata, _flags, _addr = journal.recvmsg(1 << 20, 1024)
        except BlockingIOError:
            break
        assert not ancdata, "entry sent as memfd: teach the test to read it"
        datagrams.append(base64.b64encode(data).decode())
    print(json.dumps(datagrams))
    """
)


@pytest.fixture(scope="module")
def private_run() -> list[str]:
    """A command prefix running its argv with a fresh tmpfs on /run, seen by nobody else."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) not installed")
    if os.geteuid() != 0:
        pytest.skip("needs root for `unshare -m` and mount (private journal socket)")
    script = 'mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && exec "$@"'
    prefix = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"private mount namespace not permitted: {probe.stderr.strip()}")
    return prefix


def test_journal_entries_on_the_wire(private_run: list[str], tmp_path: Path) -> None:
    pytest.importorskip("systemd.journal")
    helper = tmp_path / "journal_helper.py"
    helper.write_text(JOURNAL_HELPER)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("JOURNAL_STREAM", None)
    result = subprocess.run(
        [*private_run, sys.executable, str(helper)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # nothing fell back to stderr
    entries = [decode_journal_datagram(base64.b64decode(d)) for d in json.loads(result.stdout)]
    accepted, missing, crashed, third_party = entries

    assert accepted["MESSAGE"] == (
        "report.accepted job=ACME/Lyon/Part-Dieu/sales site=ACME_Lyon_Part-Dieu "
        "status=SUCCESS report=STATUS.json"
    )
    assert accepted["PRIORITY"] == "6"
    assert accepted["SYSLOG_IDENTIFIER"] == "backupwatch"
    assert accepted["JOB"] == "ACME/Lyon/Part-Dieu/sales"
    assert accepted["SITE"] == "ACME_Lyon_Part-Dieu"
    assert accepted["STATUS"] == "SUCCESS"
    assert accepted["REPORT"] == "STATUS.json"
    assert accepted["LOGGER"] == "backupwatch.pipeline"
    assert accepted["CODE_FILE"] == str(helper)
    assert accepted["CODE_FUNC"] == "<module>"
    assert accepted["CODE_LINE"].isdigit()

    assert missing["PRIORITY"] == "4"
    assert missing["STATUS"] == "MISSING"
    assert missing["CYCLE_AT"] == "2024-05-01T02:00:00Z"

    assert crashed["PRIORITY"] == "3"
    assert crashed["REPORT"] == "STATUS.json"
    assert crashed["MESSAGE"].startswith("report.crashed report=STATUS.json\nTraceback")
    assert "RuntimeError: disk on fire" in crashed["TRACEBACK"]

    assert third_party["MESSAGE"] == "inotify overflow"
    assert third_party["PRIORITY"] == "4"
    assert third_party["LOGGER"] == "watchdog.observers"
    assert third_party["SYSLOG_IDENTIFIER"] == "backupwatch"
