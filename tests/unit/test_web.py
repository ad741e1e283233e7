"""SPEC §12 in-process: the keys, the grid's query and cells, the WSGI application's answers,
and the waitress server's start and stop (the real daemon is in tests/integration/test_web.py)."""

from __future__ import annotations

import gzip
import re
import socket
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from sqlalchemy import delete, select
from support import World, job_block, write_config

from backupwatch import metrics
from backupwatch.config import ConfigError, load_settings, parse_listen
from backupwatch.enums import BackupEntryStatus, JobStatus
from backupwatch.grid import DayCount, Verdict, board, cells_for, day_counts, window
from backupwatch.metrics import Instruments, Runtime
from backupwatch.ratelimit import Decision, Limiter
from backupwatch.store import BackupEntry, ExpectedBackupJob, JobView, Store
from backupwatch.web import Renders, Response, WebApp, WebServer

NOW = datetime(2026, 11, 30, 15, 0, tzinfo=UTC)
JOBS = (
    job_block("ACME", "Lyon", "Part-Dieu", "sales")
    + job_block("ACME", "Lyon", "Part-Dieu", "hr")
    + job_block("<i>Evil & Co", "Paris", "Rue #1? 100%", "crm")
)


# ------------------------------------------------------------------ keys


def _settings(tmp_path: Path, **keys: Any) -> Any:
    config = write_config(tmp_path, "sqlite:///x.db", "", **keys)
    return load_settings(config, {})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:9787", ("127.0.0.1", 9787)),
        ("[::1]:80", ("::1", 80)),
        ("localhost:8080", ("localhost", 8080)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
    ],
)
def test_listen_values(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["9787", "::1:80", "host:port", "host:70000", ":80", "a b:1"])
def test_bad_listen_values_name_file_and_key(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _settings(tmp_path, http_listen=value)
    assert any(f"{tmp_path}/backupwatch.toml: http_listen:" in e for e in caught.value.errors)


def test_listen_defaults_and_off(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("")
    settings = load_settings(config, {})
    assert settings.http_listen == "127.0.0.1:9787"
    assert settings.metrics_per_job is True
    assert load_settings(config, {"BACKUPWATCH_HTTP_LISTEN": ""}).http_listen == ""
    assert load_settings(config, {"BACKUPWATCH_METRICS_PER_JOB": "false"}).metrics_per_job is False


def test_metrics_per_job_must_be_a_boolean(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        _settings(tmp_path, metrics_per_job="no")
    assert caught.value.errors == [
        f"{tmp_path}/backupwatch.toml: metrics_per_job: expected a boolean, got a string ('no')"
    ]


# ------------------------------------------------------------------ grid, pure


def _view(ident: int, status: JobStatus, **kw: Any) -> JobView:
    fields: dict[str, Any] = {
        "id": ident,
        "company_name": "ACME",
        "city": "Lyon",
        "neighborhood": "Part-Dieu",
        "database_name": f"db{ident}",
        "agent_id": "a",
        "deposit_path": "a",
        "frequency": "DAILY",
        "active": True,
        "current_status": status,
        "last_success_at": None,
        "next_deadline": NOW + timedelta(days=1),
    }
    fields.update(kw)
    return JobView(**fields)


def test_cells_worst_of_the_day_and_pending_today() -> None:
    days = window(NOW)
    assert len(days) == 14
    assert days[-1] == NOW.date()
    counts = [
        DayCount(days[0], {Verdict.OK: 2, Verdict.FAILED: 1}),
        DayCount(days[1], {Verdict.MISSING: 1, Verdict.HASH_MISMATCH: 1}),
        DayCount(days[-1], {Verdict.OK: 1}),
    ]
    cells, cycles, ok = cells_for(counts, days, pending=True, name="S")
    assert [c.verdict for c in cells[:3]] == [Verdict.FAILED, Verdict.HASH_MISMATCH, Verdict.NONE]
    assert cells[-1].verdict is Verdict.PENDING  # OK so far, one still awaited
    assert (cycles, ok) == (6, 3)
    assert cells[0].title == f"S · {days[0]}: 3 cycles, 1 FAILED, 2 OK"
    bad_today = [DayCount(days[-1], {Verdict.MISSING: 1})]
    assert cells_for(bad_today, days, True, "S")[0][-1].verdict is Verdict.MISSING


def test_board_filter_totals_and_compliance() -> None:
    days = window(NOW)
    views = [
        _view(1, JobStatus.OK),
        _view(2, JobStatus.OK, neighborhood="Gare", paused=True),
        _view(3, JobStatus.FAILED, company_name="Globex", acked_at=NOW),
        _view(4, JobStatus.OK, active=False, neighborhood="Old"),
    ]
    counts = {
        ("ACME", "Lyon", "Part-Dieu"): [DayCount(days[3], {Verdict.OK: 4})],
        ("ACME", "Lyon", "Gare"): [DayCount(days[3], {Verdict.OK: 3, Verdict.MISSING: 1})],
    }
    page = board(views, counts, NOW)
    assert [c.name for c in page.companies] == ["ACME", "Globex"]
    assert page.companies[0].compliance == 7 / 8
    assert page.companies[1].compliance is None
    assert page.totals["OK"] == 2
    assert page.totals["FAILED"] == 1
    assert page.totals["PAUSED"] == 1
    assert page.totals["ACKNOWLEDGED"] == 1
    problems = board(views, counts, NOW, problems_only=True)
    shown = [row.name for c in problems.companies for row in c.rows]
    assert shown == ["ACME/Lyon/Gare", "Globex/Lyon/Part-Dieu"]
    assert (problems.shown, problems.sites) == (2, 3)


# ------------------------------------------------------------ the store


@pytest.fixture
def world(tmp_path: Path, database_url: str) -> Iterator[World]:
    found = World.create(tmp_path, database_url, JOBS, NOW - timedelta(days=20))
    yield found
    found.store.dispose()


def _entry(store: Store, job: int, cycle: datetime, status: BackupEntryStatus) -> None:
    with store.session() as session:
        session.add(
            BackupEntry(
                job_id=job,
                cycle=cycle,
                status=status,
                message=f"{status} at {cycle}",
                recorded_at=NOW,
            )
        )


def _ids(world: World) -> dict[str, int]:
    return {job.label: job.id for job in world.store.all_jobs()}


def test_one_query_groups_cycles_by_site_and_day(world: World) -> None:
    ids = _ids(world)
    sales, hr = ids["ACME/Lyon/Part-Dieu/sales"], ids["ACME/Lyon/Part-Dieu/hr"]
    day = datetime(2026, 11, 25, 13, tzinfo=UTC)
    late = datetime(2026, 11, 25, 23, 59, 59, tzinfo=UTC)
    _entry(world.store, sales, day, BackupEntryStatus.MISSING)
    _entry(world.store, sales, day, BackupEntryStatus.SUCCESS)  # the report came after all
    _entry(world.store, hr, day, BackupEntryStatus.MISSING)
    _entry(world.store, hr, late, BackupEntryStatus.FAILED)
    _entry(world.store, hr, late, BackupEntryStatus.SUCCESS)  # a retry of the same cycle
    _entry(world.store, sales, late + timedelta(seconds=1), BackupEntryStatus.HASH_MISMATCH)
    _entry(world.store, sales, NOW - timedelta(days=30), BackupEntryStatus.FAILED)  # outside
    counts = day_counts(world.store, window(NOW))
    assert _sorted(counts) == {
        ("ACME", "Lyon", "Part-Dieu"): [
            (date(2026, 11, 25), {Verdict.OK: 2, Verdict.MISSING: 1}),
            (date(2026, 11, 26), {Verdict.HASH_MISMATCH: 1}),
        ]
    }
    per_job = day_counts(world.store, window(NOW), ("ACME", "Lyon", "Part-Dieu"))
    assert {key[0] for key in per_job} == {sales, hr}


def _sorted(counts: dict[Any, list[DayCount]]) -> dict[Any, list[tuple[date, dict[Any, int]]]]:
    return {
        k: sorted(((c.day, c.counts) for c in v), key=lambda x: x[0]) for k, v in counts.items()
    }


class FakeSource:
    def __init__(self) -> None:
        self.failing: list[str] = []

    def status_answer(self, store: Store) -> dict[str, Any]:
        jobs = [view.as_json() for view in store.job_views(NOW)]
        return {"ok": True, "pid": 1, "version": "x", "jobs": jobs}

    def failing_loops(self) -> list[str]:
        return self.failing

    def runtime(self) -> Runtime:
        return Runtime(outcomes={"accepted": 3}, hashed_bytes=10, queue_depth=2)


def _call(
    app: WebApp, path: str, method: str = "GET", **headers: str
) -> tuple[str, dict[str, str], bytes]:
    found: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]]) -> None:
        found["status"], found["headers"] = status, dict(headers)

    path, _, query = path.partition("?")
    environ = {"REQUEST_METHOD": method, "REQUEST_URI": path, "QUERY_STRING": query}
    environ.update({f"HTTP_{k.upper()}": v for k, v in headers.items()})
    body = b"".join(app(environ, start_response))
    return found["status"], found["headers"], body


