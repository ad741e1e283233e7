"""How DepositWatcher scales: start time, memory and event latency for N site folders.

    .venv/bin/python bench/watch_scale.py [N] [--samples K]

Creates N site folders, each with a `log/` subfolder, under a temporary root, starts the
watcher, then drops K reports into random folders and times each until its event arrives.
Prints one markdown table row; the start's CPU time (all threads) is steadier than its wall
time on a busy machine. Needs fs.inotify.max_user_watches above 2*N + 1. To compare with
another checkout, copy this file into its bench/ and run it there: it imports the
`backupwatch` beside it.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from backupwatch.watcher import DepositWatcher, EventKind, check_inotify_limits


def vm_hwm_mb() -> float:
    """Peak resident memory of this process (VmHWM), falling back to getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_sites(root: Path, n: int) -> list[Path]:
    sites = []
    for i in range(n):
        site = root / f"site{i:06d}"
        (site / "log").mkdir(parents=True)
        sites.append(site)
    return sites


class Latch:
    """Records when a given path's CLOSED event arrives."""

    def __init__(self) -> None:
        self.target: Path | None = None
        self.arrived = threading.Event()
        self.at = 0.0
        self.overflows = 0

    def on_event(self, kind: EventKind, path: Path) -> None:
        if kind is EventKind.CLOSED and path == self.target:
            self.at = time.perf_counter()
            self.arrived.set()

    def on_overflow(self) -> None:
        self.overflows += 1


def measure_latency(sites: list[Path], latch: Latch, samples: int) -> list[float]:
    rng = random.Random(42)
    latencies = []
    for i in range(samples):
        target = rng.choice(sites) / rng.choice(["", "log"]) / f"STATUS{i}.json"
        latch.target, latch.at = target, 0.0
        latch.arrived.clear()
        started = time.perf_counter()
        target.write_text("{}")
        if not latch.arrived.wait(10):
            raise SystemExit(f"no event for {target} within 10 s")
        latencies.append((latch.at - started) * 1000)
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("n", type=int, nargs="?", default=30_000, help="site folders")
    parser.add_argument("--samples", type=int, default=20, help="reports to time")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="watch_scale_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        sites = make_sites(root, args.n)
        setup_s = time.perf_counter() - t0
        rss_before = vm_hwm_mb()
        for warning in check_inotify_limits(2 * args.n + 1):
            print(f"<!-- {warning} -->")

        latch = Latch()
        watcher = DepositWatcher(root, latch.on_event, latch.on_overflow)
        t0, cpu0 = time.perf_counter(), time.process_time()
        watcher.start()
        start_s, start_cpu = time.perf_counter() - t0, time.process_time() - cpu0
        rss_after = vm_hwm_mb()
        watches = watcher.watch_count()
        try:
            latencies = measure_latency(sites, latch, args.samples)
            alive = watcher.is_alive()
        finally:
            t0 = time.perf_counter()
            watcher.stop()
            stop_s = time.perf_counter() - t0

    print(
        "| sites | folders | watches | mkdir s | start s (CPU s) | VmHWM MB (before→after start) "
        "| latency ms median / max | stop s | overflows | alive |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print(
        f"| {args.n} | {2 * args.n + 1} | {watches} | {setup_s:.1f} "
        f"| {start_s:.2f} ({start_cpu:.2f}) "
        f"| {rss_before:.0f}→{rss_after:.0f} "
        f"| {statistics.median(latencies):.1f} / {max(latencies):.1f} | {stop_s:.2f} "
        f"| {latch.overflows} | {alive} |"
    )
    print(f"<!-- python {sys.version.split()[0]}, {os.cpu_count()} CPUs -->")


if __name__ == "__main__":
    main()
