"""SPEC §11 against the real daemon: check's exit codes, pause/resume/ack, rejected/retry."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest
from daemonkit import Daemon, wait_for
from receivers import Webhook, webhook
from support import PG_URL, TcpProxy, database, drop, job_block, report, stage

from backupwatch.config import load_settings
from backupwatch.jobs import load_jobs
from backupwatch.store import Store

pytestmark = pytest.mark.integration

MakeDaemon = Callable[..., Daemon]
AGENT = "ACME_Lyon_Part-Dieu"
SALES = "ACME/Lyon/Part-Dieu/sales"


def hourly(neighborhood: str, database_name: str = "sales") -> str:
    return job_block(
        "ACME",
        "Lyon",
        neighborhood,
        database_name,
        frequency="HOURLY",
        expected_hour_utc=None,
        collection_window_minutes=30,
    )


@pytest.fixture
def hook() -> Iterator[Webhook]:
    with webhook() as found:
        yield found


def nagios(daemon: Daemon, *args: str) -> tuple[int, str, dict[str, int]]:
    """Run the plugin as Nagios does: the exit code, the text before `|`, the perfdata."""
    result = daemon.ctl("check", *args)
    first = result.stdout.splitlines()[0]
    text, _, perf = first.partition("|")
    values = {k: int(v.split(";")[0]) for k, v in (item.split("=", 1) for item in perf.split())}
    assert result.returncode in (0, 1, 2, 3)
    assert "Traceback" not in result.stderr
    return result.returncode, text.strip(), values


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def send(daemon: Daemon, agent: str = AGENT, ok: bool = True, name: str = "STATUS.json") -> None:
    site = daemon.deposit / agent
    if ok:
        staged = f"database/sales-{time.monotonic_ns()}.gz"
        stage(site, staged, f"dump {time.monotonic_ns()}".encode())
        db = database(staged, (site / staged).read_bytes())
    else:
        db = database(None, None, transfer=False, error="disk full")
    drop(site, report(agent, now(), {"sales": db}), name)


def test_check_exit_codes_against_the_real_daemon(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon("sqlite:///db.sqlite", hourly("Part-Dieu") + hourly("Vaise"))
    daemon.start()
    send(daemon)
    send(daemon, "ACME_Lyon_Vaise")
    wait_for(lambda: len(daemon.history("ACME/Lyon/Vaise/sales")) == 1, what="both reports")

    code, text, perf = nagios(daemon)
    assert (code, text) == (0, "BACKUPWATCH OK - 2 of 2 jobs OK")
    assert perf["ok"] == 2
    assert perf["missing"] == perf["failed"] == 0

    drop(daemon.deposit / "ACME_Lyon_Vaise", b"{not json", "broken.json")
    wait_for(lambda: nagios(daemon)[0] == 1, what="the rejection seen by check")
    code, text, perf = nagios(daemon)
    assert text.startswith("BACKUPWATCH WARNING - 1 problem(s): 1 site(s) rejected reports")
    assert perf["rejected"] == 1
    assert nagios(daemon, "--site", "ACME/Lyon/Part-Dieu")[0] == 0
    assert nagios(daemon, "--warning", "MISSING")[0] == 0  # REJECTED no longer a warning

    send(daemon, ok=False, name="second.json")
    wait_for(lambda: nagios(daemon)[0] == 2, what="the FAILED job seen by check")
    code, text, perf = nagios(daemon, "--job", SALES)
    assert text.startswith(f"BACKUPWATCH CRITICAL - 1 problem(s): {SALES} FAILED")
    assert perf["failed"] == 1
    assert nagios(daemon, "--job", "ACME/Lyon/Vaise/sales", "--warning", "MISSING")[0] == 0

    assert daemon.stop() == 0
    code, text, _ = nagios(daemon)
    assert code == 2
    assert text.startswith("BACKUPWATCH CRITICAL - 3 problem(s): backupwatchd is not running, ")


def test_check_is_unknown_when_the_database_cannot_be_read(
    make_daemon: MakeDaemon, postgres_url: str
) -> None:
    proxy = TcpProxy(("127.0.0.1", 5432))
    try:
        daemon = make_daemon(proxy.url_for(postgres_url), hourly("Part-Dieu"))
        assert "127.0.0.1:5432" in PG_URL
        daemon.start()
        assert nagios(daemon)[0] == 0  # UNKNOWN job: nothing wrong yet

        proxy.cut()
        code, text, _ = nagios(daemon)
        assert code == 3
        assert text.startswith("BACKUPWATCH UNKNOWN - cannot read the database")
        proxy.restore()
        wait_for(lambda: nagios(daemon)[0] == 0, timeout=30, what="the database back")
        assert daemon.stop() == 0
    finally:
        proxy.close()


def test_pause_resume_expiry_and_ack_against_the_real_daemon(
    make_daemon: MakeDaemon, database_url: str, hook: Webhook
) -> None:
    """Two hourly jobs last seen three hours ago; one is paused before the daemon starts."""
    jobs = hourly("Part-Dieu") + hourly("Vaise")
    daemon = make_daemon(
        database_url, jobs, extra_toml=f'[alerts]\nurls = ["{hook.url}"]\nrepeat_hours = 0\n'
    )
    settings = load_settings(daemon.config, {})
    store = Store(settings.database_url)
    store.migrate()
    store.sync_jobs(load_jobs(settings), 60, datetime.now(UTC) - timedelta(hours=3))
    store.dispose()
    paused = daemon.ctl("pause", "ACME/Lyon/Vaise", "--reason", "site closed")
    assert paused.returncode == 0, paused.stderr

    daemon.start()  # the catch-up: MISSING for Part-Dieu only

    (sent,) = hook.wait_for(1)
    assert sent["title"] == f"backupwatch: MISSING: {SALES}"
    assert daemon.history("ACME/Lyon/Vaise/sales") == []
    state = {job["neighborhood"]: job for job in daemon.ctl_json("status")["jobs"]}
    assert state["Vaise"]["paused"] is True
    assert state["Vaise"]["pause_reason"] == "site closed"
    assert "PAUSED until resumed" in daemon.ctl("status").stdout
    assert nagios(daemon)[2]["paused"] == 1

    assert daemon.ctl("resume", "ACME/Lyon/Vaise").returncode == 0
    assert daemon.ctl_json("status")["jobs"][1]["paused"] is False
    assert daemon.ctl("pause", "ACME/Lyon/Vaise/sales", "--for", "1s").returncode == 0
    wait_for(lambda: not daemon.ctl_json("status")["jobs"][1]["paused"], what="the pause to expire")
    assert daemon.history("ACME/Lyon/Vaise/sales") == []  # the paused cycles stay unexpected

    acked = daemon.ctl("ack", SALES, "--reason", "agent reinstalled tonight")
    assert acked.returncode == 0
    assert "acknowledged" in acked.stdout
    assert "MISSING (acknowledged)" in daemon.ctl("status").stdout
    assert daemon.stop() == 0
    assert len(hook.received) == 1


def test_rejected_and_retry_against_the_real_daemon(make_daemon: MakeDaemon) -> None:
    """A site sends before its job exists: rejected; the job is added; retry: accepted."""
    daemon = make_daemon("sqlite:///db.sqlite", hourly("Part-Dieu"))
    daemon.start()
    send(daemon, "ACME_Lyon_Vaise")
    rejected = daemon.deposit / "ACME_Lyon_Vaise" / "_rejected" / "STATUS.json"
    wait_for(lambda: rejected.with_name("STATUS.json.reason.txt").exists(), what="the rejection")

    listing = daemon.ctl("rejected", "--json")
    assert listing.returncode == 0
    (found,) = json.loads(listing.stdout)
    assert found["path"] == str(rejected)
    assert "no active job uses" in found["reason"]
    assert "no active job uses" in daemon.ctl("rejected").stdout

    (daemon.base / "jobs.d" / "jobs.toml").write_text(hourly("Part-Dieu") + hourly("Vaise"))
    assert daemon.ctl("reload").returncode == 0
    bad = daemon.ctl("retry", str(rejected.with_name("STATUS.json.reason.txt")))
    assert bad.returncode == 1
    assert "not a rejected report" in bad.stdout
    retried = daemon.ctl("retry", str(rejected))
    assert retried.returncode == 0, retried.stdout

    wait_for(
        lambda: [e["status"] for e in daemon.history("ACME/Lyon/Vaise/sales")] == ["SUCCESS"],
        what="the retried report accepted",
    )
    assert json.loads(daemon.ctl("rejected", "--json").stdout) == []
    assert daemon.stop() == 0