def _app(world: World, per_job: bool = True) -> tuple[WebApp, FakeSource]:
    source = FakeSource()
    return WebApp(world.store, source, lambda: NOW, lambda: per_job, Instruments()), source


def test_pages_escape_what_agents_and_job_files_name(world: World) -> None:
    app, _ = _app(world)
    status, headers, body = _call(app, "/")
    assert status == "200 OK"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert b"<i>Evil" not in body
    assert b"&lt;i&gt;Evil &amp; Co" in body
    # What a path would misread is quoted inside its segment.
    assert b'href="/site/%3Ci%3EEvil%20%26%20Co/Paris/Rue%20%231%3F%20100%25"' in body
    status, _, page = _call(app, "/site/%3Ci%3EEvil%20%26%20Co/Paris/Rue%20%231%3F%20100%25")
    assert status == "200 OK"
    assert b"crm" in page
    crm = _ids(world)["<i>Evil & Co/Paris/Rue #1? 100%/crm"]
    assert _call(app, f"/job/{crm}")[0] == "200 OK"
    assert _call(app, f"/job/{crm}?page=x")[0] == "200 OK"


def test_healthz_names_the_failing_loop(world: World) -> None:
    app, source = _app(world)
    assert _call(app, "/healthz")[0] == "200 OK"
    source.failing = ["missing timer", "workers"]
    status, _, body = _call(app, "/healthz")
    assert status == "503 Service Unavailable"
    assert body == b"unhealthy: missing timer, workers\n"


