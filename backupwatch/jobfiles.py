"""The daemon's reader of job files: fast on start, and on reload it reads only what changed.

`jobs.read_jobs` builds a `JobSpec` per job with tomllib and pydantic: the reference, and what
the tools use. At 100,000 jobs that was 16 s and ~150 MiB, on every start and every reload, so
the daemon reads through a `JobReader` instead, which gives the same jobs as `JobRecord`s:

- a file whose stat (inode, size, mtime_ns, ctime_ns) is what it was at the last read keeps its
  records without being opened; a file written within the last `RACY_NS` is read again next time
  (a same-size write within the timestamps' granularity would have the same stat);
- a file that changed is cut into its `[[job]]` tables (`jobtext`); a table whose text and whose
  file's `[defaults]` text are unchanged keeps its record, a new one is read by `parse_table` and
  `quick_record`;
- whatever those shortcuts are not sure of (an error, an unusual shape) sends the whole file
  through `jobs.load_file`, so every error message is the one `read_jobs` gives.
"""

from __future__ import annotations

import hashlib
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from backupwatch.config import ConfigError, Settings
from backupwatch.jobrecord import JobRecord, Shapes
from backupwatch.jobs import (
    JOB_KEYS,
    _defaults,
    _duplicates,
    _unknown_channels,
    job_files,
    load_file,
)
from backupwatch.jobtext import Line, parse_table, split_jobs

RACY_NS = 2_000_000_000  # a file modified this recently may change again with the same stat


@dataclass(frozen=True, slots=True)
class Stamp:
    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True, slots=True)
class _Read:
    """One file as last read: its stamp (None: read it again next time), its `[defaults]`
    text and its tables' texts with their records (empty when it went the slow way)."""

    stamp: Stamp | None
    preamble: bytes
    tables: dict[bytes, JobRecord]  # by the digest of the table's text
    records: list[JobRecord]
    errors: list[str]


@dataclass(frozen=True)
class JobsRead:
    records: list[JobRecord]
    errors: list[str]
    files_read: int  # files opened (the others were unchanged since the last read)


class JobReader:
    """Reads `jobs_path` like `jobs.read_jobs`, remembering enough to skip what did not change."""

    def __init__(self) -> None:
        self._files: dict[Path, _Read] = {}
        self._unique: tuple[Path, ...] | None = None  # files last read, and no job twice

    def load(self, settings: Settings) -> list[JobRecord]:
        """Every job, or one ConfigError listing every problem (as `jobs.load_jobs`)."""
        result = self.read(settings)
        if result.errors:
            raise ConfigError(result.errors)
        return result.records

    def read(self, settings: Settings) -> JobsRead:
        try:
            paths = job_files(settings.jobs_path)
        except ConfigError as exc:
            return JobsRead([], exc.errors, 0)
        files: dict[Path, _Read] = {}
        opened = 0
        for path in paths:
            before = self._files.get(path)
            read = _read_file(path, before)
            opened += read is not before
            files[path] = read
        # The same files, none opened: the same records, without a duplicate last time either.
        # (The check's 100,000 keys were ~12 MiB at the peak of every reload.)
        unchanged = opened == 0 and tuple(files) == self._unique
        self._files = files
        records = [record for read in files.values() for record in read.records]
        errors = [error for read in files.values() for error in read.errors]
        duplicates = [] if unchanged else list(_duplicates(records))
        self._unique = None if duplicates else tuple(files)
        channels = list(_unknown_channels(records, settings))
        return JobsRead(records, errors + duplicates + channels, opened)


def _read_file(path: Path, before: _Read | None) -> _Read:
    try:
        st = path.stat()
    except OSError:
        return _slow(path, None)
    stamp: Stamp | None = Stamp.of(st)
    if before is not None and before.stamp == stamp:
        return before
    if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_NS:
        stamp = None  # not trusted next time: read again
    try:
        data = path.read_bytes()
    except OSError:
        return _slow(path, stamp)
    return _fast(path, data, stamp, before) or _slow(path, stamp)


def _slow(path: Path, stamp: Stamp | None) -> _Read:
    specs, errors = load_file(path)
    return _Read(stamp, b"", {}, [JobRecord.of(spec) for spec in specs], errors)


def _fast(path: Path, data: bytes, stamp: Stamp | None, before: _Read | None) -> _Read | None:
    """The file's records through the shortcuts, or None when any part needs `load_file`."""
    cut = split_jobs(data)
    try:
        document = tomllib.loads(cut.preamble.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError):
        return None
    if not document.keys() <= {"defaults"}:
        return None
    errors: list[str] = []
    defaults = _defaults(path, document.get("defaults", {}), errors)
    if errors:
        return None
    known = before.tables if before is not None and before.preamble == cut.preamble else {}
    tables: dict[bytes, JobRecord] = {}
    records: list[JobRecord] = []
    lines: dict[str, Line] = {}
    shapes = Shapes(defaults)
    file = str(path)  # one string for every record of the file: see `JobRecord.source`
    for number, table in enumerate(cut.tables, start=1):
        digest = _digest(table)
        record = known.get(digest) or tables.get(digest)
        if record is None:
            # a table new since the last read
            record = _record(shapes, table, file, number, lines)
            if record is None:
                return None
        elif record.source_number != number or record.source_file != file:
            record = record._replace(source_file=file, source_number=number)
        tables[digest] = record
        records.append(record)
    return _Read(stamp, cut.preamble, tables, records, [])


def _digest(table: bytes) -> bytes:
    """A table's text as the key of its record: 16 bytes rather than the text (~90 bytes a
    job); two different tables with one digest (2**-128) would share a record."""
    return hashlib.blake2b(table, digest_size=16).digest()


def _record(
    shapes: Shapes, table: bytes, file: str, number: int, lines: dict[str, Line]
) -> JobRecord | None:
    try:
        text = table.decode("utf-8")
    except UnicodeDecodeError:
        return None
    raw = parse_table(text, lines)
    if raw is None or not raw.keys() <= JOB_KEYS:
        return None
    return shapes.record(raw, file, number)
