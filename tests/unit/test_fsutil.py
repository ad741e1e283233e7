"""SPEC §9 primitives: no symlink followed out of a root, nothing overwritten, copies verified.

O_NOFOLLOW and dir_fd need a real kernel, so everything here runs on real files under tmp_path.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
from pathlib import Path, PurePosixPath

import pytest

from backupwatch import fsutil
from backupwatch.fsutil import (
    CHUNK,
    Beneath,
    Identity,
    UnsafePath,
    copy_hashing,
    ensure_real_dir,
    link_unique,
    move_unique,
    open_beneath,
    open_dir,
    read_capped,
    sha256_fd,
    unique_name,
)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """root/a/b/file.txt, plus a secret outside root that every escape would reach."""
    (tmp_path / "root" / "a" / "b").mkdir(parents=True)
    (tmp_path / "root" / "a" / "b" / "file.txt").write_bytes(b"inside")
    (tmp_path / "outside" / "b").mkdir(parents=True)
    (tmp_path / "outside" / "b" / "file.txt").write_bytes(b"secret")
    (tmp_path / "outside" / "file.txt").write_bytes(b"secret")
    return tmp_path / "root"


def read_beneath(root: Path, relative: str) -> bytes:
    with open_beneath(root, PurePosixPath(relative)) as (_dir_fd, fd, _name):
        return os.read(fd, 100)


def names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


# ----------------------------------------------------------------------- open_beneath


def test_open_beneath_reads_a_plain_relative_file(root: Path) -> None:
    with open_beneath(root, PurePosixPath("a/b/file.txt")) as (dir_fd, fd, name):
        assert name == "file.txt"
        assert os.read(fd, 100) == b"inside"
        assert os.path.samestat(os.fstat(dir_fd), os.stat(root / "a" / "b"))


def test_open_beneath_closes_every_descriptor(root: Path) -> None:
    with open_beneath(root, PurePosixPath("a/b/file.txt")) as (dir_fd, fd, _name):
        held = (dir_fd, fd)
    for descriptor in held:
        with pytest.raises(OSError, match="Bad file descriptor"):
            os.fstat(descriptor)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_held_staged_file_keeps_two_descriptors_however_deep(root: Path) -> None:
    """The pipeline holds every database's staged file of a report at once (one walk beneath D
    per file): an agent's deep names must not multiply the daemon's descriptors."""
    deep = root.joinpath(*"cdefghijklmnop")
    deep.mkdir(parents=True)
    (deep / "dump.gz").write_bytes(b"x")
    before = open_descriptors()
    held = Beneath.open(root, PurePosixPath(*"cdefghijklmnop", "dump.gz"))
    try:
        assert open_descriptors() - before == 2
        assert os.path.samestat(os.fstat(held.dir_fd), os.stat(deep))
        assert os.read(held.fd, 10) == b"x"
        folder = held.detach_dir()
        held.close()
        assert open_descriptors() - before == 1
        folder.close()
    finally:
        held.close()
    assert open_descriptors() == before


@pytest.mark.parametrize(
    "relative",
    ["../outside/file.txt", "a/../../outside/file.txt", "a/b/..", "..", ".", "", "/etc/passwd"],
)
def test_open_beneath_refuses_paths_that_are_not_plainly_relative(
    root: Path, relative: str
) -> None:
    with pytest.raises(UnsafePath, match="not a plain relative path"):
        read_beneath(root, relative)


def test_open_beneath_refuses_an_absolute_path_even_inside_root(root: Path) -> None:
    with pytest.raises(UnsafePath, match="not a plain relative path"):
        read_beneath(root, str(root / "a" / "b" / "file.txt"))


def test_open_beneath_refuses_a_symlink_as_the_file(root: Path) -> None:
    (root / "link.txt").symlink_to(root.parent / "outside" / "file.txt")
    with pytest.raises(UnsafePath, match=r"link\.txt is a symlink"):
        read_beneath(root, "link.txt")


def test_open_beneath_refuses_a_symlink_to_a_file_inside_root_too(root: Path) -> None:
    (root / "alias.txt").symlink_to("a/b/file.txt")
    with pytest.raises(UnsafePath, match="is a symlink"):
        read_beneath(root, "alias.txt")


def test_open_beneath_refuses_a_dangling_symlink(root: Path) -> None:
    (root / "dangling.txt").symlink_to(root / "nowhere")
    with pytest.raises(UnsafePath, match="is a symlink"):
        read_beneath(root, "dangling.txt")


@pytest.mark.parametrize("level", ["first", "middle"])
def test_open_beneath_refuses_a_symlinked_directory_at_every_level(root: Path, level: str) -> None:
    outside = root.parent / "outside"
    if level == "first":
        (root / "x").symlink_to(outside, target_is_directory=True)
        relative = "x/b/file.txt"
    else:
        (root / "a" / "y").symlink_to(outside / "b", target_is_directory=True)
        relative = "a/y/file.txt"
    with pytest.raises(UnsafePath, match="is a symlink or not a directory"):
        read_beneath(root, relative)


def test_open_beneath_refuses_a_file_used_as_a_directory(root: Path) -> None:
    with pytest.raises(UnsafePath, match=r"file\.txt is a symlink or not a directory"):
        read_beneath(root, "a/b/file.txt/more")


def test_open_beneath_refuses_a_symlinked_root(root: Path) -> None:
    alias = root.parent / "alias"
    alias.symlink_to(root, target_is_directory=True)
    with pytest.raises(OSError, match="alias") as raised:
        read_beneath(alias, "a/b/file.txt")
    assert raised.value.errno in (errno.ELOOP, errno.ENOTDIR)


def test_open_beneath_reports_an_absent_component(root: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_beneath(root, "a/missing/file.txt")
    with pytest.raises(FileNotFoundError):
        read_beneath(root, "a/b/missing.txt")


def test_open_beneath_refuses_a_directory(root: Path) -> None:
    with pytest.raises(UnsafePath, match="b is not a regular file"):
        read_beneath(root, "a/b")


def test_open_beneath_refuses_a_fifo_without_blocking(root: Path) -> None:
    os.mkfifo(root / "pipe")  # no writer: a blocking open would hang this test forever
    with pytest.raises(UnsafePath, match="pipe is not a regular file"):
        read_beneath(root, "pipe")


def test_open_beneath_refuses_a_unix_socket(root: Path) -> None:
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(root / "sock"))
        with pytest.raises(UnsafePath, match="sock is not a regular file"):
            read_beneath(root, "sock")


# ------------------------------------------------------------------ reading and hashing


def test_read_capped_reads_at_most_one_byte_past_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "big"
    path.write_bytes(b"x" * (CHUNK + 10))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert read_capped(fd, 5) == b"xxxxxx"
        os.lseek(fd, 0, os.SEEK_SET)
        assert len(read_capped(fd, CHUNK + 3)) == CHUNK + 4
        os.lseek(fd, 0, os.SEEK_SET)
        assert len(read_capped(fd, CHUNK * 4)) == CHUNK + 10
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [0, 1, 4096, fsutil.CHUNK - 1, fsutil.CHUNK, fsutil.CHUNK + 1])
def test_sha256_fd_whatever_the_size_against_its_buffer(tmp_path: Path, size: int) -> None:
    """The read buffer is sized to the file (small staged files): every size hashes whole."""
    content = os.urandom(size)
    (tmp_path / "f").write_bytes(content)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert sha256_fd(fd) == (hashlib.sha256(content).hexdigest(), size)
    finally:
        os.close(fd)


def test_sha256_fd_hashes_from_the_start_whatever_the_offset(tmp_path: Path) -> None:
    content = os.urandom(CHUNK * 2 + 123)
    path = tmp_path / "data"
    path.write_bytes(content)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 1000, os.SEEK_SET)
        assert sha256_fd(fd) == (hashlib.sha256(content).hexdigest(), len(content))
    finally:
        os.close(fd)


# -------------------------------------------------------------------- unique names


@pytest.mark.parametrize(
    ("name", "attempt", "expected"),
    [
        ("sales.sql.gz", 0, "sales.sql.gz"),
        ("sales.sql.gz", 1, "sales-2.sql.gz"),
        ("sales.sql.gz", 9, "sales-10.sql.gz"),
        ("STATUS.json", 1, "STATUS-2.json"),
        ("noext", 2, "noext-3"),
    ],
)
def test_unique_name_keeps_suffixes_readable(name: str, attempt: int, expected: str) -> None:
    assert unique_name(name, attempt) == expected


def link_from(src: Path, dst_dir: Path, name: str, identity: Identity | None = None) -> Path:
    with open_dir(src.parent) as src_fd:
        return link_unique(src_fd, src.name, dst_dir, name, identity)


def test_link_unique_links_the_same_inode(tmp_path: Path) -> None:
    src = tmp_path / "src.gz"
    src.write_bytes(b"payload")
    (tmp_path / "dst").mkdir()

    final = link_from(src, tmp_path / "dst", "final.gz")

    assert final == tmp_path / "dst" / "final.gz"
    assert os.path.samefile(final, src)
    assert src.stat().st_nlink == 2


def test_link_unique_never_overwrites(tmp_path: Path) -> None:
    src = tmp_path / "src.gz"
    src.write_bytes(b"new")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "final.gz").write_bytes(b"old")
    (dst / "final-2.gz").write_bytes(b"older")

    final = link_from(src, dst, "final.gz")

    assert final == dst / "final-3.gz"
    assert final.read_bytes() == b"new"
    assert (dst / "final.gz").read_bytes() == b"old"
    assert (dst / "final-2.gz").read_bytes() == b"older"


def test_link_unique_reuses_a_name_that_already_holds_the_same_inode(tmp_path: Path) -> None:
    src = tmp_path / "src.gz"
    src.write_bytes(b"payload")
    dst = tmp_path / "dst"
    dst.mkdir()
    first = link_from(src, dst, "final.gz")  # then a crash before the commit, then a retry

    again = link_from(src, dst, "final.gz", Identity.of(src.stat()))

    assert again == first
    assert names(dst) == ["final.gz"]


def test_link_unique_without_identity_takes_a_new_name_for_the_same_inode(tmp_path: Path) -> None:
    src = tmp_path / "src.gz"
    src.write_bytes(b"payload")
    dst = tmp_path / "dst"
    dst.mkdir()
    link_from(src, dst, "final.gz")

    assert link_from(src, dst, "final.gz") == dst / "final-2.gz"


def test_link_unique_links_a_symlink_itself_never_its_target(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_bytes(b"secret")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "link").symlink_to(target)
    (tmp_path / "dst").mkdir()

    final = link_from(tmp_path / "src" / "link", tmp_path / "dst", "link")

    assert final.is_symlink()
    assert target.stat().st_nlink == 1


# ---------------------------------------------------------------------- move_unique


def test_move_unique_moves_into_a_created_folder(tmp_path: Path) -> None:
    src = tmp_path / "STATUS.json"
    src.write_bytes(b"{}")
    inode = src.stat().st_ino

    target = move_unique(src, tmp_path / "_archive")

    assert target == tmp_path / "_archive" / "STATUS.json"
    assert target.stat().st_ino == inode
    assert target.stat().st_nlink == 1
    assert not src.exists()


def test_move_unique_never_overwrites(tmp_path: Path) -> None:
    (tmp_path / "_archive").mkdir()
    (tmp_path / "_archive" / "STATUS.json").write_bytes(b"first")
    src = tmp_path / "STATUS.json"
    src.write_bytes(b"second")

    target = move_unique(src, tmp_path / "_archive")

    assert target == tmp_path / "_archive" / "STATUS-2.json"
    assert target.read_bytes() == b"second"
    assert (tmp_path / "_archive" / "STATUS.json").read_bytes() == b"first"
    assert not src.exists()


def test_move_unique_uses_the_given_name(tmp_path: Path) -> None:
    src = tmp_path / "a.json"
    src.write_bytes(b"{}")
    assert move_unique(src, tmp_path / "out", "b.json") == tmp_path / "out" / "b.json"


def test_move_unique_finishes_a_move_interrupted_between_link_and_unlink(tmp_path: Path) -> None:
    """A crash after the link left the same inode in both places: no second copy is made."""
    src = tmp_path / "STATUS.json"
    src.write_bytes(b"{}")
    (tmp_path / "_archive").mkdir()
    os.link(src, tmp_path / "_archive" / "STATUS.json")

    target = move_unique(src, tmp_path / "_archive")

    assert target == tmp_path / "_archive" / "STATUS.json"
    assert names(tmp_path / "_archive") == ["STATUS.json"]
    assert not src.exists()


def test_move_unique_reports_a_source_already_gone(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        move_unique(tmp_path / "gone.json", tmp_path / "_archive")


def test_move_unique_refuses_a_symlinked_destination(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "_archive").symlink_to(elsewhere, target_is_directory=True)
    src = tmp_path / "STATUS.json"
    src.write_bytes(b"{}")

    with pytest.raises(UnsafePath, match="not a real directory"):
        move_unique(src, tmp_path / "_archive")

    assert names(elsewhere) == []
    assert src.read_bytes() == b"{}"


# --------------------------------------------------------------------- ensure_real_dir


def test_ensure_real_dir_creates_missing_parents(tmp_path: Path) -> None:
    ensure_real_dir(tmp_path / "a" / "b" / "c")
    assert (tmp_path / "a" / "b" / "c").is_dir()
    ensure_real_dir(tmp_path / "a" / "b" / "c")  # existing: fine


def test_ensure_real_dir_refuses_a_symlink_to_a_directory(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    with pytest.raises(UnsafePath, match="not a real directory"):
        ensure_real_dir(tmp_path / "link")


def test_ensure_real_dir_refuses_a_dangling_symlink_without_creating_its_target(
    tmp_path: Path,
) -> None:
    (tmp_path / "link").symlink_to(tmp_path / "target")
    with pytest.raises(UnsafePath, match="not a real directory"):
        ensure_real_dir(tmp_path / "link")
    assert not (tmp_path / "target").exists()


def test_ensure_real_dir_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(UnsafePath, match="not a real directory"):
        ensure_real_dir(tmp_path / "file")


def test_hashing_and_copying_report_progress_on_large_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker hashing a huge backup must keep the watchdog fed: a beat per PROGRESS_EVERY."""
    monkeypatch.setattr(fsutil, "PROGRESS_EVERY", 4 * CHUNK)
    big = tmp_path / "big.gz"
    big.write_bytes(os.urandom(10 * CHUNK))
    beats: list[str] = []
    fd = os.open(big, os.O_RDONLY)
    try:
        digest, size = sha256_fd(fd, lambda: beats.append("hash"))
        with (tmp_path / "copy.gz").open("wb") as out:
            copied = copy_hashing(fd, out.fileno(), lambda: beats.append("copy"))
    finally:
        os.close(fd)
    assert beats == ["hash", "hash", "copy", "copy"]  # at 4 and 8 MiB of 10, each pass
    assert copied == (digest, size)
    assert (tmp_path / "copy.gz").read_bytes() == big.read_bytes()
