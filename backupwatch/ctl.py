"""SPEC §8, §11: `backupwatchctl`, the operator's tool.

Job states are read from the database, so `status` and `history` work while the daemon is down;
daemon actions go through its control socket. When the daemon is up, `status` asks it for the
job rows too: the tool then imports neither pydantic nor SQLAlchemy (most of a second here), so
it answers in a fraction of one. Heavy modules are imported inside the commands that need them.

It never prints a traceback: a closed pipe (`status | head`) ends it quietly, a configuration
with errors that still names a readable database is a warning on stderr, and any other
unexpected error becomes one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from backupwatch import __version__, locate
from backupwatch.control import ControlError, DaemonUnreachable, call
from backupwatch.locate import DEFAULT_CONFIG_PATH, ConfigError
from backupwatch.names import visible
from backupwatch.timeutil import format_z, utc_now

if TYPE_CHECKING:
    from backupwatch.config import Settings
    from backupwatch.jobs import JobSpec
    from backupwatch.store import BackupEntry, Store

EXIT_OK, EXIT_ERROR, EXIT_DAEMON_DOWN = 0, 1, 3
EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader left
EXIT_INTERRUPTED = 130
DEFAULT_MAX_BYTES = 1_048_576
DEFAULT_HISTORY_LIMIT = 20
STATUS_TIMEOUT = 10.0


class Ctl:
    """One invocation: the parsed arguments and a lazily, leniently loaded configuration."""

    def __init__(
        self, args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None
    ) -> None:
        self.args = args
        self.out = out or sys.stdout  # looked up now, not at import: callers may redirect it
        self.err = err or sys.stderr
        self.environ = dict(os.environ)
        self.last_answer: dict[str, Any] = {}  # the daemon's answer to the last action
        self._settings: Settings | None = None
        self._defaulted: frozenset[str] = frozenset()
        self._config_errors: list[str] = []
        # Only the commands that send check the Apprise URLs (importing Apprise is slow).
        self.check_urls = getattr(args, "command", None) == "alert-test"

    @property
    def config_path(self) -> Path:
        path = locate.default_config_path(getattr(self.args, "config", None), self.environ)
        return Path(os.path.abspath(path))

    def settings(self) -> Settings:
        """The configuration; its errors are a warning on stderr, each bad key its default."""
        if self._settings is None:
            from backupwatch.config import load_settings_lenient

            lenient = load_settings_lenient(self.config_path, self.environ, self.check_urls)
            self._settings, self._defaulted = lenient.settings, lenient.defaulted
            self._config_errors = lenient.errors
            if lenient.errors:
                self.config_warning(lenient.errors)
        return self._settings

    def needs(self, key: str) -> Settings:
        """The settings, when `key` itself is valid: a default database or socket would only
        show another installation's state (or none), so a bad one stops the command."""
        settings = self.settings()
        if key in self._defaulted:
            raise ConfigError([f"{key} is invalid (see above): cannot go on without it"])
        return settings

    def config_warning(self, errors: Sequence[str]) -> None:
        self.fail(
            "warning: the configuration has errors (the daemon would refuse it; "
            "each bad key is read as its default here):"
        )
        for error in errors:
            self.fail(f"  {visible(error)}")

    def print(self, text: str = "") -> None:
        print(text, file=self.out)

    def line(self, text: str) -> None:
        """A line that shows strings agents or reports chose: escaped, see `visible`."""
        self.print(visible(text))

    def fail(self, text: str) -> None:
        print(f"backupwatchctl: {text}", file=self.err)

    def dump(self, value: Any) -> None:
        self.print(json.dumps(value, indent=2))


# ------------------------------------------------------------------ commands


def cmd_status(ctl: Ctl) -> int:
    daemon, problem, answer = _daemon_status(ctl)
    rows, db_error, warnings = _status_rows(ctl, daemon, answer)
    rows = of_instance(rows, ctl.args.instance)
    if ctl.args.json:
        ctl.dump({"daemon": daemon, "jobs": rows})
    else:
        ctl.print(_daemon_line(daemon))
        for line in _daemon_details(daemon):
            ctl.print(f"  {visible(line)}")
        _table(
            ctl,
            [
                "ID",
                "SITE",
                "DATABASE",
                "FREQUENCY",
                "STATUS",
                "LAST SUCCESS",
                "NEXT DEADLINE",
                "INSTANCE",
            ],
            [[*_view_row(row), row.get("instance") or "-"] for row in rows],
        )
    for warning in warnings:
        ctl.fail(warning)
    if db_error:
        ctl.fail(f"cannot read the database: {db_error}")
    if problem:
        ctl.fail(problem)
        return EXIT_ERROR
    if not daemon["running"]:
        return EXIT_DAEMON_DOWN
    return EXIT_ERROR if db_error else EXIT_OK


