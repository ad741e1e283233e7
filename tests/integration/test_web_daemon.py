"""SPEC §12 against the real daemon: `/metrics`, `/api/status`, `/healthz`, the status page and
its hostile clients, on a two-week history made of real reports and MISSING flags (webkit)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from daemonkit import BIN, wait_for
from prometheus_client.parser import text_string_to_metric_families
from support import database, drop, report, write_config
from webkit import DAYS, FRESH, PLAN, SITES, WebWorld, agent, build

if TYPE_CHECKING:  # selenium is imported by the one test that drives a browser
    from selenium.webdriver.remote.webdriver import WebDriver

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def world(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WebWorld]:
    yield from build(request.param, tmp_path_factory.mktemp(f"web-{request.param}"))


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


def value(found: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    matches = [v for have, v in found[name] if all(have.get(k) == x for k, x in labels.items())]
    assert len(matches) == 1, (name, labels, found.get(name))
    return matches[0]


def test_metrics_after_known_events(world: WebWorld) -> None:
    status, headers, body = world.request("GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for family in families.values():
        assert family.documentation, f"{family.name} has no HELP text"
    found = samples(text)
    # Jobs per current status: the newest cycle of each backdated job, the fresh one UNKNOWN.
    newest = {site: plan.get(0, "OK") for site, plan in PLAN.items()}
    jobs_per = {"OK": 0, "FAILED": 0, "UNKNOWN": len(SITES[FRESH])}
    for site, verdict in newest.items():
        jobs_per[verdict] += len(SITES[site])
    for status_name, count in jobs_per.items():
        assert value(found, "backupwatch_jobs", status=status_name) == count
    assert value(found, "backupwatch_jobs", status="MISSING") == 0
    # Entries by status: every cycle of the plan, per database of its site.
    per_status: dict[str, int] = {}
    for site, plan in PLAN.items():
        for k in range(DAYS):
            verdict = plan.get(k, "OK").replace("OK", "SUCCESS")
            per_status[verdict] = per_status.get(verdict, 0) + len(SITES[site])
    for status_name, count in per_status.items():
        assert value(found, "backupwatch_entries_total", status=status_name) == count
    reports = sum(1 for plan in PLAN.values() for k in range(DAYS) if plan.get(k) != "MISSING")
    assert value(found, "backupwatch_reports_total", outcome="accepted") == reports
    assert value(found, "backupwatch_reports_total", outcome="rejected") == 0
    assert value(found, "backupwatch_report_processing_seconds_count") == reports
    hashed = value(found, "backupwatch_hashed_bytes_total")
    assert hashed > 0
    # Per-job series with the four labels.
    labels = {"company": "Globex", "city": "Nantes", "neighborhood": "Centre", "database": "crm"}
    assert value(found, "backupwatch_job_status", status="FAILED", **labels) == 1
    last_ok = world.newest - timedelta(days=1) + timedelta(minutes=5)
    assert value(found, "backupwatch_job_last_success_timestamp_seconds", **labels) == (
        last_ok.timestamp()
    )
    fresh = dict(zip(("company", "city", "neighborhood"), FRESH, strict=True), database="erp")
    assert "backupwatch_job_last_success_timestamp_seconds" in found
    assert not [
        s
        for s in found["backupwatch_job_last_success_timestamp_seconds"]
        if s[0]["company"] == FRESH[0]
    ]
    deadline = value(found, "backupwatch_job_next_deadline_timestamp_seconds", **fresh)
    assert deadline == (world.fresh_cycle + timedelta(minutes=60)).timestamp()
    assert value(found, "backupwatch_queue_depth") == 0
    assert value(found, "backupwatch_healthy") == 1
    assert value(found, "backupwatch_database_up") == 1
    assert value(found, "backupwatch_rescans_total") >= 1
    assert value(found, "backupwatch_inotify_overflows_total") == 0
    assert found["backupwatch_build_info"][0][0]["version"]


def test_api_status_is_status_json(world: WebWorld) -> None:
    served = json.loads(world.get("/api/status"))
    printed = world.daemon.ctl_json("status")
    assert served["jobs"] == printed["jobs"]
    assert served["daemon"].keys() == printed["daemon"].keys()
    assert served["daemon"]["running"] is True
    assert served["daemon"]["pid"] == printed["daemon"]["pid"]


def test_healthz(world: WebWorld) -> None:
    status, _, body = world.request("GET", "/healthz")
    assert (status, body) == (200, b"ok\n")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_read_only(world: WebWorld, method: str) -> None:
    status, headers, _ = world.request(method, "/")
    assert status == 405
    assert headers["Allow"] == "GET, HEAD"


def test_hostile_requests(world: WebWorld) -> None:
    assert world.request("GET", "/nowhere")[0] == 404
    assert world.request("GET", "/job/999999")[0] == 404
    assert world.request("GET", "/site/No/Such/Site")[0] == 404
    assert world.request("GET", "/static/../../etc/passwd")[0] in (400, 404)
    assert world.request("GET", "/static/%2e%2e/%2e%2e/etc/passwd")[0] == 400
    assert world.request("GET", "/site/%2e%2e/x/y")[0] == 400
    assert 400 <= world.request("GET", "/?" + "a" * 5000)[0] < 500
    assert 400 <= world.request("GET", "/?" + "a" * 100_000)[0] < 500
    assert world.request("GET", "/", {"X-Big": "b" * 40_000})[0] == 431
    head = world.request("HEAD", "/")
    assert head[0] == 200
    assert head[2] == b""
    # Still serving after all that.
    assert world.request("GET", "/healthz")[0] == 200


def test_idle_connections_stop_nothing(world: WebWorld) -> None:
    """200 clients that connect and never finish a request hold a socket each, no thread:
    /healthz answers and reports are processed meanwhile."""
    idle = []
    try:
        for n in range(200):
            sock = socket.create_connection((world.host, world.port), timeout=10)
            if n % 2:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # never ends its headers
            idle.append(sock)
        status, _, body = world.request("GET", "/healthz")
        assert (status, body) == (200, b"ok\n")
        site = ("ACME", "Lyon", "Part-Dieu")
        folder = world.daemon.deposit / agent(site)
        content = b"fresh backup while idle clients wait\n"
        (folder / "staged").mkdir(exist_ok=True)
        (folder / "staged" / "idle.sql.gz").write_bytes(content)
        body_ = report(
            agent(site),
            world.newest + timedelta(minutes=6),
            {"sales": database("staged/idle.sql.gz", content)},
        )
        drop(folder, body_, "STATUS-idle.json")

        def archived() -> bool:
            return not (folder / "STATUS-idle.json").exists()

        wait_for(archived, timeout=20, what="the report processed while 200 clients idle")
        assert world.request("GET", "/metrics")[0] == 200
    finally:
        for sock in idle:
            sock.close()


def test_port_in_use_is_a_clear_start_error(world: WebWorld, tmp_path: Path) -> None:
    if "sqlite" not in world.url:
        pytest.skip("a start-up check, not a database one: run once")
    config = write_config(
        tmp_path,
        f"sqlite:///{tmp_path}/other.db",
        "",
        control_socket=str(world.control.parent / "other.sock"),
        http_listen=f"{world.host}:{world.port}",
    )
    result = subprocess.run(
        [str(BIN / "backupwatchd"), "--config", str(config), "--log-target", "console"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert f"http_listen {world.host}:{world.port}: cannot listen" in result.stderr


# ------------------------------------------------------------------ the browser


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        reason = f"{CHROMIUM} and {CHROMEDRIVER} are needed (apt install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    offline = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must never download a browser
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,720")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        if offline is None:
            del os.environ["SE_OFFLINE"]
        else:
            os.environ["SE_OFFLINE"] = offline


def test_status_page_in_a_browser(world: WebWorld, browser: WebDriver, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    if "sqlite" not in world.url:
        pytest.skip("the page is the same on PostgreSQL (its data is checked by the metrics)")
    base = f"http://{world.host}:{world.port}"
    hr = world.job_id("ACME/Lyon/Part-Dieu/hr")
    centre = world.job_id("Globex/Nantes/Centre/crm")
    assert world.daemon.ctl("pause", str(hr), "--reason", "server move").returncode == 0
    assert world.daemon.ctl("ack", str(centre), "--reason", "disk ordered").returncode == 0

    def levers_shown() -> bool:
        # A page is reused for 20 times what it cost to make (milliseconds here).
        browser.get(base + "/")
        return "paused" in browser.page_source and ">ack<" in browser.page_source

    wait_for(levers_shown, what="the page to show the pause and the acknowledgement")
    screenshot = tmp_path / "status-page.png"
    browser.save_screenshot(str(screenshot))
    if os.environ.get("BACKUPWATCH_SAVE_SCREENSHOT"):
        shutil.copy(screenshot, REPO / "docs" / "status-page.png")
    rows = {
        row.get_attribute("data-site"): row
        for row in browser.find_elements(By.CSS_SELECTOR, "tr.site-row")
    }
    assert set(rows) == {"/".join(site) for site in SITES}
    # Every cell of the backdated sites carries the planned verdict of its day.
    # The grid shows the 14 UTC days up to today: near midnight the oldest cycle is out of it.
    shown_days = {world.now.date() - timedelta(days=n) for n in range(DAYS)}
    for (site, day), verdict in world.expected.items():
        if day not in shown_days:
            continue
        cell = rows[site].find_element(By.CSS_SELECTOR, f'td.cell[data-day="{day.isoformat()}"]')
        assert cell.get_attribute("data-verdict") == verdict, (site, day)
        assert cell.text.strip(), "a symbol, so that the cell reads without colour"
        assert day.isoformat() in (cell.get_attribute("title") or "")
    # The fresh site: nothing before today; today awaited when its cycle falls today.
    fresh_cells = rows["/".join(FRESH)].find_elements(By.CSS_SELECTOR, "td.cell")
    assert [c.get_attribute("data-verdict") for c in fresh_cells[:-1]] == ["NONE"] * (DAYS - 1)
    today = fresh_cells[-1].get_attribute("data-verdict")
    assert today == ("PENDING" if world.fresh_cycle.date() == world.now.date() else "NONE")
    # Pause and acknowledgement show.
    assert "paused" in rows["ACME/Lyon/Part-Dieu"].text
    assert "ack" in rows["Globex/Nantes/Centre"].text
    # Per-company compliance: ACME's cycles OK over cycles expected.
    acme = browser.find_element(
        By.XPATH, "//tr[th[normalize-space()='ACME']]/td[@class='pct company-pct']"
    )
    shown = [k for k in range(DAYS) if (world.newest - timedelta(days=k)).date() in shown_days]
    acme_sites = [s for s in PLAN if s[0] == "ACME"]
    acme_cycles = sum(len(SITES[s]) * len(shown) for s in acme_sites)
    acme_bad = sum(len(SITES[s]) for s in acme_sites for k in shown if k in PLAN[s])
    assert acme.text == f"{(acme_cycles - acme_bad) * 100 / acme_cycles:.1f}%"
    # The filter hides the site that was OK all along.
    browser.find_element(By.ID, "problems-only").click()
    problem_sites = {
        r.get_attribute("data-site") for r in browser.find_elements(By.CSS_SELECTOR, "tr.site-row")
    }
    assert problem_sites == {
        "ACME/Lyon/Confluence",
        "Globex/Paris/Bastille",
        "Globex/Nantes/Centre",
    }
    # A click reaches the job page, its entries newest first with their messages.
    browser.find_element(By.CSS_SELECTOR, 'tr[data-site="Globex/Nantes/Centre"] a.db').click()
    assert browser.current_url == f"{base}/job/{centre}"
    statuses = [
        e.get_attribute("data-status") for e in browser.find_elements(By.CSS_SELECTOR, "tr.entry")
    ]
    assert statuses[:3] == ["FAILED", "SUCCESS", "SUCCESS"]
    assert "disk full" in browser.find_element(By.CSS_SELECTOR, "tr.entry td.message").text
    assert "disk ordered" in browser.page_source
    browser.save_screenshot(str(tmp_path / "job-page.png"))
    assert screenshot.stat().st_size > 10_000
