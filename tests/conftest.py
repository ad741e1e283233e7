"""Fixtures shared by every test: the database under test runs on SQLite and on PostgreSQL.

PostgreSQL tests get a schema of their own (search_path in the URL), so they are isolated from each
other and from whatever else lives in the `test` database. Without a reachable server they skip
with the reason; in CI (CI=true) an unreachable server is a failure, never a silent skip.

The integration tests' `make_daemon` lives here too, with its harness in `daemonkit`: one conftest
in the tree, because two would both be the module `conftest` to mypy (and to an import).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemonkit import Daemon
from support import postgres_schema, write_config


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


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """Unix socket paths are limited to 108 bytes: keep sockets in a short /tmp folder."""
    path = Path(tempfile.mkdtemp(prefix="bw-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_daemon(tmp_path: Path, short_dir: Path) -> Iterator[Callable[..., Daemon]]:
    """Daemons on tmp_path (or `base`), killed at teardown if a test left them running."""
    daemons: list[Daemon] = []

    def factory(database_url: str, jobs: str, base: Path | None = None, **overrides: Any) -> Daemon:
        overrides.setdefault("control_socket", str(short_dir / "control.sock"))
        base = base or tmp_path
        config = write_config(base, database_url, jobs, **overrides)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("BACKUPWATCH_", "NOTIFY_"))}
        daemon = Daemon(base, config, short_dir, env)
        daemons.append(daemon)
        return daemon

    yield factory
    for daemon in daemons:
        if daemon.process and daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