def of_instance(rows: list[dict[str, Any]], instance: str | None) -> list[dict[str, Any]]:
    """SPEC §15: the rows of one instance (`--instance`), or all of them."""
    if instance is None:
        return rows
    return [row for row in rows if row.get("instance") == instance]


def _status_rows(
    ctl: Ctl, daemon: dict[str, Any], answer: dict[str, Any]
) -> tuple[list[dict[str, Any]], str | None, list[str]]:
    """The job rows, a database error, and warnings: from the daemon when it read its own
    configuration file for us, else from the database (importing what that takes)."""
    if "jobs" in answer or "jobs_error" in answer:
        return answer.get("jobs") or [], answer.get("jobs_error"), _file_warnings(ctl, answer)
    settings = ctl.needs("database_url")
    rows, db_error = _job_rows(settings)
    return rows, db_error, _mismatches(settings, daemon)


def _file_warnings(ctl: Ctl, answer: dict[str, Any]) -> list[str]:
    """What the daemon found in the file this tool reads: errors, and a database it names
    other than the one the daemon runs on (issue 6 item 9)."""
    check = answer.get("file_check") or {}
    if check.get("errors"):
        ctl.config_warning(check["errors"])
    named, running = check.get("database"), answer.get("database")
    if named and running and named != running:
        return [_database_mismatch(running, ctl.config_path, named)]
    return []


def _database_mismatch(running: str, config_path: Path, named: str) -> str:
    return (
        f"the running daemon uses the database {running}, but {config_path} "
        f"now names {named}: restart it to apply (systemctl restart backupwatch); "
        "the job states above come from the daemon's database"
    )


_DAEMON_KEYS = (  # SPEC §8's four first, then what the daemon adds
    "pid",
    "version",
    "uptime_s",
    "pending_reports",
    "state",
    "phase",
    "waiting_reports",
    "left_in_place",
    "replaced_workers",
    "warnings",
    "database",
    "config_path",
    "alerts",
    "instance",
)


def _daemon_status(ctl: Ctl) -> tuple[dict[str, Any], str | None, dict[str, Any]]:
    """The daemon's own view, a problem other than 'not running' (e.g. permission denied), and
    its whole answer (job rows included when it could read them)."""
    down: dict[str, Any] = {"running": False, **dict.fromkeys(_DAEMON_KEYS[:4])}
    socket = locate.control_socket(ctl.config_path, ctl.environ)
    try:
        answer = call(
            socket,
            "status",
            timeout=STATUS_TIMEOUT,
            jobs=True,
            config_path=str(ctl.config_path),
            environ=locate.overrides(ctl.environ),
        )
    except DaemonUnreachable:
        return down, None, {}
    except ControlError as exc:
        return down, f"cannot ask the daemon: {exc}", {}
    if not answer.get("ok"):
        return down, f"the daemon answered with an error: {answer.get('error')}", {}
    return daemon_view(answer), None, answer


def daemon_view(answer: dict[str, Any]) -> dict[str, Any]:
    """`status --json`'s "daemon" object from a running daemon's `status` answer."""
    return {"running": True, **{key: answer.get(key) for key in _DAEMON_KEYS}}


def status_document(answer: dict[str, Any]) -> dict[str, Any]:
    """SPEC §8's `status --json` document from a running daemon's `status` answer with its
    job rows (also what the daemon's `/api/status` serves, SPEC §12)."""
    return {"daemon": daemon_view(answer), "jobs": answer.get("jobs") or []}


