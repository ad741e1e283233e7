"""SPEC §11: the operator's levers in `backupwatchctl`: check, alerts, alert-test, pause, resume,
ack, rejected, retry. `ctl` imports this module only when one of them runs.

pause, resume and ack write to the database themselves (the daemon need not be up): the store
locks the job rows as the daemon's own transactions do, so a pause and the MISSING timer, or an
ack and a state change, never half-see each other.
"""

from __future__ import annotations

import re
import socket
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from backupwatch.check import (
    DEFAULT_CRITICAL,
    DEFAULT_WARNING,
    UNKNOWN,
    Filters,
    conditions,
    judge,
    unknown,
)
from backupwatch.ctl import (
    EXIT_ERROR,
    EXIT_OK,
    Ctl,
    _daemon_status,
    _job_rows,
    _open_store,
    _table,
    of_instance,
    unexpected,
)
from backupwatch.names import visible
from backupwatch.timeutil import format_z, utc_now

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
REJECTED_WINDOW = timedelta(hours=24)


def duration(text: str) -> timedelta:
    """`2h`, `3d`, `1d12h`, `90m`, `30s`, `1w`: a pause's length (argparse type)."""
    compact = text.strip().lower()
    parts = _DURATION.findall(compact)
    if not parts or _DURATION.sub("", compact).strip():
        raise ValueError(f"{text!r} is not a duration such as 2h, 3d, 90m or 1d12h")
    total = timedelta()
    for amount, unit in parts:
        total += timedelta(**{_UNITS[unit]: float(amount)})
    if total <= timedelta():
        raise ValueError(f"{text!r} is not a positive duration")
    return total


# --------------------------------------------------------------------------- check


def cmd_check(ctl: Ctl) -> int:
    """Never a traceback and never an exit code outside 0-3: a plugin that cannot tell says
    UNKNOWN (the Monitoring Plugins guidelines)."""
    try:
        code, line = _check(ctl)
    except Exception as exc:
        verdict = unknown(unexpected(exc))
        code, line = verdict.code, verdict.line
    ctl.print(line)
    return code


def _check(ctl: Ctl) -> tuple[int, str]:
    args = ctl.args
    try:
        warning = conditions(args.warning) if args.warning is not None else DEFAULT_WARNING
        critical = conditions(args.critical) if args.critical is not None else DEFAULT_CRITICAL
    except ValueError as exc:
        verdict = unknown(f"bad --warning/--critical: {exc}")
        return verdict.code, verdict.line
    filters = Filters(job=args.job, site=args.site, company=args.company)
    daemon, problem, answer = _daemon_status(ctl)
    if "jobs_error" in answer:
        return UNKNOWN, unknown(f"cannot read the database: {answer['jobs_error']}").line
    if "jobs" in answer:
        rows, rejected = answer["jobs"], [tuple(pair) for pair in answer["rejected_sites"]]
    else:
        found = _rows_from_database(ctl)
        if isinstance(found, str):
            return UNKNOWN, unknown(found).line
        rows, rejected = found
    rows = of_instance(rows, args.instance)
    if args.job is not None and not any(filters.keeps(row) for row in rows):
        return UNKNOWN, unknown(f"no job {args.job}").line
    verdict = judge(rows, daemon["running"] and not problem, rejected, filters, warning, critical)
    return verdict.code, verdict.line


def _rows_from_database(ctl: Ctl) -> tuple[list[dict[str, Any]], list[Any]] | str:
    settings = ctl.needs("database_url")
    rows, db_error = _job_rows(settings)
    if db_error:
        return f"cannot read the database: {db_error}"
    store = _open_store(settings)
    if store is None:
        return "no database yet: backupwatchd has never run with this configuration"
    try:
        return rows, list(store.rejected_sites(utc_now() - REJECTED_WINDOW))
    finally:
        store.dispose()


# --------------------------------------------------------------------------- alerts


def cmd_alerts(ctl: Ctl) -> int:
    from backupwatch.outbox import Outbox

    store = _open_store(ctl.needs("database_url"))
    if store is None:
        ctl.print("no alert yet: backupwatchd has never run with this configuration")
        return EXIT_OK
    try:
        outbox = Outbox(store)
        events, counts = outbox.recent(ctl.args.limit), outbox.counts()
    finally:
        store.dispose()
    if ctl.args.json:
        ctl.dump([_event_json(event) for event in events])
        return EXIT_OK
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "none"
    ctl.print(f"deliveries: {summary}")
    rows = []
    for event in events:
        text = event.text
        deliveries = "; ".join(
            f"{d.channel}: {d.state}" + (f" ({d.attempts} failed)" if d.attempts else "")
            for d in event.deliveries
        )
        subject = text.job or text.site
        rows.append(
            [
                format_z(event.created_at) or "-",
                text.kind.value,
                subject,
                text.instance or "-",
                deliveries or "-",
            ]
        )
    _table(ctl, ["CREATED", "EVENT", "JOB OR SITE", "INSTANCE", "DELIVERIES"], rows)
    for event in events:
        for d in event.deliveries:
            if d.last_error and d.state != "sent":
                ctl.line(f"  {event.text.job or event.text.site} -> {d.channel}: {d.last_error}")
    return EXIT_OK


