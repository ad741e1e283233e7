#!/usr/bin/python3
"""Write debian/changelog from pyproject.toml, so the package version has one source.

The version is `[project] version` of pyproject.toml (PEP 440, mapped to Debian's ordering:
`1.0rc1` becomes `1.0~rc1`, so it sorts before `1.0`), plus an optional suffix for rebuilds of
the same release (`+ci1`: sorts after it). The entry's text and date come from the newest
release of CHANGELOG.md (Keep a Changelog: `## [0.1.0] - 2026-11-24`) when it matches; the
date falls back to SOURCE_DATE_EPOCH, then to now.

    packaging/debian_changelog.py [--repo DIR] [--suffix +ci1] > debian/changelog
    packaging/debian_changelog.py --print-version       # 0.1.0
    packaging/debian_changelog.py --check               # exit 1 if CHANGELOG.md disagrees

Runs with Debian's /usr/bin/python3 (3.11, standard library only); imported by
tests/packaging/test_version.py.
"""

from __future__ import annotations

import argparse
import email.utils
import os
import re
import sys
import textwrap
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

PACKAGE = "backupwatch"
DISTRIBUTION = "bookworm"
DEFAULT_MAINTAINER = "backupwatch maintainers <backupwatch@example.org>"

_RELEASE_HEADING = re.compile(
    r"^##\s+\[?v?(?P<version>[0-9][^\]\s]*)\]?(?:\s*[-\u2013\u2014]\s*(?P<date>\d{4}-\d{2}-\d{2}))?"
)
_PEP440 = re.compile(
    r"^(?P<release>\d+(?:\.\d+)*)(?:(?P<pre>a|b|rc)(?P<pre_n>\d+))?"
    r"(?:\.post(?P<post>\d+))?(?:\.dev(?P<dev>\d+))?$"
)
_DEBIAN_SUFFIX = re.compile(r"^(?:[+~.][A-Za-z0-9.+~]*)?$")


@dataclass
class Release:
    """The newest released section of CHANGELOG.md."""

    version: str
    date: str | None
    items: list[str] = field(default_factory=list)


def project_version(repo: Path) -> str:
    with (repo / "pyproject.toml").open("rb") as handle:
        version = tomllib.load(handle)["project"]["version"]
    if not isinstance(version, str):
        raise ValueError("pyproject.toml: [project] version is not a string")
    return version


def debian_version(version: str, suffix: str = "") -> str:
    """A PEP 440 release as a native Debian version that sorts the same way."""
    match = _PEP440.match(version)
    if match is None:
        raise ValueError(f"pyproject.toml: version {version!r} is not a plain PEP 440 release")
    result = match["release"]
    if match["pre"]:
        result += f"~{match['pre']}{match['pre_n']}"
    if match["post"]:
        result += f"+post{match['post']}"
    if match["dev"]:
        result += f"~dev{match['dev']}"
    if not _DEBIAN_SUFFIX.match(suffix):
        raise ValueError(f"version suffix {suffix!r} must start with + ~ or . (e.g. +ci1)")
    return result + suffix


def newest_release(repo: Path) -> Release | None:
    """The first `## [X.Y.Z]` heading of CHANGELOG.md (Unreleased skipped), with its bullets."""
    path = repo / "CHANGELOG.md"
    if not path.is_file():
        return None
    release: Release | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("## "):
            if release is not None:
                break
            match = _RELEASE_HEADING.match(line)
            if match:
                release = Release(match["version"], match["date"])
            continue
        if release is None:
            continue
        stripped = line.strip()
        if stripped.startswith(("- ", "* ")):
            release.items.append(stripped[2:].strip())
        elif stripped and release.items and line.startswith((" ", "\t")):
            release.items[-1] += " " + stripped  # a bullet continued on the next line
    return release


def check(repo: Path) -> list[str]:
    """Disagreements between pyproject.toml, backupwatch/__init__.py and CHANGELOG.md."""
    version = project_version(repo)
    problems = []
    init = repo / "backupwatch" / "__init__.py"
    found = re.search(r"""^__version__\s*=\s*["']([^"']+)["']""", init.read_text(), re.M)
    if found is None or found[1] != version:
        problems.append(
            f"backupwatch/__init__.py __version__ is {found[1] if found else None!r}, "
            f"pyproject.toml says {version!r}"
        )
    release = newest_release(repo)
    if release is None:
        problems.append("CHANGELOG.md: no release heading such as '## [X.Y.Z] - YYYY-MM-DD'")
    elif release.version != version:
        problems.append(
            f"CHANGELOG.md's newest release is {release.version!r}, pyproject.toml says {version!r}"
        )
    return problems


def _entry_date(release: Release | None, version: str) -> datetime:
    if release is not None and release.version == version and release.date:
        return datetime.strptime(release.date, "%Y-%m-%d").replace(tzinfo=UTC)
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        return datetime.fromtimestamp(int(epoch), tz=UTC)
    return datetime.now(tz=UTC)


def render(repo: Path, suffix: str = "", maintainer: str | None = None) -> str:
    version = project_version(repo)
    deb_version = debian_version(version, suffix)
    release = newest_release(repo)
    if release is not None and release.version == version and release.items:
        items = release.items
    else:
        items = [f"Release {version}."]
    if suffix:
        items = [*items, f"Package rebuilt as {deb_version}."]
    who = maintainer or _maintainer_from_env() or DEFAULT_MAINTAINER
    lines = [f"{PACKAGE} ({deb_version}) {DISTRIBUTION}; urgency=medium", ""]
    for item in items:
        wrapped = textwrap.wrap(item, width=76) or [""]
        lines.append(f"  * {wrapped[0]}")
        lines.extend(f"    {rest}" for rest in wrapped[1:])
    when = email.utils.format_datetime(_entry_date(release, version))
    lines += ["", f" -- {who}  {when}", ""]
    return "\n".join(lines)


def _maintainer_from_env() -> str | None:
    name, mail = os.environ.get("DEBFULLNAME"), os.environ.get("DEBEMAIL")
    return f"{name} <{mail}>" if name and mail else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument(
        "--suffix",
        default=os.environ.get("BACKUPWATCH_DEB_VERSION_SUFFIX", ""),
        help="appended to the Debian version, e.g. +ci1 (default: $BACKUPWATCH_DEB_VERSION_SUFFIX)",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--print-version", action="store_true", help="print the Debian version")
    action.add_argument("--check", action="store_true", help="check that the versions agree")
    args = parser.parse_args(argv)
    try:
        if args.check:
            problems = check(args.repo)
            for problem in problems:
                print(f"version mismatch: {problem}", file=sys.stderr)
            return 1 if problems else 0
        if args.print_version:
            print(debian_version(project_version(args.repo), args.suffix))
        else:
            sys.stdout.write(render(args.repo, args.suffix))
    except (OSError, KeyError, ValueError, tomllib.TOMLDecodeError) as exc:
        print(f"debian_changelog: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
