"""Tests of the inotify adapter on real directories (inotify needs a real filesystem), with
real kernel queue overflows, and of the WorkQueue, with an injected clock wherever timing
matters."""

from __future__ import annotations

import json
import os
import pwd
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from backupwatch.watcher import (
    DepositWatcher,
    EventKind,
    WorkQueue,
    check_inotify_limits,
    count_folders,
)

WAIT = 5.0  # seconds: generous deadline for anything inotify delivers in milliseconds
PROBE = Path(__file__).resolve().parent.parent / "watch_probe.py"

IN_ACCESS, IN_MODIFY, IN_ATTRIB = 0x1, 0x2, 0x4
IN_CLOSE_WRITE, IN_CLOSE_NOWRITE, IN_OPEN = 0x8, 0x10, 0x20
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE = 0x40, 0x80, 0x100
IN_ONLYDIR, IN_DONT_FOLLOW = 0x01000000, 0x02000000

# --------------------------------------------------------------------------- helpers


class Recorder:
    """Collects (kind, path) from the watcher's threads; tests wait on it with a deadline.

    `stall_on` makes the reader thread block inside on_event for that path until `release`
    is set: the kernel queue then fills up exactly as if the daemon were stopped."""

    def __init__(self) -> None:
        self.events: list[tuple[EventKind, Path]] = []
        self.overflows = 0
        self._cond = threading.Condition()
        self.fail_on: Callable[[EventKind, Path], bool] = lambda _k, _p: False
        self.after_overflow: Callable[[], object] = lambda: None
        self.stall_on: Path | None = None
        self.stalled = threading.Event()
        self.release = threading.Event()

    def on_event(self, kind: EventKind, path: Path) -> None:
        with self._cond:
            self.events.append((kind, path))
            self._cond.notify_all()
        if path == self.stall_on:
            self.stalled.set()
            self.release.wait(WAIT * 4)
        if self.fail_on(kind, path):
            raise RuntimeError(f"boom on {path}")

    def on_overflow(self) -> None:
        with self._cond:
            self.overflows += 1
            self._cond.notify_all()
        self.after_overflow()

    def wait_for(self, predicate: Callable[[Recorder], bool], timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def kinds_for(self, path: Path) -> set[EventKind]:
        with self._cond:
            return {kind for kind, p in self.events if p == path}

    def paths(self) -> set[Path]:
        with self._cond:
            return {p for _, p in self.events}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "deposits"
    (folder / "acme" / "log").mkdir(parents=True)
    (folder / "flood").mkdir()
    return folder


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def watcher(root: Path, recorder: Recorder) -> Iterator[DepositWatcher]:
    w = DepositWatcher(root, recorder.on_event, recorder.on_overflow)
    w.start()
    yield w
    recorder.release.set()
    w.stop()


def poll(condition: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Wait for state that no event announces (the watch count), with a deadline."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not condition():
        if time.monotonic() > deadline:
            return False
        pause.wait(0.01)
    return True


def inotify_fds() -> set[int]:
    """This process's inotify descriptors, found the way any tool would: /proc/self/fd."""
    found = set()
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{entry}") == "anon_inode:inotify":
                found.add(int(entry))
        except OSError:
            continue
    return found


def kernel_masks(fd: int) -> list[int]:
    """The masks the kernel actually holds, one per watch, from /proc/self/fdinfo."""
    text = Path(f"/proc/self/fdinfo/{fd}").read_text()
    masks = []
    for line in text.splitlines():
        if line.startswith("inotify wd:"):
            field = next(f for f in line.split() if f.startswith("mask:"))
            masks.append(int(field.removeprefix("mask:"), 16))
    return masks


def max_queued_events() -> int:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 1_000_000:
        pytest.skip(f"max_queued_events={limit}: too large to overflow quickly")
    return limit


def flood(folder: Path, events: int) -> None:
    """`events` IN_CLOSE_WRITE events in `folder`, alternating two names so that the kernel
    cannot merge consecutive identical events."""
    files = [folder / "a.bin", folder / "b.bin"]
    for f in files:
        f.touch()
    for i in range(events):
        os.close(os.open(files[i % 2], os.O_WRONLY))


# --------------------------------------------------------------------------- watcher


@pytest.mark.usefixtures("watcher")
def test_written_and_closed_file_gives_closed(root: Path, recorder: Recorder) -> None:
    report = root / "acme" / "STATUS.json"
    report.write_text("{}")
    assert recorder.wait_for(lambda r: EventKind.CLOSED in r.kinds_for(report))


@pytest.mark.usefixtures("watcher")
def test_file_renamed_into_place_gives_moved_with_destination(
    root: Path, recorder: Recorder
) -> None:
    tmp = root / "acme" / "log" / ".STATUS.json.part"
    final = root / "acme" / "log" / "STATUS.json"
    tmp.write_text("{}")
    tmp.rename(final)
    assert recorder.wait_for(lambda r: EventKind.MOVED in r.kinds_for(final))


@pytest.mark.usefixtures("watcher")
def test_file_moved_in_from_outside_the_root_gives_moved(
    root: Path, tmp_path: Path, recorder: Recorder
) -> None:
    outside = tmp_path / "elsewhere.json"
    outside.write_text("{}")
    final = root / "acme" / "STATUS.json"
    outside.rename(final)
    assert recorder.wait_for(lambda r: EventKind.MOVED in r.kinds_for(final))
    assert EventKind.CREATED not in recorder.kinds_for(final)


@pytest.mark.usefixtures("watcher")
def test_hard_link_gives_created(root: Path, tmp_path: Path, recorder: Recorder) -> None:
    source = root / "acme" / ".upload.tmp"
    source.write_text("{}")
    link = root / "acme" / "STATUS.json"
    os.link(source, link)
    assert recorder.wait_for(lambda r: EventKind.CREATED in r.kinds_for(link))
    assert recorder.kinds_for(link) == {EventKind.CREATED}


@pytest.mark.usefixtures("watcher")
def test_chmod_gives_attrib(root: Path, recorder: Recorder) -> None:
    report = root / "acme" / "STATUS.json"
    report.write_text("{}")
    assert recorder.wait_for(lambda r: EventKind.CLOSED in r.kinds_for(report))
    report.chmod(0o644)
    assert recorder.wait_for(lambda r: EventKind.ATTRIB in r.kinds_for(report))


@pytest.mark.usefixtures("watcher")
def test_new_nested_folders_are_watched_and_their_files_reported(
    root: Path, recorder: Recorder
) -> None:
    site = root / "newco" / "log" / "deep"
    site.mkdir(parents=True)
    first = site / "STATUS.json"
    first.write_text("{}")  # at once: often before any event is read, so only listed
    for folder in (root / "newco", root / "newco" / "log", site):

        def created(r: Recorder, f: Path = folder) -> bool:
            return EventKind.DIR_CREATED in r.kinds_for(f)

        assert recorder.wait_for(created)
    assert recorder.wait_for(
        lambda r: bool(r.kinds_for(first) & {EventKind.FOUND, EventKind.CREATED, EventKind.CLOSED})
    )
    later = site / "LATER.json"
    later.write_text("{}")
    assert recorder.wait_for(lambda r: EventKind.CLOSED in r.kinds_for(later))


def test_folder_moved_in_is_watched_and_its_files_reported_as_found(
    root: Path, tmp_path: Path, recorder: Recorder, watcher: DepositWatcher
) -> None:
    outside = tmp_path / "incoming"
    (outside / "log").mkdir(parents=True)
    (outside / "log" / "STATUS.json").write_text("{}")
    outside.rename(root / "newco")
    moved = root / "newco" / "log" / "STATUS.json"
    assert recorder.wait_for(lambda r: r.kinds_for(moved) == {EventKind.FOUND})  # no writer seen
    assert poll(lambda: watcher.watch_count() == 6)
    later = root / "newco" / "log" / "LATER.json"
    later.write_text("{}")
    assert recorder.wait_for(lambda r: EventKind.CLOSED in r.kinds_for(later))


def test_folder_renamed_within_the_tree_reports_under_its_new_name(
    root: Path, recorder: Recorder, watcher: DepositWatcher
) -> None:
    (root / "acme" / "log" / "old.json").write_text("{}")
    (root / "acme").rename(root / "acme2")
    log = root / "acme2" / "log"
    assert recorder.wait_for(lambda r: EventKind.DIR_CREATED in r.kinds_for(log))
    report = root / "acme2" / "log" / "STATUS.json"
    report.write_text("{}")
    assert recorder.wait_for(lambda r: EventKind.CLOSED in r.kinds_for(report))
    assert not any(p.is_relative_to(root / "acme") for p in recorder.paths() if "STATUS" in p.name)
    assert watcher.watch_count() == count_folders(root)


def test_folder_moved_out_is_no_longer_watched(
    root: Path, tmp_path: Path, recorder: Recorder, watcher: DepositWatcher
) -> None:
    (root / "acme").rename(tmp_path / "gone")
    assert poll(lambda: watcher.watch_count() == count_folders(root) == 2)
    (tmp_path / "gone" / "log" / "STATUS.json").write_text("{}")
    sentinel = root / "sentinel.json"
    sentinel.write_text("{}")
    assert recorder.wait_for(lambda r: EventKind.CLOSED in r.kinds_for(sentinel))
    assert not any(p.name == "STATUS.json" for p in recorder.paths())


def test_deleted_folder_leaves_the_bookkeeping(
    root: Path, recorder: Recorder, watcher: DepositWatcher
) -> None:
    assert watcher.watch_count() == 4
    (root / "acme" / "log").rmdir()
    assert poll(lambda: watcher.watch_count() == 3)
    assert watcher.is_alive()


def test_symlinked_folder_is_not_followed(
    root: Path, tmp_path: Path, recorder: Recorder, watcher: DepositWatcher
) -> None:
    outside = tmp_path / "outside"
    (outside / "sub").mkdir(parents=True)
    link = root / "acme" / "link"
    link.symlink_to(outside)
    assert recorder.wait_for(lambda r: EventKind.CREATED in r.kinds_for(link))
    (outside / "secret.json").write_text("{}")
    (outside / "sub" / "secret.json").write_text("{}")
    sentinel = root / "acme" / "sentinel.json"
    sentinel.write_text("{}")
    assert recorder.wait_for(lambda r: EventKind.CLOSED in r.kinds_for(sentinel))
    assert not any(p.name == "secret.json" for p in recorder.paths())
    assert watcher.watch_count() == 4


def test_symlink_to_a_folder_present_at_start_is_not_watched(
    root: Path, tmp_path: Path, recorder: Recorder
) -> None:
    (tmp_path / "outside").mkdir()
    (root / "acme" / "link").symlink_to(tmp_path / "outside")
    w = DepositWatcher(root, recorder.on_event, recorder.on_overflow)
    w.start()
    try:
        assert w.watch_count() == w.folder_count == count_folders(root) == 4
    finally:
        w.stop()


def test_start_returns_the_files_its_walk_listed_that_the_caller_asked_for(
    root: Path, tmp_path: Path, recorder: Recorder
) -> None:
    """The daemon's start scan is the watcher's walk: every folder is listed once its watch
    is added, and the files whose names pass `listed` come back (nothing through a symlink)."""
    (root / "acme" / "log").mkdir(parents=True, exist_ok=True)
    (root / "acme" / "STATUS.json").write_text("{}")
    (root / "acme" / "log" / "old.json").write_text("{}")
    (root / "acme" / "data.gz").write_bytes(b"x")
    (root / "top.json").write_text("{}")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "far.json").write_text("{}")
    (root / "acme" / "link").symlink_to(tmp_path / "outside")
    w = DepositWatcher(root, recorder.on_event, recorder.on_overflow)
    listed = w.start(lambda name: name.endswith(b".json"))
    try:
        assert sorted(p.relative_to(root).as_posix() for p in listed) == [
            "acme/STATUS.json",
            "acme/log/old.json",
            "top.json",
        ]
        assert w.watch_count() == w.folder_count == count_folders(root)
    finally:
        w.stop()
    again = DepositWatcher(root, recorder.on_event, recorder.on_overflow)
    try:
        assert again.start() == []  # not asked for: no file kept
    finally:
        again.stop()


def test_exception_in_on_event_does_not_kill_the_reader(
    root: Path, recorder: Recorder, watcher: DepositWatcher
) -> None:
    bad = root / "acme" / "bad.json"
    recorder.fail_on = lambda _kind, path: path == bad
    bad.write_text("{}")
    assert recorder.wait_for(lambda r: bool(r.kinds_for(bad)))
    good = root / "acme" / "good.json"
    good.write_text("{}")
    assert recorder.wait_for(lambda r: EventKind.CLOSED in r.kinds_for(good))
    assert watcher.is_alive()


def test_kernel_mask_is_only_what_the_daemon_uses(root: Path, recorder: Recorder) -> None:
    before = inotify_fds()
    w = DepositWatcher(root, recorder.on_event, recorder.on_overflow)
    w.start()
    try:
        (fd,) = inotify_fds() - before
        masks = kernel_masks(fd)
    finally:
        w.stop()
    assert len(masks) == count_folders(root) == w.folder_count == 4
    wanted = IN_CREATE | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_ATTRIB
    for mask in masks:
        assert mask & (IN_OPEN | IN_ACCESS | IN_CLOSE_NOWRITE | IN_MODIFY) == 0
        assert mask & wanted == wanted
    # fdinfo shows no IN_DONT_FOLLOW/IN_ONLYDIR: they act at inotify_add_watch() time only


def test_real_overflow_calls_on_overflow_after_the_lost_folders_are_watched(
    root: Path, recorder: Recorder, watcher: DepositWatcher
) -> None:
    """A folder whose IN_CREATE was lost is watched by the rebuild, and on_overflow comes
    only after that: a file written from inside on_overflow itself gets its event."""
    limit = max_queued_events()
    lost = root / "newco" / "log"
    written_in_callback = lost / "from-on-overflow.json"
    recorder.after_overflow = lambda: written_in_callback.write_text("{}")
    recorder.stall_on = root / "stall.json"
    recorder.stall_on.write_text("{}")
    assert recorder.stalled.wait(WAIT)
    flood(root / "flood", limit + 100)
    lost.mkdir(parents=True)  # its IN_CREATE is dropped: the queue is full
    (lost / "early.json").write_text("{}")
    recorder.release.set()

    assert recorder.wait_for(lambda r: r.overflows >= 1, timeout=20)
    assert recorder.wait_for(lambda r: EventKind.CLOSED in r.kinds_for(written_in_callback))
    assert watcher.overflows == 1
    assert watcher.rebuilds == recorder.overflows == 1
    assert watcher.watch_count() == count_folders(root)
    assert watcher.is_alive()


def test_exception_in_on_overflow_does_not_kill_the_rebuild_thread(
    root: Path, recorder: Recorder, watcher: DepositWatcher
) -> None:
    limit = max_queued_events()

    def fail() -> None:
        raise RuntimeError("boom")

    recorder.after_overflow = fail
    recorder.stall_on = root / "stall.json"
    recorder.stall_on.write_text("{}")
    assert recorder.stalled.wait(WAIT)
    flood(root / "flood", limit + 100)
    recorder.release.set()
    assert recorder.wait_for(lambda r: r.overflows == 1, timeout=20)
    after = root / "acme" / "after.json"
    after.write_text("{}")
    assert recorder.wait_for(lambda r: EventKind.CLOSED in r.kinds_for(after))
    assert watcher.is_alive()


def test_is_alive_false_before_start_and_after_stop(root: Path, recorder: Recorder) -> None:
    w = DepositWatcher(root, recorder.on_event, recorder.on_overflow)
    assert not w.is_alive()
    assert w.watch_count() is None
    w.start()
    assert w.is_alive()
    w.stop()
    assert not w.is_alive()
    w.stop()  # idempotent


def test_stop_ends_every_thread(root: Path, recorder: Recorder) -> None:
    before = set(threading.enumerate())
    w = DepositWatcher(root, recorder.on_event, recorder.on_overflow)
    w.start()
    assert len(set(threading.enumerate()) - before) == 2  # inotify reader, rebuild
    w.stop()
    assert set(threading.enumerate()) - before == set()


def test_deleted_root_makes_is_alive_false(
    root: Path, recorder: Recorder, watcher: DepositWatcher
) -> None:
    for folder in (root / "acme" / "log", root / "acme", root / "flood", root):
        folder.rmdir()
    assert poll(lambda: not watcher.is_alive())


def test_missing_root_raises_and_leaves_no_thread(tmp_path: Path, recorder: Recorder) -> None:
    before = set(threading.enumerate())
    w = DepositWatcher(tmp_path / "absent", recorder.on_event, recorder.on_overflow)
    with pytest.raises(FileNotFoundError):
        w.start()
    assert not w.is_alive()
    assert set(threading.enumerate()) - before == set()


# --------------------------------------------------------------------------- in a process


class Probe:
    """tests/watch_probe.py: a DepositWatcher in its own process, so that it can be stopped
    with SIGSTOP while the test makes the kernel queue overflow."""

    def __init__(self, root: Path, prefix: list[str] | None = None) -> None:
        self.root = root
        self.lines: list[dict[str, Any]] = []
        self.log: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self.process = subprocess.Popen(
            [*(prefix or []), sys.executable, str(PROBE), str(root)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.lines)),
            threading.Thread(target=self._read, args=(self.process.stderr, self.log)),
        ]
        for thread in self._readers:
            thread.start()

    def _read(self, stream: Any, into: list[dict[str, Any]]) -> None:
        for line in stream:
            try:
                item = json.loads(line)
            except ValueError:
                item = {"raw": line}
            with self._cond:
                into.append(item)
                self._cond.notify_all()

    def wait_for(
        self,
        predicate: Callable[[dict[str, Any]], bool],
        timeout: float,
        what: str,
        *,
        log: bool = False,
    ) -> dict[str, Any]:
        """The first line (seen or to come) that matches, on stdout or (`log`) on stderr;
        fails after `timeout`."""
        found: list[dict[str, Any]] = []
        lines = self.log if log else self.lines

        def match() -> bool:
            found[:] = [line for line in lines if predicate(line)][:1]
            return bool(found) or self.process.poll() is not None

        with self._cond:
            self._cond.wait_for(match, timeout)
        if not found:
            pytest.fail(f"no {what} within {timeout} s; stderr: {self.log[-5:]}")
        return found[0]

    def closed(self, path: Path, timeout: float = WAIT) -> dict[str, Any]:
        relative = str(path.relative_to(self.root))
        return self.wait_for(
            lambda line: line.get("event") == "closed" and line.get("path") == relative,
            timeout,
            f"closed event for {relative}",
        )

    def logged(self, event: str, timeout: float = WAIT) -> dict[str, Any]:
        return self.wait_for(lambda line: line.get("event") == event, timeout, event, log=True)

    def stop(self) -> None:
        """SIGSTOP, and wait until every thread is stopped: the signal is asynchronous, and a
        reader still running would drain the queue that the test means to overflow."""
        self.process.send_signal(signal.SIGSTOP)
        tasks = Path(f"/proc/{self.process.pid}/task")
        assert poll(lambda: all(_state(task) == "T" for task in tasks.iterdir()))

    def overflow_calls(self) -> list[dict[str, Any]]:
        with self._cond:
            return [line for line in self.lines if "overflow" in line]

    def events_lost_lines(self) -> list[dict[str, Any]]:
        with self._cond:
            return [line for line in self.log if line.get("event") == "inotify_events_lost"]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
        self.process.wait(WAIT)
        for thread in self._readers:
            thread.join(WAIT)


