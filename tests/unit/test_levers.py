"""SPEC §11's levers in-process: check's verdicts, pause/resume/ack, rejected/retry, alerts."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from support import World, job_block, utc

from backupwatch import ctl
from backupwatch.check import CRITICAL, OK, UNKNOWN, WARNING, Filters, conditions, judge
from backupwatch.ctl_ops import duration
from backupwatch.rejected import REASON_SUFFIX, NotRejected, reject_into, retry

SALES = "ACME/Lyon/Part-Dieu/sales"
JOBS = job_block("ACME", "Lyon", "Part-Dieu", "sales") + job_block(
    "ACME", "Lyon", "Part-Dieu", "hr"
)


def row(database: str = "sales", status: str = "OK", **extra: Any) -> dict[str, Any]:
    return {
        "id": 1,
        "company_name": "ACME",
        "city": "Lyon",
        "neighborhood": "Part-Dieu",
        "database_name": database,
        "active": True,
        "current_status": status,
        "paused": False,
        "unchanged": False,
        **extra,
    }


def perfdata(line: str) -> dict[str, int]:
    """As a Nagios plugin's output is read: text | label=value[;...] ..."""
    _, _, perf = line.partition("|")
    return {k: int(v.split(";")[0]) for k, v in (item.split("=") for item in perf.split())}


def test_check_ok_with_performance_data() -> None:
    verdict = judge([row(), row("hr", "UNKNOWN")], True, [], Filters())
    assert verdict.code == OK
    assert verdict.line.startswith("BACKUPWATCH OK - 1 of 2 jobs OK, 1 not reported yet | ")
    assert perfdata(verdict.line)["ok"] == 1
    assert perfdata(verdict.line)["unknown"] == 1
    assert "\n" not in verdict.line


def test_check_critical_names_the_problems() -> None:
    verdict = judge([row(), row("hr", "MISSING")], True, [], Filters())
    assert verdict.code == CRITICAL
    assert verdict.line.startswith(
        "BACKUPWATCH CRITICAL - 1 problem(s): ACME/Lyon/Part-Dieu/hr MISSING |"
    )
    assert perfdata(verdict.line)["missing"] == 1


def test_check_warning_for_an_unchanged_backup_and_for_rejections() -> None:
    assert judge([row(unchanged=True)], True, [], Filters()).code == WARNING
    verdict = judge([row()], True, [("ACME", "ACME/Lyon/Part-Dieu")], Filters())
    assert verdict.code == WARNING
    assert perfdata(verdict.line)["rejected"] == 1
    elsewhere = judge(
        [row()], True, [("ACME", "ACME/Paris/X")], Filters(site="ACME/Lyon/Part-Dieu")
    )
    assert elsewhere.code == OK


def test_check_daemon_down_is_critical_and_paused_jobs_are_not_judged() -> None:
    verdict = judge([row(status="MISSING", paused=True)], False, [], Filters())
    assert verdict.code == CRITICAL
    assert "backupwatchd is not running" in verdict.line
    assert perfdata(verdict.line)["paused"] == 1
    assert judge([row(status="MISSING", paused=True)], True, [], Filters()).code == OK


def test_check_lists_can_be_overridden_and_filtered() -> None:
    rows = [row(), row("hr", "MISSING")]
    assert (
        judge(rows, True, [], Filters(), warning=frozenset({"MISSING"}), critical=frozenset()).code
        == WARNING
    )
    assert judge(rows, True, [], Filters(job=SALES)).code == OK
    assert judge(rows, True, [], Filters(company="Globex")).code == OK
    with pytest.raises(ValueError, match="LATE"):
        conditions("MISSING,late")


def test_durations() -> None:
    assert duration("2h") == timedelta(hours=2)
    assert duration("3d") == timedelta(days=3)
    assert duration("1d12h") == timedelta(days=1, hours=12)
    for bad in ("", "2", "h", "2x", "-1h", "0m"):
        with pytest.raises(ValueError, match="duration"):
            duration(bad)


