"""Burst: 1,000 site reports of 3 databases each, all renamed into place at once.

    .venv/bin/python bench/burst.py [--sites 1000] [--databases 3] [--database sqlite|postgresql]
                                    [--rounds 1] [--no-wait]

Writes a jobs.toml of SITES x DATABASES hourly jobs (window +-30 min), and for every site its
deposit folder, one small staged file per database and its report as `.STATUS.json.part` (names
starting with "." are never read). Starts the real `backupwatchd`, waits for READY=1, then renames
every report to STATUS.json as fast as it can and waits until each report's idempotency row is
committed (a separate connection polls `processed_reports`).

Measured per round: databases validated per second = entries / (last commit - first rename),
where the last commit is the round's last `entry.recorded` log line (written after the commit,
so an upper bound) and, as a cross-check, the poll that first saw every report committed; the
daemon's CPU time (user + system) during the round. At the end: the daemon's peak RSS (VmHWM
from /proc/PID/status just before SIGTERM) and its RSS at READY, and "no report lost": every
report archived, SITES x DATABASES x ROUNDS SUCCESS entries, nothing rejected, no report or
staged file left in a deposit folder, every staged file promoted, the daemon exits 0.

Round 1 is every site's first report: the daemon creates each site's `_archive/` and final
storage folders as it goes. With --rounds 2 the same sites report again (new staged files and
report bytes, after the first round is done): the folders exist, the tables hold round 1's rows.

--attach CMD runs a profiler on the daemon for the rounds, or only --attach-round N (py-spy,
perf, strace -c): `{pid}` is replaced by the daemon's pid; the profiler is stopped with SIGINT.
"""

from __future__ import annotations

import argparse
import collections
import os
import shlex
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import (
    BenchDaemon,
    BenchDatabase,
    cpu_busy_ticks,
    database_block,
    jobs_toml,
    machine,
    others_cpu,
    own_cpu,
    parse_ts,
    postgres_cpu,
    report_bytes,
    wait_quiet,
    workspace,
    write_config,
    write_file,
)
from sqlalchemy import Connection, text

COUNT_REPORTS = text("SELECT count(*) FROM processed_reports")
COUNT_ENTRIES = text("SELECT status, count(*) FROM backup_entries GROUP BY status")


def folder_of(deposit: Path, site: str) -> Path:
    return deposit / f"Bench_City_{site}"


def prepare(
    deposit: Path, sites: list[str], databases: list[str], size: int, round_no: int
) -> list[Path]:
    """Everything an agent transfers before its report; returns the temp report paths."""
    when = datetime.now(UTC)
    temps = []
    for site in sites:
        folder = folder_of(deposit, site)
        blocks = {}
        for database in databases:
            content = os.urandom(size)
            staged = f"data/{database}-r{round_no}.sql.gz"
            write_file(folder / staged, content)
            blocks[database] = database_block(staged, content, when)
        temp = folder / ".STATUS.json.part"
        write_file(temp, report_bytes(site, when, blocks))
        temps.append(temp)
    return temps


def run(args: argparse.Namespace) -> dict[str, Any]:
    sites = [f"site{i:05d}" for i in range(args.sites)]
    databases = [f"db{j}" for j in range(args.databases)]
    with workspace(args.keep) as (base, run_dir):
        db = BenchDatabase.create(args.database, base)
        try:
            config = write_config(base, db.url, jobs_toml(sites, databases), run_dir / "ctl.sock")
            deposit = base / "deposit"
            temps = prepare(deposit, sites, databases, args.size, 1)
            daemon = BenchDaemon(config, run_dir, base / "daemon.log")
            daemon.start(timeout=args.timeout)
            try:
                result = drive(args, daemon, db, temps, deposit, sites, databases)
            finally:
                code = daemon.stop()
            log_rounds(daemon, result["rounds"])
            result.update(
                check(deposit, base / "validated", sites),
                problems=problems(daemon),
                exit_code=code,
                ready_after=daemon.ready_after,
                expected=len(sites) * len(databases) * args.rounds,
            )
        finally:
            db.drop()
    return result