def _state(task: Path) -> str:
    try:
        return (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "T"  # a thread that ended is no longer running either


@pytest.fixture
def probe(root: Path) -> Iterator[Callable[..., Probe]]:
    probes: list[Probe] = []

    def start(at: Path = root, prefix: list[str] | None = None) -> Probe:
        p = Probe(at, prefix)
        probes.append(p)
        p.wait_for(lambda line: bool(line.get("ready")), 60, "ready")
        return p

    yield start
    for p in probes:
        p.close()


def overflow_while_stopped(p: Probe, during: Callable[[], object] = lambda: None) -> None:
    """SIGSTOP the probe, queue more events than the kernel keeps, run `during` (whose
    events are lost), SIGCONT."""
    limit = max_queued_events()
    p.stop()
    try:
        flood(p.root / "flood", limit + 1000)
        during()
    finally:
        p.process.send_signal(signal.SIGCONT)


def test_real_overflow_in_a_stopped_process_is_detected(
    root: Path, probe: Callable[..., Probe]
) -> None:
    """Fails if a watchdog upgrade stops passing IN_Q_OVERFLOW on to on_queue_overflow."""
    p = probe()
    lost = root / "acme" / "log"
    overflow_while_stopped(p, lambda: (lost / "lost.json").write_text("{}"))

    call = p.wait_for(lambda line: "overflow" in line, 30, "on_overflow")
    assert call["overflows"] == 1
    assert call["rebuilds"] == 1
    after = root / "acme" / "after.json"
    after.write_text("{}")
    p.closed(after)
    p.logged("inotify_watches_checked")  # logged after inotify_events_lost
    assert [line["overflows"] for line in p.events_lost_lines()] == [1]


def test_overflow_with_more_folders_than_the_queue_settles(
    root: Path, probe: Callable[..., Probe]
) -> None:
    """Issue 11 item 6: watchdog's own rebuild removed and re-added every watch, and with more
    folders than max_queued_events its IN_IGNORED flood overflowed the queue again, for ever."""
    limit = max_queued_events()
    sites = root / "sites"
    sites.mkdir()
    for i in range(limit + 1600):
        os.mkdir(sites / f"s{i:06d}")
    p = probe()
    late = [sites / f"late{i}" for i in range(20)]

    def make_late() -> None:
        for folder in late:
            folder.mkdir()

    overflow_while_stopped(p, make_late)

    p.wait_for(lambda line: "overflow" in line, 30, "on_overflow")
    for folder in late:  # their IN_CREATE was lost: the rebuild watched them
        (folder / "STATUS.json").write_text("{}")
    for folder in late:
        p.closed(folder / "STATUS.json")
    # The kernel queue is first in, first out: an overflow queued before a sentinel's event
    # is counted before that event is printed. Two rounds, so a loop cannot hide between.
    for name in ("sentinel-1.json", "sentinel-2.json"):
        (root / name).write_text("{}")
        line = p.closed(root / name)
        assert line["overflows"] == 1
        assert line["rebuilds"] == 1
    assert len(p.overflow_calls()) == 1
    p.logged("inotify_watches_checked")
    assert len(p.events_lost_lines()) == 1


# --------------------------------------------------------------------------- limits


def test_count_folders_counts_root_and_skips_symlinks(tmp_path: Path) -> None:
    (tmp_path / "a" / "log").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "file.json").write_text("{}")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    assert count_folders(tmp_path) == 4
    assert count_folders(tmp_path / "absent") == 0


