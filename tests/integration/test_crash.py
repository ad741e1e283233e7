"""Kill -9 the real daemon during a mixed burst, restart it, and compare with the truth.

Issue 11's "Done when": the project's own crash test kills the real daemon at many points of a
mixed burst, with final storage on the same and on another filesystem (a tmpfs), and checks every
report, entry, reason file and stored file against the truth. The burst and the checks live in
`crashkit.py` (shared with `bench/crash.py`, which runs hundreds of iterations); here a few fixed
seeds and kill counts run on SQLite and PostgreSQL. A failure prints its seed and kill points:
`bench/crash.py --seed N --kills K ...` replays the same burst and kill targets.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from crashkit import (
    KillPoint,
    Tree,
    agent_id,
    build_burst,
    config_overrides,
    crash_run,
    final_path,
    job_label,
    jobs_toml,
    now_utc,
    point_run,
    tmpfs_unusable,
)
from daemonkit import Daemon

pytestmark = pytest.mark.integration

SITES = 60  # random kills: 126 reports, 120 entries
POINT_SITES = 12  # named points: site 0 is "valid", site 4 "broken"
READY_TIMEOUT = 60.0


@dataclass(frozen=True)
class Case:
    database: str  # sqlite | postgresql
    final: str  # same: final storage beside the deposit root; tmpfs: on another filesystem
    seed: int
    kills: int

    @property
    def id(self) -> str:
        return f"{self.database}-{self.final}-seed{self.seed}-kills{self.kills}"


CASES = [
    Case("sqlite", "same", seed=2, kills=3),
    Case("sqlite", "tmpfs", seed=4, kills=2),
    Case("postgresql", "same", seed=5, kills=2),
    Case("postgresql", "tmpfs", seed=6, kills=1),
]


def _rejected(tree: Tree, _truth: object) -> Path:
    return tree.deposit / agent_id(4) / "_rejected"


@dataclass(frozen=True)
class PointCase:
    point: KillPoint
    final: str  # same | tmpfs
    issue: str  # what it pins

    @property
    def id(self) -> str:
        return f"{self.point.name}-{self.final}"


SALES0 = job_label(0, "sales")
POINTS = [
    PointCase(
        KillPoint("before-the-reason-file-is-created", "openat", _rejected, when=3),
        "same",
        "issue 11 item 4: a rejected report without its reason",
    ),
    PointCase(
        KillPoint(
            "before-the-reason-is-written",
            "write",
            lambda tree, _t: _rejected(tree, _t) / "schema.json.reason.txt",
        ),
        "same",
        "issue 11 item 4: an empty reason",
    ),
    PointCase(
        KillPoint(
            "between-link-and-commit",
            "newfstatat",
            lambda tree, truth: final_path(tree, truth, SALES0),
        ),
        "same",
        "a retry reuses its own link",
    ),
    PointCase(
        KillPoint(
            "between-copy-and-commit",
            "unlinkat",
            lambda tree, truth: final_path(tree, truth, SALES0).parent,
        ),
        "tmpfs",
        "issue 11 item 5b: orphan copy, -2 name, stray .backupwatch-*.tmp",
    ),
    PointCase(
        KillPoint(
            "between-commit-and-staged-unlink",
            "unlinkat",
            lambda tree, _t: tree.deposit / agent_id(0) / "database",
        ),
        "same",
        "a retry finishes the clean-up",
    ),
    PointCase(
        KillPoint(
            "between-commit-and-archive",
            "renameat2",
            lambda tree, _t: tree.deposit / agent_id(0) / "_archive",
        ),
        "same",
        "a retry archives a committed report",
    ),
]


@dataclass
class Controlled:
    """crashkit's DaemonControl over daemonkit's Daemon: start, SIGKILL, status, SIGTERM."""

    daemon: Daemon

    def start(self, wait_ready: bool, prefix: list[str] | None = None) -> None:
        if self.daemon.notify is not None:
            self.daemon.notify.close()
        self.daemon.start(wait_ready=False, as_user=prefix)
        if wait_ready:
            assert self.daemon.notify is not None
            try:
                self.daemon.notify.expect("READY=1", timeout=READY_TIMEOUT)
            except pytest.fail.Exception as exc:  # a difference to report, not the end
                raise RuntimeError(f"no READY=1 after a restart: {exc}") from None

    def alive(self) -> bool:
        return self.daemon.process is not None and self.daemon.process.poll() is None

    def kill(self) -> None:
        assert self.daemon.process is not None
        self._signal_tracees(signal.SIGKILL)
        self.daemon.process.send_signal(signal.SIGKILL)
        self.daemon.process.wait()

    def pending(self) -> int | None:
        result = self.daemon.ctl("status", "--json")
        if result.returncode != 0:
            return None
        pending: int | None = json.loads(result.stdout)["daemon"]["pending_reports"]
        return pending

    def stop(self) -> int:
        assert self.daemon.process is not None
        if self.daemon.process.poll() is not None:
            return self.daemon.process.returncode
        if self._signal_tracees(signal.SIGTERM):  # under strace: the daemon is its child
            return self.daemon.process.wait(15)
        return self.daemon.stop(signal.SIGTERM, timeout=15)

    def _signal_tracees(self, sig: int) -> bool:
        """Signal the children of the started process (strace's tracee), if it has any."""
        assert self.daemon.process is not None
        pid = self.daemon.process.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return False
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(child), sig)
        return bool(children)


