"""The hostile corpus' pieces: one site per case, what each case expects, and the checks that
hold for the whole corpus (a canary outside the roots, the daemon's log).

SPEC §9: agents are not trusted. Every case is something an agent can do in its own deposit
folder; what it expects is written as a small dataclass with `settled` (the daemon is done with
it: the corpus waits for this) and `problems` (sentences, empty when the case holds).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import sqlalchemy

COMPANY = "Hostile"
CITY = "City"
ARCHIVE = "_archive"
REJECTED = "_rejected"
REASON = ".reason.txt"


# ----------------------------------------------------------------------------- sites

_ENGINES: dict[str, sqlalchemy.Engine] = {}


def engine_for(url: str) -> sqlalchemy.Engine:
    """One pooled engine per database: the corpus polls the entries of 23 sites."""
    if url not in _ENGINES:
        _ENGINES[url] = sqlalchemy.create_engine(url)
    return _ENGINES[url]


def dispose_engines() -> None:
    while _ENGINES:
        _ENGINES.popitem()[1].dispose()


@dataclass(frozen=True)
class EntryRow:
    status: str
    message: str
    final_path: str | None
    report_name: str | None


@dataclass
class Site:
    """One case's deposit folder D, its job (`sales`) and where to look for its outcome."""

    name: str  # the neighborhood
    deposit: Path
    validated: Path
    database_url: str
    log_path: Path
    notes: dict[str, Any] = field(default_factory=dict)  # what `arrange` wants `problems` to know

    @property
    def agent_id(self) -> str:
        return f"{COMPANY}_{CITY}_{self.name}"

    @property
    def folder(self) -> Path:
        return self.deposit / self.agent_id

    @property
    def job(self) -> str:
        return f"{COMPANY}/{CITY}/{self.name}/sales"

    def entries(self) -> list[EntryRow]:
        engine = engine_for(self.database_url)
        query = sqlalchemy.text(
            "SELECT e.status, e.message, e.final_path, e.report_name FROM backup_entries e "
            "JOIN expected_backup_jobs j ON j.id = e.job_id "
            "WHERE j.company_name = :c AND j.city = :city AND j.neighborhood = :n"
        )
        with engine.connect() as connection:
            rows = connection.execute(query, {"c": COMPANY, "city": CITY, "n": self.name})
            return [EntryRow(str(r[0]), r[1] or "", r[2], r[3]) for r in rows]

    def listing(self, sub: str) -> list[Path]:
        """What lies in D/sub when it is a real folder (never through a symlink)."""
        folder = self.folder / sub
        if not folder.is_dir() or folder.is_symlink():
            return []
        return sorted(folder.iterdir())

    def logged(self, name: str) -> list[dict[str, Any]]:
        """The daemon's log records about a report of this site whose name ends in `name`."""
        return [
            record
            for record in log_lines(self.log_path)
            if str(record.get("report", "")).endswith(name)
            and f"{self.agent_id}/" in str(record.get("report", ""))
        ]

    def tracebacks_about(self, name: str) -> list[str]:
        return [
            f"{r.get('event')}: {str(r['exception']).strip().splitlines()[-1]}"
            for r in self.logged(name)
            if "exception" in r
        ]