def _event_json(event: Any) -> dict[str, Any]:
    text = event.text
    return {
        "id": event.id,
        "kind": text.kind.value,
        "job": text.job,
        "site": text.site,
        "company": text.company,
        "instance": text.instance,
        "status": text.status,
        "cycle": format_z(text.cycle),
        "since": format_z(text.since),
        "message": text.message,
        "created_at": format_z(event.created_at),
        "deliveries": [
            {
                "channel": d.channel,
                "state": d.state,
                "attempts": d.attempts,
                "last_error": d.last_error,
                "sent_at": format_z(d.sent_at),
                "next_attempt_at": format_z(d.next_attempt_at) if d.state == "pending" else None,
            }
            for d in event.deliveries
        ],
    }


def cmd_alert_test(ctl: Ctl) -> int:
    from backupwatch.alerting import Message
    from backupwatch.channels import Channels

    settings = ctl.needs("alerts")
    channels = Channels(settings.alerts.channel_urls())
    names = channels.names()
    if ctl.args.channel is not None:
        if ctl.args.channel not in names:
            offered = ", ".join(names) or "none"
            ctl.fail(f"no channel {ctl.args.channel!r} with URLs; configured: {offered}")
            return EXIT_ERROR
        names = [ctl.args.channel]
    if not names:
        ctl.fail("no alert channel has URLs: set [alerts] urls or [alerts.channels.NAME] urls")
        return EXIT_ERROR
    failed = 0
    for name in names:
        message = Message(
            f"backupwatch: test message to {name}",
            f"A test of the alert channel {name!r}, sent by `backupwatchctl alert-test` "
            f"on {socket.gethostname()} at {format_z(utc_now())}. Nothing is wrong.",
        )
        for result in channels.send(name, message):
            state = "ok" if result.ok else f"FAILED: {result.error}"
            failed += not result.ok
            ctl.line(f"{name}: {result.shown}: {state}")
    return EXIT_ERROR if failed else EXIT_OK


# --------------------------------------------------------------------------- pause, ack


def _targets(ctl: Ctl, target: str) -> tuple[Any, list[Any]] | None:
    """A job (id or company/city/neighborhood/database) or a whole site (company/city/...)."""
    store = _open_store(ctl.needs("database_url"))
    if store is None:
        return None
    job = store.find_job(target)
    jobs = [job] if job is not None else store.site_jobs(target)
    return store, jobs


def cmd_pause(ctl: Ctl) -> int:
    now = utc_now()
    found = _targets(ctl, ctl.args.target)
    if found is None or not found[1]:
        return _unknown_target(ctl, ctl.args.target, site=True)
    store, jobs = found
    until: datetime | None = now + ctl.args.duration if ctl.args.duration else None
    try:
        store.pause([job.id for job in jobs], now, until, ctl.args.reason)
    finally:
        store.dispose()
    when = f"until {format_z(until)}" if until else "until resumed"
    for job in jobs:
        ctl.line(f"paused {job.label} {when}")
    return EXIT_OK


def cmd_resume(ctl: Ctl) -> int:
    found = _targets(ctl, ctl.args.target)
    if found is None or not found[1]:
        return _unknown_target(ctl, ctl.args.target, site=True)
    store, jobs = found
    try:
        resumed = store.resume([job.id for job in jobs], utc_now())
    finally:
        store.dispose()
    ctl.print(f"resumed {resumed} of {len(jobs)} job(s); the others were not paused")
    return EXIT_OK


def cmd_ack(ctl: Ctl) -> int:
    store = _open_store(ctl.needs("database_url"))
    job = store.find_job(ctl.args.job) if store else None
    if store is None or job is None:
        return _unknown_target(ctl, ctl.args.job, site=False)
    try:
        status = store.acknowledge(job.id, utc_now(), ctl.args.reason)
    finally:
        store.dispose()
    if status.value in ("OK", "UNKNOWN"):
        ctl.line(f"{job.label} is {status.value}: nothing to acknowledge")
    else:
        ctl.line(f"acknowledged {job.label} ({status.value}): no reminders until it changes")
    return EXIT_OK


def _unknown_target(ctl: Ctl, target: str, site: bool) -> int:
    what = "job or site" if site else "job"
    forms = "an id, company/city/neighborhood/database" + (
        " or company/city/neighborhood" if site else ""
    )
    ctl.fail(f"unknown {what}: {visible(target)} (give {forms})")
    return EXIT_ERROR