# --------------------------------------------------------------------------- through main()


@pytest.fixture
def world(tmp_path: Path, database_url: str) -> World:
    return World.create(tmp_path, database_url, JOBS, utc(2026, 11, 24))


def run(capsys: pytest.CaptureFixture[str], w: World, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # what the in-process timer logged before
    code = ctl.main(["--config", str(w.settings.config_path), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_pause_resume_and_ack_from_the_control_tool(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys, world, "pause", "ACME/Lyon/Part-Dieu", "--for", "2h", "--reason", "move"
    )
    assert code == 0
    assert out.count("paused ACME/Lyon/Part-Dieu/") == 2
    code, out, _ = run(capsys, world, "status", "--json")
    jobs = json.loads(out)["jobs"]
    assert all(job["paused"] and job["pause_reason"] == "move" for job in jobs)
    code, out, _ = run(capsys, world, "status")
    assert "PAUSED until " in out

    code, out, _ = run(capsys, world, "resume", SALES)
    assert (code, out.strip()) == (0, "resumed 1 of 1 job(s); the others were not paused")
    code, out, _ = run(capsys, world, "ack", SALES, "--reason", "known")
    assert code == 0
    assert "nothing to acknowledge" in out  # never reported: UNKNOWN
    code, _, err = run(capsys, world, "pause", "ACME/Lyon/Nowhere")
    assert code == 1
    assert "unknown job or site" in err
    code, _, err = run(capsys, world, "ack", "ACME/Lyon/Part-Dieu/nope")
    assert code == 1


def test_the_timer_never_flags_a_job_paused_after_it_read_the_job(world: World) -> None:
    """The race of SPEC §11: the timer read the job, then a pause committed, then it settles."""
    (job, *_) = world.store.due_jobs(utc(2026, 11, 24, 14, 1))
    world.store.pause([job.id], utc(2026, 11, 24, 14, 0, 30), None, None)
    assert world.store.settle_jobs([job], utc(2026, 11, 24, 14, 1), utc(2026, 11, 23)) == {}
    found = world.store.find_job(job.label)
    assert found is not None
    assert found.next_deadline_at is not None
    assert found.next_deadline_at > utc(2026, 11, 25)


def test_rejected_lists_reports_with_their_reasons_escaped(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    site = world.site("ACME_Lyon_Part-Dieu")
    site.mkdir(parents=True)
    evil = site / "evil\x1b[31m.json"
    evil.write_text("x")
    reject_into(evil, site, "ACME_Lyon_Part-Dieu/evil\\x1b[31m.json", "not valid JSON")
    world.store.sync_jobs([], 60, utc(2026, 11, 24))  # inactive jobs still name their folders

    code, out, _ = run(capsys, world, "rejected")
    assert code == 0
    assert "\x1b" not in out
    assert "evil\\x1b[31m.json" in out
    assert "not valid JSON" in out
    code, out, _ = run(capsys, world, "rejected", "--json", "--site", "ACME/Lyon/Part-Dieu")
    (found,) = json.loads(out)
    assert found["path"] == str(site / "_rejected" / "evil\x1b[31m.json")
    assert found["site"] == "ACME/Lyon/Part-Dieu"


def test_retry_puts_a_report_back_under_its_original_name(tmp_path: Path) -> None:
    root = tmp_path / "deposit"
    site = root / "ACME_Lyon_Part-Dieu"
    (site / "log").mkdir(parents=True)
    report = site / "log" / "STATUS.json"
    report.write_text("{}")
    (site / "_rejected").mkdir()
    (site / "_rejected" / "STATUS.json").write_text("taken")  # so this one is STATUS-2.json
    (site / "_rejected" / ("STATUS.json" + REASON_SUFFIX)).write_text("x was rejected: y\n")
    moved = reject_into(report, site, "ACME_Lyon_Part-Dieu/log/STATUS.json", "too old")
    assert moved.name == "STATUS-2.json"

    back = retry(root, moved)

    assert back == report
    assert report.read_text() == "{}"
    assert not (site / "_rejected" / ("STATUS-2.json" + REASON_SUFFIX)).exists()


def test_retry_refuses_what_is_not_a_rejected_report(tmp_path: Path) -> None:
    root = tmp_path / "deposit"
    site = root / "S"
    (site / "_rejected").mkdir(parents=True)
    plain = site / "STATUS.json"
    plain.write_text("{}")
    bare = site / "_rejected" / "bare.json"
    bare.write_text("{}")
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    link = site / "_rejected" / "link.json"
    link.symlink_to(outside)
    (site / "_rejected" / ("link.json" + REASON_SUFFIX)).write_text("S/link.json was rejected: x")
    trap = root / "T"
    trap.mkdir()
    (trap / "_rejected").symlink_to(site / "_rejected")

    for path, why in [
        (plain, "not a report in a _rejected/ folder"),
        (bare, "no reason file"),
        (link, "not a regular file"),
        (site / "_rejected" / "link.json.reason.txt", "not a report in a _rejected/ folder"),
        (trap / "_rejected" / "bare.json", "symlink"),
        (tmp_path / "_rejected" / "x.json", "not under backup_storage_root"),
    ]:
        with pytest.raises(NotRejected, match=why):
            retry(root, path)
    assert outside.read_text() == "secret"
    assert link.is_symlink()


def test_retry_never_replaces_a_file(tmp_path: Path) -> None:
    root = tmp_path / "deposit"
    site = root / "S"
    site.mkdir(parents=True)
    report = site / "STATUS.json"
    report.write_text("old")
    moved = reject_into(report, site, "S/STATUS.json", "bad")
    report.write_text("a newer report")
    with pytest.raises(NotRejected, match="exists"):
        retry(root, moved)
    assert report.read_text() == "a newer report"
    assert moved.exists()


def test_retry_through_the_control_tool_exits_1_for_a_bad_file(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    site = world.site("ACME_Lyon_Part-Dieu")
    site.mkdir(parents=True)
    report = site / "STATUS.json"
    report.write_text("{}")
    moved = reject_into(report, site, "ACME_Lyon_Part-Dieu/STATUS.json", "bad")
    code, out, _ = run(capsys, world, "retry", str(moved), str(site / "nope.json"))
    assert code == 1
    assert f"{moved}: back as {report}" in out
    assert "nope.json: not a rejected report" in out
    assert os.path.exists(report)


def test_check_through_main_reads_the_database_when_the_daemon_is_down(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    world.tick(utc(2026, 11, 24, 14, 1))
    code, out, _ = run(capsys, world, "check", "--company", "ACME")
    assert code == CRITICAL
    assert out.startswith("BACKUPWATCH CRITICAL - 3 problem(s): backupwatchd is not running, ")
    assert perfdata(out)["missing"] == 2
    code, out, _ = run(capsys, world, "check", "--job", "ACME/Lyon/Nowhere/x")
    assert code == UNKNOWN
    code, out, _ = run(capsys, world, "check", "--warning", "LATE")
    assert (code, out.split(" - ")[0]) == (UNKNOWN, "BACKUPWATCH UNKNOWN")


def test_alerts_lists_events_and_deliveries(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    world.tick(utc(2026, 11, 24, 14, 1))
    code, out, _ = run(capsys, world, "alerts", "--json")
    assert code == 0
    events = json.loads(out)
    assert sorted(e["job"] for e in events) == ["ACME/Lyon/Part-Dieu/hr", SALES]
    assert all(e["kind"] == "MISSING" and e["deliveries"] == [] for e in events)
    code, out, _ = run(capsys, world, "alerts")
    assert "MISSING" in out
    code, _, err = run(capsys, world, "alert-test")
    assert code == 1
    assert "no alert channel has URLs" in err
