"""backupwatchctl against the real daemon: `status` answered over the control socket."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import TypedDict

import pytest
from daemonkit import Daemon
from support import job_block

pytestmark = pytest.mark.integration

MakeDaemon = Callable[..., Daemon]
JOBS = job_block("ACME", "Lyon", "Part-Dieu", "sales") + job_block("ACME", "Lyon", "Vaise", "crm")

PROBE = """
import json, sys
from backupwatch import ctl
code = ctl.main(sys.argv[1:])
heavy = sorted(m for m in ("sqlalchemy", "pydantic", "structlog", "apprise") if m in sys.modules)
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


class Outcome(TypedDict):
    """What PROBE prints: ctl's exit code and the heavy modules it imported."""

    code: int
    heavy: list[str]


def probe(daemon: Daemon, *args: str) -> tuple[Outcome, str, str]:
    """Run the control tool in a fresh interpreter and say which heavy modules it imported."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE, "--config", str(daemon.config), *args],
        env=daemon.env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    *warnings, last = result.stderr.strip().splitlines()
    return json.loads(last), result.stdout, "\n".join(warnings)


def test_status_with_the_daemon_up_imports_neither_sqlalchemy_nor_pydantic(
    make_daemon: MakeDaemon, database_url: str
) -> None:
    daemon = make_daemon(
        database_url, JOBS, extra_toml='[alerts]\nurls = ["json://127.0.0.1:9/hook"]\n'
    )
    daemon.start()

    outcome, out, _ = probe(daemon, "status", "--json")
    assert outcome == {"code": 0, "heavy": []}
    state = json.loads(out)
    assert state["daemon"]["running"] is True
    assert sorted(job["database_name"] for job in state["jobs"]) == ["crm", "sales"]
    assert all(job["next_deadline"].endswith("Z") for job in state["jobs"])

    outcome, out, _ = probe(daemon, "status")
    assert outcome == {"code": 0, "heavy": []}
    assert "ACME/Lyon/Vaise" in out
    outcome, out, _ = probe(daemon, "check")
    assert outcome == {"code": 0, "heavy": []}
    assert out.startswith("BACKUPWATCH OK - 0 of 2 jobs OK, 2 not reported yet |")
    assert daemon.stop() == 0

    outcome, out, _ = probe(daemon, "status", "--json")  # down: the database, read directly
    assert outcome["code"] == 3
    assert "sqlalchemy" in outcome["heavy"]
    assert "apprise" not in outcome["heavy"]  # nothing is sent
    assert len(json.loads(out)["jobs"]) == 2


def test_status_warns_about_errors_in_the_file_the_daemon_runs_from(
    make_daemon: MakeDaemon,
) -> None:
    daemon = make_daemon("sqlite:///db.sqlite", JOBS)
    daemon.start()
    daemon.config.write_text(daemon.config.read_text() + "rescan_intervall_minutes = 5\n")

    outcome, out, err = probe(daemon, "status")

    assert outcome == {"code": 0, "heavy": []}
    assert "warning: the configuration has errors" in err
    assert "rescan_intervall_minutes: unknown key" in err
    assert "ACME/Lyon/Part-Dieu" in out
    assert daemon.stop() == 0
