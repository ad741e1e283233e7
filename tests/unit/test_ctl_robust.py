"""backupwatchctl never prints a traceback and is not blinded by a typo (SPEC §11, issue 7)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import job_block, write_config

from backupwatch import ctl

BIN = Path(sys.executable).parent
JOBS = job_block("ACME", "Lyon", "Part-Dieu", "sales")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    return write_config(
        tmp_path, f"sqlite:///{tmp_path}/db.sqlite", JOBS, control_socket=str(tmp_path / "c.sock")
    )


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = ctl.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def migrated(config: Path) -> None:
    """The database as a daemon leaves it: schema at head, the jobs synced."""
    from backupwatch.config import load_settings
    from backupwatch.jobs import load_jobs
    from backupwatch.store import Store
    from backupwatch.timeutil import utc_now

    settings = load_settings(config, {})
    store = Store(settings.database_url)
    store.migrate()
    store.sync_jobs(load_jobs(settings), 60, utc_now())
    store.dispose()


def test_config_is_accepted_after_the_command(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "check-config", "--config", str(config))
    assert code == 0
    assert str(config) in out
    code, out, _ = run(capsys, "jobs", "--json", "--config", str(config))
    assert code == 0
    assert json.loads(out)[0]["database_name"] == "sales"


def test_a_config_given_before_the_command_is_kept(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "--config", str(config), "check-config")
    assert code == 0
    assert str(config) in out


def test_a_typo_in_the_config_is_a_warning_and_status_and_history_still_work(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    migrated(config)
    config.write_text(config.read_text() + "rescan_interval_minuts = 5\nreport_max_bytes = 'x'\n")

    code, out, err = run(capsys, "--config", str(config), "status", "--json")
    assert code == 3  # the daemon is down; the rows come from the database all the same
    assert [job["database_name"] for job in json.loads(out)["jobs"]] == ["sales"]
    assert "warning: the configuration has errors" in err
    assert "rescan_interval_minuts: unknown key" in err
    assert "report_max_bytes" in err

    code, out, err = run(capsys, "--config", str(config), "history", "ACME/Lyon/Part-Dieu/sales")
    assert code == 0
    assert "ACME/Lyon/Part-Dieu/sales" in out
    assert "warning" in err

    code, _, err = run(capsys, "--config", str(config), "check-config")
    assert code == 1  # check-config alone stays strict
    assert "rescan_interval_minuts" in err


def test_a_bad_database_url_stops_the_commands_that_need_it(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config.write_text(config.read_text().replace("sqlite:///", "nosuchdb:///"))
    code, out, err = run(capsys, "--config", str(config), "history", "1")
    assert code == 1
    assert "database_url" in err
    assert "Traceback" not in err + out


def test_jobs_shows_the_valid_jobs_and_warns_about_the_others(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (config.parent / "jobs.d" / "zz-bad.toml").write_text(
        job_block("ACME", "Lyon", "Vaise", "crm", expected_hour_utc=25)
    )
    code, out, err = run(capsys, "--config", str(config), "jobs", "--json")
    assert code == 0
    assert [job["database_name"] for job in json.loads(out)] == ["sales"]
    assert "zz-bad.toml" in err
    assert "expected_hour_utc" in err


def test_an_unreachable_database_is_one_line(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "postgresql+psycopg2://postgres@127.0.0.1:1/test"
    config.write_text(config.read_text().replace(f"sqlite:///{config.parent}/db.sqlite", url))
    code, out, err = run(capsys, "--config", str(config), "history", "ACME/Lyon/Part-Dieu/sales")
    assert code == 1
    assert err.startswith("backupwatchctl: cannot read the database: ")
    assert len(err.strip().splitlines()) == 1
    assert out == ""


@pytest.mark.parametrize("command", [["status"], ["jobs"], ["history", "1", "--limit", "0"]])
def test_a_closed_pipe_ends_quietly(config: Path, command: list[str]) -> None:
    """`backupwatchctl status | head`: the reader is gone before anything is written."""
    migrated(config)
    (config.parent / "jobs.d" / "jobs.toml").write_text(
        "".join(job_block("ACME", "Lyon", f"N{n}", "sales") for n in range(300))
    )
    migrated(config)
    read, write = os.pipe()
    os.close(read)
    result = subprocess.run(
        [str(BIN / "backupwatchctl"), "--config", str(config), *command],
        stdout=write,
        stderr=subprocess.PIPE,
        text=True,
        check=False,
        timeout=60,
    )
    os.close(write)
    assert result.stderr == ""
    assert result.returncode == ctl.EXIT_CLOSED_PIPE


def test_an_unexpected_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.unexpected(KeyError("x")) == "unexpected error: KeyError: 'x'"
    assert ctl.unexpected(PermissionError(13, "Permission denied", "/etc/x")) == (
        "Permission denied (/etc/x)"
    )


def test_backupwatchd_lists_the_valid_log_levels() -> None:
    result = subprocess.run(
        [str(BIN / "backupwatchd"), "--log-level", "verbose"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 2
    assert "DEBUG" in result.stderr
    assert "WARNING" in result.stderr
    assert "Traceback" not in result.stderr
