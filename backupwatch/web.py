"""SPEC §12: the daemon's read-only HTTP listener (`/`, `/job/ID`, `/site/…`, `/metrics`,
`/api/status`, `/healthz`).

A plain WSGI application served by waitress (no HTTP parsing of our own) in a thread of its
own. Waitress reads requests asynchronously and hands only complete ones to a bounded pool of
threads, so idle or slow clients hold a socket each (up to `CONNECTION_LIMIT`, closed after
`CHANNEL_TIMEOUT`), never a thread. The application reads the database through an engine of its
own (its own connection pool, read-only transactions): a busy page can neither take the
connections the daemon's loops need nor SQLite's write lock. It takes no lock of the daemon's:
what it needs from the daemon comes through `Source`, whose methods only read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import json
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import Any, Protocol
from urllib.parse import parse_qs, quote, unquote, urlencode

import structlog
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from backupwatch import __version__
from backupwatch.config import parse_listen
from backupwatch.enums import JobStatus
from backupwatch.grid import (
    SYMBOLS,
    Row,
    Verdict,
    board,
    day_counts,
    site_rows,
    verdict_of,
    window,
)
from backupwatch.metrics import Instruments, Runtime, exposition, registry
from backupwatch.pastdays import PastDays
from backupwatch.ratelimit import Limiter
from backupwatch.siterow import site_row, site_url
from backupwatch.store import BackupEntry, ExpectedBackupJob, Store
from backupwatch.timeutil import format_z

log = structlog.get_logger(__name__)

THREADS = 6  # requests served at once; more wait in waitress' queue, not in a thread
# Pages and scrapes are made one at a time, each reused for CACHE_FACTOR times what it cost to
# make (at most CACHE_MAX seconds): however often clients ask, the listener's share of the
# interpreter stays near 1/CACHE_FACTOR, and report processing keeps the rest.
CACHE_FACTOR = 20
CACHE_MAX = 30.0
CACHE_ENTRIES = 64
GZIP_MIN_BYTES = 4096
OUTBUF_BYTES = 8 << 20  # a response up to this size stays in memory (not a temporary file)
CONNECTION_LIMIT = 256  # open connections; beyond, new ones wait in the listen backlog
CHANNEL_TIMEOUT = 15  # seconds an idle connection is kept
MAX_HEADER_BYTES = 16384  # request line and headers: above, waitress answers 431
MAX_QUERY_BYTES = 2048  # query string: above, 414
MAX_PATH_BYTES = 2048
PAGE_SIZE = 50  # entries per page on /job/ID
REFRESH_SECONDS = 60
ALLOWED = "GET, HEAD"
SECURITY_HEADERS = [
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]
HTML_POLICY = ("Content-Security-Policy", "default-src 'none'; style-src 'self'; img-src 'self'")


class Source(Protocol):
    """What the listener asks the daemon; every method only reads."""

    def status_answer(self, store: Store) -> dict[str, Any]:
        """The control socket's `status` answer, job rows read through `store`."""
        ...

    def failing_loops(self) -> list[str]:
        """The loops that are dead or unseen too long; empty while healthy."""
        ...

    def runtime(self) -> Runtime: ...


