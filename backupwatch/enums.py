"""The seed's enums, shared by the config, the schedule engine and the store."""

from __future__ import annotations

import enum


class BackupFrequency(enum.StrEnum):
    DAILY = "DAILY"
    WEEKLY = "WEEKLY"
    MONTHLY = "MONTHLY"
    HOURLY = "HOURLY"
    ONCE = "ONCE"


class BackupEntryStatus(enum.StrEnum):
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    MISSING = "MISSING"
    HASH_MISMATCH = "HASH_MISMATCH"
    TRANSFER_INTEGRITY_FAILED = "TRANSFER_INTEGRITY_FAILED"


class JobStatus(enum.StrEnum):
    OK = "OK"
    FAILED = "FAILED"
    MISSING = "MISSING"
    HASH_MISMATCH = "HASH_MISMATCH"
    TRANSFER_INTEGRITY_FAILED = "TRANSFER_INTEGRITY_FAILED"
    UNKNOWN = "UNKNOWN"

    @classmethod
    def from_entry(cls, status: BackupEntryStatus | None) -> JobStatus:
        """SPEC §4: SUCCESS reads as OK, every other entry status keeps its name."""
        if status is None:
            return cls.UNKNOWN
        if status is BackupEntryStatus.SUCCESS:
            return cls.OK
        return cls(status.value)


# ISO weekday codes of the job files, Monday first (matches datetime.weekday()).
WEEKDAYS: tuple[str, ...] = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")