def drive(
    args: argparse.Namespace,
    daemon: BenchDaemon,
    db: BenchDatabase,
    temps: list[Path],
    deposit: Path,
    sites: list[str],
    databases: list[str],
) -> dict[str, Any]:
    engine = db.engine()
    profiler = None
    rounds = []
    try:
        with engine.connect() as conn:
            rss_ready = daemon.proc_status("VmRSS")
            for round_no in range(1, args.rounds + 1):
                if round_no > 1:
                    temps = prepare(deposit, sites, databases, args.size, round_no)
                    time.sleep(1.0)  # let the daemon drain the staged files' (ignored) events
                if args.attach and profiler is None and args.attach_round in (0, round_no):
                    profiler = attach(args.attach, daemon.pid, args.attach_wait)
                rounds.append(one_round(args, daemon, conn, temps, len(sites) * round_no))
                time.sleep(0.5)  # let the last archive finish
                if profiler is not None and args.attach_round == round_no:
                    detach(profiler)
                    profiler = None
            statuses: dict[str, int] = dict(conn.execute(COUNT_ENTRIES).all())
            hwm = daemon.proc_status("VmHWM")
    finally:
        if profiler is not None:
            detach(profiler)
        engine.dispose()
    return {"rounds": rounds, "statuses": statuses, "rss_ready_kib": rss_ready, "hwm_kib": hwm}


def attach(template: str, pid: int, wait: float) -> subprocess.Popen[bytes]:
    command = shlex.split(template.replace("{pid}", str(pid)))
    profiler = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    time.sleep(wait)
    return profiler


def detach(profiler: subprocess.Popen[bytes]) -> None:
    profiler.send_signal(signal.SIGINT)
    profiler.wait(60)


def one_round(
    args: argparse.Namespace, daemon: BenchDaemon, conn: Connection, temps: list[Path], total: int
) -> dict[str, Any]:
    quiet = float("nan") if args.no_wait else wait_quiet()
    cpu_before, busy_before, own_before = daemon.cpu_times(), cpu_busy_ticks(), own_cpu()
    pg_before = postgres_cpu()
    first = time.time()
    for temp in temps:
        os.rename(temp, temp.with_name("STATUS.json"))
    renamed = time.time()
    assert daemon.process is not None
    deadline = time.monotonic() + args.timeout
    while (committed := conn.execute(COUNT_REPORTS).scalar_one()) < total:
        if time.monotonic() > deadline or daemon.process.poll() is not None:
            break
        time.sleep(args.poll_ms / 1000)
    seen_all = time.time()
    cpu = [b - a for a, b in zip(cpu_before, daemon.cpu_times(), strict=True)]
    pg = postgres_cpu() - pg_before
    others = others_cpu(busy_before, sum(cpu) + own_cpu() - own_before + pg)
    return {
        "postgres": pg,
        "quiet": quiet,
        "others": others,
        "first": first,
        "renamed": renamed,
        "seen_all": seen_all,
        "committed_reports": committed - (total - len(temps)),
        "cpu": cpu,
    }


def log_rounds(daemon: BenchDaemon, rounds: list[dict[str, Any]]) -> None:
    """Attribute each `entry.recorded` line to the round whose renames preceded it."""
    for item in rounds:
        item.update(last_entry=0.0, logged=0)
    for record in daemon.logs():
        if record["event"] != "entry.recorded":
            continue
        stamp = parse_ts(record["timestamp"])
        for item in reversed(rounds):
            if stamp >= item["first"]:
                item["last_entry"] = max(item["last_entry"], stamp)
                item["logged"] += 1
                break


def problems(daemon: BenchDaemon) -> dict[str, int]:
    found: collections.Counter[str] = collections.Counter()
    for record in daemon.logs():
        if record.get("level") in ("warning", "error", "critical"):
            found[record["event"]] += 1
    return dict(found)