class Renders:
    """Expensive answers, made under one lock and reused for a time proportional to their cost.

    The daemon's workers share the interpreter with this listener: a client fetching a
    1,000-site page back to back would otherwise take a whole core's worth of the GIL from
    report processing. A small installation's pages cost milliseconds, so they stay fresh."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, Response]] = {}

    def get(self, key: str, make: Callable[[], Response]) -> Response:
        found = self._fresh(key)
        if found is not None:
            return found
        with self._lock:
            found = self._fresh(key)  # made while this request waited
            if found is not None:
                return found
            started = time.monotonic()
            response = make()
            if response.status.startswith("200"):
                response = response.compressed()
            done = time.monotonic()
            if response.status.startswith("200"):
                keep = min(CACHE_MAX, (done - started) * CACHE_FACTOR)
                self._cache[key] = (done + keep, response)
                self._trim(done)
            return response

    def clear(self) -> None:
        self._cache.clear()

    def _fresh(self, key: str) -> Response | None:
        found = self._cache.get(key)
        if found is not None and found[0] > time.monotonic():
            return found[1]
        return None

    def _trim(self, now: float) -> None:
        if len(self._cache) <= CACHE_ENTRIES:
            return
        for key, (expires, _) in list(self._cache.items()):
            if expires <= now:
                del self._cache[key]
        while len(self._cache) > CACHE_ENTRIES:
            del self._cache[min(self._cache, key=lambda k: self._cache[k][0])]


@dataclass(frozen=True)
class Response:
    status: str
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()
    gzipped: bytes | None = None  # the body compressed once, for clients that accept it

    def compressed(self) -> Response:
        """With its gzip form (a 1,000-site page shrinks twentyfold: far less to send)."""
        if self.gzipped is not None or len(self.body) < GZIP_MIN_BYTES:
            return self
        return dataclasses.replace(self, gzipped=gzip.compress(self.body, compresslevel=4))


def text(status: str, message: str, *headers: tuple[str, str]) -> Response:
    return Response(status, (message + "\n").encode(), headers=headers)


class WebApp:
    """The WSGI application: routes, pages and their one aggregated query each."""

    def __init__(
        self,
        store: Store,
        source: Source,
        clock: Callable[[], datetime],
        per_job: Callable[[], bool],
        instruments: Instruments,
        limiter: Limiter | None = None,
    ) -> None:
        self.store = store
        self.limiter = limiter or Limiter(waiters=THREADS - 2)
        self.source = source
        self.clock = clock
        self.registry = registry(store, clock, per_job, source.runtime, instruments)
        self.renders = Renders()
        self.past = PastDays()
        self.templates = Environment(
            loader=PackageLoader("backupwatch", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.globals.update(
            version=__version__,
            refresh=REFRESH_SECONDS,
            symbols=SYMBOLS,
            Verdict=Verdict,
            verdict_of=verdict_of,
            z=format_z,
            site_url=site_url,
            entry_status=JobStatus.from_entry,
            row_cells=row_cells,
            site_row=site_row,
        )
        self.css = resources.files("backupwatch").joinpath("static/style.css").read_bytes()

    def __call__(
        self, environ: Mapping[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        response = self.respond(method, environ)
        body = response.body
        headers = [("Content-Type", response.content_type), *SECURITY_HEADERS, *response.headers]
        if response.gzipped is not None:
            headers.append(("Vary", "Accept-Encoding"))
            if _accepts_gzip(str(environ.get("HTTP_ACCEPT_ENCODING", ""))):
                body = response.gzipped
                headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(body))))
        start_response(response.status, headers)
        return [] if method == "HEAD" else [body]

    def respond(self, method: str, environ: Mapping[str, Any]) -> Response:
        if method not in ("GET", "HEAD"):
            return text("405 Method Not Allowed", "read-only: GET and HEAD", ("Allow", ALLOWED))
        query_string = str(environ.get("QUERY_STRING", ""))
        if len(query_string) > MAX_QUERY_BYTES:
            return text("414 URI Too Long", f"query string over {MAX_QUERY_BYTES} bytes")
        segments = _segments(environ)
        if segments is None:
            return text("400 Bad Request", "not a path this server answers")
        if segments != ["healthz"] and "REMOTE_ADDR" in environ:
            refused = self._throttle(str(environ["REMOTE_ADDR"]))
            if refused is not None:
                return refused
        query = parse_qs(query_string, max_num_fields=20)
        try:
            return self.route(segments, query)
        except SQLAlchemyError as exc:
            detail = str(exc).splitlines()[0]
            log.warning("web.database_error", error=detail)
            return text("503 Service Unavailable", f"cannot read the database: {detail}")
        except Exception:
            log.exception("web.internal_error", path="/".join(segments))
            return text("500 Internal Server Error", "internal error (see the daemon's log)")

    def _throttle(self, client: str) -> Response | None:
        """`client`'s token (`ratelimit`): None once it has one, else the 429 answer. Only
        requests through a socket (with a peer address) are counted; `/healthz` never is."""
        decision = self.limiter.admit(client)
        if decision.refused:
            return text(
                "429 Too Many Requests",
                "too many requests from this address: retry later",
                ("Retry-After", str(decision.retry_after)),
            )
        if decision.wait > 0:
            try:
                time.sleep(decision.wait)  # this thread only, without the GIL
            finally:
                self.limiter.waited()
        return None

    def route(self, segments: list[str], query: dict[str, list[str]]) -> Response:
        match segments:
            case [""]:
                problems = query.get("problems", ["0"])[-1] not in ("", "0")
                instance = query.get("instance", [""])[-1] or None
                return self.renders.get(
                    repr(("/", problems, instance)), lambda: self.index(problems, instance)
                )
            case ["metrics"]:
                return self.renders.get("/metrics", self.metrics)
            case ["healthz"]:
                return self.healthz()
            case ["api", "status"]:
                return self.renders.get("/api/status", self.api_status)
            case ["static", "style.css"]:
                return Response("200 OK", self.css, "text/css; charset=utf-8")
            case ["job", ident] if ident.isdigit() and len(ident) < 12:
                page = _page(query)
                return self.renders.get(f"/job/{ident}?{page}", lambda: self.job(int(ident), page))
            case ["site", company, city, neighborhood]:
                return self.renders.get(
                    repr(("site", company, city, neighborhood)),
                    lambda: self.site(company, city, neighborhood),
                )
        return text("404 Not Found", "no such page")

    # ---------------------------------------------------------------- pages

    def healthz(self) -> Response:
        failing = self.source.failing_loops()
        if failing:
            return text("503 Service Unavailable", "unhealthy: " + ", ".join(failing))
        return text("200 OK", "ok")

    def api_status(self) -> Response:
        from backupwatch.ctl import status_document

        document = status_document(self.source.status_answer(self.store))
        body = json.dumps(document, indent=2).encode()
        return Response("200 OK", body, "application/json")

    def metrics(self) -> Response:
        # 0.0.4: the text format every Prometheus version reads
        return Response("200 OK", exposition(self.registry), CONTENT_TYPE_PLAIN_0_0_4)

    def index(self, problems: bool, instance: str | None = None) -> Response:
        """The grid; `instance` (SPEC §15) keeps one daemon instance's jobs."""
        now = self.clock()
        views = self.store.job_states(now, last_success=False)
        instances = sorted({view.instance for view in views if view.instance})
        past = self.past.rows(self.store, views, now)  # every site's: one set for all filters
        if instance is not None:
            views = [view for view in views if view.instance == instance]
        today = day_counts(self.store, window(now)[-1:])
        page = board(views, today, now, problems, past)
        return self._html(
            "index.html",
            board=page,
            problems=problems,
            instance=instance,
            instances=instances,
            here=_index_url(problems=False, instance=instance),
            problems_url=_index_url(problems=True, instance=instance),
        )

    def site(self, company: str, city: str, neighborhood: str) -> Response:
        now = self.clock()
        j = ExpectedBackupJob
        views = self.store.job_views(
            now, j.company_name == company, j.city == city, j.neighborhood == neighborhood
        )
        if not views:
            return text("404 Not Found", "no such site")
        days = window(now)
        counts = day_counts(self.store, days, (company, city, neighborhood))
        active = [view for view in views if view.active]
        return self._html(
            "site.html",
            name=f"{company}/{city}/{neighborhood}",
            company=company,
            rows=site_rows(active, counts, now),
            inactive=[view for view in views if not view.active],
            days=days,
            now=now,
        )

    def job(self, job_id: int, page: int) -> Response:
        now = self.clock()
        views = self.store.job_views(now, ExpectedBackupJob.id == job_id)
        if not views:
            return text("404 Not Found", "no such job")
        e = BackupEntry
        with self.store.reading() as session:
            total = session.scalar(select(func.count()).where(e.job_id == job_id)) or 0
            entries = list(
                session.scalars(
                    select(e)
                    .where(e.job_id == job_id)
                    .order_by(e.cycle.desc(), e.id.desc())
                    .limit(PAGE_SIZE)
                    .offset((page - 1) * PAGE_SIZE)
                )
            )
        pages = max(1, -(-total // PAGE_SIZE))
        return self._html(
            "job.html", job=views[0], entries=entries, page=page, pages=pages, total=total
        )

    def _html(self, template: str, **context: Any) -> Response:
        body = self.templates.get_template(template).render(**context).encode()
        return Response("200 OK", body, "text/html; charset=utf-8", (HTML_POLICY,))


def row_cells(row: Row) -> Markup:
    """A grid row's day cells: markup made by `grid.cells_html`, where every variable part is
    escaped or ours."""
    return Markup(row.html)  # noqa: S704 - escaped where it was made


def _accepts_gzip(header: str) -> bool:
    """`Accept-Encoding` names gzip (or `*`) without refusing it with `q=0`."""
    for part in header.lower().split(","):
        coding, _, params = part.strip().partition(";")
        if coding.strip() in ("gzip", "*"):
            quality = params.replace(" ", "").removeprefix("q=")
            return not (params and quality.rstrip("0").rstrip(".") in ("0", ""))
    return False


def _index_url(problems: bool, instance: str | None) -> str:
    """`/` with the page's filters (escaped: an instance name is the operator's, but still)."""
    query = {"problems": "1"} if problems else {}
    if instance is not None:
        query["instance"] = instance
    return "/?" + urlencode(query) if query else "/"


def _segments(environ: Mapping[str, Any]) -> list[str] | None:
    """The request path's segments, each percent-decoded on its own (so that a `/` inside a
    company's name stays inside its segment); None for anything suspicious."""
    raw = str(environ.get("REQUEST_URI") or quote(str(environ.get("PATH_INFO", "/"))))
    path = raw.split("?", 1)[0]
    if not path.startswith("/") or len(path) > MAX_PATH_BYTES:
        return None
    segments = []
    for part in path[1:].split("/"):
        try:
            segment = unquote(part, errors="strict")
        except UnicodeDecodeError:
            return None
        if segment in (".", "..") or "\x00" in segment or "\\" in part:
            return None
        segments.append(segment)
    return segments


def _page(query: dict[str, list[str]]) -> int:
    value = query.get("page", ["1"])[-1]
    return min(int(value), 10**6) if value.isdigit() and int(value) > 0 else 1


class WebServer:
    """waitress on `http_listen`, in a daemon thread; `start` fails at once when it cannot
    listen (the key and the address named), `stop` closes every connection."""

    def __init__(self, listen: str, app: WebApp) -> None:
        self.listen = listen
        self.app = app
        self.server: Any = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        from waitress.server import create_server

        host, port = parse_listen(self.listen)
        try:
            self.server = create_server(
                self.app,
                host=host,
                port=port,
                threads=THREADS,
                connection_limit=CONNECTION_LIMIT,
                channel_timeout=CHANNEL_TIMEOUT,
                cleanup_interval=5,
                max_request_header_size=MAX_HEADER_BYTES,
                max_request_body_size=65536,
                outbuf_overflow=OUTBUF_BYTES,
                asyncore_use_poll=True,  # select() fails above 1,024 descriptors
                ident="backupwatch",
                expose_tracebacks=False,
            )
        except OSError as exc:
            raise OSError(
                exc.errno, f"http_listen {self.listen}: cannot listen: {exc.strerror or exc}"
            ) from exc
        self.thread = threading.Thread(target=self._run, name="http", daemon=True)
        self.thread.start()
        log.info("http.listening", address=self.address)

    @property
    def address(self) -> str:
        if self.server is None:
            return self.listen
        host, port = self.server.socket.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def _run(self) -> None:
        try:
            self.server.run()
        except Exception:
            log.exception("http.failed")

    def is_alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self, timeout: float) -> None:
        """Close the listening socket and every connection from the server's own thread (the
        only one that may touch its socket map), then let the request threads finish."""
        if self.server is None or self.thread is None:
            return
        server = self.server

        def close_all() -> None:
            for channel in list(server._map.values()):
                channel.handle_close()

        with contextlib.suppress(OSError):  # the loop is gone already
            server.trigger.pull_trigger(close_all)
        self.thread.join(timeout)
        server.task_dispatcher.shutdown(timeout=max(0.1, timeout))
        self.app.store.dispose()
