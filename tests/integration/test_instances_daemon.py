"""SPEC §15 with real daemons on one PostgreSQL: a failover pair, and hosts with their own sites.

Kept short (a few sites, deadlines put in the past by hand instead of waited for): the whole
module runs in well under 40 s.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy
from daemonkit import Daemon, wait_for
from support import database, drop, job_block, report, stage

pytestmark = pytest.mark.integration

MakeDaemon = Callable[..., Daemon]
BURST = [f"B{n}" for n in range(8)]  # sites that report during the test
WAVE = [f"W{n}" for n in range(6)]  # sites whose deadlines all pass at once
CYCLES = 4  # due cycles per WAVE job


def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def hourly_job(city: str, window: int, minute: int = 0) -> str:
    """HOURLY at `minute`, ±`window` min: with 30, any report time maps to the nearest
    hour's cycle (the burst); with 5, a deadline passes at `minute` + 5 (the wave)."""
    return job_block(
        "ACME",
        city,
        "Centre",
        "sales",
        frequency="HOURLY",
        expected_hour_utc=None,
        expected_minute_utc=minute,
        collection_window_minutes=window,
    )


def scalar(engine: sqlalchemy.Engine, sql: str, **params: object) -> int:
    with engine.connect() as connection:
        return int(connection.execute(sqlalchemy.text(sql), params).scalar_one())


def put_deadlines_in_the_past(engine: sqlalchemy.Engine, first: datetime) -> None:
    """As if the WAVE jobs had been active for hours: CYCLES hourly deadlines are due now."""
    with engine.begin() as connection:
        connection.execute(
            sqlalchemy.text(
                "UPDATE expected_backup_jobs SET activated_at = :activated,"
                " next_cycle_at = :cycle, next_deadline_at = :deadline"
                " WHERE city LIKE 'W%'"
            ),
            {
                "activated": (first - timedelta(minutes=1)).replace(tzinfo=None),
                "cycle": first.replace(tzinfo=None),
                "deadline": (first + timedelta(minutes=5)).replace(tzinfo=None),
            },
        )


def test_a_failover_pair_records_every_report_and_every_missing_once(
    make_daemon: MakeDaemon, postgres_url: str, tmp_path: Path, short_dir: Path
) -> None:
    """Two daemons, one instance, one deposit root: one is SIGKILLed amid a burst of reports
    and a wave of deadlines, then restarted; nothing is lost and nothing is recorded twice."""
    start = now()
    minute = (start.minute + 30) % 60  # no WAVE deadline of its own falls during the test
    jobs = "".join(hourly_job(c, 30) for c in BURST) + "".join(
        hourly_job(c, 5, minute) for c in WAVE
    )
    shared = tmp_path / "shared"
    pair = [
        make_daemon(
            postgres_url,
            jobs,
            base=tmp_path / name,
            control_socket=str(short_dir / name),
            backup_storage_root=str(shared / "deposit"),
            validated_backups_base_path=str(shared / "validated"),
            instance="pair",
        )
        for name in ("a", "b")
    ]
    for daemon in pair:
        daemon.start()
    engine = sqlalchemy.create_engine(postgres_url)
    try:
        # the latest WAVE cycle before now, and the CYCLES - 1 before it, are due
        last = start.replace(minute=minute, second=0)
        last -= timedelta(hours=1) if last > start else timedelta()
        first = last - timedelta(hours=CYCLES - 1)
        put_deadlines_in_the_past(engine, first)
        for city in BURST:
            site = shared / "deposit" / f"ACME_{city}_Centre"
            staged = f"database/sales-{city}.sql.gz"
            stage(site, staged, city.encode())
            body = report(f"ACME_{city}_Centre", now(), {"sales": database(staged, city.encode())})
            drop(site, body)
        victim, survivor = pair
        victim.ctl("reload")  # wakes its timer now rather than within 10 s: it starts the wave
        assert victim.stop(signal.SIGKILL) == -signal.SIGKILL
        survivor.ctl("reload")
        victim.start()

        wait_for(
            lambda: scalar(engine, "SELECT count(*) FROM processed_reports") >= len(BURST),
            timeout=30,
            what="every report processed",
        )
        missing = (
            "SELECT count(*) FROM backup_entries WHERE status = 'MISSING'"
            " AND job_id IN (SELECT id FROM expected_backup_jobs WHERE city LIKE 'W%')"
        )
        wait_for(
            lambda: scalar(engine, missing) >= len(WAVE) * CYCLES,
            timeout=30,
            what="every due cycle flagged",
        )
        for daemon in pair:

            def idle(d: Daemon = daemon) -> bool:
                return bool(d.ctl_json("status")["daemon"]["pending_reports"] == 0)

            wait_for(idle, what="both daemons idle")
        assert [daemon.stop() for daemon in pair] == [0, 0]

        assert scalar(engine, "SELECT count(*) FROM processed_reports") == len(BURST)
        assert scalar(engine, missing) == len(WAVE) * CYCLES
        once = (
            "SELECT count(*) FROM (SELECT job_id, cycle, status FROM backup_entries"
            " GROUP BY job_id, cycle, status HAVING count(*) > 1) AS twice"
        )
        assert scalar(engine, once) == 0
        recorded = (
            "SELECT count(*) FROM backup_entries e JOIN expected_backup_jobs j ON j.id = e.job_id"
            " WHERE j.city LIKE 'B%' AND e.status = 'SUCCESS'"
        )
        assert scalar(engine, recorded) == len(BURST)
        cycles = (
            "SELECT count(DISTINCT e.cycle) FROM backup_entries e"
            " WHERE e.status = 'MISSING' AND e.cycle >= :first AND e.cycle <= :last"
        )
        span = {"first": first.replace(tzinfo=None), "last": last.replace(tzinfo=None)}
        assert scalar(engine, cycles, **span) == CYCLES
        assert scalar(engine, "SELECT count(DISTINCT instance) FROM expected_backup_jobs") == 1
        for city in BURST:
            site = shared / "deposit" / f"ACME_{city}_Centre"
            assert not (site / "STATUS.json").exists()
            assert (site / "_archive" / "STATUS.json").exists()
            assert not (site / "_archive" / "STATUS-2.json").exists()
    finally:
        engine.dispose()


