"""Filesystem primitives that hold SPEC §9: no symlink followed out of D, nothing overwritten.

Agents can write anything inside their deposit folder, including symlinks and folders named like
ours, so every path a report names is walked one component at a time with O_NOFOLLOW relative to
an already-opened directory, and every move into a folder uses link(2), which never replaces an
existing name.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from backupwatch.names import fit_name

CHUNK = 1 << 20  # 1 MiB reads: hashlib releases the GIL on large updates
PROGRESS_EVERY = 256 * CHUNK  # a progress beat every 256 MiB hashed or copied
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class UnsafePath(Exception):
    """A path component is a symlink, not a directory, or leaves its root."""


@contextlib.contextmanager
def open_dir(path: Path) -> Iterator[int]:
    """Open an existing directory without following a symlink at its last component."""
    fd = os.open(path, DIR_FLAGS)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_beneath(root: Path, relative: PurePosixPath) -> Iterator[tuple[int, int, str]]:
    """Walk `relative` under `root` refusing symlinks; yield (dir_fd, file_fd, name).

    Raises FileNotFoundError when a component is absent, UnsafePath for a symlink, a '..' or an
    absolute path, and IsADirectoryError / UnsafePath for a final component that is not a file.
    """
    opened = Beneath.open(root, relative)
    try:
        yield opened.dir_fd, opened.fd, opened.name
    finally:
        opened.close()


class Beneath:
    """A file opened beneath a root the way `open_beneath` opens it, held by its owner.

    Not a context manager: the pipeline opens a staged file once for the readiness check and
    keeps it through the judgement and the promotion (one walk beneath D instead of three,
    issue 10's burst), then keeps only its folder's descriptor for the clean-up (`detach_dir`).
    """

    __slots__ = ("_fds", "name")

    def __init__(self, fds: list[int], name: str) -> None:
        self._fds = fds  # the file's folder and the file: closed in reverse order
        self.name = name

    @classmethod
    def open(cls, root: Path, relative: PurePosixPath) -> Beneath:
        """Walk as `open_beneath` does; the caller must `close()` what it gets."""
        parts = relative.parts
        if not parts or relative.is_absolute() or any(p in ("..", ".", "") for p in parts):
            raise UnsafePath(f"{relative} is not a plain relative path")
        # Each folder closed once its child is open: a report's files are all held at once,
        # and an agent's deep names must not multiply the daemon's descriptors (two per file).
        # Plain descriptors, not an ExitStack: this runs for every database of every report.
        fd = os.open(root, DIR_FLAGS)
        try:
            for part in parts[:-1]:
                child = _subdir_fd(fd, part)
                os.close(fd)
                fd = child
            file_fd = _open_file_at(fd, parts[-1])
        except BaseException:
            os.close(fd)
            raise
        return cls([fd, file_fd], parts[-1])

    @property
    def dir_fd(self) -> int:
        return self._fds[-2]

    @property
    def fd(self) -> int:
        return self._fds[-1]

    def detach_dir(self) -> StagedDir:
        """The file's folder, open, for its owner to close; `close()` leaves it alone."""
        folder = StagedDir(self._fds[-2], self.name)
        del self._fds[-2]
        return folder

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in reversed(fds):
            os.close(fd)


@dataclass
class StagedDir:
    """The folder (already walked beneath its root, SPEC §9) that holds a validated file."""

    fd: int
    name: str

    def remove_if(self, validated: Identity) -> None:
        """Unlink `name` if it is still the very file validated; as `open_beneath` would, refuse
        a symlink or a non-regular file there (UnsafePath), and say nothing if it is gone."""
        st = os.stat(self.name, dir_fd=self.fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePath(f"{self.name} is a symlink")
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePath(f"{self.name} is not a regular file")
        if Identity.of(st) == validated:
            os.unlink(self.name, dir_fd=self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@contextlib.contextmanager
def open_dir_beneath(root: Path, relative: PurePosixPath) -> Iterator[int]:
    """Open the folder `relative` under `root`, refusing a symlink at every component (SPEC §9,
    §14: what retention deletes is found the way everything else is)."""
    parts = relative.parts
    if relative.is_absolute() or any(p in ("..", ".", "") for p in parts):
        raise UnsafePath(f"{relative} is not a plain relative path")
    with contextlib.ExitStack() as stack:
        dir_fd = stack.enter_context(open_dir(root))
        for part in parts:
            dir_fd = stack.enter_context(_open_subdir(dir_fd, part))
        yield dir_fd


@contextlib.contextmanager
def _open_subdir(dir_fd: int, name: str) -> Iterator[int]:
    fd = _subdir_fd(dir_fd, name)
    try:
        yield fd
    finally:
        os.close(fd)


def _subdir_fd(dir_fd: int, name: str) -> int:
    try:
        return os.open(name, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafePath(f"{name} is a symlink or not a directory") from exc
        raise


def _open_file_at(dir_fd: int, name: str) -> int:
    try:
        fd = os.open(name, FILE_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePath(f"{name} is a symlink") from exc
        if exc.errno == errno.ENXIO:  # a Unix socket (or a FIFO opened for writing)
            raise UnsafePath(f"{name} is not a regular file") from exc
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UnsafePath(f"{name} is not a regular file")
    return fd


def read_capped(fd: int, limit: int) -> bytes:
    """Read at most limit + 1 bytes, so a caller can tell 'exactly limit' from 'over limit'."""
    chunks: list[bytes] = []
    remaining = limit + 1
    while remaining > 0:
        chunk = os.read(fd, min(CHUNK, remaining))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def sha256_fd(
    fd: int,
    progress: Callable[[], None] | None = None,
    sink: Callable[[memoryview], None] | None = None,
) -> tuple[str, int]:
    """SHA-256 and byte count of an open file from its start, in one pass.

    `progress` is called every PROGRESS_EVERY bytes: hashing a very large backup is long work,
    not a hang, and the daemon's watchdog must be able to tell the difference. `sink` gets the
    same chunks (the archive test, SPEC §13): the file is still read once.
    """
    digest = hashlib.sha256()
    size = 0
    # No bigger than the file (plus one byte, to see its end in one read): a fresh 1 MiB buffer
    # per small staged file was an mmap, 256 page faults and a munmap each (issue 10's burst).
    buffer = bytearray(max(1, min(CHUNK, os.fstat(fd).st_size + 1)))
    view = memoryview(buffer)
    os.lseek(fd, 0, os.SEEK_SET)
    if sink is not None:
        # Each chunk a bytes object of its own, which the sink may keep (a queue to another
        # thread) without a copy; the reused buffer below would have to be copied.
        while chunk := os.read(fd, CHUNK):
            digest.update(chunk)
            sink(memoryview(chunk))
            size += len(chunk)
            if progress is not None and size % PROGRESS_EVERY < len(chunk):
                progress()
        return digest.hexdigest(), size
    while count := os.readv(fd, [buffer]):
        digest.update(view[:count])
        size += count
        if progress is not None and size % PROGRESS_EVERY < count:
            progress()
    return digest.hexdigest(), size


@dataclass(frozen=True)
class Identity:
    """Which file we validated: a later step re-checks it is still the same inode."""

    dev: int
    ino: int

    @classmethod
    def of(cls, st: os.stat_result) -> Identity:
        return cls(st.st_dev, st.st_ino)


UNIQUE_RESERVE = len("-10000") + len(".reason.txt")
"""Room kept in a file name for the counter and for a rejected report's reason file."""


def unique_name(name: str, attempt: int) -> str:
    """`name`, then `stem-2.ext.gz`, `stem-3.ext.gz`, ...: the suffixes stay readable.

    Every variant, and its `.reason.txt`, fits in NAME_MAX: an agent's 250-byte name is
    shortened (see `names.fit_name`) rather than failing with ENAMETOOLONG.
    """
    name = fit_name(name, UNIQUE_RESERVE)
    if attempt == 0:
        return name
    stem, dot, suffixes = name.partition(".")
    return f"{stem}-{attempt + 1}{dot}{suffixes}"


def link_unique(
    src_dir_fd: int, src_name: str, dst_dir: Path, name: str, identity: Identity | None = None
) -> Path:
    """Hard-link a file into dst_dir under `name` or the first free variant; never overwrite.

    If a name already holds this very inode (a crash between link and commit), it is reused, so a
    retried report does not leave a second copy behind.
    """
    with open_dir(dst_dir) as dst_fd:
        return link_unique_at(src_dir_fd, src_name, dst_fd, dst_dir, name, identity)


def link_unique_at(
    src_dir_fd: int,
    src_name: str,
    dst_fd: int,
    dst_dir: Path,
    name: str,
    identity: Identity | None = None,
) -> Path:
    """`link_unique` into `dst_dir` already opened as `dst_fd` (a caller that goes on working
    in that folder opens it once)."""
    for attempt in range(10_000):
        candidate = unique_name(name, attempt)
        try:
            os.link(
                src_name,
                candidate,
                src_dir_fd=src_dir_fd,
                dst_dir_fd=dst_fd,
                follow_symlinks=False,
            )
            return dst_dir / candidate
        except FileExistsError:
            if identity is not None and _holds(dst_fd, candidate, identity):
                return dst_dir / candidate
    raise FileExistsError(f"no free name for {name} in {dst_dir}")


def _holds(dir_fd: int, name: str, identity: Identity) -> bool:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return Identity.of(st) == identity


_libc = ctypes.CDLL(None, use_errno=True)
_RENAME_NOREPLACE = 1


def rename_noreplace(src_dir_fd: int, src_name: str, dst_dir_fd: int, dst_name: str) -> None:
    """renameat2(RENAME_NOREPLACE): an atomic move that never replaces an existing name.

    Unlike link(2), it needs no access to the file itself, so it works on agents' files under
    fs.protected_hardlinks=1 (Debian's default) for an unprivileged daemon.
    """
    result = _libc.renameat2(
        src_dir_fd, os.fsencode(src_name), dst_dir_fd, os.fsencode(dst_name), _RENAME_NOREPLACE
    )
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), dst_name)


def move_unique(src: Path, dst_dir: Path, name: str | None = None) -> Path:
    """Move a file into dst_dir (a real directory, created if absent) without overwriting."""
    ensure_real_dir(dst_dir)
    with open_dir(src.parent) as src_fd, open_dir(dst_dir) as dst_fd:
        try:
            return _rename_unique(src_fd, src.name, dst_fd, dst_dir, name or src.name)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOSYS):
                raise
        return _move_by_link(src_fd, src.name, dst_dir, name or src.name)


def _rename_unique(src_fd: int, src_name: str, dst_fd: int, dst_dir: Path, name: str) -> Path:
    """Rename to the first free variant of `name`; a name already holding this very inode (a
    link-based move cut short by a crash) is where the move ends."""
    identity = Identity.of(os.stat(src_name, dir_fd=src_fd, follow_symlinks=False))
    for attempt in range(10_000):
        candidate = unique_name(name, attempt)
        try:
            rename_noreplace(src_fd, src_name, dst_fd, candidate)
        except FileExistsError:
            if _holds(dst_fd, candidate, identity):
                os.unlink(src_name, dir_fd=src_fd)
                return dst_dir / candidate
            continue
        return dst_dir / candidate
    raise FileExistsError(f"no free name for {name} in {dst_dir}")


def _move_by_link(src_fd: int, src_name: str, dst_dir: Path, name: str) -> Path:
    """For filesystems without RENAME_NOREPLACE: link, then unlink the old name.

    Passing the source's identity makes a move interrupted between link and unlink (a crash,
    or another worker moving the same file) finish on the name it already has.
    """
    identity = Identity.of(os.stat(src_name, dir_fd=src_fd, follow_symlinks=False))
    target = link_unique(src_fd, src_name, dst_dir, name, identity)
    os.unlink(src_name, dir_fd=src_fd)
    return target


def ensure_real_dir(path: Path, mode: int = 0o775) -> None:
    """Create `path` if absent; refuse it when an agent left a symlink or a file there."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=mode, parents=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafePath(f"{path} is not a real directory (a symlink or a file?)")


def copy_hashing(
    src_fd: int, out_fd: int, progress: Callable[[], None] | None = None
) -> tuple[str, int]:
    """Copy src_fd from its start to out_fd, returning the SHA-256 and size of what was read."""
    digest = hashlib.sha256()
    size = 0
    os.lseek(src_fd, 0, os.SEEK_SET)
    while chunk := os.read(src_fd, CHUNK):
        digest.update(chunk)
        view = memoryview(chunk)
        while view:
            written = os.write(out_fd, view)
            view = view[written:]
        size += len(chunk)
        if progress is not None and size % PROGRESS_EVERY < len(chunk):
            progress()
    return digest.hexdigest(), size


def newest_change(folder: Path, skip: frozenset[str], limit: int = 10_000) -> float | None:
    """The newest change time (wall clock, st_ctime) of a regular file under `folder`.

    ctime, not mtime: an agent can set mtime to anything, but the kernel alone sets ctime, on
    every write, rename and chmod. Symlinks are not followed, folders named in `skip` are not
    entered, and at most `limit` entries are looked at, so a huge site tree costs a bounded walk.
    None when there is no file at all.
    """
    newest: float | None = None
    stack = [os.fspath(folder)]
    seen = 0
    while stack and seen < limit:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    seen += 1
                    if entry.is_dir(follow_symlinks=False):
                        if entry.name not in skip:
                            stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        changed = entry.stat(follow_symlinks=False).st_ctime
                        newest = changed if newest is None else max(newest, changed)
        except OSError:
            continue
    return newest