def write_limits(folder: Path, watches: int, queued: int) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "max_user_watches").write_text(f"{watches}\n")
    (folder / "max_queued_events").write_text(f"{queued}\n")
    return folder


def test_limits_too_low_give_both_warnings(tmp_path: Path) -> None:
    proc = write_limits(tmp_path / "p", watches=8192, queued=16384)
    warnings = check_inotify_limits(60_001, proc_dir=proc)
    assert len(warnings) == 2
    assert "max_user_watches=8192" in warnings[0]
    assert "sysctl -w fs.inotify.max_user_watches=" in warnings[0]
    assert "max_queued_events=16384" in warnings[1]


def test_limits_ample_give_no_warning(tmp_path: Path) -> None:
    proc = write_limits(tmp_path / "p", watches=524_288, queued=16384)
    assert check_inotify_limits(1000, proc_dir=proc) == []


def test_limits_leave_headroom_for_new_folders(tmp_path: Path) -> None:
    proc = write_limits(tmp_path / "p", watches=10_000, queued=1_000_000)
    assert check_inotify_limits(9_500, proc_dir=proc) != []


def test_limits_unreadable_give_no_warning(tmp_path: Path) -> None:
    assert check_inotify_limits(10**6, proc_dir=tmp_path / "absent") == []


def test_limits_read_from_real_proc() -> None:
    assert check_inotify_limits(1) == []


