"""SPEC §13's archive test: the decompressors alone, then through `process_path` on real files
(SQLite and PostgreSQL): a corrupt archive is FAILED even when the agent's checksum matches, the
staged file stays where it is, and the file is read exactly once.

The 1 GiB case is a speed question: bench/archive.py.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from support import World, database, drop, job_block, report, stage, utc

from backupwatch import archivetest
from backupwatch.archivetest import ArchiveTest, format_of
from backupwatch.enums import BackupEntryStatus
from backupwatch.pipeline import Outcome
from backupwatch.store import BackupEntry

if sys.version_info >= (3, 14):
    from compression.zstd import CompressionParameter
    from compression.zstd import compress as zstd_compress
else:
    from backports.zstd import CompressionParameter
    from backports.zstd import compress as zstd_compress


def zst(data: bytes) -> bytes:
    """As the zstd tool writes it: with the frame's content checksum (`--check`, its default)."""
    return zstd_compress(data, options={CompressionParameter.checksum_flag: 1})


COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    ".gz": gzip.compress,
    ".zst": zst,
    ".xz": lzma.compress,
    ".bz2": bz2.compress,
}
PAYLOAD = os.urandom(40_000) + b"-- dump\n" * 20_000


def run(suffix: str, blob: bytes, chunk: int = 65536) -> str | None:
    test = ArchiveTest.for_name("sales.sql" + suffix)
    assert test is not None
    view = memoryview(blob)
    for start in range(0, len(blob), chunk):
        test.feed(view[start : start + chunk])
    return test.finish()


