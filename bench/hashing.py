"""Hashing: backupwatch's `sha256_fd` against `openssl dgst -sha256` on the same staged file.

    .venv/bin/python bench/hashing.py [--size-mib 1024] [--runs 3] [--dir /var/tmp]

Writes one file of random bytes once, then hashes it --runs times with each tool, alternating
(python, openssl, python, openssl, ...), in two modes:

- cold: `sync; echo 3 > /proc/sys/vm/drop_caches` before every run (needs root; skipped
  otherwise), so each run reads the file from the disk;
- warm: the file is in the page cache, so the run measures the hashing and the copy to user
  space, not the disk.

`sha256_fd` runs in a fresh child interpreter, timed around the call alone; its /proc/self/io
deltas prove one pass: `rchar` (bytes returned by read syscalls) and, cold, `read_bytes` (bytes
fetched from the block device) are each about the file size. openssl is timed as a whole process
(its exec start-up, measured on /dev/null, is printed too; it is a few ms, under 1 %), and its
disk reads come from wait4()'s ru_inblock. Prints markdown tables: each run, then per mode the
best and median time of each tool and the speed ratio (target: sha256_fd >= 0.9x openssl).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import REPO, machine, wait_quiet

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def proc_io() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        key, value = line.split(":")
        fields[key] = int(value)
    return fields


def child(path: str) -> None:
    """In a fresh interpreter: time sha256_fd alone and count what it read."""
    sys.path.insert(0, str(REPO))
    from backupwatch.fsutil import sha256_fd

    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    before = proc_io()
    started = time.perf_counter()
    digest, size = sha256_fd(fd)
    seconds = time.perf_counter() - started
    after = proc_io()
    os.close(fd)
    delta = {key: after[key] - before[key] for key in ("rchar", "read_bytes", "syscr")}
    print(json.dumps({"digest": digest, "size": size, "seconds": seconds, **delta}))


def run_python(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def run_openssl(path: Path) -> dict[str, Any]:
    started = time.perf_counter()
    process = subprocess.Popen(
        ["openssl", "dgst", "-sha256", "-r", str(path)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    output = process.stdout.read()
    _pid, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"openssl failed with {process.returncode}")
    return {
        "digest": output.split()[0],
        "seconds": seconds,
        "read_bytes": usage.ru_inblock * 512,
        "rchar": None,
        "syscr": None,
    }


def openssl_startup() -> float:
    return min(float(run_openssl(Path("/dev/null"))["seconds"]) for _ in range(5))


def drop_caches() -> bool:
    try:
        os.sync()
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    return True


def write_random(path: Path, size: int) -> None:
    block = 16 << 20
    with path.open("wb") as out:
        remaining = size
        while remaining:
            chunk = os.urandom(min(block, remaining))
            out.write(chunk)
            remaining -= len(chunk)
        out.flush()
        os.fsync(out.fileno())


def measure(path: Path, size: int, runs: int, cold: bool) -> list[dict[str, Any]]:
    rows = []
    if not cold:
        run_python(path)  # bring the file into the page cache
    for index in range(runs):
        for tool, fn in (("sha256_fd", run_python), ("openssl", run_openssl)):
            if cold:
                drop_caches()
            result = fn(path)
            result.update(tool=tool, run=index + 1, mode="cold" if cold else "warm")
            result["speed"] = size / result["seconds"] / 1e9
            rows.append(result)
    return rows


def mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / (1 << 20):.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"), help="a disk, not tmpfs")
    parser.add_argument("--modes", default="cold,warm")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    size = args.size_mib << 20
    modes = args.modes.split(",")
    if "cold" in modes and not drop_caches():
        print("cannot write /proc/sys/vm/drop_caches (root?): no cold runs", file=sys.stderr)
        modes.remove("cold")
    with tempfile.TemporaryDirectory(prefix="backupwatch-hash-", dir=args.dir) as folder:
        path = Path(folder) / "staged.sql.gz"
        started = time.perf_counter()
        write_random(path, size)
        print(f"wrote {mib(size)} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
        wait_quiet()
        startup = openssl_startup()
        rows = []
        for mode in modes:
            rows += measure(path, size, args.runs, cold=mode == "cold")
    digests = {row["digest"] for row in rows}
    if len(digests) != 1:
        raise SystemExit(f"the tools disagree: {digests}")
    print(f"<!-- {machine()}; file {mib(size)}; openssl start-up {startup * 1000:.1f} ms -->")
    print("| mode | run | tool | seconds | GB/s | rchar | read_bytes (disk) | read calls |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print(
            f"| {row['mode']} | {row['run']} | {row['tool']} | {row['seconds']:.3f} "
            f"| {row['speed']:.2f} | {mib(row['rchar'])} | {mib(row['read_bytes'])} "
            f"| {row['syscr'] if row['syscr'] is not None else 'n/a'} |"
        )
    print()
    print("| mode | sha256_fd best / median | openssl best / median | ratio best / median |")
    print("| --- | ---: | ---: | ---: |")
    for mode in modes:
        ours = [r["seconds"] for r in rows if r["mode"] == mode and r["tool"] == "sha256_fd"]
        theirs = [r["seconds"] for r in rows if r["mode"] == mode and r["tool"] == "openssl"]
        best = min(theirs) / min(ours)
        median = statistics.median(theirs) / statistics.median(ours)
        print(
            f"| {mode} | {min(ours):.3f} s / {statistics.median(ours):.3f} s "
            f"| {min(theirs):.3f} s / {statistics.median(theirs):.3f} s "
            f"| {best:.2f}x / {median:.2f}x |"
        )


if __name__ == "__main__":
    main()
