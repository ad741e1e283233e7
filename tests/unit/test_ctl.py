"""backupwatchctl's offline commands, run in-process through `main(argv)`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import database, job_block, report, utc, write_config

from backupwatch import ctl
from backupwatch.timeutil import utc_now

JOBS = job_block("ACME", "Lyon", "Part-Dieu", "sales") + job_block(
    "Globex", "Paris", "La-Defense", "erp", frequency="WEEKLY", days_of_week=["MO", "FR"]
)


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
    with big.open("wb") as out:
        out.truncate(2 * 1048576)
    code, out, _ = run(capsys, "--config", str(config), "validate", str(big))
    assert code == 1
    assert "over report_max_bytes" in out