# --------------------------------------------------------------------------- work queue


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def wq(clock: FakeClock) -> WorkQueue:
    return WorkQueue(maxsize=10, clock=clock)


def drain(q: WorkQueue) -> list[Path]:
    out = []
    while (p := q.get(timeout=0)) is not None:
        out.append(p)
        q.done(p)
    return out


def test_queue_dedupes_by_path(wq: WorkQueue) -> None:
    a = Path("/r/a.json")
    for _ in range(3):
        assert wq.put(a)
    assert wq.in_progress_or_queued() == 1
    assert drain(wq) == [a]


def test_queue_hands_out_by_not_before(wq: WorkQueue, clock: FakeClock) -> None:
    a, b, c = Path("/a"), Path("/b"), Path("/c")
    wq.put(a, delay=5)
    wq.put(b, delay=1)
    wq.put(c)
    assert drain(wq) == [c]
    clock.now += 1
    assert drain(wq) == [b]
    clock.now += 4
    assert drain(wq) == [a]


def test_queue_is_fifo_among_items_due(wq: WorkQueue) -> None:
    paths = [Path(f"/p{i}") for i in range(5)]
    for p in paths:
        wq.put(p)
    assert drain(wq) == paths


def test_a_group_takes_only_paths_due_up_to_its_limit(wq: WorkQueue, clock: FakeClock) -> None:
    """`get_many` (a worker's group in a burst): due paths in order, none not yet due, none
    in another worker's hand, and each in hand until its own `done`."""
    due = [Path(f"/due{i}") for i in range(4)]
    for p in due:
        wq.put(p)
    wq.put(Path("/later"), delay=5)
    assert wq.waiting() == 5
    assert wq.get_many(3, timeout=0) == due[:3]
    assert wq.get_many(3, timeout=0) == due[3:]  # /later is not due: not taken, not waited for
    assert wq.get_many(3, timeout=0) == []
    wq.put(due[0])
    assert wq.get_many(3, timeout=0) == []  # still in hand
    wq.done(due[0])
    clock.now += 5
    assert wq.get_many(3, timeout=0) == [due[0], Path("/later")]  # by not-before
    assert wq.in_progress_or_queued() == 5


