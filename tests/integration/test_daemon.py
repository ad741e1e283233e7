"""The real daemon, end to end: arrival → verdict, reload, rescan, SIGTERM, daemon down."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import alembic
import pytest
import sqlalchemy
from daemonkit import Daemon, wait_for
from support import PG_URL, TcpProxy, database, drop, job_block, report, stage

import backupwatch
from backupwatch.config import load_settings
from backupwatch.control import call
from backupwatch.jobs import load_jobs
from backupwatch.store import Store

pytestmark = pytest.mark.integration

AGENT = "ACME_Lyon_Part-Dieu"
SALES = "ACME/Lyon/Part-Dieu/sales"


def hourly_jobs(*names: str) -> str:
    """HOURLY jobs with a ±30 min window: any report time maps to the nearest hour's cycle."""
    return "".join(
        job_block(
            "ACME",
            "Lyon",
            "Part-Dieu",
            name,
            frequency="HOURLY",
            expected_hour_utc=None,
            collection_window_minutes=30,
        )
        for name in names
    )


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def good_report(site: Path, name: str = "sales", content: bytes = b"dump") -> dict[str, Any]:
    staged = f"database/{name}-{time.monotonic_ns()}.sql.gz"
    stage(site, staged, content)
    return report(AGENT, now(), {name: database(staged, content)})


def statuses(daemon: Daemon, job: str) -> list[str]:
    return [entry["status"] for entry in daemon.history(job)]


MakeDaemon = Callable[..., Daemon]


def test_arrival_to_verdict(make_daemon: MakeDaemon, database_url: str) -> None:
    daemon = make_daemon(database_url, hourly_jobs("sales", "hr"))
    daemon.start()
    site = daemon.deposit / AGENT
    body = good_report(site)
    body["databases"]["hr"] = database("database/hr.sql.gz", b"hr", sha256="0" * 64)
    stage(site, "database/hr.sql.gz", b"hr")

    drop(site, body)

    wait_for(lambda: statuses(daemon, SALES) == ["SUCCESS"], what="the SUCCESS entry")
    assert statuses(daemon, "ACME/Lyon/Part-Dieu/hr") == ["HASH_MISMATCH"]
    wait_for(lambda: (site / "_archive" / "STATUS.json").exists(), what="the archived report")
    state = daemon.ctl_json("status")
    assert state["daemon"]["running"] is True
    assert daemon.process is not None
    assert state["daemon"]["pid"] == daemon.process.pid
    by_db = {job["database_name"]: job for job in state["jobs"]}
    assert by_db["sales"]["current_status"] == "OK"
    assert by_db["hr"]["current_status"] == "HASH_MISMATCH"
    assert by_db["sales"]["last_success_at"].endswith("Z")
    (entry,) = daemon.history(SALES)
    assert Path(entry["final_path"]).read_bytes() == b"dump"
    assert entry["server_sha256"] == entry["agent_sha256"]
    assert daemon.stop() == 0


def test_reports_waiting_at_start_are_processed_before_ready(
    make_daemon: MakeDaemon, database_url: str
) -> None:
    daemon = make_daemon(database_url, hourly_jobs("sales"))
    site = daemon.deposit / AGENT
    drop(site, good_report(site))

    daemon.start()  # READY=1 only once the waiting report is processed

    assert statuses(daemon, SALES) == ["SUCCESS"]
    assert daemon.stop() == 0