def test_metrics_per_job_switch(world: World) -> None:
    ids = _ids(world)
    _entry(
        world.store,
        ids["ACME/Lyon/Part-Dieu/hr"],
        NOW - timedelta(hours=2),
        BackupEntryStatus.FAILED,
    )
    for per_job in (True, False):
        app, _ = _app(world, per_job)
        status, _, body = _call(app, "/metrics")
        assert status == "200 OK"
        names = {f.name for f in text_string_to_metric_families(body.decode())}
        assert ("backupwatch_job_status" in names) is per_job
        assert "backupwatch_jobs" in names
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body.decode())
            for s in f.samples
        }
        assert samples["backupwatch_jobs", (("status", "FAILED"),)] == 1
        assert samples["backupwatch_jobs", (("status", "UNKNOWN"),)] == 2
        assert samples["backupwatch_entries_total", (("status", "FAILED"),)] == 1
        assert samples["backupwatch_reports_total", (("outcome", "accepted"),)] == 3
        assert samples["backupwatch_queue_depth", ()] == 2


def test_methods_paths_and_sizes(world: World) -> None:
    app, _ = _app(world)
    status, headers, _ = _call(app, "/", "POST")
    assert status == "405 Method Not Allowed"
    assert headers["Allow"] == "GET, HEAD"
    assert _call(app, "/", "HEAD")[2] == b""
    assert _call(app, "/nope")[0] == "404 Not Found"
    assert _call(app, "/job/12345678901234")[0] == "404 Not Found"
    assert _call(app, "/static/../backupwatch.toml")[0] == "400 Bad Request"
    assert _call(app, "/site/%2E%2E/a/b")[0] == "400 Bad Request"
    assert _call(app, "/%ff")[0] == "400 Bad Request"
    assert _call(app, "/?" + "x" * 3000)[0] == "414 URI Too Long"
    assert _call(app, "/static/style.css")[1]["Content-Type"].startswith("text/css")


