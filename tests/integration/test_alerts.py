"""SPEC §10 against the real daemon: messages that reach a webhook and a mailbox, once."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from daemonkit import Daemon, wait_for
from receivers import Mailbox, Webhook, body_of, mailbox, webhook
from support import database, drop, job_block, report

from backupwatch.config import load_settings
from backupwatch.jobs import load_jobs
from backupwatch.outbox import EventRow, Outbox
from backupwatch.store import Store

pytestmark = pytest.mark.integration

MakeDaemon = Callable[..., Daemon]
AGENT = "ACME_Lyon_Part-Dieu"


@pytest.fixture
def hook() -> Iterator[Webhook]:
    with webhook() as found:
        yield found


@pytest.fixture
def smtp() -> Iterator[Mailbox]:
    with mailbox() as found:
        yield found


def alerts(*urls: str, repeat_hours: int = 0) -> str:
    listed = ", ".join(f'"{url}"' for url in urls)
    return f"[alerts]\nurls = [{listed}]\nrepeat_hours = {repeat_hours}\n"


def hourly(company: str, neighborhood: str, database_name: str = "sales") -> str:
    return job_block(
        company,
        "Lyon",
        neighborhood,
        database_name,
        frequency="HOURLY",
        expected_hour_utc=None,
        collection_window_minutes=30,
    )


def failed_report(daemon: Daemon, agent: str = AGENT, name: str = "STATUS.json") -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    db = database(None, None, transfer=False, error="disk full on the agent")
    drop(daemon.deposit / agent, report(agent, now, {"sales": db}), name)


def events(url: str) -> list[EventRow]:
    store = Store(url, create=False)
    try:
        return Outbox(store).recent(1000)
    finally:
        store.dispose()


def test_a_failure_reaches_the_webhook_and_the_mailbox_once(
    make_daemon: MakeDaemon, database_url: str, hook: Webhook, smtp: Mailbox
) -> None:
    daemon = make_daemon(
        database_url, hourly("ACME", "Part-Dieu"), extra_toml=alerts(hook.url, smtp.url())
    )
    daemon.start()

    failed_report(daemon)

    (sent,) = hook.wait_for(1)
    assert sent["title"] == "backupwatch: FAILED: ACME/Lyon/Part-Dieu/sales"
    assert "disk full on the agent" in sent["message"]
    (mail,) = smtp.wait_for(1)
    assert "backupwatchctl history ACME/Lyon/Part-Dieu/sales" in body_of(mail)
    wait_for(lambda: daemon.ctl_json("status")["daemon"] is not None, what="status")
    assert daemon.stop() == 0
    assert len(hook.received) == len(smtp.received) == 1


def test_a_restart_after_three_days_down_sends_one_catch_up_message(
    make_daemon: MakeDaemon, database_url: str, hook: Webhook
) -> None:
    """200 daily jobs last seen three days ago: 600 MISSING, 200 events, one message."""
    jobs = "".join(job_block("ACME", "Lyon", f"N{n:03d}", "sales") for n in range(200))
    daemon = make_daemon(
        database_url, jobs, extra_toml=alerts(hook.url), max_status_file_age_days=4
    )
    settings = load_settings(daemon.config, {})
    store = Store(settings.database_url)
    store.migrate()
    last_seen = datetime.now(UTC) - timedelta(days=3, hours=1)
    store.sync_jobs(load_jobs(settings), 60, last_seen)  # what the daemon wrote back then
    store.dispose()

    daemon.start()

    (sent,) = hook.wait_for(1, timeout=60)
    assert sent["title"] == "backupwatch: 200 alerts (200 MISSING)"
    assert sent["message"].startswith("Catch-up after the daemon was down or busy:")
    assert "ACME (200)" in sent["message"]
    assert daemon.stop() == 0
    assert len(hook.received) == 1
    assert sum(len(daemon.history(f"ACME/Lyon/N{n:03d}/sales")) for n in (0, 99)) == 6


def test_a_daemon_killed_between_claim_and_send_delivers_once_after_a_restart(
    make_daemon: MakeDaemon, hook: Webhook
) -> None:
    daemon = make_daemon(
        "sqlite:///db.sqlite", hourly("ACME", "Part-Dieu"), extra_toml=alerts(hook.url)
    )
    daemon.start()
    hook.mode = "hang"  # the daemon connects; the request is never read: nothing is received
    failed_report(daemon)
    assert hook.connected.wait(30)

    daemon.stop(signal.SIGKILL)
    assert hook.received == []
    hook.mode = "ok"
    daemon.start()

    hook.wait_for(1)
    url = f"sqlite:///{daemon.base}/db.sqlite"
    wait_for(lambda: events(url)[0].deliveries[0].state == "sent", what="the delivery recorded")
    assert daemon.stop() == 0
    assert len(hook.received) == 1


def test_a_daemon_killed_after_sending_resends_at_most_once(
    make_daemon: MakeDaemon, hook: Webhook
) -> None:
    """The one case of at-least-once: the receiver had the message, the record was lost."""
    daemon = make_daemon(
        "sqlite:///db.sqlite", hourly("ACME", "Part-Dieu"), extra_toml=alerts(hook.url)
    )
    daemon.start()
    hook.mode = "read-then-hang"  # received, but the daemon never learns it was
    failed_report(daemon)
    hook.wait_for(1)

    daemon.stop(signal.SIGKILL)
    hook.mode = "ok"
    daemon.start()

    hook.wait_for(2)
    url = f"sqlite:///{daemon.base}/db.sqlite"
    wait_for(lambda: events(url)[0].deliveries[0].state == "sent", what="the delivery recorded")
    assert daemon.stop() == 0
    assert hook.titles() == ["backupwatch: FAILED: ACME/Lyon/Part-Dieu/sales"] * 2


def test_two_daemons_on_one_database_deliver_each_event_once(
    make_daemon: MakeDaemon, postgres_url: str, hook: Webhook, tmp_path: Path
) -> None:
    """A failover pair (SPEC §15): one deposit root, one database, two daemons delivering."""
    jobs = "".join(hourly("ACME", f"N{n}") for n in range(8))
    first = make_daemon(postgres_url, jobs, extra_toml=alerts(hook.url))
    second = make_daemon(
        postgres_url,
        jobs,
        base=tmp_path / "second",
        extra_toml=alerts(hook.url),
        backup_storage_root=str(first.deposit),
        validated_backups_base_path=str(first.validated),
        control_socket=str(first.run_dir / "second.sock"),
    )
    first.start()
    second.start()

    for n in range(8):
        failed_report(first, agent=f"ACME_Lyon_N{n}")

    def carried() -> int:
        return sum(_count(body) for body in hook.received)

    wait_for(lambda: carried() >= 8, timeout=30, what="eight events delivered")
    wait_for(
        lambda: all(d.state == "sent" for e in events(postgres_url) for d in e.deliveries),
        what="every delivery recorded",
    )
    assert first.stop() == 0
    assert second.stop() == 0
    assert carried() == 8
    lines = [line for body in hook.received for line in body["message"].splitlines()]
    sites = sorted(
        line.split("/")[2].split(":")[0]
        for line in lines
        if line.startswith(("  ACME/Lyon/N", "Job: ACME/Lyon/N"))
    )
    assert sites == [f"N{n}" for n in range(8)]


def _count(body: dict[str, object]) -> int:
    title = str(body["title"])
    if " alerts (" in title:
        return int(title.split(": ")[1].split(" ")[0])
    return 1
