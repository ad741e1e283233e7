"""`D/_rejected/` (SPEC §3, issue 11 item 4): a reason is whole or absent, never lost."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

import backupwatch.rejected as rejected
from backupwatch.fsutil import UnsafePath, rename_noreplace
from backupwatch.names import NAME_MAX
from backupwatch.rejected import LOST_REASON, ORPHAN_AGE, REASON_SUFFIX, reject_into, repair


@pytest.fixture
def site(tmp_path: Path) -> Path:
    folder = tmp_path / "site"
    folder.mkdir()
    return folder


def report(site: Path, name: str = "STATUS.json", body: bytes = b"{oops") -> Path:
    path = site / name
    path.write_bytes(body)
    return path


def listing(site: Path) -> list[str]:
    return sorted(os.listdir(site / "_rejected"))


def age(path: Path, seconds: float) -> None:
    old = path.stat().st_mtime - seconds
    os.utime(path, (old, old))


def test_report_and_its_whole_reason_land_together(site: Path) -> None:
    target = reject_into(report(site), site, "site/STATUS.json", "not valid JSON")
    assert target == site / "_rejected" / "STATUS.json"
    assert listing(site) == ["STATUS.json", "STATUS.json.reason.txt"]
    reason = (site / "_rejected" / "STATUS.json.reason.txt").read_text()
    assert reason == "site/STATUS.json was rejected: not valid JSON\n"


def test_the_reason_is_in_place_before_the_report_moves(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kill between the two steps must leave a whole reason and the report still in D."""
    seen: list[list[str]] = []
    real_rename = rename_noreplace

    def spy(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
        if dst == "STATUS.json":
            seen.append(listing(site))
        real_rename(src_fd, src, dst_fd, dst)

    monkeypatch.setattr(rejected, "rename_noreplace", spy)
    reject_into(report(site), site, "STATUS.json", "schema errors")
    assert seen == [["STATUS.json.reason.txt"]]


def test_a_failed_move_takes_its_reason_back(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_rename = rename_noreplace

    def fail_on_report(src_fd: int, src: str, dst_fd: int, dst: str) -> None:
        if dst == "STATUS.json":
            raise OSError(5, "Input/output error")
        real_rename(src_fd, src, dst_fd, dst)

    monkeypatch.setattr(rejected, "rename_noreplace", fail_on_report)
    with pytest.raises(OSError, match="Input/output"):
        reject_into(report(site), site, "STATUS.json", "why")
    assert listing(site) == []
    assert (site / "STATUS.json").exists()


def test_after_a_crash_the_same_report_takes_back_its_orphaned_name(site: Path) -> None:
    (site / "_rejected").mkdir()
    orphan = site / "_rejected" / ("STATUS.json" + REASON_SUFFIX)
    orphan.write_text("STATUS.json was rejected: the first time\n")
    age(orphan, ORPHAN_AGE + 5)

    reject_into(report(site), site, "STATUS.json", "the second time")

    assert listing(site) == ["STATUS.json", "STATUS.json.reason.txt"]
    assert "the second time" in orphan.read_text()


def test_a_young_reason_without_its_report_belongs_to_a_rejection_under_way(site: Path) -> None:
    (site / "_rejected").mkdir()
    (site / "_rejected" / ("STATUS.json" + REASON_SUFFIX)).write_text("another worker's\n")

    target = reject_into(report(site), site, "STATUS.json", "mine")

    assert target.name == "STATUS-2.json"
    assert "another worker's" in (site / "_rejected" / "STATUS.json.reason.txt").read_text()


def test_two_reports_of_one_name_rejected_at_once_each_keep_their_reason(site: Path) -> None:
    (site / "log").mkdir()
    first, second = report(site, body=b"1"), report(site / "log", body=b"2")
    start = threading.Barrier(2)
    errors: list[BaseException] = []

    def run(path: Path, why: str) -> None:
        try:
            start.wait(5)
            reject_into(path, site, str(path.relative_to(site.parent)), why)  # as the pipeline
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(first, "one")),
        threading.Thread(target=run, args=(second, "two")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert listing(site) == [
        "STATUS-2.json",
        "STATUS-2.json.reason.txt",
        "STATUS.json",
        "STATUS.json.reason.txt",
    ]
    for name in ("STATUS.json", "STATUS-2.json"):
        body = (site / "_rejected" / name).read_bytes()
        reason = (site / "_rejected" / (name + REASON_SUFFIX)).read_text()
        assert reason.endswith({b"1": "one\n", b"2": "two\n"}[body])


def test_a_symlinked_rejected_folder_is_refused(site: Path, tmp_path: Path) -> None:
    """Issue 6 item 5: an agent's `ln -s /tmp D/_rejected`."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (site / "_rejected").symlink_to(outside)
    with pytest.raises(UnsafePath):
        reject_into(report(site), site, "STATUS.json", "why")
    assert os.listdir(outside) == []
    assert (site / "STATUS.json").exists()


def test_a_name_near_name_max_still_gets_its_reason(site: Path) -> None:
    """Issue 11 item 8: names over ~244 bytes gave reason files over NAME_MAX."""
    name = "r" * (NAME_MAX - len(".json")) + ".json"
    target = reject_into(report(site, name), site, name, "why")
    assert (target.parent / (target.name + REASON_SUFFIX)).exists()
    assert target.name.endswith(".json")


def test_repair_removes_old_orphans_and_restores_lost_reasons(site: Path) -> None:
    folder = site / "_rejected"
    folder.mkdir()
    old_orphan = folder / ("gone.json" + REASON_SUFFIX)
    old_orphan.write_text("x")
    age(old_orphan, ORPHAN_AGE + 5)
    (folder / ("young.json" + REASON_SUFFIX)).write_text("a rejection under way")
    (folder / "bare.json").write_text("{")  # an earlier version crashed before its reason
    (folder / "kept.json").write_text("{")
    (folder / ("kept.json" + REASON_SUFFIX)).write_text("kept.json was rejected: why\n")

    result = repair(site)

    assert result == rejected.Repair(orphans_removed=1, reasons_restored=1)
    assert sorted(os.listdir(folder)) == [
        "bare.json",
        "bare.json.reason.txt",
        "kept.json",
        "kept.json.reason.txt",
        "young.json.reason.txt",
    ]
    assert LOST_REASON in (folder / "bare.json.reason.txt").read_text()


def test_a_young_orphan_naming_the_same_report_is_taken_back(site: Path) -> None:
    """A kill between the reason and the move, then an immediate restart: the same report is
    rejected again and takes its own orphaned reason's name (issue 11 item 4)."""
    (site / "_rejected").mkdir()
    orphan = site / "_rejected" / ("STATUS.json" + REASON_SUFFIX)
    orphan.write_text("site/STATUS.json was rejected: not valid JSON\n")

    reject_into(report(site), site, "site/STATUS.json", "not valid JSON")

    assert listing(site) == ["STATUS.json", "STATUS.json.reason.txt"]


def test_a_crash_while_the_reason_is_written_leaves_no_file(
    site: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reason is an unnamed file (O_TMPFILE) until it is whole: a kill mid-write left
    `.XXXX.reason.tmp` files behind (found by the crash test)."""

    seen_while_writing: list[list[str]] = []

    def killed(_fd: int, _text: bytes) -> None:
        seen_while_writing.append(listing(site))  # what a kill at this instant would leave
        raise KeyboardInterrupt

    monkeypatch.setattr(rejected, "_write_all", killed)
    with pytest.raises(KeyboardInterrupt):
        reject_into(report(site), site, "STATUS.json", "why")
    assert seen_while_writing == [[]]