def check(deposit: Path, validated: Path, sites: list[str]) -> dict[str, Any]:
    archived = left = rejected = 0
    for site in sites:
        folder = folder_of(deposit, site)
        archive = folder / "_archive"
        archived += len(os.listdir(archive)) if archive.is_dir() else 0
        rejected += (folder / "_rejected").is_dir()
        left += sum(1 for name in os.listdir(folder) if name.endswith(".json"))
        left += sum(1 for _ in (folder / "data").glob("*")) if (folder / "data").is_dir() else 0
    promoted = sum(len(files) for _root, _dirs, files in os.walk(validated))
    return {
        "archived": archived,
        "left_in_deposit": left,
        "rejected_folders": rejected,
        "promoted": promoted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=1000)
    parser.add_argument("--databases", type=int, default=3, help="jobs (databases) per site")
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--rounds", type=int, default=1, help="bursts, one after the other")
    parser.add_argument("--size", type=int, default=4096, help="bytes per staged file")
    parser.add_argument("--poll-ms", type=float, default=10.0)
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds, per round")
    parser.add_argument(
        "--attach",
        help="a profiler command run on the daemon during the rounds ({pid} is replaced), "
        "stopped with SIGINT, e.g. 'py-spy record -p {pid} -o burst.json -f speedscope'",
    )
    parser.add_argument("--attach-wait", type=float, default=1.0, help="seconds to let it attach")
    parser.add_argument(
        "--attach-round", type=int, default=0, help="profile only this round (0: all of them)"
    )
    parser.add_argument(
        "--no-wait", action="store_true", help="measure at once, even on a busy machine (A/B)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work tree and daemon log")
    parser.add_argument("--header", action="store_true", help="print the table header first")
    args = parser.parse_args()
    started = time.monotonic()
    r = run(args)
    entries = sum(r["statuses"].values())
    success = r["statuses"].get("SUCCESS", 0)
    reports = args.sites * args.rounds
    lost = (
        r["archived"] != reports
        or success != r["expected"]
        or entries != r["expected"]
        or r["rejected_folders"]
        or r["left_in_deposit"]
        or r["promoted"] != r["expected"]
        or r["exit_code"] != 0
    )
    if args.header:
        print(f"<!-- {machine()} -->")
        print(
            "| database | round | reports x databases | renames took "
            "| first rename -> last commit | databases/s | (by poll) | daemon CPU user + sys "
            "| peak RSS (VmHWM) | RSS at READY | archived | SUCCESS entries | rejected | lost |"
        )
        print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
              "| ---: | ---: | --- |")  # fmt: skip
    for number, item in enumerate(r["rounds"], 1):
        elapsed = item["last_entry"] - item["first"]
        rate = item["logged"] / elapsed if elapsed > 0 else float("nan")
        polled = item["committed_reports"] * args.databases / (item["seen_all"] - item["first"])
        print(
            f"| {args.database} | {number} | {args.sites} x {args.databases} "
            f"| {(item['renamed'] - item['first']) * 1000:.0f} ms | {elapsed:.2f} s "
            f"| {rate:.0f} | {polled:.0f} | {item['cpu'][0]:.1f} + {item['cpu'][1]:.1f} s "
            f"| {r['hwm_kib'] / 1024:.0f} MiB | {r['rss_ready_kib'] / 1024:.0f} MiB "
            f"| {r['archived']}/{reports} | {success}/{r['expected']} | {r['rejected_folders']} "
            f"| {'YES' if lost else 'none'} |"
        )
    sys.stdout.flush()
    for number, item in enumerate(r["rounds"], 1):
        print(
            f"round {number}: machine {item['quiet']:.0%} busy before; during it PostgreSQL "
            f"used {item['postgres']:.1f} CPU s, other processes {item['others']:.1f} CPU s",
            file=sys.stderr,
        )
    print(
        f"daemon ready in {r['ready_after']:.1f} s; entry statuses {r['statuses']}; "
        f"reports or staged files left {r['left_in_deposit']}; promoted {r['promoted']}; "
        f"warnings/errors {r['problems'] or 'none'}; exit {r['exit_code']}; "
        f"wall {time.monotonic() - started:.0f} s",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