def _daemon_details(daemon: dict[str, Any]) -> list[str]:
    """What the daemon holds that an operator should know: waits, reports it could not move,
    replaced workers, and warnings about its limits."""
    lines = [
        f"{count} report(s) waiting: {why}"
        for why, count in sorted((daemon.get("waiting_reports") or {}).items())
    ]
    lines += [
        f"left in place (cannot be moved): {path}" for path in daemon.get("left_in_place") or []
    ]
    lines += [f"worker replaced: {why}" for why in daemon.get("replaced_workers") or []]
    lines += [f"warning: {text}" for text in daemon.get("warnings") or []]
    alerts = daemon.get("alerts") or {}
    if alerts.get("pending") or alerts.get("failed"):
        lines.append(
            f"alerts: {alerts.get('pending', 0)} pending, {alerts.get('failed', 0)} failed "
            "(backupwatchctl alerts)"
        )
    return lines


def _mismatches(settings: Settings, daemon: dict[str, Any]) -> list[str]:
    """Issue 6 item 9: a daemon that runs on another database or socket than the file names
    (the operator changed a key that needs a restart) must not be silently misread."""
    if daemon["running"]:
        running, named = daemon.get("database"), shown_url(settings.database_url)
        if running and running != named:
            return [
                f"the running daemon uses the database {running}, but {settings.config_path} "
                f"now names {named}: restart it to apply (systemctl restart backupwatch); "
                "the job states above come from the file's database"
            ]
        return []
    return [
        f"backupwatchd (pid {pid}) is running but does not answer on {settings.control_socket}: "
        f"if control_socket was changed in {settings.config_path}, restart it to apply"
        for pid in running_daemons(settings.config_path)
    ]