@pytest.fixture
def tmpfs_dir(tmp_path: Path) -> Iterator[Path]:
    """A per-test folder on /dev/shm (a tmpfs): final storage on another filesystem."""
    reason = tmpfs_unusable(Path("/dev/shm"), other=tmp_path)
    if reason is not None:
        pytest.skip(f"no other filesystem for final storage: {reason}")
    path = Path(tempfile.mkdtemp(prefix="bw-crash-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_kill_9_during_a_mixed_burst_loses_and_duplicates_nothing(
    case: Case,
    make_daemon: Callable[..., Daemon],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    if case.database == "sqlite":
        url = f"sqlite:///{tmp_path}/backupwatch.db"
    else:
        url = str(request.getfixturevalue("postgres_url"))
    overrides = config_overrides()
    if case.final == "tmpfs":
        overrides["validated_backups_base_path"] = str(request.getfixturevalue("tmpfs_dir"))
    daemon, tree = _daemon(make_daemon, url, SITES, case.final, request)
    truth = build_burst(SITES, case.seed, now_utc())
    print(f"crash case {case.id}: {truth.describe()}")

    run = crash_run(truth, tree, Controlled(daemon), case.seed, case.kills)

    print(run.summary(limit=1000))
    assert run.clean, run.summary(limit=40)


@pytest.mark.skipif(shutil.which("strace") is None, reason="named kill points need strace")
@pytest.mark.parametrize("case", POINTS, ids=[case.id for case in POINTS])
def test_kill_9_at_a_named_point_loses_and_duplicates_nothing(
    case: PointCase,
    make_daemon: Callable[..., Daemon],
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """strace kills the daemon when it enters one syscall: the windows random kills miss."""
    url = f"sqlite:///{tmp_path}/backupwatch.db"
    daemon, tree = _daemon(make_daemon, url, POINT_SITES, case.final, request)
    truth = build_burst(POINT_SITES, 7, now_utc())

    controlled = Controlled(daemon)
    try:
        run = point_run(truth, tree, controlled, case.point, seed=7)
    finally:
        if controlled.alive():  # killing strace alone would leave its tracee running
            controlled.kill()

    print(f"{case.id} ({case.issue}): {run.summary(limit=1000)}")
    assert run.clean, f"{case.issue}\n{run.summary(limit=40)}"


def _daemon(
    make_daemon: Callable[..., Daemon],
    url: str,
    sites: int,
    final: str,
    request: pytest.FixtureRequest,
) -> tuple[Daemon, Tree]:
    overrides = config_overrides()
    validated: Path | None = None
    if final == "tmpfs":
        validated = request.getfixturevalue("tmpfs_dir")
        overrides["validated_backups_base_path"] = str(validated)
    daemon = make_daemon(url, jobs_toml(sites), **overrides)
    return daemon, Tree(daemon.deposit, validated or daemon.validated, url)
