"""SPEC §11: `backupwatchctl check`, a Nagios/Icinga plugin per the Monitoring Plugins guidelines.

One line, `BACKUPWATCH STATE - what is wrong | perfdata`, and the exit code 0 OK, 1 WARNING,
2 CRITICAL, 3 UNKNOWN. Pure: it judges the job rows `status --json` prints (from the daemon or
the database), whether the daemon answered, and the sites that rejected reports lately.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backupwatch.names import visible

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
STATE_NAMES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}

# What a job (or the host) can be, as `--warning` and `--critical` name it.
CONDITIONS = (
    "MISSING",
    "FAILED",
    "HASH_MISMATCH",
    "TRANSFER_INTEGRITY_FAILED",
    "UNCHANGED",
    "SUSPICIOUS",
    "UNKNOWN",
    "REJECTED",
    "DOWN",
)
DEFAULT_CRITICAL = frozenset(
    {"MISSING", "FAILED", "HASH_MISMATCH", "TRANSFER_INTEGRITY_FAILED", "DOWN"}
)
DEFAULT_WARNING = frozenset({"UNCHANGED", "SUSPICIOUS", "REJECTED"})
PERF_KEYS = (
    "ok",
    "missing",
    "failed",
    "hash_mismatch",
    "transfer_integrity_failed",
    "unchanged",
    "suspicious",
    "unknown",
    "paused",
    "rejected",
)
LISTED = 5  # problems named on the status line; the rest are counted


def conditions(text: str) -> frozenset[str]:
    """`--warning MISSING,unchanged` as a set; ValueError names what is not a condition."""
    names = {part.strip().upper() for part in text.split(",") if part.strip()}
    unknown = sorted(names - set(CONDITIONS))
    if unknown:
        raise ValueError(f"unknown {', '.join(unknown)}; choose among {','.join(CONDITIONS)}")
    return frozenset(names)


@dataclass(frozen=True)
class Filters:
    job: str | None = None  # an id or company/city/neighborhood/database
    site: str | None = None  # company/city/neighborhood
    company: str | None = None

    def keeps(self, row: Mapping[str, Any]) -> bool:
        site = f"{row['company_name']}/{row['city']}/{row['neighborhood']}"
        if self.job is not None and self.job not in (
            str(row["id"]),
            f"{site}/{row['database_name']}",
        ):
            return False
        if self.site is not None and self.site != site:
            return False
        return self.company is None or self.company == row["company_name"]

    def keeps_site(self, company: str | None, site: str) -> bool:
        if self.job is not None:
            return site == self.job.rsplit("/", 1)[0]
        if self.site is not None and self.site != site:
            return False
        return self.company is None or self.company == company


@dataclass(frozen=True)
class Verdict:
    code: int
    line: str


def condition_of(row: Mapping[str, Any]) -> str | None:
    """What a job row is, as the check names it; None: OK, or nothing to judge."""
    if not row["active"] or row.get("paused"):
        return None
    status = row["current_status"]
    if status == "OK":
        if row.get("suspicious"):
            return "SUSPICIOUS"  # SPEC §13: much smaller than the job's recent successes
        return "UNCHANGED" if row.get("unchanged") else None
    return str(status)


def judge(
    rows: Sequence[Mapping[str, Any]],
    daemon_up: bool,
    rejected_sites: Iterable[tuple[str | None, str]],
    filters: Filters,
    warning: frozenset[str] = DEFAULT_WARNING,
    critical: frozenset[str] = DEFAULT_CRITICAL,
) -> Verdict:
    kept = [row for row in rows if filters.keeps(row)]
    rejected = sum(1 for company, site in rejected_sites if filters.keeps_site(company, site))
    problems: list[tuple[int, str]] = []
    counts: Counter[str] = Counter()
    for row in kept:
        found = condition_of(row)
        _count(counts, row, found)
        if found is not None:
            level = CRITICAL if found in critical else WARNING if found in warning else OK
            if level != OK:
                problems.append((level, f"{_label(row)} {found}"))
    if rejected and ("REJECTED" in critical or "REJECTED" in warning):
        level = CRITICAL if "REJECTED" in critical else WARNING
        problems.append((level, f"{rejected} site(s) rejected reports in the last 24 h"))
    counts["rejected"] = rejected
    if not daemon_up and ("DOWN" in critical or "DOWN" in warning):
        problems.insert(
            0, (CRITICAL if "DOWN" in critical else WARNING, "backupwatchd is not running")
        )
    code = max((level for level, _ in problems), default=OK)
    return Verdict(code, _line(code, problems, kept, counts))


def _count(counts: Counter[str], row: Mapping[str, Any], found: str | None) -> None:
    if not row["active"]:
        return
    if row.get("paused"):
        counts["paused"] += 1
        return
    counts[row["current_status"].lower()] += 1
    if found == "UNCHANGED":
        counts["unchanged"] += 1
    if found == "SUSPICIOUS":
        counts["suspicious"] += 1


def _label(row: Mapping[str, Any]) -> str:
    return visible(
        f"{row['company_name']}/{row['city']}/{row['neighborhood']}/{row['database_name']}"
    )


def _line(code: int, problems: list[tuple[int, str]], kept: list[Any], counts: Counter[str]) -> str:
    active = sum(1 for row in kept if row["active"])
    if problems:
        worst = sorted(problems, key=lambda p: -p[0])
        named = ", ".join(text for _, text in worst[:LISTED])
        more = f" and {len(worst) - LISTED} more" if len(worst) > LISTED else ""
        text = f"{len(problems)} problem(s): {named}{more}"
    else:
        text = f"{counts['ok']} of {active} jobs OK"
        if counts["unknown"]:
            text += f", {counts['unknown']} not reported yet"
        if counts["paused"]:
            text += f", {counts['paused']} paused"
    perf = " ".join(f"{key}={counts[key]}" for key in PERF_KEYS)
    return f"BACKUPWATCH {STATE_NAMES[code]} - {text} | {perf}"


def unknown(why: str) -> Verdict:
    """The plugin cannot tell (SPEC §11: the database cannot be read)."""
    return Verdict(UNKNOWN, f"BACKUPWATCH UNKNOWN - {visible(why)}")
