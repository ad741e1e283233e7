"""What changed in the job files since the daemon's last sync, so that a reload syncs only that.

A reload used to repeat the whole start: every job compared with its row, the registry of every
site rebuilt, every deposit folder listed again (60 s at 100,000 jobs, for one edited job). The
`JobReader` hands back the very same `JobRecord` object for a job whose file or table did not
change, so the records a reload reads that are not among those of the last sync are exactly the
new, edited and moved jobs, and the keys that are no longer there are the removed ones.

A full sync is still done when the comparison would not hold: no records from the last sync
(the daemon was given `JobSpec`s), a changed default window W (every job without its own window
changes), a changed `archive_test` default (every registry entry may change), or a change so
large that comparing everything costs no more. Jobs that were left to another instance (SPEC
§15) are asked about again at every reload, as a full sync would: that instance may have let
them go since.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from backupwatch import heap
from backupwatch.config import Settings
from backupwatch.jobrecord import JobRecord
from backupwatch.jobs import JobSpec
from backupwatch.pipeline import registry_after_sync, registry_updated
from backupwatch.sites import Registry, changed_folders
from backupwatch.store import JobKey, Store, SyncResult

DELTA_LIMIT = 5_000  # more changed jobs than this: a full sync


@dataclass(frozen=True)
class Synced:
    """What the last successful sync was given, and the defaults it was given them with."""

    records: Sequence[JobRecord]
    window_minutes: int
    archive_test: bool
    conflicts: frozenset[JobKey] = frozenset()


@dataclass(frozen=True)
class JobDelta:
    changed: list[JobRecord]  # new, edited or moved jobs, and those in conflict
    gone: list[JobKey]  # jobs no file defines any more

    @property
    def keys(self) -> list[JobKey]:
        return [*(record.key for record in self.changed), *self.gone]


def synced(
    specs: Sequence[JobSpec | JobRecord],
    window_minutes: int,
    archive_test: bool,
    conflicts: Sequence[JobKey] = (),
) -> Synced | None:
    """The state to compare the next reload with; None when the specs are not records."""
    records = [spec for spec in specs if isinstance(spec, JobRecord)]
    if len(records) != len(specs):
        return None
    return Synced(records, window_minutes, archive_test, frozenset(conflicts))


def delta_since(
    last: Synced | None, records: Sequence[JobRecord], window_minutes: int, archive_test: bool
) -> JobDelta | None:
    """The jobs to sync after `last`, or None when only a full sync will do."""
    if last is None or (last.window_minutes, last.archive_test) != (window_minutes, archive_test):
        return None
    old, new = _differing(last.records, records)
    before = {id(record) for record in old}  # alive: `last` holds them
    changed = [r for r in new if id(r) not in before]
    if last.conflicts:  # another instance's jobs: asked about again, wherever they are
        fresh = {id(r) for r in changed}
        changed = [r for r in records if id(r) in fresh or r.key in last.conflicts]
    now = {record.key for record in new}
    gone = [record.key for record in old if record.key not in now]
    if len(changed) + len(gone) > DELTA_LIMIT:
        return None
    return JobDelta(changed, gone)


def _differing(
    old: Sequence[JobRecord], new: Sequence[JobRecord]
) -> tuple[Sequence[JobRecord], Sequence[JobRecord]]:
    """The parts of two lists of records between their longest common head and tail (by
    identity): all that can differ, since a record is in a list once and its key once. A
    reload that changed nothing or one job compares a few records, not two sets of 100,000
    (~18 MiB each time)."""
    head = 0
    limit = min(len(old), len(new))
    while head < limit and old[head] is new[head]:
        head += 1
    tail = 0
    while tail < limit - head and old[-1 - tail] is new[-1 - tail]:
        tail += 1
    return old[head : len(old) - tail], new[head : len(new) - tail]


@dataclass(frozen=True)
class Resynced:
    """A reload's sync: its counts, the new registry, what the next reload compares with, and
    the deposit folders whose site changed (None: all of them may have, scan them all)."""

    result: SyncResult
    registry: Registry
    synced: Synced | None
    folders: list[Path] | None


def resync(
    store: Store,
    settings: Settings,
    specs: Sequence[JobRecord],
    last: Synced | None,
    registry: Registry,
    now: datetime,
) -> Resynced:
    """Sync a reload's jobs (only the changed ones when it can) and update the registry."""
    window = settings.scanner_report_collection_window_minutes
    delta = delta_since(last, specs, window, settings.archive_test)
    with heap.collector_paused():
        if delta is None:
            result = store.sync_jobs(specs, window, now)
            new = registry_after_sync(settings, store, specs, result.unchanged)
            result.unchanged.clear()
            folders = None
        else:
            result = store.sync_jobs(delta.changed, window, now, gone=delta.gone)
            new = registry_updated(registry, settings, store, delta.keys)
            folders = changed_folders(registry, new)
    after = synced(specs, window, settings.archive_test, result.conflict_keys)
    return Resynced(result, new, after, folders)
