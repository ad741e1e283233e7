"""Scale: the real daemon with N sites (default 30,000) of one job each, every site folder present.

Measures what an operator waits for: time to READY=1 (config, job sync, registry, inotify
watches, start scan), `backupwatchctl status --json` and `reload` wall time, and the daemon's peak
RSS. Usage: .venv/bin/python bench/scale.py [--sites 30000] [--database sqlite|postgresql]
"""

from __future__ import annotations

import argparse
import subprocess
import time

from common import (
    BIN,
    BenchDaemon,
    BenchDatabase,
    agent_id,
    jobs_toml,
    machine,
    wait_quiet,
    workspace,
    write_config,
)


def timed_ctl(config: str, *args: str) -> tuple[float, int]:
    started = time.monotonic()
    result = subprocess.run(
        [str(BIN / "backupwatchctl"), "--config", config, *args],
        capture_output=True,
        text=True,
        check=False,
    )
    return time.monotonic() - started, result.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sites", type=int, default=30_000)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args()
    with workspace() as (base, run_dir):
        database = BenchDatabase.create(args.database, base)
        sites = [f"S{i:05d}" for i in range(args.sites)]
        config = write_config(base, database.url, jobs_toml(sites, ["db"]), run_dir / "c.sock")
        for site in sites:
            (base / "deposit" / agent_id(site) / "log").mkdir(parents=True)
        wait_quiet()
        daemon = BenchDaemon(config, run_dir, base / "daemon.log")
        try:
            daemon.start(timeout=600)
            status_s, status_code = timed_ctl(str(config), "status", "--json")
            reload_s, reload_code = timed_ctl(str(config), "reload")
            peak = daemon.proc_status("VmHWM") // 1024
        finally:
            code = daemon.stop()
            database.drop()
    print(f"machine: {machine()}")
    header = ["database", "sites", "folders watched", "READY after", "status --json", "reload"]
    print("| " + " | ".join([*header, "peak RSS", "exit"]) + " |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| {args.database} | {args.sites} | {2 * args.sites + 1} | {daemon.ready_after:.1f} s "
        f"| {status_s:.1f} s (exit {status_code}) | {reload_s:.1f} s (exit {reload_code}) "
        f"| {peak} MiB | {code} |"
    )


if __name__ == "__main__":
    main()
