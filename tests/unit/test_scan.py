"""SPEC §7: the reconciliation scan lists report folders and strays, on a real tree."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path, PurePosixPath

import pytest
from pyfakefs.fake_filesystem import FakeFilesystem

import backupwatch.scan
from backupwatch.enums import BackupFrequency
from backupwatch.scan import pending_among, pending_reports, report_name
from backupwatch.schedule import Schedule
from backupwatch.sites import JobRef, Registry
from backupwatch.watcher import DepositWatcher

SCHEDULE = Schedule(BackupFrequency.DAILY, hour=13, window=timedelta(minutes=60))


def job(ident: int, agent_id: str) -> JobRef:
    return JobRef(
        id=ident,
        company_name="ACME",
        city="Lyon",
        neighborhood=agent_id,
        database_name="db",
        agent_id=agent_id,
        schedule=SCHEDULE,
        final_storage_path_template="{agent_id}/{staged_file_name}",
    )


def touch(path: Path, content: bytes = b"{}") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Registry, Path, Path]:
    root = tmp_path / "deposit"
    outside = tmp_path / "outside"
    touch(outside / "evil.json")
    touch(outside / "log" / "evil.json")
    registry = Registry.build(
        root,
        [
            (PurePosixPath("ACME"), job(1, "ACME")),
            (PurePosixPath("LINKED"), job(2, "LINKED")),
            (PurePosixPath("outer"), job(3, "outer")),
            (PurePosixPath("outer/inner"), job(4, "inner")),
            (PurePosixPath("NOT_CREATED_YET"), job(5, "later")),
        ],
    )
    return registry, root, outside


def scanned_folders(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """A spy on os.scandir (it still scans): which folders the scan opened."""
    opened: list[Path] = []
    real = os.scandir

    def spy(path: os.PathLike[str] | str) -> object:
        opened.append(Path(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", spy)
    return opened


def reports_and_others(root: Path, outside: Path) -> tuple[set[Path], list[Path]]:
    """The reports and strays a scan must find under `root`, and files it must not."""
    d = root / "ACME"
    wanted = {
        touch(d / "STATUS.json"),
        touch(d / "second.json"),
        touch(d / "log" / "STATUS.json"),
        touch(root / "outer" / "o.json"),
        touch(root / "outer" / "inner" / "i.json"),
        touch(root / "outer" / "inner" / "log" / "il.json"),
        touch(root / "STATUS.json"),  # strays: reports in folders no job uses
        touch(root / "Unknown" / "STATUS.json"),
        touch(root / "Unknown" / "deep" / "x.json"),
    }
    (d / "link.json").symlink_to(outside / "evil.json")  # listed, so that it gets rejected
    wanted.add(d / "link.json")
    os.mkfifo(d / "fifo.json")  # listed too: the pipeline rejects it without blocking
    wanted.add(d / "fifo.json")
    unwanted = [
        touch(d / ".STATUS.json"),
        touch(d / "STATUS.json.part"),
        touch(d / "log" / ".writing.json"),
        touch(d / "_archive" / "old.json"),
        touch(d / "_rejected" / "bad.json"),
        touch(d / "database" / "staged.json"),
        touch(d / "database" / "deep" / "x.json"),
        touch(d / "log" / "older" / "x.json"),
        touch(root / "outer" / "data" / "x.json"),
        touch(root / "Unknown" / "_rejected" / "STATUS.json"),
        touch(root / "Unknown" / "_archive" / "STATUS.json"),
        touch(root / ".hidden" / "x.json"),
    ]
    (d / "folder.json").mkdir()  # a directory is never a report
    (root / "LINKED").mkdir()
    (root / "LINKED" / "log").symlink_to(outside / "log", target_is_directory=True)
    (root / "stray-link").symlink_to(outside, target_is_directory=True)
    return wanted, unwanted


def test_pending_reports_finds_reports_and_strays_and_nothing_else(
    tree: tuple[Registry, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    registry, root, outside = tree
    d = root / "ACME"
    wanted, unwanted = reports_and_others(root, outside)
    opened = scanned_folders(monkeypatch)

    found = list(pending_reports(registry))

    assert len(found) == len(set(found))
    assert set(found) == wanted
    assert not set(unwanted) & set(found)
    never = [
        d / "database",
        d / "database" / "deep",
        d / "log" / "older",
        d / "_archive",
        d / "_rejected",
        root / "outer" / "data",
        root / "Unknown" / "_rejected",
        root / ".hidden",
        root / "LINKED" / "log",
        root / "stray-link",
        outside,
        outside / "log",
    ]
    assert not set(never) & set(opened)


def test_the_start_finds_the_same_reports_in_the_watchers_listing(
    tree: tuple[Registry, Path, Path],
) -> None:
    """The start's scan is the watcher's walk (each folder listed after its watch was
    added): among what it listed, `pending_among` finds what `pending_reports` finds."""
    registry, root, outside = tree
    wanted, _ = reports_and_others(root, outside)
    watcher = DepositWatcher(root, lambda _kind, _path: None, lambda: None)
    try:
        listed = watcher.start(report_name)
    finally:
        watcher.stop()
    found = list(pending_among(registry, listed))
    assert len(found) == len(set(found))
    assert set(found) == wanted


def test_pending_reports_lists_a_sites_reports_before_the_strays(
    tree: tuple[Registry, Path, Path],
) -> None:
    registry, root, _outside = tree
    stray = touch(root / "Unknown" / "STATUS.json")
    report = touch(root / "ACME" / "STATUS.json")

    assert list(pending_reports(registry)) == [report, stray]


def test_pending_reports_on_an_empty_or_absent_root(tmp_path: Path) -> None:
    registry = Registry.build(tmp_path / "absent", [(PurePosixPath("ACME"), job(1, "ACME"))])
    assert list(pending_reports(registry)) == []
    (tmp_path / "absent").mkdir()
    assert list(pending_reports(registry)) == []


def test_a_site_folder_that_is_a_file_is_skipped(tree: tuple[Registry, Path, Path]) -> None:
    registry, root, _outside = tree
    touch(root / "ACME", b"not a folder")
    stray = touch(root / "Unknown" / "STATUS.json")

    assert list(pending_reports(registry)) == [stray]


def test_misplaced_reports_are_found_without_entering_staged_data(fs: FakeFilesystem) -> None:
    """Pure listing logic: pyfakefs. The scan looks at D, D/log and report-like folders only."""
    root = Path("/deposit")
    registry = Registry.build(root, [(PurePosixPath("site"), job(1, "site"))])
    for name in (
        "site/STATUS.JSON",
        "site/log/ok.json",
        "site/log/Wrong.Json",
        "site/Logs/STATUS.json",
        "site/database/export.json",
        "site/database/STATUS.JSON",
        "site/_rejected/X.JSON",
    ):
        fs.create_file(root / name)

    found = {
        str(path.relative_to(root)): classified.why
        for path, classified in backupwatch.scan.misplaced_reports(registry)
    }

    assert sorted(found) == ["site/Logs/STATUS.json", "site/STATUS.JSON", "site/log/Wrong.Json"]
