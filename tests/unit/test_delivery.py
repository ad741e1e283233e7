"""SPEC §10's delivery loop, driven in-process with an injected clock, to real receivers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from receivers import Mailbox, Webhook, body_of, mailbox, webhook
from support import World, database, drop, job_block, report, utc

from backupwatch.config import load_settings
from backupwatch.delivery import DeliveryLoop
from backupwatch.outbox import Outbox
from backupwatch.store import Store

ACTIVATED = utc(2026, 11, 24, 0, 0)
AGENT = "ACME_Lyon_Part-Dieu"
SALES = "ACME/Lyon/Part-Dieu/sales"
MINUTE = timedelta(minutes=1)


def at(day: int, hour: int = 13, minute: int = 0) -> datetime:
    return ACTIVATED + timedelta(days=day, hours=hour, minutes=minute)


@pytest.fixture
def hook() -> Iterator[Webhook]:
    with webhook() as found:
        yield found


@pytest.fixture
def smtp() -> Iterator[Mailbox]:
    with mailbox() as found:
        yield found


def alerts_toml(*urls: str, **keys: object) -> str:
    lines = ["[alerts]", "urls = [" + ", ".join(f'"{u}"' for u in urls) + "]"]
    lines += [f"{key} = {value}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def world(tmp_path: Path, url: str, jobs: str, alerts: str, **overrides: object) -> World:
    w = World.create(tmp_path, url, jobs, ACTIVATED, extra_toml=alerts, **overrides)
    w.store.routing = w.settings.alerts.routing()
    return w


def loop(w: World, me: str = "test:1:a") -> DeliveryLoop:
    settings = load_settings(w.settings.config_path, {})
    return DeliveryLoop(w.store, lambda: at(9), settings.alerts, me=me)


def sites(count: int, company: str = "ACME") -> str:
    return "".join(job_block(company, "Lyon", f"N{n:03d}", "sales") for n in range(count))


def test_one_failure_is_one_message_by_webhook_and_by_email(
    tmp_path: Path, database_url: str, hook: Webhook, smtp: Mailbox
) -> None:
    jobs = job_block("ACME", "Lyon", "Part-Dieu", "sales")
    w = world(tmp_path, database_url, jobs, alerts_toml(hook.url, smtp.url()))
    body = report(AGENT, at(0), {"sales": database(None, None, transfer=False, error="disk full")})
    w.process(drop(w.site(AGENT), body), at(0, 13, 5))

    assert loop(w).run_once(at(0, 13, 6))

    (sent,) = hook.received
    assert sent["title"] == f"backupwatch: FAILED: {SALES}"
    text = sent["message"]
    assert f"Job: {SALES}" in text
    assert "Site: ACME/Lyon/Part-Dieu (agent ACME_Lyon_Part-Dieu)" in text
    assert "Status: FAILED since 2026-11-24 13:00Z" in text
    assert "Cycle: 2026-11-24 13:00Z" in text
    assert "disk full" in text
    assert f"backupwatchctl history {SALES}" in text
    (mail,) = smtp.received
    assert mail["Subject"] == sent["title"]
    assert "disk full" in body_of(mail)
    assert not loop(w).run_once(at(0, 13, 7))  # delivered: never again
    assert len(hook.received) == 1


def test_fifty_missing_at_one_deadline_are_one_grouped_message(
    tmp_path: Path, database_url: str, hook: Webhook
) -> None:
    jobs = sites(30) + sites(20, company="Globex")
    w = world(tmp_path, database_url, jobs, alerts_toml(hook.url))
    assert len(w.tick(at(0, 14, 0) + timedelta(seconds=1))) == 50

    loop(w).run_once(at(0, 14, 1))

    (sent,) = hook.received
    assert sent["title"] == "backupwatch: 50 alerts (50 MISSING)"
    assert "ACME (30)" in sent["message"]
    assert "Globex (20)" in sent["message"]
    assert "  ACME/Lyon/N000: 1 MISSING" in sent["message"]


def test_a_catch_up_after_three_days_down_is_one_message_not_six_hundred(
    tmp_path: Path, database_url: str, hook: Webhook
) -> None:
    w = world(tmp_path, database_url, sites(200), alerts_toml(hook.url), max_status_file_age_days=4)
    flagged = w.tick(at(2, 14, 1))  # the restart: three days of deadlines at once
    assert len(flagged) == 600

    delivery = loop(w)
    delivery.run_once(at(2, 14, 2))

    (sent,) = hook.received
    assert sent["title"] == "backupwatch: 200 alerts (200 MISSING)"
    assert sent["message"].startswith("Catch-up after the daemon was down or busy:")


@pytest.mark.parametrize(("jobs", "messages"), [(5, 5), (6, 1)])
def test_more_than_five_in_a_minute_are_grouped(
    tmp_path: Path, database_url: str, hook: Webhook, jobs: int, messages: int
) -> None:
    w = world(tmp_path, database_url, sites(jobs), alerts_toml(hook.url))
    w.tick(at(0, 14, 1))
    loop(w).run_once(at(0, 14, 2))
    assert len(hook.received) == messages


def test_the_flood_window_counts_what_was_sent_one_by_one_in_the_last_minute() -> None:
    from backupwatch.alerting import should_group

    assert not should_group(5, 0)
    assert should_group(6, 0)
    assert should_group(2, 4)  # four sent alone a moment ago: these two go together
    assert not should_group(1, 10)  # one event is never a group


def test_a_failed_send_is_retried_with_backoff_and_only_to_the_url_that_failed(
    tmp_path: Path, database_url: str, hook: Webhook, smtp: Mailbox
) -> None:
    w = world(tmp_path, database_url, sites(1), alerts_toml(hook.url, smtp.url()))
    w.tick(at(0, 14, 1))
    hook.mode = "error"
    delivery = loop(w)

    delivery.run_once(at(0, 14, 2))
    assert len(smtp.received) == 1
    (event,) = Outbox(w.store).recent(5)
    (row,) = event.deliveries
    assert (row.state, row.attempts) == ("pending", 1)
    assert row.next_attempt_at == at(0, 14, 2) + timedelta(seconds=10)
    assert "127.0.0.1" in (row.last_error or "")

    hook.mode = "ok"
    assert not delivery.run_once(at(0, 14, 2) + timedelta(seconds=9))  # not due yet
    delivery.run_once(at(0, 14, 2) + timedelta(seconds=10))
    assert len(hook.received) == 2  # the failed attempt reached it too (500), then this one
    assert len(smtp.received) == 1  # the email had taken it: not sent again
    (row,) = Outbox(w.store).recent(5)[0].deliveries
    assert row.state == "sent"


def test_a_send_failing_for_24_hours_is_given_up(
    tmp_path: Path, database_url: str, hook: Webhook
) -> None:
    w = world(tmp_path, database_url, sites(1), alerts_toml(hook.url, repeat_hours=0))
    w.tick(at(0, 14, 1))
    hook.mode = "error"
    late = DeliveryLoop(w.store, lambda: at(1, 14, 2), w.settings.alerts, me="test:1:b")
    late.run_once(at(1, 14, 2))
    (row,) = Outbox(w.store).recent(5)[0].deliveries
    assert (row.state, row.attempts) == ("failed", 1)


def test_two_daemons_delivering_from_one_database_send_each_event_once(
    tmp_path: Path, database_url: str, hook: Webhook
) -> None:
    w = world(tmp_path, database_url, sites(40), alerts_toml(hook.url))
    w.tick(at(0, 14, 1))
    second = Store(database_url)
    loops = [
        loop(w, me="host-a:1:x"),
        DeliveryLoop(second, lambda: at(9), w.settings.alerts, me="host-b:2:y"),
    ]
    barrier = threading.Barrier(2)

    def run(delivery: DeliveryLoop) -> None:
        barrier.wait(timeout=10)
        delivery.run_once(at(0, 14, 2))

    threads = [threading.Thread(target=run, args=(d,)) for d in loops]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    second.dispose()

    assert sum(_count(body) for body in hook.received) == 40
    lines = [line for body in hook.received for line in body["message"].splitlines()]
    site_lines = sorted(line for line in lines if line.startswith("  ACME/Lyon/N"))
    assert site_lines == [f"  ACME/Lyon/N{n:03d}: 1 MISSING" for n in range(40)]
    rows = [row for event in Outbox(w.store).recent(100) for row in event.deliveries]
    assert [row.state for row in rows] == ["sent"] * 40


def _count(body: dict[str, object]) -> int:
    """How many events one message carries: a grouped one says it in its title."""
    title = str(body["title"])
    if " alerts (" in title:
        return int(title.split(": ")[1].split(" ")[0])
    return 1


def test_reminders_while_not_ok_none_when_acknowledged_or_paused(
    tmp_path: Path, database_url: str, hook: Webhook
) -> None:
    w = world(tmp_path, database_url, sites(3), alerts_toml(hook.url, repeat_hours=2))
    w.tick(at(0, 14, 1))
    delivery = loop(w)
    delivery.run_once(at(0, 14, 2))
    assert len(hook.received) == 3  # the three MISSING
    first, second, third = sorted(w.store.active_jobs(), key=lambda j: j.id)
    w.store.acknowledge(second.id, at(0, 15), "known: the agent is being reinstalled")
    w.store.pause([third.id], at(0, 15), None, "site closed")

    delivery.run_once(at(0, 15, 59))
    assert len(hook.received) == 3  # not two hours yet
    delivery.run_once(at(0, 16, 2))
    delivery.run_once(at(0, 17, 10))
    assert hook.titles()[3:] == [f"backupwatch: still MISSING: {first.label}"]
    assert "Status: MISSING since 2026-11-24 13:00Z" in hook.received[3]["message"]
    delivery.run_once(at(0, 18, 3))  # the second reminder, two hours after the first
    assert hook.titles()[4:] == [f"backupwatch: still MISSING: {first.label}"]


def test_the_digest_once_a_day_per_channel_with_compliance(
    tmp_path: Path, database_url: str, hook: Webhook
) -> None:
    alerts = alerts_toml(hook.url, digest_hour_utc=7, repeat_hours=0)
    alerts += f'[alerts.channels.globex]\nurls = ["{hook.url}?channel=globex"]\n'
    jobs = sites(2) + job_block("Globex", "Paris", "Centre", "erp", alert_channels=["globex"])
    w = world(tmp_path, database_url, jobs, alerts, max_status_file_age_days=4)
    site = w.site("ACME_Lyon_N000")
    from support import stage

    for day in range(3):  # N000 backs up every day, N001 never does
        staged = f"database/s{day}.gz"
        stage(site, staged, f"dump {day}".encode())
        when = at(day)
        w.process(
            drop(
                site,
                report("ACME_Lyon_N000", when, {"sales": database(staged, f"dump {day}".encode())}),
                f"r{day}.json",
            ),
            when + MINUTE,
        )
    w.tick(at(2, 14, 1))
    delivery = loop(w)
    delivery.run_once(at(2, 14, 2))
    count = len(hook.received)

    delivery.run_once(at(3, 6, 59))
    delivery.run_once(at(3, 7, 0))
    delivery.run_once(at(3, 7, 30))  # the same day: no second digest
    digests = [b for b in hook.received[count:] if "daily summary" in str(b["title"])]
    assert len(digests) == 2  # one per channel
    acme = next(b for b in digests if "ACME" in b["message"])
    assert acme["title"] == "backupwatch: daily summary 2026-11-27: 1 of 2 jobs not OK"
    assert "ACME: compliance over 14 days 50.0% (3/6 cycles OK)" in acme["message"]
    assert "  ACME/Lyon/N001/sales: MISSING" in acme["message"]
    assert "Globex" not in acme["message"]
    globex = next(b for b in digests if "Globex" in b["message"])
    assert "Globex: compliance over 14 days 0.0% (0/3 cycles OK)" in globex["message"]
