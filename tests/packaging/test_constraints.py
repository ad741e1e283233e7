"""The package pins every runtime dependency, inside the ranges pyproject.toml allows."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]


def pins() -> dict[str, str]:
    lines = (REPO / "packaging" / "constraints.txt").read_text().splitlines()
    found = {}
    for line in lines:
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            found[canonicalize_name(name)] = version.strip()
    return found


def runtime_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] + project["optional-dependencies"]["systemd"]
    return [Requirement(name) for name in names]


def test_every_runtime_dependency_is_pinned_within_its_range() -> None:
    pinned = pins()
    for requirement in runtime_requirements():
        version = pinned.get(canonicalize_name(requirement.name))
        assert version is not None, f"{requirement.name} is not pinned in constraints.txt"
        assert requirement.specifier.contains(version), (
            f"{requirement.name}=={version} vs {requirement}"
        )


def test_the_package_build_uses_the_constraints() -> None:
    rules = (REPO / "packaging" / "debian" / "rules").read_text()
    assert "--constraint=$(CURDIR)/packaging/constraints.txt" in rules