def shown_url(url: str) -> str:
    """A database URL as the daemon shows it: without its password."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def running_daemons(config: Path, proc: Path = Path("/proc")) -> list[int]:
    """Pids of the backupwatchd processes this user can see that run on `config`: named by
    their `--config` (resolved against their working folder), or, without one, when `config`
    is the packaged default (their environment cannot be read to know better)."""
    found = []
    for entry in proc.glob("[0-9]*"):
        try:
            argv = [os.fsdecode(a) for a in (entry / "cmdline").read_bytes().split(b"\0")]
        except OSError:
            continue
        if not any(os.path.basename(arg) == "backupwatchd" for arg in argv[:2]):
            continue
        if _daemon_config(entry, argv) == config:
            found.append(int(entry.name))
    return sorted(found)


def _daemon_config(entry: Path, argv: list[str]) -> Path | None:
    for index, arg in enumerate(argv):
        value = None
        if arg == "--config" and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith("--config="):
            value = arg.removeprefix("--config=")
        if value is not None:
            try:
                return Path(os.path.normpath(Path(os.readlink(entry / "cwd")) / value))
            except OSError:
                return Path(os.path.normpath(value)) if os.path.isabs(value) else None
    return DEFAULT_CONFIG_PATH


def _open_store(settings: Settings) -> Store | None:
    """None when the daemon has never created its SQLite file: nothing to show yet."""
    from backupwatch.store import Store

    url = settings.database_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return None
    return Store(url, create=False)


def _job_rows(settings: Settings) -> tuple[list[dict[str, Any]], str | None]:
    from sqlalchemy.exc import SQLAlchemyError

    store = _open_store(settings)
    if store is None:
        return [], None
    try:
        return [view.as_json() for view in store.job_views(utc_now())], None
    except SQLAlchemyError as exc:
        return [], str(exc).splitlines()[0]
    finally:
        store.dispose()


def _daemon_line(daemon: dict[str, Any]) -> str:
    if not daemon["running"]:
        return "backupwatchd: not running (job states below come from the database)"
    state = daemon.get("state") or "running"
    if state != "running":
        state = daemon.get("phase") or state
    instance = f"instance {daemon['instance']}, " if daemon.get("instance") else ""
    return (
        f"backupwatchd: {state}, {instance}pid {daemon['pid']}, version {daemon['version']}, "
        f"up {timedelta(seconds=daemon['uptime_s'] or 0)}, "
        f"{daemon['pending_reports']} reports pending"
    )


def _view_row(row: dict[str, Any]) -> list[str]:
    site = f"{row['company_name']}/{row['city']}/{row['neighborhood']}"
    status = _status_cell(row)
    return [
        str(row["id"]),
        site,
        row["database_name"],
        row["frequency"],
        status,
        row["last_success_at"] or "-",
        row["next_deadline"] or "-",
    ]


def _status_cell(row: dict[str, Any]) -> str:
    """SPEC §11: `status` shows PAUSED and acknowledgements."""
    status = row["current_status"]
    if not row["active"]:
        return f"{status} (inactive)"
    if row.get("paused"):
        until = row.get("paused_until")
        return f"PAUSED {'until ' + until if until else 'until resumed'} ({status})"
    if row.get("acked_at") and status not in ("OK", "UNKNOWN"):
        return f"{status} (acknowledged)"
    return str(status)


def cmd_reload(ctl: Ctl) -> int:
    code = _daemon_action(ctl, "reload", _reload_text)
    for change in ctl.last_answer.get("needs_restart") or []:
        ctl.fail(
            f"{change['key']} changed in the configuration ({change['running']} -> "
            f"{change['file']}): the daemon applies it only when restarted "
            "(systemctl restart backupwatch)"
        )
    return code


def cmd_rescan(ctl: Ctl) -> int:
    return _daemon_action(
        ctl, "rescan", lambda a: f"rescan started: {a.get('queued', 0)} reports queued"
    )


def _reload_text(answer: dict[str, Any]) -> str:
    return (
        f"reloaded: {answer['added']} added, {answer['changed']} changed, "
        f"{answer['deactivated']} deactivated"
    )


def _daemon_action(ctl: Ctl, command: str, describe: Callable[[dict[str, Any]], str]) -> int:
    socket = locate.control_socket(ctl.config_path, ctl.environ)
    try:
        answer = call(socket, command, timeout=120.0)
    except DaemonUnreachable as exc:
        ctl.fail(f"the daemon is not running ({exc})")
        return EXIT_DAEMON_DOWN
    except ControlError as exc:
        ctl.fail(f"cannot ask the daemon to {command}: {exc}")
        return EXIT_ERROR
    if not answer.get("ok"):
        ctl.fail(
            f"{command} failed; the daemon keeps its previous configuration:\n{answer.get('error')}"
        )
        return EXIT_ERROR
    ctl.last_answer = answer
    ctl.print(describe(answer))
    return EXIT_OK


def cmd_jobs(ctl: Ctl) -> int:
    from backupwatch.jobs import read_jobs

    settings = ctl.settings()
    specs, errors = read_jobs(settings)
    if errors:
        ctl.fail("warning: jobs with errors are left out (the daemon would refuse them all):")
        for error in errors:
            ctl.fail(f"  {visible(error)}")
    window = settings.scanner_report_collection_window_minutes
    if ctl.args.instance not in (None, settings.instance):
        # SPEC §15: this file's jobs are this instance's; another host's are in its own files.
        ctl.fail(
            f"note: these job files define instance {settings.instance!r}'s jobs; "
            f"`status --instance {ctl.args.instance}` shows {ctl.args.instance!r}'s"
        )
        specs = []
    if ctl.args.json:
        ctl.dump(
            [
                {**_spec_json(spec, settings, window), "instance": settings.instance}
                for spec in specs
            ]
        )
        return EXIT_OK
    rows = [
        [
            spec.agent_id,
            spec.database_name,
            _schedule_text(spec),
            f"±{spec.collection_window_minutes or window} min",
            str(settings.backup_storage_root / spec.deposit_relpath),
            "yes" if spec.active else "no",
            settings.instance,
        ]
        for spec in specs
    ]
    header = ["AGENT", "DATABASE", "SCHEDULE (UTC)", "WINDOW", "DEPOSIT FOLDER", "ACTIVE"]
    _table(ctl, [*header, "INSTANCE"], rows)
    return EXIT_OK


def _schedule_text(spec: JobSpec) -> str:
    at = f"{spec.expected_hour_utc or 0:02d}:{spec.expected_minute_utc:02d}"
    days = ""
    if spec.days_of_week:
        days = " " + ",".join(
            ("MO", "TU", "WE", "TH", "FR", "SA", "SU")[d] for d in spec.days_of_week
        )
    match spec.frequency.value:
        case "HOURLY":
            return f"HOURLY at :{spec.expected_minute_utc:02d}{days}"
        case "MONTHLY":
            return f"MONTHLY day {spec.day_of_month} {at}"
        case "ONCE":
            return f"ONCE {spec.expected_date} {at}"
    return f"{spec.frequency.value} {at}{days}"


def _spec_json(spec: JobSpec, settings: Settings, window: int) -> dict[str, Any]:
    data = spec.model_dump(mode="json", exclude={"source"})
    data["collection_window_minutes"] = spec.collection_window_minutes or window
    data["deposit_folder"] = str(settings.backup_storage_root / spec.deposit_relpath)
    data["source"] = spec.source
    return data


def cmd_history(ctl: Ctl) -> int:
    store = _open_store(ctl.needs("database_url"))
    job = store.find_job(ctl.args.job) if store else None
    if job is not None and ctl.args.instance not in (None, job.instance):
        job = None  # SPEC §15: `--instance` narrows, as in every read view
    if store is None or job is None:
        ctl.fail(f"unknown job: {ctl.args.job} (give an id or company/city/neighborhood/database)")
        return EXIT_ERROR
    limit = ctl.args.limit or None
    entries = store.history(job.id, limit)
    total = _entry_count(store, job.id) if len(entries) == limit else len(entries)
    store.dispose()
    left_out = None
    if total > len(entries):
        left_out = f"{len(entries)} of {total} entries shown; --limit N or --limit 0 for all"
    if ctl.args.json:
        ctl.dump([_entry_json(e) for e in entries])  # SPEC §8: a plain list, so the note goes
        if left_out:  # to stderr
            ctl.fail(left_out)
        return EXIT_OK
    owner = f", instance {job.instance}" if job.instance else ""
    ctl.line(f"{job.label} ({job.frequency.value}, agent {job.agent_id}{owner})")
    _table(
        ctl,
        ["CYCLE", "STATUS", "RECORDED", "REPORT", "MESSAGE"],
        [
            [
                format_z(e.cycle) or "-",
                e.status.value,
                format_z(e.recorded_at) or "-",
                e.report_name or "-",
                e.message,
            ]
            for e in entries
        ],
    )
    if left_out:
        ctl.print(left_out)
    return EXIT_OK


def _entry_count(store: Store, job_id: int) -> int:
    from sqlalchemy import func, select

    from backupwatch.store import BackupEntry

    with store.reading() as session:
        query = select(func.count()).select_from(BackupEntry).where(BackupEntry.job_id == job_id)
        return session.scalar(query) or 0


def _entry_json(entry: BackupEntry) -> dict[str, Any]:
    return {
        "cycle": format_z(entry.cycle),
        "status": entry.status.value,
        "message": entry.message,
        "recorded_at": format_z(entry.recorded_at),
        "report": entry.report_name,
        "agent_sha256": entry.agent_sha256,
        "agent_size": entry.agent_size,
        "server_sha256": entry.server_sha256,
        "server_size": entry.server_size,
        "final_path": entry.final_path,
    }


def cmd_validate(ctl: Ctl) -> int:
    """Offline checks of SPEC §3 for agent authors; works without a configuration too."""
    from backupwatch.config import load_settings_lenient

    max_bytes, max_age = DEFAULT_MAX_BYTES, timedelta(days=1)
    try:
        settings = load_settings_lenient(ctl.config_path, ctl.environ).settings
        max_bytes, max_age = (
            settings.report_max_bytes,
            timedelta(days=settings.max_status_file_age_days),
        )
    except ConfigError:
        pass  # agent authors run it where no backupwatch.toml exists: the defaults then
    failures = 0
    for name in ctl.args.files:
        reason = _validate_file(Path(name), max_bytes, max_age)
        if reason is None:
            ctl.line(f"{name}: valid")
        else:
            failures += 1
            ctl.line(f"{name}: invalid: {reason}")
    return EXIT_ERROR if failures else EXIT_OK


def _validate_file(path: Path, max_bytes: int, max_age: timedelta) -> str | None:
    """The daemon's own acceptance (`report.accept_report`), minus the site's agent_id."""
    from backupwatch.report import ReportRejected, accept_report, size_problem

    try:
        if path.is_symlink() or not path.is_file():
            return "not a regular file"
        problem = size_problem(path.stat().st_size, max_bytes)
        if problem:
            return problem
        accept_report(path.read_bytes(), utc_now(), max_age)
    except ReportRejected as exc:
        return exc.reason
    except OSError as exc:
        return f"cannot read it: {exc.strerror}"
    return None


def cmd_check_config(ctl: Ctl) -> int:
    from backupwatch.config import load_settings
    from backupwatch.jobs import load_jobs

    settings = load_settings(ctl.config_path, ctl.environ)
    specs = load_jobs(settings)
    sites = {spec.deposit_relpath for spec in specs if spec.active}
    ctl.print(f"{settings.config_path}: OK: {len(specs)} jobs, {len(sites)} active deposit folders")
    for warning in config_warnings(settings):
        ctl.fail(f"warning: {warning}")
    return EXIT_OK


def config_warnings(settings: Settings) -> list[str]:
    """Mistakes that are not errors but would make the daemon watch the wrong thing."""
    from backupwatch.jobs import unread_job_files

    warnings = unread_job_files(settings)
    for key in ("backup_storage_root", "validated_backups_base_path"):
        root = getattr(settings, key)
        if not root.is_dir():
            warnings.append(
                f"{key} {root} does not exist: the daemon will create it empty (relative paths "
                f"are resolved against {settings.config_path.parent})"
            )
    return warnings


# ------------------------------------------------------------------ plumbing


def _table(ctl: Ctl, header: list[str], rows: list[list[str]]) -> None:
    """Columns, one row a line; every cell escaped (see `visible`)."""
    rows = [[visible(str(cell)) for cell in row] for row in rows]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        ctl.print(
            "  ".join(
                str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)
            ).rstrip()
        )


def _later(name: str) -> Callable[[Ctl], int]:
    """A command of `ctl_ops`, imported only when it runs (see the module docstring)."""

    def run(ctl: Ctl) -> int:
        from backupwatch import ctl_ops

        command: Callable[[Ctl], int] = getattr(ctl_ops, name)
        return command(ctl)

    return run


COMMANDS: dict[str, Callable[[Ctl], int]] = {
    "status": cmd_status,
    "reload": cmd_reload,
    "rescan": cmd_rescan,
    "jobs": cmd_jobs,
    "history": cmd_history,
    "validate": cmd_validate,
    "check-config": cmd_check_config,
    "check": _later("cmd_check"),
    "alerts": _later("cmd_alerts"),
    "alert-test": _later("cmd_alert_test"),
    "pause": _later("cmd_pause"),
    "resume": _later("cmd_resume"),
    "ack": _later("cmd_ack"),
    "rejected": _later("cmd_rejected"),
    "retry": _later("cmd_retry"),
    "prune": _later("cmd_prune"),
}


CONFIG_HELP = "backupwatch.toml (default: $BACKUPWATCH_CONFIG or /etc/backupwatch/backupwatch.toml)"


INSTANCE_HELP = "only the jobs of this daemon instance (SPEC §15; default: every instance)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backupwatchctl", description="Drive and inspect backupwatchd."
    )
    parser.add_argument("--config", type=Path, help=CONFIG_HELP)
    parser.add_argument("--version", action="version", version=f"backupwatchctl {__version__}")
    # `--config` is accepted after the command too (`backupwatchctl status --config F`); the
    # sub-command's copy only sets it when given, so it never hides the one given before.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", type=Path, default=argparse.SUPPRESS, help=CONFIG_HELP)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=text, description=text, parents=[common])

    status = command("status", "the daemon's state and every job's status")
    status.add_argument("--json", action="store_true")
    command("reload", "make the daemon reload its configuration and jobs")
    command("rescan", "make the daemon scan the deposit folders now")
    jobs = command("jobs", "the configured jobs")
    jobs.add_argument("--json", action="store_true")
    for view in (status, jobs):
        view.add_argument("--instance", help=INSTANCE_HELP)
    history = command(
        "history",
        f"a job's entries, newest first (the {DEFAULT_HISTORY_LIMIT} newest unless --limit)",
    )
    history.add_argument("job", help="job id or company/city/neighborhood/database")
    history.add_argument(
        "--limit",
        type=_limit,
        default=DEFAULT_HISTORY_LIMIT,
        metavar="N",
        help=f"show the N newest entries (default: the {DEFAULT_HISTORY_LIMIT} newest; 0 for all)",
    )
    history.add_argument("--json", action="store_true")
    history.add_argument("--instance", help=INSTANCE_HELP)
    validate = command("validate", "check STATUS.json files offline")
    validate.add_argument("files", nargs="+", metavar="FILE")
    command("check-config", "check the configuration and job files")
    _lever_commands(command)
    return parser


def _lever_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """SPEC §11's commands (run by `ctl_ops`)."""
    check = command("check", "a Nagios/Icinga plugin: one status line, exit 0/1/2/3")
    check.add_argument("--job", help="only this job (id or company/city/neighborhood/database)")
    check.add_argument("--site", help="only this site (company/city/neighborhood)")
    check.add_argument("--company", help="only this company's jobs")
    check.add_argument("--instance", help=INSTANCE_HELP)
    check.add_argument(
        "--warning",
        metavar="S,...",
        help="conditions that are WARNING (default: UNCHANGED,SUSPICIOUS,REJECTED)",
    )
    check.add_argument(
        "--critical",
        metavar="S,...",
        help="conditions that are CRITICAL (default: "
        "MISSING,FAILED,HASH_MISMATCH,TRANSFER_INTEGRITY_FAILED,DOWN)",
    )
    alerts = command("alerts", "recent alert events and their delivery per channel")
    alerts.add_argument("--limit", type=_limit, default=DEFAULT_HISTORY_LIMIT, metavar="N")
    alerts.add_argument("--json", action="store_true")
    test = command("alert-test", "send a test message now; say whether each URL took it")
    test.add_argument("channel", nargs="?", help="one channel (default: all of them)")
    for name, text in (
        ("pause", "stop expecting a job or a whole site (entries are still recorded)"),
        ("resume", "expect a paused job or site again"),
    ):
        lever = command(name, text)
        lever.add_argument("target", metavar="JOB|SITE", help="id, c/city/n/database or c/city/n")
        if name == "pause":
            lever.add_argument(
                "--for",
                dest="duration",
                type=_duration,
                metavar="DURATION",
                help="resume by itself after this long: 2h, 3d, 90m, 1d12h (default: never)",
            )
            lever.add_argument("--reason", help="why, shown by status")
    ack = command("ack", "acknowledge a job that is not OK: no reminders until it changes")
    ack.add_argument("job", help="job id or company/city/neighborhood/database")
    ack.add_argument("--reason", help="why, shown by status")
    rejected = command("rejected", "rejected reports still in _rejected/, with their reasons")
    rejected.add_argument("--site", help="only this site (company/city/neighborhood)")
    rejected.add_argument("--json", action="store_true")
    retry = command("retry", "put rejected reports back where they came from")
    retry.add_argument("files", nargs="+", metavar="FILE", help="a report in a _rejected/ folder")
    prune = command("prune", "apply retention now (SPEC §14) and print what it removes")
    prune.add_argument("--dry-run", action="store_true", help="remove nothing; say what would go")