def test_closed_overtakes_settling_created(wq: WorkQueue) -> None:
    p = Path("/r/STATUS.json")
    wq.put(p, delay=2)
    assert wq.get(timeout=0) is None
    wq.put(p, delay=0)
    assert wq.get(timeout=0) == p


def test_later_created_does_not_postpone(wq: WorkQueue) -> None:
    p = Path("/r/STATUS.json")
    wq.put(p)
    wq.put(p, delay=2)
    assert wq.get(timeout=0) == p


def test_full_queue_drops_and_requests_rescan(clock: FakeClock) -> None:
    q = WorkQueue(maxsize=2, clock=clock)
    assert q.put(Path("/a"))
    assert q.put(Path("/b"))
    assert not q.needs_rescan.is_set()
    assert not q.put(Path("/c"))
    assert q.needs_rescan.is_set()
    assert q.put(Path("/a"))  # already queued: no room needed
    assert sorted(drain(q)) == [Path("/a"), Path("/b")]


def test_path_in_progress_is_requeued_only_if_put_again(wq: WorkQueue) -> None:
    p = Path("/r/a.json")
    wq.put(p)
    assert wq.get(timeout=0) == p
    assert wq.put(p)
    assert wq.get(timeout=0) is None  # never to a second worker while in hand
    assert wq.in_progress_or_queued() == 1
    wq.done(p)
    assert wq.get(timeout=0) == p
    wq.done(p)
    assert wq.get(timeout=0) is None
    assert wq.in_progress_or_queued() == 0


