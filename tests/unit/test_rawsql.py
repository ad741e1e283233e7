"""`rawsql`: the report's INSERTs straight to the DBAPI write what SQLAlchemy would have written.

On both databases, the same rows go in once through SQLAlchemy's `connection.execute` and once
through `rawsql`, and every column of the stored rows (read back as the driver returns them, not
through the ORM's types) is compared; then through the ORM, as the daemon reads them.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table, insert, select
from support import World, job_block, utc

from backupwatch.enums import BackupEntryStatus
from backupwatch.rawsql import raw_insert
from backupwatch.store import (
    ENTRY_COLUMNS,
    PROCESSED_COLUMNS,
    BackupEntry,
    NewEntry,
    ProcessedReport,
    ProcessedReportRecord,
)

NOW = utc(2026, 11, 24, 13, 15, 7) + timedelta(microseconds=123456)
CYCLE = utc(2026, 11, 24, 13)


def entries(job_id: int, tag: str) -> list[NewEntry]:
    """Three entries of one job, their messages starting with `tag` (the unique key on
    (job, report SHA-256) allows one SHA-256 per job: the others have none)."""
    full = NewEntry(
        job_id=job_id,
        cycle=CYCLE,
        status=BackupEntryStatus.SUCCESS,
        message=f"{tag} full: staged file verified; stored at /v/é ☃",
        report_name="ACME_Lyon_North/STATUS.json",
        report_sha256=tag * 64,
        operation_start_time=CYCLE + timedelta(minutes=5, microseconds=1),
        operation_timestamp=CYCLE + timedelta(minutes=10),
        backup_ok=True,
        compress_ok=False,
        transfer_ok=True,
        agent_sha256="a" * 64,
        agent_size=2**40,
        server_sha256="b" * 64,
        server_size=0,
        staged_path="/d/database/sales.sql.gz",
        final_path="/v/sales.sql.gz",
        unchanged_since_last_success=True,
        details={"agent": {"size": 1, "nested": [1, None, "x"]}, "server": {}},
        final_dev=2**33,
        final_ino=12,
        suspicious=True,
    )
    bare = NewEntry(job_id=job_id, cycle=CYCLE, status=BackupEntryStatus.FAILED, message=tag)
    return [full, bare, dataclasses.replace(bare, details={}, message=f"{tag} empty")]


def stored(w: World, table: Any, *skip: str) -> list[tuple[Any, ...]]:
    """The rows as the driver returns them (no SQLAlchemy type processing), by id, without
    the columns `skip`."""
    names = [c.name for c in table.columns if c.name not in ("id", *skip)]
    order = "id" if "id" in table.columns else names[-1]
    with w.store.engine.connect() as connection:
        query = f"SELECT {', '.join(names)} FROM {table.name} ORDER BY {order}"
        return [tuple(row) for row in connection.exec_driver_sql(query)]


def test_entries_and_processed_rows_are_stored_as_through_sqlalchemy(
    tmp_path: Path, database_url: str
) -> None:
    w = World.create(tmp_path, database_url, job_block("ACME", "Lyon", "North", "sales"), CYCLE)
    (job_id,) = [job.id for job in w.store.all_jobs()]
    entry_table = cast(Table, BackupEntry.__table__)
    processed_table = cast(Table, ProcessedReport.__table__)
    with w.store.engine.begin() as connection:
        raw_entries = raw_insert(entry_table, ENTRY_COLUMNS, connection.dialect)
        raw_processed = raw_insert(processed_table, PROCESSED_COLUMNS, connection.dialect)
        assert raw_entries is not None
        assert raw_processed is not None
        connection.execute(insert(BackupEntry), [e.row(NOW) for e in entries(job_id, "s")])
        raw_entries.many(connection, [e.row(NOW) for e in entries(job_id, "r")])
        records = [
            ProcessedReportRecord("s" * 64, "/d/North", "STATUS.json", "accepted"),
            ProcessedReportRecord("r" * 64, "/d/North", "STATUS.json", "accepted", "why ☃"),
        ]
        connection.execute(insert(ProcessedReport), [records[0].row(NOW)])
        new = raw_processed.returning_new(connection, [r.row(NOW) for r in records], "sha256")

    assert new == {"r" * 64}  # the row already there is not inserted again
    rows = stored(w, entry_table, "message", "report_sha256")
    assert len(rows) == 6
    assert rows[3:] == rows[:3]
    with w.store.engine.connect() as connection:
        query = "SELECT message, report_sha256 FROM backup_entries ORDER BY id"
        keys = [tuple(row) for row in connection.exec_driver_sql(query)]
    assert keys == [
        (f"{tag} full: staged file verified; stored at /v/é ☃", tag * 64)
        if n == 0
        else (tag if n == 1 else f"{tag} empty", None)
        for tag in "sr"
        for n in range(3)
    ]
    (old, new_row) = stored(w, processed_table, "sha256", "reason")
    assert new_row == old
    with w.store.session() as session:
        read = list(session.scalars(select(BackupEntry).order_by(BackupEntry.id)))
    columns = [c for c in ENTRY_COLUMNS if c not in ("message", "report_sha256")]
    assert [[getattr(e, c) for c in columns] for e in read[:3]] == [
        [getattr(e, c) for c in columns] for e in read[3:]
    ]
    assert read[0].details == {"agent": {"size": 1, "nested": [1, None, "x"]}, "server": {}}
    assert read[0].operation_start_time == CYCLE + timedelta(minutes=5, microseconds=1)
