"""SPEC §3: deposit folders, the jobs that share them, and what a path under the root means.

A `Registry` is an immutable snapshot of the active jobs, rebuilt on start and reload and swapped
in one assignment, so the watcher, the workers and the timer never see a half-applied reload.
Classifying a path is pure: no filesystem access, so it is safe on the inotify thread.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath

from backupwatch.missing import Era, assign_cycle
from backupwatch.schedule import Schedule

ARCHIVE_DIR = "_archive"
REJECTED_DIR = "_rejected"
LOG_DIR = "log"
NEVER_SCANNED = frozenset({ARCHIVE_DIR, REJECTED_DIR})


@dataclass(frozen=True, slots=True)
class JobRef:
    """What the pipeline needs of one active job, in slots (~130 bytes; the strings are
    shared with the other jobs of its site): the registry holds one per job, 100,000 of them
    at scale, so its names are four slots rather than a tuple of them (~7 MiB of tuples at
    scale), and the label and the template fields are built when asked."""

    id: int
    company_name: str
    city: str
    neighborhood: str
    database_name: str
    agent_id: str
    schedule: Schedule
    final_storage_path_template: str
    previous: tuple[Era, ...] = ()  # replaced schedules whose cycles are still owed
    archive_test: bool = True  # SPEC §13: decompress .gz/.zst/.xz/.bz2 while hashing

    @property
    def names(self) -> tuple[str, str, str, str]:
        """company_name, city, neighborhood, database_name: the job's key."""
        return (self.company_name, self.city, self.neighborhood, self.database_name)

    @property
    def label(self) -> str:
        return "/".join(self.names)

    @property
    def fields(self) -> dict[str, str]:
        """The values of the placeholders of its final storage path template."""
        return {
            "company_name": self.company_name,
            "city": self.city,
            "neighborhood": self.neighborhood,
            "database_name": self.database_name,
            "agent_id": self.agent_id,
        }

    def cycle_for(self, t: datetime) -> datetime | None:
        """The cycle a report made at t belongs to (`missing.assign_cycle`), or None."""
        return assign_cycle(self.schedule, self.previous, t)


@dataclass(frozen=True, slots=True)
class Site:
    """One deposit folder D and the active jobs that resolve to it."""

    folder: Path
    jobs: tuple[JobRef, ...]

    @property
    def agent_ids(self) -> frozenset[str]:
        return frozenset(job.agent_id for job in self.jobs)

    @property
    def name(self) -> str:
        return self.jobs[0].agent_id if len(self.agent_ids) == 1 else str(self.folder)

    def job_for(self, database_name: str, agent_id: str | None) -> JobRef | None:
        """The job expecting this database; the report's agent_id breaks a tie between agents."""
        candidates = [job for job in self.jobs if job.database_name == database_name]
        if len(candidates) > 1 and agent_id is not None:
            candidates = [job for job in candidates if job.agent_id == agent_id] or candidates
        return candidates[0] if candidates else None


class PathKind(enum.Enum):
    REPORT = "report"  # a report of a known site: process it
    STRAY = "stray"  # a report in a folder no active job uses: reject it
    IGNORED = "ignored"  # not a report (staged data, archives, writers' temp files)
    MISPLACED = "misplaced"  # meant as a report, but never read where it is: warn, once


@dataclass(frozen=True)
class Classified:
    kind: PathKind
    site: Site | None = None
    why: str | None = None  # MISPLACED: what the agent should do instead


