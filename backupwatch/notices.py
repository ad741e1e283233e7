"""Warnings an operator should see in `backupwatchctl status`, not only in the journal.

A report in a folder the daemon never reads, a `.JSON` name, a job file that is not read, a
database no job expects: each is a silent mistake until someone notices the missing backups.
Each is logged once and kept here, counted, so `status` shows it (issue 6 item 10). Bounded:
the oldest give way to new ones.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)

LIMIT = 200


@dataclass
class Notice:
    text: str
    count: int


class Notices:
    def __init__(self, limit: int = LIMIT) -> None:
        self._limit = limit
        self._lock = threading.Lock()
        self._notices: OrderedDict[str, Notice] = OrderedDict()

    def add(self, key: str, text: str, **fields: object) -> None:
        """Keep `text` under `key`; log it the first time only."""
        with self._lock:
            notice = self._notices.get(key)
            if notice is not None:
                notice.count += 1
                self._notices.move_to_end(key)
                return
            self._notices[key] = Notice(text, 1)
            while len(self._notices) > self._limit:
                self._notices.popitem(last=False)
        log.warning("notice", text=text, **fields)

    def texts(self) -> list[str]:
        with self._lock:
            return [
                n.text if n.count == 1 else f"{n.text} ({n.count} times)"
                for n in self._notices.values()
            ]

    def discard_prefix(self, prefix: str) -> None:
        """Forget the notices whose key starts with `prefix` (a reload that fixed them)."""
        with self._lock:
            for key in [k for k in self._notices if k.startswith(prefix)]:
                del self._notices[key]