def flipped(blob: bytes, at: int) -> bytes:
    return blob[:at] + bytes([blob[at] ^ 0x01]) + blob[at + 1 :]


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
def test_valid_archives_pass_whatever_the_chunking(suffix: str) -> None:
    blob = COMPRESSORS[suffix](PAYLOAD)
    assert run(suffix, blob) is None
    assert run(suffix, blob, chunk=1 << 20) is None
    assert run(suffix, blob[:5000], chunk=7) is not None  # truncated, fed 7 bytes at a time


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
def test_concatenated_streams_are_valid(suffix: str) -> None:
    """Multi-member gzip (`cat a.gz b.gz`), zstd frames, xz and bzip2 streams one after another."""
    compress = COMPRESSORS[suffix]
    blob = compress(PAYLOAD) + compress(b"second part\n") + compress(b"third\n")
    test = ArchiveTest.for_name("x" + suffix)
    assert test is not None
    test.feed(blob)
    assert test.finish() is None
    assert test.streams == 3


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
@pytest.mark.parametrize(
    "damage",
    ["truncated", "truncated_early", "flipped_byte", "wrong_magic", "empty", "second_truncated"],
)
def test_corrupt_archives_fail_with_the_decompressors_words(suffix: str, damage: str) -> None:
    compress = COMPRESSORS[suffix]
    blob = compress(PAYLOAD)
    bad = {
        "truncated": blob[:-9],
        "truncated_early": blob[: len(blob) // 2],
        "flipped_byte": flipped(blob, len(blob) // 2),
        "wrong_magic": b"PK" + blob[2:],
        "empty": b"",
        "second_truncated": blob + compress(PAYLOAD)[:-9],
    }[damage]
    problem = run(suffix, bad)
    assert problem is not None
    label = format_of("x" + suffix)
    assert label is not None
    assert problem.startswith(label + ": ")


def test_names_without_a_known_suffix_are_not_tested() -> None:
    assert ArchiveTest.for_name("sales.sql") is None
    assert ArchiveTest.for_name("sales.tar.gz.part") is None
    assert ArchiveTest.for_name("sales.zip") is None


def test_a_highly_compressed_file_beats_progress_and_stays_small_in_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A long decompression is work, not a hang (the watchdog's beat, here every 8 MiB of
    output instead of 256), and a bomb never sits in memory at once: each call asks for at
    most 1 MiB."""
    monkeypatch.setattr(archivetest, "PROGRESS_OUTPUT", 8 << 20)
    beats: list[int] = []
    outputs: list[int] = []
    blob = zst(b"\0" * (20 << 20))
    assert len(blob) < 2_000
    test = ArchiveTest(".zst", progress=lambda: beats.append(1))
    real = test._decompressor.decompress

    def decompress(data: bytes, max_length: int = -1) -> bytes:
        out = real(data, max_length)
        outputs.append(len(out))
        return out

    monkeypatch.setattr(test, "_decompressor", _Spy(test._decompressor, decompress))
    test.feed(blob)
    assert test.finish() is None
    assert len(beats) == 2  # at 8 and 16 MiB of output
    assert max(outputs) <= 1 << 20


class _Spy:
    def __init__(self, inner: object, decompress: Callable[..., bytes]) -> None:
        self._inner = inner
        self.decompress = decompress

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


# --------------------------------------------------------------------- through the pipeline

AGENT = "ACME_Lyon_Part-Dieu"
JOBS = job_block("ACME", "Lyon", "Part-Dieu", "sales")
ACTIVATED = utc(2026, 11, 24, 0, 0)
WHEN = utc(2026, 11, 24, 13, 10)
NOW = utc(2026, 11, 24, 13, 15)


def entries(w: World) -> list[BackupEntry]:
    from sqlalchemy import select

    with w.store.session() as session:
        return list(session.scalars(select(BackupEntry).order_by(BackupEntry.id)))


def deposit(w: World, name: str, content: bytes) -> Path:
    site = w.site(AGENT)
    stage(site, name, content)
    return drop(site, report(AGENT, WHEN, {"sales": database(name, content)}))


@pytest.fixture
def counted_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Bytes read through os.read and os.readv, wherever in the daemon's code."""
    counts = {"bytes": 0}
    real_read, real_readv = os.read, os.readv

    def read(fd: int, n: int) -> bytes:
        data = real_read(fd, n)
        counts["bytes"] += len(data)
        return data

    def readv(fd: int, buffers: list[bytearray]) -> int:
        got = real_readv(fd, buffers)
        counts["bytes"] += got
        return got

    monkeypatch.setattr(os, "read", read)
    monkeypatch.setattr(os, "readv", readv)
    return counts


def test_a_valid_archive_is_a_success_read_once(
    tmp_path: Path, database_url: str, counted_reads: dict[str, int]
) -> None:
    w = World.create(tmp_path, database_url, JOBS, ACTIVATED, archive_test=True)
    content = gzip.compress(PAYLOAD) + gzip.compress(b"tail\n")
    path = deposit(w, "sales.sql.gz", content)
    counted_reads["bytes"] = 0
    result = w.process(path, NOW)
    assert result.outcome is Outcome.ACCEPTED
    [entry] = entries(w)
    assert entry.status is BackupEntryStatus.SUCCESS, entry.message
    archived = next((w.site(AGENT) / "_archive").iterdir())
    report_size = archived.stat().st_size
    assert counted_reads["bytes"] == len(content) + report_size  # the backup read once


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
def test_a_corrupt_archive_with_a_matching_checksum_is_failed_and_left_in_place(
    tmp_path: Path, database_url: str, suffix: str
) -> None:
    w = World.create(tmp_path, database_url, JOBS, ACTIVATED, archive_test=True)
    content = COMPRESSORS[suffix](PAYLOAD)[:-20]  # the agent hashed the truncated file
    path = deposit(w, "sales.sql" + suffix, content)
    assert w.process(path, NOW).outcome is Outcome.ACCEPTED
    [entry] = entries(w)
    assert entry.status is BackupEntryStatus.FAILED
    assert "archive test failed: " in entry.message
    assert entry.server_sha256 == entry.agent_sha256  # the checksum matched
    assert (w.site(AGENT) / ("sales.sql" + suffix)).read_bytes() == content
    assert not any(p.is_file() for p in w.validated.rglob("*"))


def test_archive_test_off_in_the_config_or_the_job(tmp_path: Path, database_url: str) -> None:
    not_gzip = b"-- plain text under a .gz name\n" * 100
    w = World.create(tmp_path, database_url, JOBS, ACTIVATED, archive_test=False)
    assert w.process(deposit(w, "sales.sql.gz", not_gzip), NOW).outcome is Outcome.ACCEPTED
    assert entries(w)[-1].status is BackupEntryStatus.SUCCESS
    # The same world with the config's test on: only the job's `archive_test = false` skips it.
    w = World.create(tmp_path, database_url, JOBS, ACTIVATED, archive_test=True)
    w.restart(job_block("ACME", "Lyon", "Part-Dieu", "sales", archive_test=False), NOW)
    path = deposit(w, "sales.sql.gz", not_gzip + b"2")
    assert w.process(path, NOW).outcome is Outcome.ACCEPTED
    assert entries(w)[-1].status is BackupEntryStatus.SUCCESS
    w.restart(JOBS, NOW)
    path = deposit(w, "sales.sql.gz", not_gzip + b"3")
    assert w.process(path, NOW).outcome is Outcome.ACCEPTED
    assert entries(w)[-1].status is BackupEntryStatus.FAILED


def test_archive_test_must_be_a_boolean_in_config_and_job(tmp_path: Path) -> None:
    from backupwatch.config import ConfigError, load_settings
    from backupwatch.jobs import load_jobs

    config = tmp_path / "backupwatch.toml"
    config.write_text('archive_test = "no"\nsize_drop_ratio = 2\n')
    with pytest.raises(ConfigError) as raised:
        load_settings(config, {})
    text = "\n".join(raised.value.errors)
    assert f"{config}: archive_test: expected a boolean" in text
    assert f"{config}: size_drop_ratio:" in text
    (tmp_path / "jobs.d").mkdir()
    (tmp_path / "jobs.d" / "a.toml").write_text(
        job_block("ACME", "Lyon", "Part-Dieu", "sales", archive_test="no", keep_daily=-1)
    )
    config.write_text('jobs_path = "jobs.d"\narchive_test = false\n')
    with pytest.raises(ConfigError) as raised:
        load_jobs(load_settings(config, {}))
    text = "\n".join(raised.value.errors)
    assert "archive_test: Input should be a valid boolean" in text
    assert "keep_daily: Input should be greater than or equal to 0" in text
    settings = load_settings(config, {"BACKUPWATCH_ARCHIVE_TEST": "true"})
    assert settings.archive_test is True


def test_a_background_test_keeps_the_readers_beat_and_always_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The pipeline's way: decompression on a thread of its own; the reader, waiting for it,
    beats only while the decompressor makes progress, and leaving the block ends the thread."""
    monkeypatch.setattr(archivetest, "WAIT_BEAT", 0.001)
    monkeypatch.setattr(archivetest, "QUEUE_CHUNKS", 1)
    beats: list[int] = []
    blob = zst(b"\0" * (64 << 20))  # a few KiB that take a while to decompress
    background = archivetest.Background(ArchiveTest(".zst"), progress=lambda: beats.append(1))
    with background:
        for _ in range(3):
            background.feed(memoryview(blob))  # three frames, one after another
        assert background.finish() is None
    assert background.test.streams == 3
    assert beats  # the reader waited, and saw the output grow
    failing = archivetest.Background(ArchiveTest(".gz"))

    def read_fails() -> None:
        with failing:
            failing.feed(b"\x1f\x8b")
            raise OSError("the disk went away mid-read")

    with pytest.raises(OSError, match="mid-read"):
        read_fails()
    assert not failing._thread.is_alive()
