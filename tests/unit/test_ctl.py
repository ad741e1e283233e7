"""backupwatchctl's offline commands, run in-process through `main(argv)`."""

from __future__ import annotations

import json
import unicodedata
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import database, job_block, report, utc, write_config

from backupwatch import ctl
from backupwatch.config import load_settings
from backupwatch.enums import BackupEntryStatus
from backupwatch.jobs import load_jobs
from backupwatch.names import visible
from backupwatch.store import NewEntry, ProcessedReportRecord, Store
from backupwatch.timeutil import utc_now

JOBS = job_block("ACME", "Lyon", "Part-Dieu", "sales") + job_block(
    "Globex", "Paris", "La-Defense", "erp", frequency="WEEKLY", days_of_week=["MO", "FR"]
)

SALES = "ACME/Lyon/Part-Dieu/sales"
T0 = utc(2026, 11, 24, 0, 0)
NOTE = "entries shown; --limit N or --limit 0 for all"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(
        tmp_path, f"sqlite:///{tmp_path}/db.sqlite", JOBS, control_socket=str(tmp_path / "c.sock")
    )


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = ctl.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_check_config_ok(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--config", str(config), "check-config")
    assert code == 0
    assert "2 jobs, 2 active deposit folders" in out


def test_check_config_reports_every_error(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (config.parent / "jobs.d" / "bad.toml").write_text(
        "[[job]]\ncompany_name = 'A'\ncity = 'B'\nneighborhood = 'C'\ndatabase_name = 'd'\n"
        "expected_hour_utc = 25\nbogus = 1\n"
    )
    code, _, err = run(capsys, "--config", str(config), "check-config")
    assert code == 1
    assert "bad.toml" in err
    assert "expected_hour_utc" in err
    assert "bogus" in err


def test_config_from_environment(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BACKUPWATCH_CONFIG", str(config))
    code, out, _ = run(capsys, "check-config")
    assert code == 0
    assert str(config) in out


def test_jobs_json(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--config", str(config), "jobs", "--json")
    assert code == 0
    jobs = json.loads(out)
    assert [j["database_name"] for j in jobs] == ["sales", "erp"]
    assert jobs[0]["collection_window_minutes"] == 60
    assert jobs[0]["deposit_folder"] == str(config.parent / "deposit" / "ACME_Lyon_Part-Dieu")
    assert jobs[1]["frequency"] == "WEEKLY"


def test_jobs_table(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--config", str(config), "jobs")
    assert code == 0
    assert "DAILY 13:00" in out
    assert "WEEKLY 13:00 MO,FR" in out


def test_status_before_the_daemon_ever_ran(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "--config", str(config), "status", "--json")
    assert code == 3
    assert json.loads(out) == {
        "daemon": {
            "running": False,
            "pid": None,
            "version": None,
            "uptime_s": None,
            "pending_reports": None,
        },
        "jobs": [],
    }
    assert not (config.parent / "db.sqlite").exists()  # ctl never creates the database


def test_history_unknown_job(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "--config", str(config), "history", "ACME/Lyon/Part-Dieu/nope")
    assert code == 1
    assert "unknown job" in err


def test_validate_reports_each_file(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps(report("A", utc_now(), {"db": database("x.gz", b"x")})))
    stale = tmp_path / "stale.json"
    stale.write_text(json.dumps(report("A", utc(2020, 1, 1, 0, 0), {"db": database("x", b"x")})))
    broken = tmp_path / "broken.json"
    broken.write_text('{"databases": ')

    code, out, _ = run(
        capsys,
        "--config",
        str(config),
        "validate",
        str(good),
        str(stale),
        str(broken),
        str(tmp_path / "absent.json"),
    )

    assert code == 1
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    assert lines[str(good)] == "valid"
    assert "older than" in lines[str(stale)]
    assert "not valid JSON" in lines[str(broken)]
    assert "not a regular file" in lines[str(tmp_path / "absent.json")]


def test_validate_without_any_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Agent authors run it on their own machines, where no backupwatch.toml exists."""
    good = tmp_path / "STATUS.json"
    good.write_text(json.dumps(report("A", utc_now(), {"db": database("x.gz", b"x")})))
    code, out, _ = run(capsys, "--config", str(tmp_path / "none.toml"), "validate", str(good))
    assert code == 0
    assert out.strip().endswith("valid")


def test_validate_oversize(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = tmp_path / "big.json"
    with big.open("wb") as sparse:
        sparse.truncate(2 * 1048576)
    code, out, _ = run(capsys, "--config", str(config), "validate", str(big))
    assert code == 1
    assert "over report_max_bytes" in out


# --------------------------------------------------------------------------- history


def record_entries(config: Path, messages: list[str], report_name: str = "STATUS.json") -> None:
    """One FAILED entry per message, an hour apart, each from a report of its own."""
    settings = load_settings(config, {})
    store = Store(settings.database_url)
    try:
        store.migrate()
        store.sync_jobs(load_jobs(settings), 60, T0)
        job = store.find_job(SALES)
        assert job is not None
        for n, message in enumerate(messages):
            sha, at = f"{n:064x}", T0 + timedelta(hours=n)
            entry = NewEntry(
                job.id, at, BackupEntryStatus.FAILED, message, report_name, report_sha256=sha
            )
            store.record_report(
                ProcessedReportRecord(sha, "ACME_Lyon_Part-Dieu", report_name, "accepted"),
                [entry],
                at,
            )
    finally:
        store.dispose()


def history_rows(out: str) -> list[str]:
    """The table's rows: what follows the job line and the header."""
    return [line for line in out.splitlines()[2:] if line and NOTE not in line]


def test_history_shows_the_20_newest_and_says_how_many_were_left_out(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record_entries(config, [f"failure {n}" for n in range(25)])

    code, out, err = run(capsys, "--config", str(config), "history", SALES)

    assert code == 0
    rows = history_rows(out)
    assert len(rows) == 20
    assert "failure 24" in rows[0]
    assert out.splitlines()[-1] == f"20 of 25 {NOTE}"
    assert err == ""


def test_history_limit_0_shows_every_entry(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record_entries(config, [f"failure {n}" for n in range(25)])

    code, out, _ = run(capsys, "--config", str(config), "history", SALES, "--limit", "0")

    assert code == 0
    assert len(history_rows(out)) == 25
    assert NOTE not in out


@pytest.mark.parametrize(("recorded", "limit"), [(20, "20"), (3, "20"), (25, "25")])
def test_history_says_nothing_when_nothing_was_left_out(
    config: Path, capsys: pytest.CaptureFixture[str], recorded: int, limit: str
) -> None:
    record_entries(config, [f"failure {n}" for n in range(recorded)])

    _, out, err = run(capsys, "--config", str(config), "history", SALES, "--limit", limit)

    assert len(history_rows(out)) == recorded
    assert NOTE not in out + err


def test_history_json_stays_a_plain_list_and_says_what_was_left_out_on_stderr(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record_entries(config, [f"failure {n}" for n in range(25)])

    code, out, err = run(capsys, "--config", str(config), "history", SALES, "--json")
    _, everything, quiet = run(
        capsys, "--config", str(config), "history", SALES, "--json", "--limit", "0"
    )

    assert code == 0
    assert [e["message"] for e in json.loads(out)] == [f"failure {n}" for n in range(24, 4, -1)]
    assert err == f"backupwatchctl: 20 of 25 {NOTE}\n"
    assert len(json.loads(everything)) == 25
    assert quiet == ""


def test_history_help_says_the_default_limit(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        ctl.main(["history", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the 20 newest" in text
    assert "0 for all" in text


def test_history_refuses_a_negative_limit(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        ctl.main(["history", SALES, "--limit", "-1"])
    assert exit_.value.code == 2
    assert "0 or more" in capsys.readouterr().err


HOSTILE = "disk full\x1b[2J\x1b]0;owned\x07\nSUCCESS  all good\r\x9b31m\x7f"


def test_history_escapes_what_agents_wrote_and_json_keeps_it_exact(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    record_entries(config, [HOSTILE], report_name="STATUS\n\x1b[31m.json")

    _, out, _ = run(capsys, "--config", str(config), "history", SALES)
    _, as_json, _ = run(capsys, "--config", str(config), "history", SALES, "--json")

    (row,) = history_rows(out)
    assert "disk full\\x1b[2J\\x1b]0;owned\\x07\\nSUCCESS  all good\\r\\x9b31m\\x7f" in row
    assert "STATUS\\n\\x1b[31m.json" in row
    assert not any(unicodedata.category(c) == "Cc" for c in out.replace("\n", ""))
    (entry,) = json.loads(as_json)
    assert entry["message"] == HOSTILE
    assert entry["report"] == "STATUS\n\x1b[31m.json"


def test_validate_escapes_file_names_and_reasons(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hostile = tmp_path / "STATUS\x1b[2J\n.json"
    hostile.write_text('{"agent_id": "\\u001b[31mx", "databases": 1}')

    code, out, _ = run(capsys, "--config", str(tmp_path / "none.toml"), "validate", str(hostile))

    assert code == 1
    assert len(out.splitlines()) == 1
    assert "STATUS\\x1b[2J\\n.json: invalid: " in out
    assert not any(unicodedata.category(c) == "Cc" for c in out.replace("\n", ""))


# --------------------------------------------------------------------------- visible()

CONTROL = {*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0)}


@given(st.text(alphabet=st.characters(codec=None)))
def test_visible_output_holds_no_control_character(text: str) -> None:
    shown = visible(text)
    assert not any(ord(c) in CONTROL for c in shown)
    assert shown.isprintable()
    shown.encode("utf-8")  # lone surrogates (from undecodable file names) are escaped too


@given(
    st.text(alphabet=st.characters(blacklist_categories=["Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"]))
)
def test_visible_keeps_printable_text_unchanged(text: str) -> None:
    text = "".join(c for c in text if c.isprintable())
    assert visible(text) == text


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("a\nb", "a\\nb"),
        ("\x1b[31m", "\\x1b[31m"),
        ("tab\there", "tab\\there"),
        ("\x9b", "\\x9b"),
        ("\x7f", "\\x7f"),
        ("\u202eevil", "\\u202eevil"),
        ("\udcff.gz", "\\udcff.gz"),
        ("Zürich  ä/ü C:\\dumps", "Zürich  ä/ü C:\\dumps"),
    ],
)
def test_visible_examples(raw: str, shown: str) -> None:
    assert visible(raw) == shown


def test_check_config_warns_about_what_it_would_silently_do(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 6 item 10: relative roots resolving somewhere new, job files never read."""
    text = config.read_text()
    config.write_text(text.replace('"deposit"', '"nowhere/deposit"'))
    (config.parent / "jobs.d" / "more.tml").write_text("")

    code, out, err = run(capsys, "--config", str(config), "check-config")

    assert code == 0
    assert "OK" in out
    assert f"backup_storage_root {config.parent}/nowhere/deposit does not exist" in err
    assert "more.tml: not read" in err
