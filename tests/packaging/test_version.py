"""The version has one source, pyproject.toml; everything that shows one agrees with it.

pyproject.toml `[project] version`, `backupwatch.__version__`, `backupwatchd --version`, the
newest release heading of CHANGELOG.md, and debian/changelog as packaging/build-deb.sh
generates it (packaging/debian_changelog.py: there is no checked-in debian/changelog).
"""

from __future__ import annotations

import importlib.util
import itertools
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

import backupwatch

REPO = Path(__file__).resolve().parents[2]


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "debian_changelog", REPO / "packaging" / "debian_changelog.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gen = _load_generator()
PYPROJECT_VERSION: str = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def _changelog_version(text: str) -> str:
    first = text.splitlines()[0]
    return first.split("(", 1)[1].split(")", 1)[0]


def test_package_version_is_pyprojects() -> None:
    assert backupwatch.__version__ == PYPROJECT_VERSION


def test_backupwatchd_version_is_pyprojects() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "backupwatch.daemon", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"backupwatchd {PYPROJECT_VERSION}"


def test_changelog_md_newest_release_is_pyprojects() -> None:
    release = gen.newest_release(REPO)
    assert release is not None, "CHANGELOG.md has no '## [X.Y.Z] - YYYY-MM-DD' release heading"
    assert release.version == PYPROJECT_VERSION
    assert release.date, "the release heading has no date"


def test_generated_debian_changelog_is_pyprojects() -> None:
    text = gen.render(REPO)
    assert _changelog_version(text) == PYPROJECT_VERSION
    assert text.startswith(f"backupwatch ({PYPROJECT_VERSION}) ")


def test_generated_debian_changelog_parses(tmp_path: Path) -> None:
    """dpkg's own parser reads the generated file and finds the same version."""
    if shutil.which("dpkg-parsechangelog") is None:
        pytest.skip("dpkg-parsechangelog not installed (apt install dpkg-dev)")
    changelog = tmp_path / "changelog"
    changelog.write_text(gen.render(REPO, suffix="+ci1"))
    result = subprocess.run(
        ["dpkg-parsechangelog", "-l", str(changelog), "-S", "Version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.strip() == f"{PYPROJECT_VERSION}+ci1"


def test_check_command_agrees() -> None:
    assert gen.check(REPO) == []


@pytest.mark.parametrize(
    ("pep440", "debian"),
    [
        ("0.1.0", "0.1.0"),
        ("1.2rc1", "1.2~rc1"),
        ("1.2.0a3", "1.2.0~a3"),
        ("1.2.post1", "1.2+post1"),
        ("1.3.dev4", "1.3~dev4"),
    ],
)
def test_pep440_maps_to_debian(pep440: str, debian: str) -> None:
    assert gen.debian_version(pep440) == debian


def test_debian_versions_sort_like_pep440() -> None:
    if shutil.which("dpkg") is None:
        pytest.skip("dpkg not installed")
    ordered = ["1.0~dev1", "1.0~rc1", "1.0", "1.0+ci1", "1.0+post1"]
    assert [gen.debian_version(v) for v in ("1.0.dev1", "1.0rc1", "1.0")] == ordered[:3]
    assert gen.debian_version("1.0", "+ci1") == "1.0+ci1"
    for lower, higher in itertools.pairwise(ordered):
        subprocess.run(["dpkg", "--compare-versions", higher, "gt", lower], check=True)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="PEP 440"):
        gen.debian_version("1.0-beta")
    with pytest.raises(ValueError, match="suffix"):
        gen.debian_version("1.0", "ci1")