def _duration(text: str) -> timedelta:
    from backupwatch.ctl_ops import duration

    try:
        return duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _limit(value: str) -> int:
    try:
        limit = int(value)
    except ValueError:
        limit = -1
    if limit < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more (0 for all), not {value!r}")
    return limit


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ctl = Ctl(args)
    try:
        return COMMANDS[args.command](ctl)
    except BrokenPipeError:
        return _reader_gone()
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        return _last_words(ctl, f"invalid configuration:\n{exc}")
    except ControlError as exc:
        return _last_words(ctl, f"cannot talk to the daemon: {exc}")
    except Exception as exc:  # SPEC §11: never a traceback; one line that says what failed
        return _last_words(ctl, unexpected(exc))


def unexpected(exc: BaseException) -> str:
    """One line for an error nothing else caught: a database's own first line, or the type."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    if type(exc).__module__.startswith(("sqlalchemy", "psycopg2", "sqlite3")):
        return f"cannot read the database: {first or type(exc).__name__}"
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return f"unexpected error: {type(exc).__name__}: {first}".rstrip(": ")


def _last_words(ctl: Ctl, text: str) -> int:
    try:
        ctl.fail(text)
    except BrokenPipeError:
        return _reader_gone()
    return EXIT_ERROR


def _reader_gone() -> int:
    """stdout's reader left (`status | head`): end quietly, like any Unix tool.

    Python would still flush stdout at exit and print a BrokenPipeError about it; pointing
    the descriptor at /dev/null first keeps that flush silent.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # not a real descriptor (a test's capture): nothing will be flushed to a pipe
    return EXIT_CLOSED_PIPE


if __name__ == "__main__":
    sys.exit(main())