def test_requeue_after_done_keeps_its_not_before(wq: WorkQueue, clock: FakeClock) -> None:
    p = Path("/r/a.json")
    wq.put(p)
    assert wq.get(timeout=0) == p
    wq.put(p, delay=3)
    wq.put(p, delay=1)
    wq.done(p)
    assert wq.get(timeout=0) is None
    clock.now += 1
    assert wq.get(timeout=0) == p


def test_requeue_while_in_progress_respects_bound(clock: FakeClock) -> None:
    q = WorkQueue(maxsize=1, clock=clock)
    a, b = Path("/a"), Path("/b")
    q.put(a)
    assert q.get(timeout=0) == a
    assert q.put(b)
    assert not q.put(a)
    assert q.needs_rescan.is_set()


def test_pending_under(wq: WorkQueue) -> None:
    site1, site10 = Path("/r/site1"), Path("/r/site10")
    report = site1 / "log" / "STATUS.json"
    assert not wq.pending_under(site1)
    wq.put(report)
    assert wq.pending_under(site1)
    assert not wq.pending_under(site10)
    assert wq.get(timeout=0) == report
    assert wq.pending_under(site1)  # in progress still counts
    wq.done(report)
    assert not wq.pending_under(site1)


def test_wait_idle(wq: WorkQueue) -> None:
    assert wq.wait_idle(0)
    p = Path("/a")
    wq.put(p)
    assert not wq.wait_idle(0.05)

    def work() -> None:
        item = wq.get(timeout=WAIT)
        assert item is not None
        wq.done(item)

    worker = threading.Thread(target=work)
    worker.start()
    assert wq.wait_idle(WAIT)
    worker.join(WAIT)


