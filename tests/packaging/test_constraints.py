"""The package pins every runtime dependency, inside the ranges pyproject.toml allows."""

from __future__ import annotations

import ast
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
# Runtime dependencies that no module imports by name, and why they are needed all the same.
LOADED_INDIRECTLY = {"psycopg2-binary": "SQLAlchemy loads it for postgresql+psycopg2:// URLs"}


def pins() -> dict[str, str]:
    lines = (REPO / "packaging" / "constraints.txt").read_text().splitlines()
    found: dict[str, str] = {}
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


def imported_modules() -> set[str]:
    """The top-level names every module of the package imports, at any depth (lazy ones too)."""
    found: set[str] = set()
    for path in (REPO / "backupwatch").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.partition(".")[0])
    return found


def test_every_runtime_dependency_is_used() -> None:
    """What the .deb ships must be what the code needs (pydantic-settings once shipped unused)."""
    provided_by: dict[str, set[str]] = {}
    for module, distributions in packages_distributions().items():
        for distribution in distributions:
            provided_by.setdefault(canonicalize_name(distribution), set()).add(module)
    imported = imported_modules()
    unused = [
        str(requirement)
        for requirement in runtime_requirements()
        if canonicalize_name(requirement.name) not in LOADED_INDIRECTLY
        and not provided_by.get(canonicalize_name(requirement.name), set()) & imported
    ]
    assert unused == []
