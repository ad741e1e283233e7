"""SPEC §3: `D/_rejected/`, where a report that cannot be trusted goes with its reason.

The reason is written first, whole, under its final name (`NAME.reason.txt`, written to a temp
file, fsynced and renamed into place), and only then is the report moved beside it: a crash in
between leaves a reason without its report, never a report without its reason or a reason cut
short. Such an orphan is harmless: the report is still in D and is judged again after the
restart; the start-up repair removes orphans and gives a reason to a report an earlier version
left without one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from backupwatch.fsutil import (
    ensure_real_dir,
    open_dir,
    rename_noreplace,
    unique_name,
)
from backupwatch.names import display_name
from backupwatch.sites import REJECTED_DIR

log = structlog.get_logger(__name__)

REASON_SUFFIX = ".reason.txt"
TEMP_SUFFIX = ".reason.tmp"
ORPHAN_AGE = 60.0
"""A reason file without its report, younger than this, may belong to a rejection under way
(another worker, or another daemon sharing the folder): it is left alone."""
LOST_REASON = "the reason was lost: the daemon stopped while rejecting it; it will not be retried"


def reason_text(display_name: str, reason: str) -> str:
    return f"{display_name} was rejected: {reason}\n"


def reject_into(report: Path, folder: Path, display_name: str, reason: str) -> Path:
    """Move `report` to `folder/_rejected/` under a free name, its reason file written first.

    Raises FileNotFoundError if the report vanished, UnsafePath if `_rejected` is not a real
    folder (an agent's symlink), OSError for anything else; the report then stays in place.
    """
    target_dir = folder / REJECTED_DIR
    ensure_real_dir(target_dir)
    text = reason_text(display_name, reason).encode("utf-8", "backslashreplace")
    with open_dir(report.parent) as src_fd, open_dir(target_dir) as dst_fd:
        os.stat(report.name, dir_fd=src_fd, follow_symlinks=False)  # vanished: say so now
        for attempt in range(10_000):
            name = unique_name(report.name, attempt)
            if not _write_reason(dst_fd, name, text):
                continue
            try:
                rename_noreplace(src_fd, report.name, dst_fd, name)
            except FileExistsError:
                _take_back_reason(dst_fd, name)
                continue
            except BaseException:
                _take_back_reason(dst_fd, name)
                raise
            os.fsync(dst_fd)
            return target_dir / name
    raise FileExistsError(f"no free name for {report.name} in {target_dir}")


def _take_back_reason(dir_fd: int, name: str) -> None:
    """The move failed: remove our reason, unless a report landed at NAME meanwhile (another
    daemon rejecting the same report wrote the same reason, and its report is now there)."""
    if not _exists(dir_fd, name):
        _unlink_quietly(dir_fd, name + REASON_SUFFIX)


def _write_reason(dir_fd: int, name: str, text: bytes) -> bool:
    """Put NAME.reason.txt in place, whole; False when NAME or a live reason already holds it."""
    if _exists(dir_fd, name):
        return False
    reason_name = name + REASON_SUFFIX
    with _whole_file(dir_fd, text) as place:
        try:
            place(reason_name)
            return True
        except FileExistsError:
            if not _is_orphan(dir_fd, reason_name, _subject(text)):
                return False
        _unlink_quietly(dir_fd, reason_name)  # our own, or an old, orphan: its name is free
        try:
            place(reason_name)
        except FileExistsError:
            return False
        return True


def _subject(text: bytes) -> bytes:
    """`SITE/NAME was rejected:`, the part of a reason that names its report."""
    head, sep, _rest = text.partition(b" was rejected:")
    return head + sep


@contextlib.contextmanager
def _whole_file(dir_fd: int, text: bytes) -> Iterator[Callable[[str], None]]:
    """`text`, fsynced, and a function that links it under a name (FileExistsError if taken).

    An O_TMPFILE has no name until it is linked, so a crash while writing leaves nothing at
    all; where the filesystem has no O_TMPFILE (NFS), a dot-named temp is used instead and
    renamed without replacing (a crash may then leave the temp, which `repair` removes).
    """
    try:
        fd = os.open(".", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
        yield from _named_temp(dir_fd, text)
        return
    try:
        _write_all(fd, text)
        yield lambda name: os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd)
    finally:
        os.close(fd)


def _named_temp(dir_fd: int, text: bytes) -> Iterator[Callable[[str], None]]:
    temp = f".{uuid.uuid4().hex}{TEMP_SUFFIX}"
    fd = os.open(
        temp,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o644,
        dir_fd=dir_fd,
    )
    try:
        _write_all(fd, text)
    finally:
        os.close(fd)
    try:
        yield lambda name: rename_noreplace(dir_fd, temp, dir_fd, name)
    finally:
        _unlink_quietly(dir_fd, temp)


def _write_all(fd: int, text: bytes) -> None:
    view = memoryview(text)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


def _is_orphan(dir_fd: int, reason_name: str, subject: bytes = b"") -> bool:
    """A reason file whose report is not beside it, left by a crash mid-rejection: our own
    (it names the very report being rejected again), or anyone's once it is old. A young one
    naming another report may be a rejection under way (another worker or daemon)."""
    report_name = reason_name.removesuffix(REASON_SUFFIX)
    if _exists(dir_fd, report_name):
        return False
    try:
        st = os.stat(reason_name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    if not stat.S_ISREG(st.st_mode):
        return False
    if _older(dir_fd, reason_name):
        return True
    return bool(subject) and _starts_with(dir_fd, reason_name, subject)


def _starts_with(dir_fd: int, name: str, prefix: bytes) -> bool:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return False
    try:
        return os.read(fd, len(prefix)) == prefix
    finally:
        os.close(fd)


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def _unlink_quietly(dir_fd: int, name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


@dataclass(frozen=True)
class Repair:
    orphans_removed: int = 0
    reasons_restored: int = 0


def repair(folder: Path) -> Repair:
    """Finish what a crash left half-done in `folder/_rejected/` (see the module docstring)."""
    target_dir = folder / REJECTED_DIR
    try:
        with open_dir(target_dir) as dir_fd:
            names = set(_listing(target_dir))
            orphans = [n for n in names if n.endswith(REASON_SUFFIX) and _is_orphan(dir_fd, n)]
            temps = [n for n in names if n.endswith(TEMP_SUFFIX) and _older(dir_fd, n)]
            for name in orphans + temps:
                _unlink_quietly(dir_fd, name)
                log.info("rejected.orphan_reason_removed", folder=str(target_dir), reason=name)
            bare = [
                n
                for n in names
                if not n.endswith(REASON_SUFFIX)
                and not n.startswith(".")
                and n + REASON_SUFFIX not in names
            ]
            for name in bare:
                _restore_reason(dir_fd, name)
    except (FileNotFoundError, NotADirectoryError, OSError):
        return Repair()
    return Repair(len(orphans) + len(temps), len(bare))


def _older(dir_fd: int, name: str) -> bool:
    """Older than ORPHAN_AGE: not a rejection under way (another worker or daemon)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return time.time() - st.st_mtime > ORPHAN_AGE


def _restore_reason(dir_fd: int, name: str) -> None:
    text = reason_text(display_name(name), LOST_REASON).encode("utf-8", "backslashreplace")
    with _whole_file(dir_fd, text) as place, contextlib.suppress(FileExistsError):
        place(name + REASON_SUFFIX)
        log.warning("rejected.reason_restored", report=display_name(name))


def _listing(folder: Path) -> Iterator[str]:
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                yield entry.name
