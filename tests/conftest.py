"""Fixtures shared by every test: the database under test runs on SQLite and on PostgreSQL.

PostgreSQL tests get a schema of their own (search_path in the URL), so they are isolated from each
other and from whatever else lives in the `test` database. Without a reachable server they skip
with the reason; in CI (CI=true) an unreachable server is a failure, never a silent skip.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import postgres_schema


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL confined to a fresh schema, dropped afterwards."""
    with postgres_schema() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: object) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/backupwatch.db"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def other_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A folder on another filesystem than tmp_path (a tmpfs): promotion must copy there."""
    if not Path("/dev/shm").is_dir():
        pytest.skip("no /dev/shm here to put final storage on another filesystem")
    folder = Path(tempfile.mkdtemp(prefix="backupwatch-test-", dir="/dev/shm"))
    try:
        if folder.stat().st_dev == tmp_path.stat().st_dev:
            pytest.skip("/dev/shm is on the same filesystem as tmp_path: no EXDEV to test")
        yield folder
    finally:
        shutil.rmtree(folder)
