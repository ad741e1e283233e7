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
from backupwatch.sites import LOG_DIR, REJECTED_DIR

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


# ---------------------------------------------------------------- backupwatchctl (SPEC §11)

REASON_READ_LIMIT = 64 * 1024
_REJECTED_MARK = " was rejected: "


@dataclass(frozen=True)
class RejectedReport:
    """One report still in a site's `_rejected/`, with what its reason file says."""

    folder: Path  # the site folder D (or the stray folder the report lay in)
    name: str  # its name in `_rejected/` (agent-chosen: escape it before showing it)
    reason: str | None  # the reason file's text, or None when it has none
    rejected_at: float | None  # the reason file's mtime: when it was rejected

    @property
    def path(self) -> Path:
        return self.folder / REJECTED_DIR / self.name


def rejected_reports(folder: Path) -> list[RejectedReport]:
    """The reports in `folder/_rejected/`, never following a symlink (an agent's trap)."""
    try:
        with open_dir(folder / REJECTED_DIR) as dir_fd:
            names = sorted(_listing_at(dir_fd))
            found = []
            for name in names:
                if name.endswith(REASON_SUFFIX) or name.startswith("."):
                    continue
                reason, when = _read_reason(dir_fd, name + REASON_SUFFIX)
                found.append(RejectedReport(folder, name, reason, when))
            return found
    except OSError:  # absent, a symlink (ELOOP), not a folder, not readable: nothing listed
        return []


def _listing_at(dir_fd: int) -> Iterator[str]:
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                yield entry.name


def _read_reason(dir_fd: int, name: str) -> tuple[str | None, float | None]:
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None, None
    with os.fdopen(fd, "rb") as reason:
        when = os.fstat(reason.fileno()).st_mtime
        if not stat.S_ISREG(os.fstat(reason.fileno()).st_mode):
            return None, None
        return reason.read(REASON_READ_LIMIT).decode("utf-8", "replace").strip(), when


class NotRejected(Exception):
    """`backupwatchctl retry` was given something that is not a rejected report."""


def retry(root: Path, path: Path) -> Path:
    """Put a rejected report back where it came from (its reason file names it), to be
    judged again; its reason file goes. Returns where it went.

    Refuses (NotRejected) anything but a regular file in a real `_rejected/` folder under the
    deposit root with its reason beside it; never follows a symlink; never replaces a file.
    """
    path = Path(os.path.abspath(path))
    rejected_dir, name = path.parent, path.name
    if rejected_dir.name != REJECTED_DIR or name.endswith(REASON_SUFFIX) or name.startswith("."):
        raise NotRejected("not a report in a _rejected/ folder")
    folder = rejected_dir.parent
    if not folder.is_relative_to(root):
        raise NotRejected(f"not under backup_storage_root ({root})")
    try:
        with open_dir(rejected_dir) as src_fd:
            st = os.stat(name, dir_fd=src_fd, follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                raise NotRejected("not a regular file")
            reason, _when = _read_reason(src_fd, name + REASON_SUFFIX)
            if reason is None:
                raise NotRejected("it has no reason file beside it")
            target_dir, target = _origin(root, folder, name, reason)
            with open_dir(target_dir) as dst_fd:
                rename_noreplace(src_fd, name, dst_fd, target)
            _unlink_quietly(src_fd, name + REASON_SUFFIX)
    except FileNotFoundError as exc:
        raise NotRejected("no such file") from exc
    except NotADirectoryError as exc:  # O_NOFOLLOW | O_DIRECTORY on a symlink
        raise NotRejected(f"{exc.filename}: a symlink or not a folder: not followed") from exc
    except FileExistsError as exc:
        raise NotRejected(f"{target_dir / target} exists: it is not replaced") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotRejected("a symlink in the way: not followed") from exc
        raise
    log.info("rejected.retried", report=str(path), to=str(target_dir / target))
    return target_dir / target


def _origin(root: Path, folder: Path, name: str, reason: str) -> tuple[Path, str]:
    """Where the report lay: the name its reason file gives, when that is D or D/log/ and
    a plain name; else D under its current name."""
    first = reason.splitlines()[0] if reason else ""
    original = first.split(_REJECTED_MARK, 1)[0] if _REJECTED_MARK in first else ""
    candidate = root / original if original else None
    if (
        candidate is not None
        and candidate.parent in (folder, folder / LOG_DIR)
        and candidate.name not in ("", ".", "..")
        and not candidate.name.startswith(".")
        and os.fsdecode(os.fsencode(candidate.name)) == candidate.name
    ):
        return candidate.parent, candidate.name
    return folder, name