@dataclass(frozen=True)
class Registry:
    root: Path
    sites: Mapping[Path, Site] = field(default_factory=dict)

    @classmethod
    def build(cls, root: Path, jobs: Iterable[tuple[PurePosixPath | str, JobRef]]) -> Registry:
        # Grouped by the folder's normalised text, and a `Path` made once per folder: the
        # `root / relpath` and `normalize` of each parsed its text twice more (~0.4 s of a
        # start at 30,000 sites). `os.path.normpath` of the joined text is `normalize`'s.
        grouped: dict[str, list[JobRef]] = {}
        folders: dict[PurePosixPath | str, str] = {}  # the jobs of a site share its folder
        top = os.fspath(root)
        for relpath, job in jobs:
            folder = folders.get(relpath)
            if folder is None:
                folder = folders[relpath] = os.path.normpath(os.path.join(top, relpath))
            grouped.setdefault(folder, []).append(job)
        sites: dict[Path, Site] = {}
        for text, refs in grouped.items():
            path = Path(text)
            sites[path] = Site(path, tuple(refs))
        return cls(root=normalize(root), sites=sites)

    def classify(self, path: Path) -> Classified:
        """What `path` (absolute, under the root) is to the daemon; see SPEC §3."""
        path = normalize(path)
        try:
            relative = path.relative_to(self.root)
        except ValueError:
            return Classified(PathKind.IGNORED)
        if not _looks_like_report(relative):
            return self._misplaced(path, relative)
        site = self.sites.get(path.parent)
        if site is None and path.parent.name == LOG_DIR:
            site = self.sites.get(path.parent.parent)
        if site is not None:
            return Classified(PathKind.REPORT, site)
        if any(parent in self.sites for parent in path.parents):
            return self._misplaced(path, relative)  # in a site's tree: staged data, or a mistake
        return Classified(PathKind.STRAY)

    def site_of_folder(self, folder: Path) -> Site | None:
        return self.sites.get(normalize(folder))

    def site_containing(self, path: Path) -> Site | None:
        """The site whose deposit folder holds `path` at any depth (the innermost one)."""
        for parent in normalize(path).parents:
            site = self.sites.get(parent)
            if site is not None:
                return site
        return None

    def _misplaced(self, path: Path, relative: Path) -> Classified:
        """A file an agent clearly meant as a report but that is never read where it lies."""
        name = path.name
        hidden = any(part.startswith(".") or part in NEVER_SCANNED for part in relative.parts)
        if hidden or not name.lower().endswith(".json"):
            return Classified(PathKind.IGNORED)
        site = self.sites.get(path.parent) or (
            self.sites.get(path.parent.parent) if path.parent.name == LOG_DIR else None
        )
        if site is not None:  # in D or D/log, but `.JSON`, `.Json`…
            why = "its name must end in lower-case '.json' to be read as a report"
            return Classified(PathKind.MISPLACED, site, why)
        site = self.sites.get(path.parent.parent)
        if site is not None and _report_like_folder(path.parent.name):
            why = f"reports are read only directly in {site.folder} or in its {LOG_DIR}/ folder"
            return Classified(PathKind.MISPLACED, site, why)
        return Classified(PathKind.IGNORED)


def _looks_like_report(relative: PurePosixPath | Path) -> bool:
    parts = relative.parts
    if not parts or not parts[-1].endswith(".json"):
        return False
    if any(part.startswith(".") for part in parts):
        return False
    return not any(part in NEVER_SCANNED for part in parts[:-1])


REPORT_LIKE_FOLDERS = frozenset({"log", "logs", "report", "reports", "status"})


def _report_like_folder(name: str) -> bool:
    """`Log/`, `LOGS/`, `reports/`: where agents put reports by mistake (not staged data)."""
    return name != LOG_DIR and name.lower() in REPORT_LIKE_FOLDERS


def changed_folders(old: Registry, new: Registry) -> list[Path]:
    """The deposit folders whose site differs between two registries (added, removed, or
    with other jobs): `registry_updated` keeps the very same `Site` for the others."""
    folders = [f for f, site in new.sites.items() if old.sites.get(f) is not site]
    return folders + [f for f in old.sites if f not in new.sites]


def normalize(path: Path) -> Path:
    """Lexical normalisation only: symlinks are never resolved, so none can redirect us."""
    return Path(os.path.normpath(path))


def report_folders(site: Site) -> tuple[Path, Path]:
    """The two folders of a site where reports may lie (SPEC §3)."""
    return site.folder, site.folder / LOG_DIR
