"""What one inotify queue overflow costs when the tree has more folders than the kernel queue.

    .venv/bin/python bench/overflow_storm.py [FOLDERS] [--seconds S] [--source TREE]

Creates FOLDERS site folders (default: max_queued_events + 1,617, the 18,001 of issue 11 on a
default kernel), starts a DepositWatcher in a child process, stops the child with SIGSTOP,
queues more events than `max_queued_events`, resumes it, then watches it for S seconds:
how many overflows it logged (`inotify_events_lost`), how often it called on_overflow (each
is a full rescan in the daemon), and the CPU it used. With `--storm` it overflows the queue
every half second or so for the whole time (the CPU then includes reading the flood itself).
`--source` imports `backupwatch` from another checkout (e.g. `git worktree add /tmp/before
main`) to measure the code before a change on the same machine. Prints one markdown row.
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
from collections.abc import Iterable
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


def overflow(process: subprocess.Popen[str], folder: Path, limit: int) -> None:
    """Stop the child, queue more events than the kernel keeps, resume it."""
    process.send_signal(signal.SIGSTOP)
    tasks = Path(f"/proc/{process.pid}/task")
    while not all(stopped(task) for task in tasks.iterdir()):
        time.sleep(0.01)  # SIGSTOP is asynchronous
    files = [folder / "a", folder / "b"]
    for i in range(limit + 1000):
        os.close(os.open(files[i % 2], os.O_WRONLY | os.O_CREAT, 0o644))
    process.send_signal(signal.SIGCONT)


def count_lines(stream: Iterable[str], counts: dict[str, int]) -> None:
    """Tally the child's lines: ready, on_overflow calls, lines logging lost events and the
    overflows they count (a line without a count, as the code before 2026-11 logged, is one)."""
    for text in stream:
        try:
            line = json.loads(text)
        except ValueError:
            continue
        counts["ready"] += bool(line.get("ready"))
        counts["overflow_calls"] += bool(line.get("overflow"))
        if line.get("event") == "inotify_events_lost":
            counts["lines"] += 1
            counts["overflows"] += int(line.get("overflows", 1))


def main() -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folders", type=int, nargs="?", default=limit + 1617)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--storm", action="store_true", help="overflow again and again")
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
        counts = dict.fromkeys(("ready", "overflow_calls", "lines", "overflows"), 0)
        readers = [
            threading.Thread(target=count_lines, args=(stream, counts))
            for stream in (process.stdout, process.stderr)
        ]
        for thread in readers:
            thread.start()
        try:
            deadline = time.monotonic() + 120
            while not counts["ready"] and time.monotonic() < deadline:
                time.sleep(0.05)
            cpu_before = cpu_seconds(process.pid)
            end = time.monotonic() + args.seconds
            overflow(process, root / "flood", limit)
            while args.storm and time.monotonic() < end:
                time.sleep(0.5)  # let it run: then overflow it again
                overflow(process, root / "flood", limit)
            time.sleep(max(0.0, end - time.monotonic()))
            cpu = cpu_seconds(process.pid) - cpu_before
        finally:
            process.kill()
            process.wait()
            for thread in readers:
                thread.join()

    print(
        "| folders | max_queued_events | storm | seconds | overflows (log lines) "
        "| on_overflow calls | CPU s (% of one core) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {args.folders} | {limit} | {args.storm} | {args.seconds:g} "
        f"| {counts['overflows']} ({counts['lines']}) "
        f"| {counts['overflow_calls']} | {cpu:.1f} ({100 * cpu / args.seconds:.0f} %) |"
    )
    print(f"<!-- source {args.source}, python {sys.version.split()[0]}, {os.cpu_count()} CPUs -->")


if __name__ == "__main__":
    main()