# --------------------------------------------------------------------------- rejected


def cmd_rejected(ctl: Ctl) -> int:
    from backupwatch.rejected import rejected_reports

    settings = ctl.settings()
    folders = _site_folders(ctl, settings.backup_storage_root, ctl.args.site)
    if folders is None:
        return _unknown_target(ctl, ctl.args.site, site=True)
    found = [report for folder, _ in folders for report in rejected_reports(folder)]
    labels = dict(folders)
    if ctl.args.json:
        ctl.dump(
            [
                {
                    "site": labels.get(r.folder),
                    "folder": str(r.folder),
                    "path": str(r.path),
                    "rejected_at": format_z(_instant(r.rejected_at)),
                    "reason": r.reason,
                }
                for r in found
            ]
        )
        return EXIT_OK
    rows = [
        [
            labels.get(r.folder) or str(r.folder),
            str(r.path),
            format_z(_instant(r.rejected_at)) or "-",
            _reason_only(r.reason) or "(no reason file)",
        ]
        for r in found
    ]
    _table(ctl, ["SITE", "REJECTED REPORT", "REJECTED AT", "REASON"], rows)
    if found:
        ctl.print("backupwatchctl retry FILE puts one back to be judged again")
    return EXIT_OK


def _instant(stamp: float | None) -> datetime | None:
    from datetime import UTC

    return None if stamp is None else datetime.fromtimestamp(stamp, UTC)


def _reason_only(reason: str | None) -> str | None:
    """The reason file says `NAME was rejected: WHY`; the table has the name already."""
    if reason is None:
        return None
    first = reason.splitlines()[0] if reason else ""
    return first.split(" was rejected: ", 1)[-1]


def _site_folders(ctl: Ctl, root: Path, site: str | None) -> list[tuple[Path, str | None]] | None:
    """Each deposit folder with its site label: every job's, and the root's own sub-folders
    (a report in a folder no job uses is rejected there). None: no such site."""
    store = _open_store(ctl.needs("database_url"))
    jobs = store.all_jobs() if store else []
    if store:
        store.dispose()
    folders: dict[Path, str | None] = {}
    for job in jobs:
        label = f"{job.company_name}/{job.city}/{job.neighborhood}"
        if site is None or site == label:
            folders[root / job.deposit_path] = label
    if site is not None:
        return sorted(folders.items()) or None
    try:
        strays = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        strays = []
    for folder in strays:
        folders.setdefault(folder, None)
    return sorted(folders.items())


def cmd_retry(ctl: Ctl) -> int:
    from backupwatch.rejected import NotRejected, retry

    root = ctl.settings().backup_storage_root
    failures = 0
    for name in ctl.args.files:
        try:
            back = retry(root, Path(name))
        except NotRejected as exc:
            failures += 1
            ctl.line(f"{name}: not a rejected report: {exc}")
        except OSError as exc:
            failures += 1
            ctl.line(f"{name}: cannot move it back: {exc.strerror or exc}")
        else:
            ctl.line(f"{name}: back as {back}; the daemon judges it again")
    return EXIT_ERROR if failures else EXIT_OK


# --------------------------------------------------------------------------- prune


def cmd_prune(ctl: Ctl) -> int:
    """SPEC §14 now: each removal as it happens, then a summary. Safe beside a running daemon
    (and other daemons on the database): removals are claimed, deletions are conditional."""
    from backupwatch.pruning import Pruner

    settings = ctl.needs("database_url")
    store = _open_store(settings)
    if store is None:
        ctl.print("nothing to prune: the database does not exist yet")
        return EXIT_OK
    # SPEC §15: only this host's jobs, as its daemon prunes them; another instance's final
    # files live under another host's root, where this one would misjudge them.
    store.instance = settings.instance
    try:
        report = Pruner(store, settings, progress=ctl.line).run_once(
            utc_now(), dry_run=ctl.args.dry_run
        )
    except Exception as exc:
        ctl.fail(unexpected(exc))
        return EXIT_ERROR
    finally:
        store.dispose()
    verb = "would remove" if report.dry_run else "removed"
    for path in report.moved:
        ctl.line(f"{verb} {path}")
    for path in report.stale_uploads:
        ctl.line(f"stale upload (kept, no report claimed it): {path}")
    ctl.print(
        f"{verb}: {len(report.backups)} validated backups, {report.entries} entries, "
        f"{report.reports} report keys, {report.alerts} alert events, "
        f"{len(report.moved)} files of _archive/ and _rejected/; "
        f"{len(report.kept_changed)} backups kept (changed since promotion), "
        f"{len(report.stale_uploads)} stale uploads"
    )
    return EXIT_OK
