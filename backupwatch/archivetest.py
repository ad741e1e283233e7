"""SPEC §13: the archive test, fed the very chunks that feed SHA-256 (one read of the file).

A checksum proves the file arrived as the agent sent it, not that it can be restored: an agent
that compressed a truncated dump reports a matching checksum. So a staged file named `.gz`,
`.zst`, `.xz` or `.bz2` is decompressed to nowhere while it is hashed. Each decompressor is
asked for at most `OUTPUT_LIMIT` bytes per call (a small bomb never fills memory), restarted on
what follows an end of stream (multi-member gzip, concatenated zstd frames, xz and bzip2
streams one after another are all valid), and the file is complete only when its last stream
reached its end marker. The first error ends the test; hashing goes on.

`.zst` uses `compression.zstd` (Python 3.14) or its backport `backports.zstd`: unlike the
`zstandard` package's `decompressobj`, it bounds each call's output (`max_length`) and says
whether a frame ended (`eof`), which a truncation test needs.
"""

from __future__ import annotations

import bz2
import lzma
import queue
import sys
import threading
import zlib
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

if sys.version_info >= (3, 14):
    from compression.zstd import ZstdDecompressor, ZstdError
else:
    from backports.zstd import ZstdDecompressor, ZstdError

OUTPUT_LIMIT = 1 << 20  # bytes of decompressed output asked for per call
PROGRESS_OUTPUT = 256 << 20  # a progress beat every 256 MiB decompressed (xz: ~ seconds)
SUFFIXES = (".gz", ".zst", ".xz", ".bz2")
QUEUE_CHUNKS = 8  # chunks (1 MiB each) between the reader and a `Background` test
WAIT_BEAT = 0.5  # seconds a reader waits on a `Background` test before it looks for progress


class Decompressor(Protocol):
    """The lzma/bz2/zstd shape of a streaming decompressor (zlib is adapted to it)."""

    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...

    @property
    def eof(self) -> bool: ...

    @property
    def needs_input(self) -> bool: ...

    @property
    def unused_data(self) -> bytes: ...


class _Gzip:
    """zlib's gzip decoder (wbits 31: a gzip header required, as `gzip -t` requires it)."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(31)
        self._full = False  # the last call filled its output: more may be pending inside zlib

    def decompress(self, data: bytes, max_length: int = -1) -> bytes:
        tail = self._z.unconsumed_tail
        out = self._z.decompress(tail + data if tail else data, max(max_length, 0))
        self._full = max_length > 0 and len(out) == max_length
        return out

    @property
    def eof(self) -> bool:
        return self._z.eof

    @property
    def needs_input(self) -> bool:
        return not self._z.unconsumed_tail and not self._full

    @property
    def unused_data(self) -> bytes:
        return self._z.unused_data


_FORMATS: dict[str, tuple[str, Callable[[], Any]]] = {
    ".gz": ("gzip", _Gzip),
    ".zst": ("zstd", ZstdDecompressor),
    ".xz": ("xz", lzma.LZMADecompressor),
    ".bz2": ("bzip2", bz2.BZ2Decompressor),
}
_ERRORS = (zlib.error, lzma.LZMAError, ZstdError, OSError, EOFError, ValueError)


def format_of(name: str) -> str | None:
    """The compression format a staged file's name announces, or None (no test)."""
    for suffix, (label, _factory) in _FORMATS.items():
        if name.endswith(suffix):
            return label
    return None


class ArchiveTest:
    """One file's test: `feed` every chunk in order, then `finish` for the verdict."""

    def __init__(self, suffix: str, progress: Callable[[], None] | None = None) -> None:
        self.format, self._factory = _FORMATS[suffix]
        self._decompressor: Decompressor = self._factory()
        self._progress = progress
        self._output = 0
        self.error: str | None = None
        self.streams = 0  # streams (gzip members, zstd frames, ...) that reached their end

    @classmethod
    def for_name(cls, name: str, progress: Callable[[], None] | None = None) -> ArchiveTest | None:
        for suffix in _FORMATS:
            if name.endswith(suffix):
                return cls(suffix, progress)
        return None

    def feed(self, chunk: bytes | memoryview) -> None:
        if self.error is not None:
            return
        try:
            self._feed(bytes(chunk))
        except _ERRORS as exc:
            self.error = f"{self.format}: {exc}"

    def _feed(self, data: bytes) -> None:
        d = self._decompressor
        while True:
            if d.eof:
                data = d.unused_data + data  # what followed the end: the next stream, or nothing
                if not data:
                    return
                self.streams += 1
                d = self._decompressor = self._factory()
            if not data and d.needs_input:
                return
            self._count(len(d.decompress(data, OUTPUT_LIMIT)))
            data = b""

    def _count(self, produced: int) -> None:
        before = self._output
        self._output += produced
        crossed = self._output // PROGRESS_OUTPUT > before // PROGRESS_OUTPUT
        if crossed and self._progress is not None:
            self._progress()

    def finish(self) -> str | None:
        """None when every stream ended properly; else the decompressor's words."""
        if self.error is None:
            try:
                self._drain()
            except _ERRORS as exc:
                self.error = f"{self.format}: {exc}"
        return self.error

    def _drain(self) -> None:
        d = self._decompressor
        while not d.eof and not d.needs_input:
            self._count(len(d.decompress(b"", OUTPUT_LIMIT)))
        if d.eof:
            self.streams += 1
        else:
            self.error = (
                f"{self.format}: unexpected end of file (the compressed data stops before "
                "the end of its stream: truncated?)"
            )


class Background:
    """An `ArchiveTest` on a thread of its own, fed through a bounded queue.

    Hashing and decompressing both release the GIL, so on two cores the one pass takes about
    as long as the slower of the two instead of their sum (BENCHMARKS.md, "Archive test"); the
    file is still read once, by the caller. The caller's thread keeps the watchdog's beat: while
    it waits for the test (the queue full, or at the end), it calls `progress` whenever the
    decompressor has produced more output since it last looked, so a long xz test is work and a
    wedged one is not. Use it as a context manager: leaving it always ends the thread.
    """

    def __init__(self, test: ArchiveTest, progress: Callable[[], None] | None = None) -> None:
        self.test = test
        self._progress = progress
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=QUEUE_CHUNKS)
        self._seen = 0
        self._thread = threading.Thread(target=self._run, name="archive-test", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self.test.feed(chunk)

    def feed(self, chunk: bytes | memoryview) -> None:
        whole = chunk.obj if isinstance(chunk, memoryview) else chunk
        if not (isinstance(whole, bytes) and len(whole) == len(chunk)):
            whole = bytes(chunk)  # a view of a buffer the reader reuses: the queue keeps a copy
        self._put(whole)

    def _put(self, item: bytes | None) -> None:
        while True:
            try:
                self._queue.put(item, timeout=WAIT_BEAT)
                return
            except queue.Full:
                self._beat_if_progressing()

    def _beat_if_progressing(self) -> None:
        produced = self.test._output
        if produced > self._seen and self._progress is not None:
            self._progress()
        self._seen = produced

    def finish(self) -> str | None:
        """Wait for the test to have seen every chunk; its verdict (see `ArchiveTest.finish`)."""
        self._end()
        return self.test.finish()

    def _end(self) -> None:
        if self._thread.is_alive():
            self._put(None)
        while self._thread.is_alive():
            self._thread.join(WAIT_BEAT)
            self._beat_if_progressing()

    def __enter__(self) -> Background:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._end()