def jobs_toml(names: list[str]) -> str:
    lines = ["[defaults]", 'frequency = "HOURLY"', "collection_window_minutes = 30", ""]
    for name in names:
        lines += [
            "[[job]]",
            f'company_name = "{COMPANY}"',
            f'city = "{CITY}"',
            f'neighborhood = "{name}"',
            'database_name = "sales"',
            "",
        ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- expectations


class Expect(Protocol):
    def settled(self, site: Site) -> bool: ...
    def problems(self, site: Site) -> list[str]: ...


def _present(path: Path) -> bool:
    return os.path.lexists(path)


def says(text: str, word: str) -> bool:
    """Case-insensitive; "a|b" is said when either is."""
    return any(choice.lower() in text.lower() for choice in word.split("|"))


def reasons_in(site: Site) -> list[tuple[Path, str]]:
    """(path, text) of every reason file in D/_rejected."""
    return [
        (path, path.read_text(encoding="utf-8", errors="replace"))
        for path in site.listing(REJECTED)
        if os.fsencode(path.name).endswith(REASON.encode())
    ]


def reason_problems(site: Site, words: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    """A whole reason file (non-empty, ending in a newline) that says `words`, never `forbidden`."""
    found = reasons_in(site)
    if not found:
        return ["no reason file in D/_rejected"]
    problems = []
    for path, text in found:
        if not text.strip() or not text.endswith("\n"):
            problems.append(f"reason file {path.name!r} is empty or cut short: {text!r}")
            continue
        missing = [w for w in words if not says(text, w)]
        if missing:
            problems.append(f"the reason does not say {missing}: {text.strip()!r}")
        said = [w for w in forbidden if w.lower() in text.lower()]
        if said:
            problems.append(f"the reason says {said}: {text.strip()!r}")
    return problems


@dataclass(frozen=True)
class Rejected:
    """The report leaves D for a real D/_rejected/, with a whole reason naming `words`; no entry."""

    report: str | bytes  # its name in D (bytes: not UTF-8)
    words: tuple[str, ...]
    forbidden: tuple[str, ...] = ("internal error",)

    def path(self, site: Site) -> Path:
        return Path(os.fsdecode(os.path.join(os.fsencode(site.folder), os.fsencode(self.report))))

    def settled(self, site: Site) -> bool:
        return not _present(self.path(site)) and bool(reasons_in(site))

    def problems(self, site: Site) -> list[str]:
        problems = []
        if _present(self.path(site)):
            problems.append(f"{self.report!r} is still in D, not rejected")
        moved = [p for p in site.listing(REJECTED) if not p.name.endswith(REASON)]
        if not moved and not _present(self.path(site)):
            problems.append(f"{self.report!r} is neither in D nor in D/_rejected (lost)")
        problems += reason_problems(site, self.words, self.forbidden)
        entries = site.entries()
        if entries:
            problems.append(f"expected no entry, got {[e.status for e in entries]}")
        return problems


@dataclass(frozen=True)
class Recorded:
    """One entry with `status` whose message says `words`; the report archived. A SUCCESS
    holds the staged bytes in final storage, nlink 1, and nothing of it stays in D."""

    report: str | bytes
    status: str
    words: tuple[str, ...] = ()
    staged: bytes | None = None  # a SUCCESS's verified bytes

    def path(self, site: Site) -> Path:
        return Path(os.fsdecode(os.path.join(os.fsencode(site.folder), os.fsencode(self.report))))

    def settled(self, site: Site) -> bool:
        return not _present(self.path(site)) and bool(site.entries())

    def problems(self, site: Site) -> list[str]:
        problems = []
        entries = site.entries()
        statuses = [e.status for e in entries]
        if statuses != [self.status]:
            problems.append(f"expected one {self.status} entry, got {statuses}")
        for entry in entries:
            missing = [w for w in self.words if not says(entry.message, w)]
            if missing:
                problems.append(f"the entry does not say {missing}: {entry.message!r}")
            if self.status == "SUCCESS" and entry.status == "SUCCESS":
                problems += stored_problems(entry, self.staged, site)
        problems += orphan_problems(site, entries)
        if _present(self.path(site)):
            problems.append(f"{self.report!r} is still in D, not archived")
        archived = [p for p in site.listing(ARCHIVE) if p.is_file()]
        rejected = [p.name for p in site.listing(REJECTED)]
        if rejected:
            reasons = [text.strip() for _path, text in reasons_in(site)]
            problems.append(
                f"rejected instead of archived: D/_rejected holds {rejected}, {reasons}"
            )
        elif not archived and not _present(self.path(site)):
            problems.append(f"{self.report!r} is neither in D nor in D/_archive (lost)")
        return problems


def orphan_problems(site: Site, entries: list[EntryRow]) -> list[str]:
    """SPEC §5: an entry for every file promoted; nothing else under the job's final folder."""
    folder = site.validated / COMPANY / CITY / site.name
    recorded = {Path(e.final_path) for e in entries if e.final_path}
    stored = [Path(d) / n for d, _, names in os.walk(folder) for n in names]
    return [f"{p.name[:40]!r} in final storage has no entry" for p in stored if p not in recorded]


def stored_problems(entry: EntryRow, data: bytes | None, site: Site) -> list[str]:
    if entry.final_path is None:
        return ["a SUCCESS without a final path"]
    final = Path(entry.final_path)
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        return [f"final path {final} does not exist"]
    problems = []
    if site.validated not in final.parents:
        problems.append(f"final path {final} is outside final storage")
    if not stat.S_ISREG(st.st_mode):
        problems.append(f"final path {final} is not a regular file")
    elif data is not None and final.read_bytes() != data:
        problems.append("final storage does not hold the verified bytes")
    if st.st_nlink != 1:
        problems.append(f"the stored file has {st.st_nlink} links (reachable from D), expected 1")
    return problems


@dataclass(frozen=True)
class LeftAlone:
    """Not a report (SPEC §3): these stay as they are; no entry, nothing archived or rejected."""

    paths: tuple[str, ...]

    def settled(self, site: Site) -> bool:
        return True

    def problems(self, site: Site) -> list[str]:
        problems = [f"{p} is gone" for p in self.paths if not _present(site.folder / p)]
        if site.entries():
            problems.append(f"unexpected entries {[e.status for e in site.entries()]}")
        for sub in (ARCHIVE, REJECTED):
            if site.listing(sub):
                problems.append(f"D/{sub} holds {[p.name for p in site.listing(sub)]}")
        return problems


@dataclass(frozen=True)
class Quietly:
    """`expect`, and no traceback in the log about the report named `name` (issue 11 item 9:
    bad input is rejected at once, not after internal errors)."""

    expect: Expect
    name: str

    def settled(self, site: Site) -> bool:
        return self.expect.settled(site)

    def problems(self, site: Site) -> list[str]:
        found = site.tracebacks_about(self.name)
        problems = self.expect.problems(site)
        if found:
            problems.append(f"{len(found)} traceback(s) about it in the log, first: {found[0]}")
        return problems


@dataclass(frozen=True)
class Custom:
    """A case whose outcome needs its own words (symlinked _rejected/_archive, hard links)."""

    is_settled: Callable[[Site], bool]
    find: Callable[[Site], list[str]]

    def settled(self, site: Site) -> bool:
        return self.is_settled(site)

    def problems(self, site: Site) -> list[str]:
        return self.find(site)


# ----------------------------------------------------------------------------- whole-corpus checks


def tree_digest(root: Path) -> dict[str, str]:
    """Name → kind and content hash of everything under `root`, symlinks not followed."""
    digest = {}
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = Path(folder) / name
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                value = f"file {oct(st.st_mode)} {hashlib.sha256(path.read_bytes()).hexdigest()}"
            elif stat.S_ISLNK(st.st_mode):
                value = f"link {os.readlink(path)}"
            else:
                value = f"{stat.filemode(st.st_mode)}"
            digest[str(path.relative_to(root))] = value
    return digest


def digest_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    changes = [f"{name} appeared" for name in sorted(set(after) - set(before))]
    changes += [f"{name} disappeared" for name in sorted(set(before) - set(after))]
    changes += [
        f"{name} changed"
        for name in sorted(set(before) & set(after))
        if before[name] != after[name]
    ]
    return changes


def log_lines(path: Path) -> Iterator[dict[str, Any]]:
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                yield json.loads(line)
            except ValueError:
                continue


def tracebacks(path: Path) -> list[str]:
    """One line per logged exception: its event, the report and the exception's last line."""
    found = []
    for record in log_lines(path):
        if "exception" in record:
            last = str(record["exception"]).strip().splitlines()[-1:] or [""]
            found.append(f"{record.get('event')} ({record.get('report', '')}): {last[0]}")
    return found