def test_server_start_stop_and_port_in_use(world: World) -> None:
    app, _ = _app(world)
    server = WebServer("127.0.0.1:0", app)
    server.start()
    host, port = server.address.rsplit(":", 1)
    idle = socket.create_connection((host, int(port)))
    try:
        second = WebServer(f"127.0.0.1:{port}", _app(world)[0])
        with pytest.raises(OSError, match=rf"http_listen 127.0.0.1:{port}: cannot listen"):
            second.start()
    finally:
        server.stop(2.0)
        idle.close()
    assert not server.is_alive()


def test_renders_are_reused_for_a_multiple_of_their_cost() -> None:
    renders = Renders()
    made: list[int] = []

    def make() -> Response:
        made.append(1)
        time.sleep(0.01)  # reused for 20 times that at least: 0.2 s
        return Response("200 OK", b"page")

    first = renders.get("/", make)
    assert renders.get("/", make) is first
    assert len(made) == 1
    assert renders.get("/other", make) is not first
    renders.clear()
    renders.get("/", make)
    assert len(made) == 3
    failed = renders.get("/bad", lambda: Response("503 Service Unavailable", b"down"))
    assert renders.get("/bad", lambda: Response("200 OK", b"up")) is not failed  # not kept


def test_job_states_agree_with_job_views(world: World) -> None:
    """The lean rows of the page and the scrape say what `status` says."""
    ids = _ids(world)
    cycle = NOW - timedelta(hours=3)
    _entry(world.store, ids["ACME/Lyon/Part-Dieu/sales"], cycle, BackupEntryStatus.MISSING)
    _entry(world.store, ids["ACME/Lyon/Part-Dieu/sales"], cycle, BackupEntryStatus.FAILED)
    _entry(world.store, ids["ACME/Lyon/Part-Dieu/hr"], cycle, BackupEntryStatus.SUCCESS)
    with world.store.session() as session:
        session.add(
            BackupEntry(
                job_id=ids["ACME/Lyon/Part-Dieu/hr"],
                cycle=cycle + timedelta(hours=1),
                status=BackupEntryStatus.SUCCESS,
                message="same bytes",
                recorded_at=NOW,
                unchanged_since_last_success=True,
            )
        )
    world.store.pause([ids["ACME/Lyon/Part-Dieu/hr"]], NOW - timedelta(minutes=1), None, "x")
    lean = {v.id: v for v in world.store.job_states(NOW)}
    full = {v.id: v for v in world.store.job_views(NOW)}
    assert lean.keys() == full.keys()
    for ident, view in full.items():
        got = lean[ident]
        assert (got.current_status, got.unchanged, got.paused, got.last_success_at) == (
            view.current_status,
            view.unchanged,
            view.paused,
            view.last_success_at,
        )
    assert lean[ids["ACME/Lyon/Part-Dieu/hr"]].unchanged is True
    assert lean[ids["ACME/Lyon/Part-Dieu/sales"]].current_status is JobStatus.FAILED


@pytest.mark.parametrize(
    ("accept", "compressed"),
    [("gzip, deflate", True), ("br;q=1.0, gzip;q=0.5", True), ("gzip;q=0", False), ("", False)],
)
def test_big_answers_are_sent_compressed_to_who_accepts_it(
    world: World, accept: str, compressed: bool
) -> None:
    app, _ = _app(world)
    _, _, plain = _call(app, "/")
    status, headers, body = _call(app, "/", accept_encoding=accept)
    assert status == "200 OK"
    assert headers["Vary"] == "Accept-Encoding"
    assert (headers.get("Content-Encoding") == "gzip") is compressed
    assert (gzip.decompress(body) if compressed else body) == plain
    assert int(headers["Content-Length"]) == len(body)