def test_close_unblocks_getters() -> None:
    q = WorkQueue()
    results: list[Path | None] = []
    getters = [threading.Thread(target=lambda: results.append(q.get(None))) for _ in range(3)]
    for t in getters:
        t.start()
    q.close()
    for t in getters:
        t.join(WAIT)
        assert not t.is_alive()
    assert results == [None, None, None]
    assert not q.put(Path("/a"))
    assert q.get(timeout=0) is None


def test_get_times_out(wq: WorkQueue) -> None:
    wq.put(Path("/later"), delay=60)
    started = time.monotonic()
    assert wq.get(timeout=0.1) is None
    assert 0.09 <= time.monotonic() - started < WAIT


def test_blocked_get_wakes_on_put() -> None:
    q = WorkQueue()
    got: list[Path | None] = []
    getter = threading.Thread(target=lambda: got.append(q.get(WAIT)))
    getter.start()
    q.put(Path("/a"))
    getter.join(WAIT)
    assert got == [Path("/a")]


def test_get_waits_for_real_not_before() -> None:
    q = WorkQueue()
    started = time.monotonic()
    q.put(Path("/a"), delay=0.2)
    assert q.get(WAIT) == Path("/a")
    assert time.monotonic() - started >= 0.2


def test_heap_stays_bounded_under_repeated_lowering(wq: WorkQueue) -> None:
    p = Path("/a")
    for i in range(10_000):
        wq.put(p, delay=10_000 - i)
    assert len(wq._heap) <= 2 * len(wq._queued) + 65
    assert wq.in_progress_or_queued() == 1


