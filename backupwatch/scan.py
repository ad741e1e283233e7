"""SPEC §7: the reconciliation scan that catches whatever inotify did not deliver.

It lists each site's two report folders (never following a symlink) and walks only the folders
that belong to no site, looking for stray reports; it never descends into a site's staged data,
so its cost grows with the number of sites, not with the size of the deposits.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from backupwatch.sites import (
    LOG_DIR,
    NEVER_SCANNED,
    REPORT_LIKE_FOLDERS,
    Classified,
    PathKind,
    Registry,
    Site,
    report_folders,
)


def pending_reports(registry: Registry) -> Iterator[Path]:
    """Every report file waiting under the root: the sites' own, then the strays."""
    for site in registry.sites.values():
        for folder in report_folders(site):
            yield from _json_files(folder)
    yield from _strays(registry)


def pending_among(registry: Registry, files: Iterable[Path]) -> Iterator[Path]:
    """`pending_reports` of files already listed (by the watcher's walk at start): the ones
    `pending_reports` would find that mean something, a site's reports and the strays. (It
    also yields a site's `*.json` that `classify` ignores, a hidden site folder's: a worker
    would only ignore them.)"""
    for path in files:
        if registry.classify(path).kind in (PathKind.REPORT, PathKind.STRAY):
            yield path


def report_name(name: bytes) -> bool:
    """A name that may be a report's, to keep from a listing (`pending_among` decides)."""
    return name.endswith(b".json") and not name.startswith(b".")


def reports_in(folders: Iterable[Path]) -> Iterator[Path]:
    """The report files waiting in these folders and their `log/`: after a reload that
    changed a few sites, the only folders whose reports may now mean something else."""
    for folder in folders:
        yield from _json_files(folder)
        yield from _json_files(folder / LOG_DIR)


def _json_files(folder: Path) -> Iterator[Path]:
    if folder.is_symlink():
        return  # an agent's symlinked log/ would lead the scan out of its folder
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    continue  # a folder named *.json is not a report (SPEC §3: a regular file)
                if entry.name.endswith(".json") and not entry.name.startswith("."):
                    yield Path(entry.path)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return


def _strays(registry: Registry) -> Iterator[Path]:
    stack = [registry.root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as entries:
                children = list(entries)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in children:
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                if _walkable(entry.name) and path not in registry.sites:
                    stack.append(path)
            elif registry.classify(path).kind is PathKind.STRAY:
                yield path


def _walkable(name: str) -> bool:
    return name not in NEVER_SCANNED and not name.startswith(".")


def misplaced_reports(
    registry: Registry, folders: Iterable[Path] | None = None
) -> Iterator[tuple[Path, Classified]]:
    """Files meant as reports that are never read where they lie (SPEC §3): `STATUS.JSON` in
    D or D/log, and `*.json` in D's `Log/`, `logs/`, `reports/`… Looks at D, D/log and those
    few folders only, never into staged data; only at the sites of `folders` when given."""
    if folders is None:
        sites: Iterable[Site] = registry.sites.values()
    else:
        sites = [site for site in map(registry.sites.get, folders) if site is not None]
    for site in sites:
        for folder in (*report_folders(site), *_report_like_subfolders(site.folder)):
            for path in _files(folder):
                classified = registry.classify(path)
                if classified.kind is PathKind.MISPLACED:
                    yield path, classified


def _report_like_subfolders(folder: Path) -> list[Path]:
    try:
        with os.scandir(folder) as entries:
            return [
                Path(e.path)
                for e in entries
                if e.name != LOG_DIR
                and e.name.lower() in REPORT_LIKE_FOLDERS
                and e.is_dir(follow_symlinks=False)
            ]
    except OSError:
        return []


def _files(folder: Path) -> Iterator[Path]:
    if folder.is_symlink():
        return
    try:
        with os.scandir(folder) as entries:
            names = [e.path for e in entries if e.is_file(follow_symlinks=False)]
    except OSError:
        return
    yield from (Path(name) for name in names)