def test_hosts_with_their_own_sites_sync_only_their_own_jobs(
    make_daemon: MakeDaemon, postgres_url: str, tmp_path: Path, short_dir: Path
) -> None:
    east_jobs = job_block("ACME", "Lyon", "Centre", "sales") + job_block(
        "ACME", "Lyon", "Centre", "hr"
    )
    west_jobs = job_block("ACME", "Paris", "Louvre", "sales")
    east, west = (
        make_daemon(
            postgres_url,
            jobs,
            base=tmp_path / name,
            control_socket=str(short_dir / name),
            instance=name,
        )
        for name, jobs in (("east", east_jobs), ("west", west_jobs))
    )
    east.start()
    west.start()

    def seen(daemon: Daemon, *args: str) -> dict[str, tuple[str, bool]]:
        rows = daemon.ctl_json("status", *args)["jobs"]
        return {f"{r['city']}/{r['database_name']}": (r["instance"], r["active"]) for r in rows}

    both = {
        "Lyon/hr": ("east", True),
        "Lyon/sales": ("east", True),
        "Paris/sales": ("west", True),
    }
    assert seen(east) == seen(west) == both
    assert seen(east, "--instance", "west") == {"Paris/sales": ("west", True)}
    assert east.ctl_json("status")["daemon"]["instance"] == "east"
    table = west.ctl("status").stdout
    assert "INSTANCE" in table
    assert "instance west" in table

    # a reload of east with one job left deactivates east's other job, never west's
    (east.base / "jobs.d" / "jobs.toml").write_text(job_block("ACME", "Lyon", "Centre", "sales"))
    reload = east.ctl("reload")
    assert reload.returncode == 0, reload.stderr
    assert "1 deactivated" in reload.stdout
    assert seen(west) == {**both, "Lyon/hr": ("east", False)}
    # west's reload with its own files changes nothing of east's
    assert "0 deactivated" in west.ctl("reload").stdout
    assert seen(east) == {**both, "Lyon/hr": ("east", False)}
    # history and check narrow by instance too
    assert east.ctl("history", "ACME/Paris/Louvre/sales", "--instance", "east").returncode == 1
    history = east.ctl("history", "ACME/Paris/Louvre/sales")
    assert "instance west" in history.stdout
    check = east.ctl("check", "--instance", "west")
    assert check.returncode == 0, check.stdout
    assert "of 1 jobs" in check.stdout, check.stdout
    assert [east.stop(), west.stop()] == [0, 0]


def test_sqlite_refuses_a_second_instance(
    make_daemon: MakeDaemon, tmp_path: Path, short_dir: Path
) -> None:
    url = f"sqlite:///{tmp_path}/shared.db"
    jobs = job_block("ACME", "Lyon", "Centre", "sales")
    first = make_daemon(url, jobs, base=tmp_path / "one", control_socket=str(short_dir / "one"))
    first.start()
    assert first.stop() == 0
    second = make_daemon(
        url, jobs, base=tmp_path / "two", control_socket=str(short_dir / "two"), instance="two"
    )
    second.start(wait_ready=False)
    assert second.process is not None
    assert second.process.wait(30) == 1
    text = second.log_path.read_text()
    assert "an SQLite file serves one host" in text
    assert "instance = " in text