def test_concurrent_put_and_get_lose_nothing() -> None:
    q = WorkQueue()
    paths = [Path(f"/r/site{i}/STATUS.json") for i in range(3000)]
    processed: set[Path] = set()
    in_hand: set[Path] = set()
    lock = threading.Lock()
    errors: list[str] = []
    stop = threading.Event()

    def produce(seed: int) -> None:
        rng = random.Random(seed)
        for p in rng.sample(paths, len(paths)):
            assert q.put(p, delay=rng.choice([0.0, 0.0, 0.001]))

    def consume() -> None:
        while not stop.is_set():
            p = q.get(timeout=0.01)
            if p is None:
                continue
            with lock:
                if p in in_hand:
                    errors.append(f"{p} handed out twice")
                in_hand.add(p)
            with lock:
                in_hand.discard(p)
                processed.add(p)
            q.done(p)

    consumers = [threading.Thread(target=consume) for _ in range(4)]
    producers = [threading.Thread(target=produce, args=(s,)) for s in range(4)]
    for t in consumers + producers:
        t.start()
    for t in producers:
        t.join(WAIT * 4)
    assert q.wait_idle(WAIT * 4)
    stop.set()
    for t in consumers:
        t.join(WAIT)
    assert errors == []
    assert processed == set(paths)
    assert not q.needs_rescan.is_set()


class WorkQueueMachine(RuleBasedStateMachine):
    """Single-threaded model check: one entry per path, never two holders, min not-before."""

    paths = st.sampled_from([Path(f"/r/{name}") for name in "abcde"])

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.q = WorkQueue(maxsize=3, clock=self.clock)
        self.queued: dict[Path, float] = {}
        self.again: dict[Path, float] = {}
        self.in_hand: set[Path] = set()

    @rule(path=paths, delay=st.sampled_from([0.0, 1.0, 2.5]))
    def put(self, path: Path, delay: float) -> None:
        nb = self.clock.now + delay
        target = self.again if path in self.in_hand else self.queued
        room = len(self.queued) + len(self.again) < 3
        accepted = self.q.put(path, delay)
        if path in target:
            target[path] = min(target[path], nb)
            assert accepted
        else:
            assert accepted == room
            if room:
                target[path] = nb

    @rule()
    def get(self) -> None:
        got = self.q.get(timeout=0)
        due = {p: nb for p, nb in self.queued.items() if nb <= self.clock.now}
        if not due:
            assert got is None
            return
        assert got in due
        assert due[got] == min(due.values())
        del self.queued[got]
        self.in_hand.add(got)

    @precondition(lambda self: bool(self.in_hand))
    @rule(data=st.data())
    def done(self, data: st.DataObject) -> None:
        path = data.draw(st.sampled_from(sorted(self.in_hand)))
        self.q.done(path)
        self.in_hand.discard(path)
        if path in self.again:
            self.queued[path] = self.again.pop(path)

    @rule(step=st.sampled_from([0.5, 1.0, 3.0]))
    def advance(self, step: float) -> None:
        self.clock.now += step

    @invariant()
    def counts_match(self) -> None:
        assert self.q.in_progress_or_queued() == len(self.queued) + len(self.in_hand)


WorkQueueMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40)
TestWorkQueueModel = WorkQueueMachine.TestCase


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder that another user can reach (pytest's tmp_path is under a 0700 folder)."""
    path = Path(tempfile.mkdtemp(prefix="bw-watch-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_unreadable_folder_is_logged_and_counted_not_fatal(
    open_dir: Path, probe: Callable[..., Probe]
) -> None:
    """An agent's chmod 000 folder cannot be watched: one error line, the rest goes on.
    (As root every folder is readable, so the probe then runs as nobody.)"""
    root = open_dir / "deposits"
    (root / "acme" / "log").mkdir(parents=True)
    (root / "locked").mkdir(mode=0o000)
    prefix = None
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        prefix = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}"]
        prefix.append("--clear-groups")
        for folder in (root, root / "acme", root / "acme" / "log"):
            folder.chmod(0o777)
    p = probe(root, prefix)
    ready = p.lines[0]
    assert (ready["folders"], ready["watches"]) == (4, 3)
    assert p.logged("inotify_watch_failed")["folder"] == str(root / "locked")
    report = root / "acme" / "log" / "STATUS.json"
    report.write_text("{}")
    p.closed(report)
    assert sum(line.get("event") == "inotify_watch_failed" for line in p.log) == 1
