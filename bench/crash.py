"""Crash: many kill -9 runs of the real daemon during a mixed burst, compared with the truth.

    .venv/bin/python bench/crash.py [--iterations 100] [--sites 300]
                                    [--database sqlite|postgresql] [--final same|tmpfs]
                                    [--kills 1] [--seed 1] [--keep-failures]

Each iteration is one run of `tests/integration/crashkit.py` (the same harness as
`tests/integration/test_crash.py`) on a fresh tree and a fresh database: SITES sites of four
HOURLY jobs, a burst of valid, mixed, duplicate, multi-cycle, broken, foreign and stray reports
whose outcome is known in advance, KILLS SIGKILLs at seeded moments (the first after a random
number of reports were taken, the later ones during the restart's start-up scan), a restart,
then a comparison of every report, reason file, entry, staged file and stored file with the
truth. Iteration i uses seed SEED + i: `--seed S --iterations 1` replays it (the burst and the
kill targets; the exact instant of a kill depends on the machine).

`--final tmpfs` puts final storage in a folder on /dev/shm: promotion copies across
filesystems instead of linking. Prints one line per iteration and a summary: clean runs / runs,
the runs per kind of difference, and for each failing run its seed and first differences.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common import BIN, DAEMON, REPO, BenchDatabase, NotifySocket, machine, workspace

sys.path.insert(0, str(REPO / "tests" / "integration"))

from crashkit import (
    Run,
    Tree,
    build_burst,
    category,
    config_overrides,
    crash_run,
    jobs_toml,
    now_utc,
    tmpfs_unusable,
)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(str(value))


@dataclass
class CrashDaemon:
    """crashkit's DaemonControl: a `backupwatchd` subprocess, sd_notify and `backupwatchctl`."""

    config: Path
    run_dir: Path
    log_path: Path
    ready_timeout: float = 120.0
    process: subprocess.Popen[bytes] | None = None
    notify: NotifySocket | None = None

    def start(self, wait_ready: bool, prefix: list[str] | None = None) -> None:
        if self.notify is not None:
            self.notify.close()
        self.notify = NotifySocket(self.run_dir / f"notify-{time.monotonic_ns()}.sock")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUPWATCH_", "NOTIFY_"))}
        env["NOTIFY_SOCKET"] = str(self.notify.path)
        command = [*(prefix or []), *DAEMON, "--config", str(self.config), "--log-target", "json"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=log)
        if wait_ready:
            self.notify.expect("READY=1", self.ready_timeout, self.process)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def pending(self) -> int | None:
        result = subprocess.run(
            [str(BIN / "backupwatchctl"), "--config", str(self.config), "status", "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            return None
        pending: int | None = json.loads(result.stdout)["daemon"]["pending_reports"]
        return pending

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                return -9
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        return self.process.returncode


def write_config(base: Path, database_url: str, validated: Path, sites: int, run_dir: Path) -> Path:
    for folder in ("deposit", "jobs.d"):
        (base / folder).mkdir(parents=True, exist_ok=True)
    (base / "jobs.d" / "jobs.toml").write_text(jobs_toml(sites))
    values: dict[str, object] = {
        "backup_storage_root": "deposit",
        "validated_backups_base_path": str(validated),
        "jobs_path": "jobs.d",
        "database_url": database_url,
        "control_socket": str(run_dir / "ctl.sock"),
        **config_overrides(),
    }
    path = base / "backupwatch.toml"
    path.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in values.items()))
    return path


def one_iteration(args: argparse.Namespace, seed: int) -> Run:
    with workspace(keep=False) as (base, run_dir), final_storage(args.final, base) as validated:
        db = BenchDatabase.create(args.database, base)
        try:
            (base / "state").mkdir(exist_ok=True)
            config = write_config(base, db.url, validated, args.sites, run_dir)
            daemon = CrashDaemon(config, run_dir, base / "daemon.log")
            truth = build_burst(args.sites, seed, now_utc())
            tree = Tree(base / "deposit", validated, db.url)
            try:
                run = crash_run(truth, tree, daemon, seed, args.kills, args.idle_timeout)
            except (RuntimeError, TimeoutError) as exc:
                run = Run(seed, differences=[f"the run stopped: {exc}"])
            finally:
                if daemon.alive():
                    daemon.kill()
            if not run.clean and args.keep_failures:
                kept = Path(tempfile.mkdtemp(prefix=f"crash-seed{seed}-", dir="/var/tmp"))
                shutil.copytree(base, kept, dirs_exist_ok=True, symlinks=True)
                shutil.copytree(validated, kept / "final", dirs_exist_ok=True, symlinks=True)
                print(f"  kept the tree of seed {seed} in {kept}", file=sys.stderr)
        finally:
            db.drop()
    return run


@contextlib.contextmanager
def final_storage(final: str, base: Path) -> Iterator[Path]:
    if final == "same":
        yield base / "validated"
        return
    reason = tmpfs_unusable(Path("/dev/shm"), other=base)
    if reason is not None:
        raise SystemExit(f"--final tmpfs: {reason}")
    path = Path(tempfile.mkdtemp(prefix="bw-crash-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def summarise(args: argparse.Namespace, runs: list[Run]) -> None:
    clean = sum(run.clean for run in runs)
    kinds: collections.Counter[str] = collections.Counter()
    for run in runs:
        kinds.update({category(d) for d in run.differences})
    print()
    print(f"machine: {machine()}")
    print(
        f"database {args.database}, final storage {args.final}, {args.sites} sites, "
        f"{args.kills} kill(s) per run, seeds {args.seed}..{args.seed + len(runs) - 1}"
    )
    print("| clean runs | runs | rate |\n| ---: | ---: | ---: |")
    print(f"| {clean} | {len(runs)} | {clean / max(1, len(runs)):.0%} |")
    if kinds:
        print("\n| runs | kind of difference |\n| ---: | --- |")
        for kind, count in kinds.most_common():
            print(f"| {count} | {kind} |")
    failing = [run for run in runs if not run.clean]
    if failing:
        print("\nfailing runs (replay one with --seed SEED --iterations 1):")
        for run in failing:
            print(run.summary(limit=args.show))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--sites", type=int, default=300)
    parser.add_argument("--database", choices=["sqlite", "postgresql"], default="sqlite")
    parser.add_argument("--final", choices=["same", "tmpfs"], default="same")
    parser.add_argument("--kills", type=int, default=1, help="SIGKILLs per run (1-3)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the first iteration")
    parser.add_argument("--idle-timeout", type=float, default=180.0)
    parser.add_argument("--show", type=int, default=5, help="differences shown per failing run")
    parser.add_argument("--keep-failures", action="store_true", help="copy failing trees")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    runs = []
    for index in range(args.iterations):
        seed = args.seed + index
        run = one_iteration(args, seed)
        runs.append(run)
        status = "clean" if run.clean else f"{len(run.differences)} differences"
        kills = "; ".join(map(str, run.kills))
        print(f"seed {seed}: {status} ({kills}; {run.seconds:.1f} s)", flush=True)
    summarise(args, runs)
    return 0 if all(run.clean for run in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
