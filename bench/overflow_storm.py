"""What one inotify queue overflow costs when the tree has more folders than the kernel queue.

    .venv/bin/python bench/overflow_storm.py [FOLDERS] [--seconds S] [--source TREE]

Creates FOLDERS site folders (default: max_queued_events + 1,617, the 18,001 of issue 11 on a
default kernel), starts a DepositWatcher in a child process, stops the child with SIGSTOP,
queues more events than `max_queued_events`, resumes it, then watches it for S seconds:
how many overflows it logged (`inotify_events_lost`), how often it called on_overflow (each
is a full rescan in the daemon), and the CPU it used. `--source` imports `backupwatch` from
another checkout (e.g. `git worktree add /tmp/before main`) to measure the code before a
change on the same machine. Prints one markdown table row.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def child(root: Path) -> None:
    """The watcher: one JSON line on stdout when ready and per on_overflow call."""
    import structlog

    from backupwatch.watcher import DepositWatcher

    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )

    def say(**fields: object) -> None:
        sys.stdout.write(json.dumps(fields) + "\n")
        sys.stdout.flush()

    watcher = DepositWatcher(root, lambda _kind, _path: None, lambda: say(overflow=True))
    watcher.start()
    say(ready=True, watches=watcher.watch_count())
    threading.Event().wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stopped(task: Path) -> bool:
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return True


def count_lines(stream: object, counts: dict[str, int], key: str, match: str) -> None:
    for line in stream:  # type: ignore[attr-defined]
        if match in line:
            counts[key] += 1
        if '"ready"' in line:
            counts["ready"] += 1


def main() -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folders", type=int, nargs="?", default=limit + 1617)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--source", type=Path, default=HERE, help="checkout to import from")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return

    with tempfile.TemporaryDirectory(prefix="overflow_storm_") as tmp:
        root = Path(tmp)
        (root / "flood").mkdir()
        for i in range(args.folders - 2):
            os.mkdir(root / f"site{i:06d}")
        env = dict(os.environ, PYTHONPATH=str(args.source))
        process = subprocess.Popen(
            [sys.executable, __file__, "--child", str(root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=args.source,
        )
        counts = {"ready": 0, "overflow_calls": 0, "events_lost": 0}
        readers = [
            threading.Thread(
                target=count_lines, args=(process.stdout, counts, "overflow_calls", '"overflow"')
            ),
            threading.Thread(
                target=count_lines, args=(process.stderr, counts, "events_lost", "events_lost")
            ),
        ]
        for thread in readers:
            thread.start()
        try:
            deadline = time.monotonic() + 120
            while not counts["ready"] and time.monotonic() < deadline:
                time.sleep(0.05)
            cpu_before = cpu_seconds(process.pid)
            process.send_signal(signal.SIGSTOP)
            tasks = Path(f"/proc/{process.pid}/task")
            while not all(stopped(task) for task in tasks.iterdir()):
                time.sleep(0.01)  # SIGSTOP is asynchronous
            files = [root / "flood" / "a", root / "flood" / "b"]
            for f in files:
                f.touch()
            for i in range(limit + 1000):
                os.close(os.open(files[i % 2], os.O_WRONLY))
            process.send_signal(signal.SIGCONT)
            time.sleep(args.seconds)
            cpu = cpu_seconds(process.pid) - cpu_before
        finally:
            process.kill()
            process.wait()
            for thread in readers:
                thread.join()

    print(
        "| folders | max_queued_events | seconds | overflows logged | on_overflow calls "
        "| CPU s (% of one core) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    print(
        f"| {args.folders} | {limit} | {args.seconds:g} | {counts['events_lost']} "
        f"| {counts['overflow_calls']} | {cpu:.1f} ({100 * cpu / args.seconds:.0f} %) |"
    )
    print(f"<!-- source {args.source}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs -->")


if __name__ == "__main__":
    main()
