"""A DepositWatcher in a process of its own, for tests that must stop it with SIGSTOP.

    python tests/watch_probe.py ROOT [--mute NAME]

Prints one JSON object a line on stdout: {"ready": ...} once watching, then {"event": KIND,
"path": RELATIVE} per event (except under ROOT/NAME, the tests' flood folder) and
{"overflow": N} per call of on_overflow; each line also carries the watcher's `overflows` and
`rebuilds` counters as they are when it is printed. The watcher's own log goes to stderr as
JSON lines. Runs until killed.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path
from typing import Any

import structlog

from backupwatch.watcher import DepositWatcher, EventKind


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root", type=Path)
    parser.add_argument("--mute", default="flood")
    args = parser.parse_args()
    structlog.configure(
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    root: Path = args.root
    muted = root / args.mute
    lock = threading.Lock()
    overflow_calls = 0
    watcher: DepositWatcher | None = None

    def emit(**fields: Any) -> None:
        if watcher is not None:
            fields.update(overflows=watcher.overflows, rebuilds=watcher.rebuilds)
        with lock:
            sys.stdout.write(json.dumps(fields) + "\n")
            sys.stdout.flush()

    def on_event(kind: EventKind, path: Path) -> None:
        if not path.is_relative_to(muted):
            emit(event=str(kind), path=str(path.relative_to(root)))

    def on_overflow() -> None:
        nonlocal overflow_calls
        overflow_calls += 1
        emit(overflow=overflow_calls)

    watcher = DepositWatcher(root, on_event, on_overflow)
    watcher.start()
    emit(ready=True, folders=watcher.folder_count, watches=watcher.watch_count())
    threading.Event().wait()


if __name__ == "__main__":
    main()