def test_instances_label_metrics_and_filter_the_page(world: World) -> None:
    """SPEC §15: per-job series carry the instance; `/?instance=NAME` keeps one instance's."""
    with world.store.session() as session:
        for job in session.scalars(select(ExpectedBackupJob)):
            job.instance = "alpha" if job.company_name == "ACME" else "beta"
    app, _ = _app(world)
    status, _, body = _call(app, "/")
    assert status == "200 OK"
    assert b'href="/?instance=alpha"' in body
    assert b"Part-Dieu" in body
    assert b"Evil" in body
    _, _, alpha = _call(app, "/?instance=alpha")
    assert b"Part-Dieu" in alpha
    assert b"Evil" not in alpha
    assert b'href="/?problems=1&amp;instance=alpha"' in alpha
    _, _, problems = _call(app, "/?problems=1&instance=beta")
    assert b"Part-Dieu" not in problems
    assert app.past.made == 1  # every filter's page shares the past days' cells
    _, _, metrics = _call(app, "/metrics")
    instances = {
        s.labels["instance"]
        for f in text_string_to_metric_families(metrics.decode())
        if f.name == "backupwatch_job_status"
        for s in f.samples
    }
    assert instances == {"alpha", "beta"}


def _cell(body: bytes, site: str, day: date) -> str:
    """The verdict shown in `site`'s row for `day`."""
    row = body.split(f'data-site="{site}"'.encode(), 1)[1].split(b"</tr>", 1)[0]
    found = re.search(rb'data-verdict="(\w+)" data-day="' + day.isoformat().encode(), row)
    assert found is not None
    return found.group(1).decode()


def _rows_html(world: World, app: WebApp | None) -> list[str]:
    """Every row's cells, from the past days `app` keeps (or, without, from one query)."""
    views = world.store.job_states(NOW, last_success=False)
    if app is None:
        page = board(views, day_counts(world.store, window(NOW)), NOW)
    else:
        today = day_counts(world.store, window(NOW)[-1:])
        page = board(views, today, NOW, past=app.past.rows(world.store, views, NOW))
    return [row.html for company in page.companies for row in company.rows]


def test_past_days_are_kept_until_their_entries_change(world: World) -> None:
    app, _ = _app(world)
    sales = _ids(world)["ACME/Lyon/Part-Dieu/sales"]
    site, past = "ACME/Lyon/Part-Dieu", date(2026, 11, 25)

    def page() -> bytes:
        app.renders.clear()
        status, _, body = _call(app, "/")
        assert status == "200 OK"
        assert _rows_html(world, app) == _rows_html(world, None)  # what a fresh page shows
        return body

    assert _cell(page(), site, past) == "NONE"
    made = app.past.made
    assert _cell(page(), site, past) == "NONE"
    assert app.past.made == made  # nothing changed: the past days were reused
    _entry(world.store, sales, NOW - timedelta(hours=1), BackupEntryStatus.FAILED)
    assert _cell(page(), site, NOW.date()) == "FAILED"  # today is read for every page
    assert app.past.made == made
    _entry(world.store, sales, datetime(2026, 11, 25, 13, tzinfo=UTC), BackupEntryStatus.MISSING)
    assert _cell(page(), site, past) == "MISSING"  # a late MISSING flag of a past day
    _entry(world.store, sales, datetime(2026, 11, 25, 13, tzinfo=UTC), BackupEntryStatus.SUCCESS)
    assert _cell(page(), site, past) == "OK"  # the report came after all
    with world.store.session() as session:
        session.execute(delete(BackupEntry).where(BackupEntry.cycle < NOW - timedelta(days=1)))
    assert _cell(page(), site, past) == "NONE"  # history retention removed them
    assert app.past.made == made + 3


