"""Promotion into final storage (SPEC §5 step 6, issue 6 item 6, issue 11 item 5), real files.

What lands in final storage is what was verified and reachable only from there; two workers on
the same bytes, or a retry after a crash, never leave a second copy or a stray temp behind.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import pytest
import structlog

from backupwatch.fsutil import UnsafePath, open_beneath
from backupwatch.promotion import (
    TEMP_DIR,
    TEMP_MAX_AGE,
    AlreadyCommitted,
    Facts,
    Promoted,
    PromotionBusy,
    Request,
    claim_temp,
    clean_temps,
    ensure_sole_link,
    promote,
)

DUMP = b"-- a verified dump\n" * 500
FACTS = Facts(hashlib.sha256(DUMP).hexdigest(), len(DUMP))
KEY = "a" * 64 + "-7"


@contextmanager
def request_for(
    site: Path, root: Path, committed: bool = False, name: str = "sales.sql.gz"
) -> Iterator[Request]:
    with open_beneath(site, PurePosixPath("database") / name) as (dir_fd, fd, base):
        yield Request(
            dir_fd=dir_fd,
            fd=fd,
            base=base,
            target=root / "ACME" / "sales.sql.gz",
            facts=FACTS,
            key=KEY,
            temp_root=root / TEMP_DIR,
            committed=lambda: committed,
            progress=lambda: None,
        )


@pytest.fixture
def site(tmp_path: Path) -> Path:
    folder = tmp_path / "deposit" / "site"
    (folder / "database").mkdir(parents=True)
    (folder / "database" / "sales.sql.gz").write_bytes(DUMP)
    return folder


def promoted(site: Path, root: Path, committed: bool = False) -> Promoted:
    with request_for(site, root, committed) as request:
        return promote(request)


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


def test_on_one_filesystem_a_lone_staged_file_is_linked(site: Path, tmp_path: Path) -> None:
    root = tmp_path / "validated"
    result = promoted(site, root)
    assert result.method == "link"
    assert result.path.stat().st_ino == (site / "database" / "sales.sql.gz").stat().st_ino
    assert result.path.stat().st_nlink == 2  # staged + final until the staged name goes


def test_a_staged_file_with_another_link_is_copied_not_linked(site: Path, tmp_path: Path) -> None:
    """Issue 6 item 6: `ln staged D/.keep` before the report; writing to .keep afterwards
    must not change final storage."""
    keep = site / ".keep"
    os.link(site / "database" / "sales.sql.gz", keep)
    root = tmp_path / "validated"

    result = promoted(site, root)
    result.release()  # what happens after the commit
    (site / "database" / "sales.sql.gz").unlink()  # the staged name goes after the commit
    with keep.open("r+b") as out:
        out.write(b"TAMPERED")

    assert result.method == "copy"
    assert result.path.read_bytes() == DUMP
    assert result.path.stat().st_nlink == 1
    assert files(root) == ["ACME/sales.sql.gz"]  # the temp is gone too


def test_across_filesystems_a_copy_is_verified_and_its_temp_removed_after_the_commit(
    site: Path, other_filesystem: Path
) -> None:
    result = promoted(site, other_filesystem)
    assert result.method == "copy"
    assert result.claim is not None
    assert result.claim.path.exists()  # held, locked, until the commit
    result.release()
    assert files(other_filesystem) == ["ACME/sales.sql.gz"]
    assert (other_filesystem / "ACME" / "sales.sql.gz").stat().st_nlink == 1


def test_a_retry_after_a_crash_reuses_its_own_earlier_copy(
    site: Path, other_filesystem: Path
) -> None:
    """Issue 11 item 5(b): a kill between the copy and the commit left an orphan and, on the
    retry, a second `-2` copy and a stray temp."""
    first = promoted(site, other_filesystem)
    assert first.claim is not None
    os.close(first.claim.fd)  # the process dies: its lock goes, its files stay

    again = promoted(site, other_filesystem)
    again.release()

    assert again.path == first.path
    assert files(other_filesystem) == ["ACME/sales.sql.gz"]


def test_a_copy_cut_short_by_a_crash_is_made_again(site: Path, other_filesystem: Path) -> None:
    claim = claim_temp(other_filesystem / TEMP_DIR, f"{KEY}.tmp")
    os.write(claim.fd, DUMP[:100])
    os.close(claim.fd)  # died mid-copy: one link, a partial temp

    result = promoted(site, other_filesystem)
    result.release()

    assert result.path.read_bytes() == DUMP
    assert files(other_filesystem) == ["ACME/sales.sql.gz"]


def test_a_second_worker_on_the_same_bytes_waits_instead_of_copying(
    site: Path, other_filesystem: Path
) -> None:
    """Issue 11 item 5(a): the same report bytes twice at once left a `-2` copy behind."""
    first = promoted(site, other_filesystem)
    with pytest.raises(PromotionBusy):
        promoted(site, other_filesystem)
    first.release()
    with pytest.raises(AlreadyCommitted):  # once the first committed, the second stops there
        promoted(site, other_filesystem, committed=True)
    assert files(other_filesystem) == ["ACME/sales.sql.gz"]


def test_undo_takes_back_the_final_name_and_the_temp(site: Path, other_filesystem: Path) -> None:
    result = promoted(site, other_filesystem)
    result.undo()
    assert files(other_filesystem) == []


def test_ensure_sole_link_replaces_a_shared_inode_by_a_verified_copy(tmp_path: Path) -> None:
    final = tmp_path / "final.gz"
    final.write_bytes(DUMP)
    bait = tmp_path / "bait"
    os.link(final, bait)

    ensure_sole_link(final, FACTS, lambda: None)

    assert final.read_bytes() == DUMP
    assert final.stat().st_nlink == 1
    assert final.stat().st_ino != bait.stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bait", "final.gz"]


def test_ensure_sole_link_never_stores_what_was_not_verified(tmp_path: Path) -> None:
    final = tmp_path / "final.gz"
    final.write_bytes(b"rewritten through the agent's link")
    os.link(final, tmp_path / "bait")
    with structlog.testing.capture_logs() as logs:
        ensure_sole_link(final, FACTS, lambda: None)
    assert [entry["event"] for entry in logs] == ["promotion.tampered"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bait", "final.gz"]


def test_clean_temps_removes_committed_and_abandoned_ones_only(tmp_path: Path) -> None:
    temps = tmp_path / TEMP_DIR
    names = {sha: f"{sha}-1.tmp" for sha in ("c" * 64, "u" * 64, "o" * 64, "h" * 64)}
    for name in names.values():
        os.close(claim_temp(temps, name).fd)  # left by a crash: the lock went with the process
    old = (temps / names["o" * 64]).stat().st_mtime - TEMP_MAX_AGE - 60
    os.utime(temps / names["o" * 64], (old, old))
    held = claim_temp(temps, names["h" * 64])  # another daemon at work on it
    old_held = held.path.stat().st_mtime - TEMP_MAX_AGE - 60
    os.utime(held.path, (old_held, old_held))

    removed = clean_temps(temps, lambda sha: sha == "c" * 64)

    assert removed == 2
    assert sorted(os.listdir(temps)) == sorted([names["u" * 64], names["h" * 64]])
    held.release()


def test_a_symlinked_folder_in_final_storage_is_refused(site: Path, tmp_path: Path) -> None:
    root = tmp_path / "validated"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root.mkdir()
    (root / "ACME").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UnsafePath):
        promoted(site, root)
    assert os.listdir(elsewhere) == []