def test_slow_writer_is_processed_once(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon("sqlite:///" + "db.sqlite", hourly_jobs("sales"))
    daemon.start()
    site = daemon.deposit / AGENT
    data = json.dumps(good_report(site)).encode()

    with (site / "STATUS.json").open("wb") as out:  # written in place, in pieces, slowly
        for start in range(0, len(data), 40):
            out.write(data[start : start + 40])
            out.flush()
            time.sleep(0.1)

    wait_for(lambda: (site / "_archive" / "STATUS.json").exists(), what="the archived report")
    assert statuses(daemon, SALES) == ["SUCCESS"]
    assert not (site / "_rejected").exists()
    assert not (site / "_archive" / "STATUS-2.json").exists()
    assert daemon.stop() == 0


def test_report_renamed_into_place_is_processed_once(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon("sqlite:///db.sqlite", hourly_jobs("sales"))
    daemon.start()
    site = daemon.deposit / AGENT

    drop(site, good_report(site), name="report-1.json")

    wait_for(lambda: (site / "_archive" / "report-1.json").exists(), what="the archived report")
    assert statuses(daemon, SALES) == ["SUCCESS"]
    accepted = [e for e in daemon.logs() if e.get("event") == "entry.recorded"]
    assert len(accepted) == 1
    assert daemon.stop() == 0


def test_new_site_folder_is_watched_without_restart(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon("sqlite:///db.sqlite", hourly_jobs("sales"))
    daemon.start()
    site = daemon.deposit / AGENT
    assert not site.exists()

    site.mkdir()
    body = good_report(site)
    (site / "STATUS.json").write_text(json.dumps(body))  # straight after the mkdir

    wait_for(lambda: statuses(daemon, SALES) == ["SUCCESS"], what="the new site's report")
    assert daemon.stop() == 0


def test_bad_report_is_rejected_and_the_daemon_goes_on(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon("sqlite:///db.sqlite", hourly_jobs("sales"))
    site = daemon.deposit / AGENT
    site.mkdir(parents=True)  # watched from the start: the rename into place is seen
    daemon.start()
    outside = daemon.base / "outside.txt"
    outside.write_text("do not touch")

    drop(site, b'{"operation_timestamp": "2026-11-24T13:00:00Z", "databases": ', "bad.json")
    body = good_report(site)
    body["databases"]["sales"]["staged_file_name"] = "../../outside.txt"
    drop(site, body, "traversal.json")

    wait_for(
        lambda: (site / "_rejected" / "bad.json.reason.txt").exists(), what="bad.json rejected"
    )
    wait_for(lambda: (site / "_rejected" / "traversal.json.reason.txt").exists(), what="traversal")
    assert "not valid JSON" in (site / "_rejected" / "bad.json.reason.txt").read_text()
    assert outside.read_text() == "do not touch"
    drop(site, good_report(site))
    wait_for(lambda: statuses(daemon, SALES) == ["SUCCESS"], what="the next good report")
    assert daemon.process is not None
    assert daemon.process.poll() is None
    assert daemon.stop() == 0


def test_reload_by_signal_and_by_ctl(make_daemon: MakeDaemon, database_url: str) -> None:
    daemon = make_daemon(database_url, hourly_jobs("sales"))
    daemon.start()
    jobs_file = daemon.base / "jobs.d" / "jobs.toml"

    jobs_file.write_text(hourly_jobs("sales", "hr"))
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGHUP)
    assert daemon.notify is not None
    daemon.notify.expect("RELOADING=1")
    daemon.notify.expect("READY=1")
    names = {job["database_name"] for job in daemon.ctl_json("status")["jobs"]}
    assert names == {"sales", "hr"}

    jobs_file.write_text(hourly_jobs("sales"))
    result = daemon.ctl("reload")
    assert result.returncode == 0, result.stderr
    assert "0 added, 0 changed, 1 deactivated" in result.stdout

    jobs_file.write_text("[[job]]\ncompany_name = 'ACME'\n")
    result = daemon.ctl("reload")
    assert result.returncode == 1
    assert "city" in result.stderr  # the daemon's error names the missing key
    active = {j["database_name"] for j in daemon.ctl_json("status")["jobs"] if j["active"]}
    assert active == {"sales"}  # the invalid reload changed nothing
    assert daemon.stop() == 0


def test_reload_and_status_say_what_needs_a_restart(
    make_daemon: MakeDaemon, short_dir: Path
) -> None:
    """Issue 6 item 9: after changing database_url or control_socket, reload printed
    '0 added, 0 changed, 0 deactivated' and status silently read the new, empty database."""
    daemon = make_daemon("sqlite:///db.sqlite", hourly_jobs("sales"))
    daemon.start()
    text = daemon.config.read_text()
    daemon.config.write_text(text.replace("db.sqlite", "other.sqlite"))

    result = daemon.ctl("reload")
    assert result.returncode == 0, result.stderr
    assert "database_url changed in the configuration" in result.stderr
    assert "only when restarted" in result.stderr
    status = daemon.ctl("status")
    assert "the running daemon uses the database sqlite:///" in status.stderr
    assert "db.sqlite" in status.stderr
    assert "restart it to apply" in status.stderr

    moved = str(short_dir / "moved.sock")
    daemon.config.write_text(text.replace(str(short_dir / "control.sock"), moved))
    status = daemon.ctl("status")
    assert status.returncode == 3
    assert daemon.process is not None
    assert f"(pid {daemon.process.pid}) is running but does not answer on {moved}" in status.stderr
    daemon.config.write_text(text)
    assert daemon.stop() == 0


def test_rescan_on_demand(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon("sqlite:///db.sqlite", hourly_jobs("sales"))
    daemon.start()

    result = daemon.ctl("rescan")

    assert result.returncode == 0, result.stderr
    assert "reports queued" in result.stdout
    assert any(e.get("event") == "rescan.done" for e in daemon.logs())
    assert daemon.stop() == 0


def test_sigterm_stops_cleanly_and_loses_nothing(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon("sqlite:///db.sqlite", hourly_jobs("sales"))
    daemon.start()
    site = daemon.deposit / AGENT
    for index in range(20):
        drop(site, good_report(site), name=f"burst-{index}.json")

    notify = daemon.notify
    assert notify is not None
    started = time.monotonic()
    assert daemon.process is not None
    daemon.process.send_signal(signal.SIGTERM)
    notify.expect("STOPPING=1")
    code = daemon.stop(signal.SIGTERM)

    assert code == 0
    assert time.monotonic() - started < 10
    daemon.start()  # whatever was not processed before the stop is processed now
    wait_for(lambda: not list(site.glob("burst-*.json")), what="every report processed")
    archived = list((site / "_archive").glob("burst-*.json"))
    assert len(archived) == 20
    assert len(daemon.history(SALES)) == 20
    assert daemon.stop(signal.SIGINT) == 0


def test_ctl_when_daemon_is_down(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon("sqlite:///db.sqlite", hourly_jobs("sales"))
    daemon.start()
    daemon.stop()

    status = daemon.ctl("status")
    assert status.returncode == 3
    assert "not running" in status.stdout
    assert "sales" in status.stdout  # rows still printed, from the database
    state = daemon.ctl_json("status")
    assert state["daemon"] == {
        "running": False,
        "pid": None,
        "version": None,
        "uptime_s": None,
        "pending_reports": None,
    }
    assert state["jobs"][0]["next_deadline"].endswith("Z")
    assert daemon.ctl("reload").returncode == 3
    assert daemon.ctl("rescan").returncode == 3
    assert daemon.ctl("history", SALES).returncode == 0
    assert daemon.ctl("history", "ACME/Lyon/Nowhere/x").returncode == 1


def test_bad_config_exits_1_with_the_key(make_daemon: MakeDaemon) -> None:
    daemon = make_daemon("sqlite:///db.sqlite", hourly_jobs("sales"), report_max_bytes=-1)
    daemon.start(wait_ready=False)
    assert daemon.process is not None
    assert daemon.process.wait(10) == 1
    assert "report_max_bytes" in daemon.log_path.read_text()
    check = daemon.ctl("check-config")
    assert check.returncode == 1
    assert "report_max_bytes" in check.stderr


def test_missing_is_flagged_by_the_timer_within_seconds(make_daemon: MakeDaemon) -> None:
    """A ONCE job whose one-minute window closes 15-75 s after the daemon starts.

    Windows are whole minutes and cycles before a job's activation never count, so the job is
    synced beforehand, activated a minute before this minute's cycle (as if configured
    earlier): the test then waits for this minute's deadline when at least 15 s remain, not for
    the next minute's (60-120 s).
    """
    start = now()
    cycle = start.replace(second=0, microsecond=0)
    if cycle + timedelta(minutes=1) - start < timedelta(seconds=15):
        cycle += timedelta(minutes=1)
    jobs = job_block(
        "ACME",
        "Lyon",
        "Part-Dieu",
        "sales",
        frequency="ONCE",
        expected_date=cycle.date().isoformat(),
        expected_hour_utc=cycle.hour,
        expected_minute_utc=cycle.minute,
        collection_window_minutes=1,
    )
    daemon = make_daemon("sqlite:///db.sqlite", jobs)
    settings = load_settings(daemon.config, {})
    store = Store(settings.database_url)
    try:
        store.migrate()
        store.sync_jobs(load_jobs(settings), 60, cycle - timedelta(minutes=1))
    finally:
        store.dispose()
    daemon.start()
    deadline = cycle + timedelta(minutes=1)

    entries = wait_for(lambda: daemon.history(SALES), timeout=100, what="the MISSING entry")

    assert [e["status"] for e in entries] == ["MISSING"]
    recorded = datetime.fromisoformat(entries[0]["recorded_at"].replace("Z", "+00:00"))
    assert deadline <= recorded + timedelta(seconds=1)
    assert recorded - deadline < timedelta(seconds=5)
    assert daemon.ctl_json("status")["jobs"][0]["next_deadline"] is None
    assert daemon.stop() == 0


def test_database_env_override(make_daemon: MakeDaemon, tmp_path: Path) -> None:
    daemon = make_daemon("sqlite:///db.sqlite", hourly_jobs("sales"))
    daemon.env["BACKUPWATCH_DATABASE_URL"] = f"sqlite:///{tmp_path}/other.db"
    daemon.start()
    assert (tmp_path / "other.db").exists()
    assert not (tmp_path / "db.sqlite").exists()
    assert daemon.stop() == 0
    assert os.environ.get("BACKUPWATCH_DATABASE_URL") is None


def test_postgres_connections_killed_under_the_daemon(
    make_daemon: MakeDaemon, postgres_url: str
) -> None:
    """A database restart drops every connection: the daemon reconnects, nothing is lost."""
    name = f"bwtest_{time.monotonic_ns()}"
    daemon = make_daemon(f"{postgres_url}&application_name={name}", hourly_jobs("sales"))
    daemon.start()
    site = daemon.deposit / AGENT
    drop(site, good_report(site), "first.json")
    wait_for(lambda: len(daemon.history(SALES)) == 1, what="the first entry")

    admin = sqlalchemy.create_engine(PG_URL)
    with admin.begin() as connection:
        killed = connection.execute(
            sqlalchemy.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = :name"
            ),
            {"name": name},
        ).scalar()
    admin.dispose()
    assert killed is not None
    assert killed >= 1

    drop(site, good_report(site), "second.json")
    wait_for(lambda: len(daemon.history(SALES)) == 2, what="the entry after the reconnect")
    assert (site / "_archive" / "second.json").exists()
    assert daemon.process is not None
    assert daemon.process.poll() is None
    assert daemon.stop() == 0


def test_a_database_outage_is_logged_once_and_nothing_is_lost(
    make_daemon: MakeDaemon, postgres_url: str
) -> None:
    """Issue 11 item 10: every pending report logged an error every 5 s of an outage."""
    proxy = TcpProxy(("127.0.0.1", 5432))
    try:
        daemon = make_daemon(proxy.url_for(postgres_url), hourly_jobs("sales"))
        daemon.start()
        site = daemon.deposit / AGENT
        proxy.cut()
        for index in range(10):
            drop(site, good_report(site), f"during-{index}.json")
        wait_for(
            lambda: any(e.get("event") == "database.unreachable" for e in daemon.logs()),
            what="the outage noticed",
        )
        time.sleep(6)  # what this test is about: the retries within the outage stay silent
        proxy.restore()
        wait_for(lambda: len(daemon.history(SALES)) == 10, timeout=30, what="all ten recorded")
        events = [e.get("event") for e in daemon.logs()]
        assert events.count("database.unreachable") == 1
        assert events.count("database.back") == 1
        assert "worker.database_error" not in events
        assert sorted(p.name for p in (site / "_archive").iterdir()) == sorted(
            f"during-{index}.json" for index in range(10)
        )
        assert daemon.stop() == 0
    finally:
        proxy.close()


NOBODY = 65534
AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


def nobody_cannot_run_the_daemon() -> str | None:
    """Why `nobody` cannot run this checkout's daemon, or None if it can.

    The usual cause is a checkout (or its venv) under a folder that no other user may enter,
    such as a home folder of mode 0700: `nobody` then cannot even start the venv's python."""
    probe = subprocess.run(
        [*AS_NOBODY, sys.executable, "-c", "import alembic.command, backupwatch.daemon"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if probe.returncode == 0:
        return None
    needed = [Path(sys.executable).parent]
    needed += [Path(str(module.__file__)).parent for module in (backupwatch, alembic)]
    closed = next((f for p in needed for f in [*reversed(p.parents), p] if _closed(f)), None)
    if closed is None:
        return f"nobody (uid {NOBODY}) cannot import backupwatch: {probe.stderr.strip()[-500:]}"
    return (
        f"nobody (uid {NOBODY}) cannot run this checkout's daemon: {closed} (mode "
        f"{stat.S_IMODE(closed.stat().st_mode):04o}) lets no other user in; run the suite from "
        f"a checkout and venv under folders others may enter, or `chmod o+x {closed}`"
    )


def _closed(folder: Path) -> bool:
    return not folder.stat().st_mode & stat.S_IXOTH


@pytest.mark.skipif(os.geteuid() != 0, reason="running the daemon as another user needs root")
def test_unprivileged_daemon_with_agent_owned_files(
    make_daemon: MakeDaemon, short_dir: Path
) -> None:
    """As in production: the daemon may read agents' files but not write them, so the kernel's
    fs.protected_hardlinks=1 refuses link(2); promotion copies, archiving renames."""
    if Path("/proc/sys/fs/protected_hardlinks").read_text().strip() != "1":
        pytest.skip("fs.protected_hardlinks is not 1 here")
    if reason := nobody_cannot_run_the_daemon():
        pytest.skip(reason)
    base = short_dir / "tree"
    base.mkdir()
    os.chmod(short_dir, 0o755)
    daemon = make_daemon(
        f"sqlite:///{base}/state/db.sqlite",
        hourly_jobs("sales"),
        base=base,
        control_socket=str(base / "run" / "control.sock"),
    )
    for folder in ("state", "validated", "run"):
        (base / folder).mkdir(exist_ok=True)
        os.chown(base / folder, NOBODY, NOBODY)
    site = base / "deposit" / AGENT
    site.mkdir(parents=True)
    os.chmod(site, 0o777)  # in production: the site's group, setgid, shared with the daemon
    body = good_report(site)
    staged = site / body["databases"]["sales"]["staged_file_name"]
    os.chmod(staged, 0o644)  # owned by the "agent" (root here), readable, not writable
    os.chmod(staged.parent, 0o777)

    daemon.start(as_user=AS_NOBODY)
    drop(site, body)

    wait_for(lambda: statuses(daemon, SALES) == ["SUCCESS"], what="the SUCCESS entry")
    (entry,) = daemon.history(SALES)
    final = Path(entry["final_path"])
    assert final.read_bytes() == b"dump"
    assert final.stat().st_uid == NOBODY  # a verified copy, not a link to the agent's inode
    wait_for(lambda: not staged.exists(), what="the staged file removed after the commit")
    assert (site / "_archive" / "STATUS.json").exists()
    assert daemon.stop() == 0


def test_sigterm_with_a_worker_stuck_still_stops_within_10_s(make_daemon: MakeDaemon) -> None:
    """The report in hand cannot finish (the test holds SQLite's write lock): the daemon stops
    on time anyway, and the abandoned report is processed at the next start."""
    daemon = make_daemon("sqlite:///db.sqlite", hourly_jobs("sales"))
    daemon.start()
    site = daemon.deposit / AGENT
    lock = sqlite3.connect(daemon.base / "db.sqlite", timeout=0)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        drop(site, good_report(site))
        socket_path = Path(tomllib.loads(daemon.config.read_text())["control_socket"])
        wait_for(lambda: call(socket_path, "status")["in_hand"], what="a worker holding it")
        started = time.monotonic()
        code = daemon.stop(signal.SIGTERM, timeout=15)
        assert time.monotonic() - started < 10
        assert code == 0
    finally:
        lock.rollback()
        lock.close()
    assert (site / "STATUS.json").exists()  # abandoned, not lost
    daemon.start()
    assert statuses(daemon, SALES) == ["SUCCESS"]
    assert daemon.stop() == 0