def test_per_job_series_are_what_prometheus_client_would_print() -> None:
    """The per-job families are written by backupwatch (`Rendered`): byte for byte what
    prometheus_client's own families and `generate_latest` make, odd names included."""
    views = [
        _view(1, JobStatus.OK, last_success_at=NOW - timedelta(hours=3, microseconds=5)),
        _view(2, JobStatus.FAILED, company_name='Q"uo\\te', city="New\nline", paused=True),
        _view(3, JobStatus.UNKNOWN, neighborhood="<i>Ü & Co", instance="east", next_deadline=None),
    ]
    expected = CollectorRegistry(auto_describe=False)
    ours = CollectorRegistry(auto_describe=False)

    class Families(Collector):
        def __init__(self, families: list[Metric]) -> None:
            self.families = families

        def collect(self) -> Iterator[Metric]:
            yield from self.families

    labels = ["company", "city", "neighborhood", "database", "instance"]
    status = GaugeMetricFamily("backupwatch_job_status", "", labels=[*labels, "status"])
    last = GaugeMetricFamily("backupwatch_job_last_success_timestamp_seconds", "", labels=labels)
    deadline = GaugeMetricFamily(
        "backupwatch_job_next_deadline_timestamp_seconds", "", labels=labels
    )
    paused = GaugeMetricFamily("backupwatch_job_paused", "", labels=labels)
    for v in views:
        values = [v.company_name, v.city, v.neighborhood, v.database_name, v.instance or ""]
        status.add_metric([*values, v.current_status.value], 1)
        if v.last_success_at:
            last.add_metric(values, v.last_success_at.timestamp())
        if v.next_deadline:
            deadline.add_metric(values, v.next_deadline.timestamp())
        if v.paused:
            paused.add_metric(values, 1)
    rendered = list(metrics._per_job(views))
    for family, mine in zip([status, last, deadline, paused], rendered, strict=True):
        family.documentation = mine.documentation
    expected.register(Families([status, last, deadline, paused]))
    ours.register(Families(rendered))
    assert metrics.exposition(ours) == generate_latest(expected)
    assert b'company="Q\\"uo\\\\te",database="db2"' in metrics.exposition(ours)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_limiter_slows_a_client_down_then_refuses_it() -> None:
    clock = Clock()
    limiter = Limiter(rate=2.0, burst=3, max_wait=1.0, waiters=1, clock=clock)
    assert [limiter.admit("a").wait for _ in range(3)] == [0.0, 0.0, 0.0]  # the burst
    assert limiter.admit("b") == Decision()  # another client has its own bucket
    assert limiter.admit("a") == Decision(wait=0.5)  # its next token, in half a second
    refused = limiter.admit("a")  # the one waiting slot is taken
    assert refused.refused
    assert refused.retry_after == 1
    limiter.waited()
    assert limiter.admit("a") == Decision(wait=1.0)
    limiter.waited()
    assert limiter.admit("a").retry_after == 2  # over a second to wait: refused, not held
    clock.now += 1.0  # two tokens back: the two reserved ones are paid for
    assert limiter.admit("a") == Decision(wait=0.5)
    limiter.waited()
    clock.now += 60
    assert limiter.admit("a") == Decision()  # refilled up to the burst, no more
    assert [limiter.admit("a").wait for _ in range(2)] == [0.0, 0.0]
    assert limiter.admit("a").wait == 0.5


def test_a_client_over_its_rate_is_answered_429_but_healthz_never(world: World) -> None:
    source = FakeSource()
    clock = Clock()
    limiter = Limiter(rate=1.0, burst=2, max_wait=0.0, clock=clock)
    app = WebApp(world.store, source, lambda: NOW, lambda: True, Instruments(), limiter)

    def get(path: str, peer: str = "192.0.2.1") -> tuple[str, dict[str, str]]:
        environ = {"REQUEST_METHOD": "GET", "REQUEST_URI": path, "REMOTE_ADDR": peer}
        found: dict[str, Any] = {}
        b"".join(app(environ, lambda s, h: found.update(status=s, headers=dict(h))))
        return found["status"], found["headers"]

    assert get("/metrics")[0] == "200 OK"
    assert get("/")[0] == "200 OK"
    status, headers = get("/api/status")
    assert status == "429 Too Many Requests"
    assert headers["Retry-After"] == "1"
    assert [get("/healthz")[0] for _ in range(10)] == ["200 OK"] * 10
    assert get("/", peer="192.0.2.2")[0] == "200 OK"  # another client is not held back
    assert _call(app, "/")[0] == "200 OK"  # in-process (no peer): not counted
    clock.now += 1
    assert get("/static/style.css")[0] == "200 OK"
