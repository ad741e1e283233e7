"""SPEC §5: the decision table for one database of a relevant report, as pure functions.

`decide` is the whole table and the one the pipeline runs: the agent's own steps first (1-2),
then the server's facts about the staged file (3-5), else SUCCESS (6). The pipeline gathers the
facts (opening the staged file beneath D, hashing it once) and acts on the verdict; nothing
here touches a file or the database.
"""

from __future__ import annotations

from dataclasses import dataclass

from backupwatch.enums import BackupEntryStatus
from backupwatch.report import DatabaseReport


@dataclass(frozen=True)
class Verdict:
    status: BackupEntryStatus
    message: str


@dataclass(frozen=True)
class StagedFacts:
    """What the server itself found: `problem` set when there is no usable regular file."""

    name: str
    problem: str | None = None
    size: int | None = None
    sha256: str | None = None  # None when the size already differed: no need to hash
    archive_problem: str | None = None  # SPEC §13: the decompressor's words, if it failed


def agent_verdict(db: DatabaseReport) -> Verdict | None:
    """Steps 1-2 of SPEC §5: what the agent itself says failed."""
    failed = [
        step
        for step, ok in (
            ("backup", db.backup_process.status),
            ("compress", db.compress_process.status),
        )
        if not ok
    ]
    if failed:
        return Verdict(
            BackupEntryStatus.FAILED, f"the agent reports its {' and '.join(failed)} step failed"
        )
    if not db.transfer_process.status:
        detail = db.transfer_process.error_message or "no error message given"
        return Verdict(BackupEntryStatus.FAILED, f"the agent reports its transfer failed: {detail}")
    return None


def file_verdict(db: DatabaseReport, facts: StagedFacts) -> Verdict:
    """Steps 3-6 of SPEC §5: what the server finds on disk."""
    if facts.problem is not None:
        return Verdict(
            BackupEntryStatus.TRANSFER_INTEGRITY_FAILED,
            f"staged file {facts.name}: {facts.problem}",
        )
    expected_size = db.compress_process.size_bytes
    if facts.size != expected_size:
        return Verdict(
            BackupEntryStatus.TRANSFER_INTEGRITY_FAILED,
            f"staged file {facts.name} is {facts.size} bytes, the agent reported {expected_size}",
        )
    if facts.sha256 != db.compress_process.sha256_checksum:
        return Verdict(
            BackupEntryStatus.HASH_MISMATCH,
            f"staged file {facts.name} has SHA-256 {facts.sha256}, "
            f"the agent reported {db.compress_process.sha256_checksum}",
        )
    if facts.archive_problem is not None:
        # SPEC §13: the agent's checksum matches a file that cannot be restored.
        return Verdict(
            BackupEntryStatus.FAILED,
            f"staged file {facts.name}: archive test failed: {facts.archive_problem}",
        )
    return Verdict(
        BackupEntryStatus.SUCCESS, f"staged file {facts.name} verified ({facts.size} bytes)"
    )


def decide(db: DatabaseReport, facts: StagedFacts | None) -> Verdict:
    """The whole table; `facts` may be None only when the agent's own steps failed."""
    verdict = agent_verdict(db)
    if verdict is not None:
        return verdict
    if facts is None:
        raise ValueError("the staged file must be inspected once the agent's steps succeeded")
    return file_verdict(db, facts)


def mark_unchanged(
    verdict: Verdict, facts: StagedFacts | None, previous_sha256: str | None
) -> bool:
    """SPEC §5 step 6: a success identical to the job's previous one is suspicious."""
    return (
        verdict.status is BackupEntryStatus.SUCCESS
        and facts is not None
        and facts.sha256 is not None
        and facts.sha256 == previous_sha256
    )


UNCHANGED_WARNING = "; WARNING: identical to the previous successful backup (SHA-256 unchanged)"


SIZE_HISTORY = 7  # SPEC §13: the job's previous successes a new size is compared with


def size_anomaly(size: int | None, previous: list[int], ratio: float) -> str | None:
    """SPEC §13: the warning for a success much smaller than the job's recent ones, if any.

    `previous` are the sizes of the job's previous successes, newest first (at most
    SIZE_HISTORY are used); with none there is nothing to compare with. A ratio of 0 never warns.
    """
    sizes = sorted(previous[:SIZE_HISTORY])
    if size is None or not sizes:
        return None
    middle = len(sizes) // 2
    median = sizes[middle] if len(sizes) % 2 else (sizes[middle - 1] + sizes[middle]) / 2
    if size >= ratio * median:
        return None
    return (
        f"; WARNING: {size} bytes is less than {ratio:g} times the median size ({median:g} bytes) "
        f"of the job's previous {len(sizes)} successful backups"
    )
