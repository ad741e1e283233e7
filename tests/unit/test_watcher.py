"""Tests of the inotify adapter on real directories (inotify needs a real filesystem) and of
the WorkQueue, with an injected clock wherever timing matters."""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from watchdog.events import (
    DirCreatedEvent,
    DirModifiedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileMovedEvent,
)

from backupwatch.watcher import (
    OVERFLOW_LOGGERS,
    DepositWatcher,
    EventKind,
    WorkQueue,
    check_inotify_limits,
    classify,
    count_folders,
)

WAIT = 5.0  # seconds: generous deadline for anything inotify delivers in milliseconds

IN_ACCESS, IN_MODIFY, IN_ATTRIB = 0x1, 0x2, 0x4
IN_CLOSE_WRITE, IN_CLOSE_NOWRITE, IN_OPEN = 0x8, 0x10, 0x20
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE_SELF = 0x40, 0x80, 0x100, 0x400

# --------------------------------------------------------------------------- helpers


class Recorder:
    """Collects (kind, path) from the watcher thread; tests wait on it with a deadline."""

    def __init__(self) -> None:
        self.events: list[tuple[EventKind, Path]] = []
        self.overflows = 0
        self._cond = threading.Condition()
        self.fail_on: Callable[[EventKind, Path], bool] = lambda _k, _p: False

    def on_event(self, kind: EventKind, path: Path) -> None:
        with self._cond:
            self.events.append((kind, path))
            self._cond.notify_all()
        if self.fail_on(kind, path):
            raise RuntimeError(f"boom on {path}")

    def on_overflow(self) -> None:
        with self._cond:
            self.overflows += 1
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[Recorder], bool], timeout: float = WAIT) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: predicate(self), timeout)

    def kinds_for(self, path: Path) -> set[EventKind]:
        with self._cond:
            return {kind for kind, p in self.events if p == path}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "deposits"
    (folder / "acme" / "log").mkdir(parents=True)
    return folder


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def watcher(root: Path, recorder: Recorder) -> Iterator[DepositWatcher]:
    w = DepositWatcher(root, recorder.on_event, recorder.on_overflow)
    w.start()
    yield w
    w.stop()


def inotify_fd(w: DepositWatcher) -> int:
    """The observer's inotify file descriptor (watchdog internals, 7.1.0)."""
    fd = w._observer._inotify_fd._inotify_fd  # type: ignore[union-attr]
    assert isinstance(fd, int)
    return fd


def kernel_masks(fd: int) -> list[int]:
    """The masks the kernel actually holds, one per watch, from /proc/self/fdinfo."""
    text = Path(f"/proc/self/fdinfo/{fd}").read_text()
    masks = []
    for line in text.splitlines():
        if line.startswith("inotify wd:"):
            field = next(f for f in line.split() if f.startswith("mask:"))
            masks.append(int(field.removeprefix("mask:"), 16))
    return masks


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
def test_file_moved_in_from_outside_the_root_gives_created(
    root: Path, tmp_path: Path, recorder: Recorder
) -> None:
    outside = tmp_path / "elsewhere.json"
    outside.write_text("{}")
    final = root / "acme" / "STATUS.json"
    outside.rename(final)
    assert recorder.wait_for(lambda r: EventKind.CREATED in r.kinds_for(final))


@pytest.mark.usefixtures("watcher")
def test_new_folder_is_reported_and_watched_without_restart(root: Path, recorder: Recorder) -> None:
    site = root / "newco" / "log"
    site.mkdir(parents=True)
    first = site / "STATUS.json"
    first.write_text("{}")  # at once: usually only a synthetic "created" comes for it
    assert recorder.wait_for(lambda r: EventKind.DIR_CREATED in r.kinds_for(root / "newco"))
    assert recorder.wait_for(lambda r: EventKind.DIR_CREATED in r.kinds_for(site))
    assert recorder.wait_for(
        lambda r: bool(r.kinds_for(first) & {EventKind.CREATED, EventKind.CLOSED})
    )
    later = site / "LATER.json"
    later.write_text("{}")
    assert recorder.wait_for(lambda r: EventKind.CLOSED in r.kinds_for(later))


def test_exception_in_on_event_does_not_kill_the_observer(
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


def test_kernel_mask_excludes_open_access_and_nowrite_close(
    root: Path, watcher: DepositWatcher
) -> None:
    masks = kernel_masks(inotify_fd(watcher))
    assert len(masks) == count_folders(root) == watcher.watch_count() == 3
    for mask in masks:
        assert mask & (IN_OPEN | IN_ACCESS | IN_CLOSE_NOWRITE | IN_MODIFY | IN_ATTRIB) == 0
        wanted = IN_CREATE | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE_SELF
        assert mask & wanted == wanted


@pytest.mark.usefixtures("watcher")
def test_overflow_logged_by_watchdog_calls_on_overflow(recorder: Recorder) -> None:
    logging.getLogger("watchdog.observers.inotify_c").warning(
        "Inotify queue overflowed; filesystem events were lost"
    )
    assert recorder.wait_for(lambda r: r.overflows >= 1)


@pytest.mark.usefixtures("watcher")
def test_lost_watches_logged_by_watchdog_call_on_overflow(recorder: Recorder) -> None:
    logging.getLogger("watchdog.observers.inotify").error(
        "Unable to rebuild recursive inotify watches below %r", b"/x"
    )
    assert recorder.wait_for(lambda r: r.overflows >= 1)


@pytest.mark.usefixtures("watcher")
def test_other_watchdog_messages_do_not_call_on_overflow(recorder: Recorder) -> None:
    logging.getLogger("watchdog.observers.inotify_c").warning("something else")
    logging.getLogger("watchdog.observers.inotify").debug("queue overflow, but only debug")
    assert recorder.overflows == 0


def test_overflow_hook_works_when_watchdog_logging_is_silenced(
    root: Path, recorder: Recorder
) -> None:
    parent = logging.getLogger("watchdog")
    saved = parent.level
    parent.setLevel(logging.CRITICAL)
    w = DepositWatcher(root, recorder.on_event, recorder.on_overflow)
    try:
        w.start()
        logging.getLogger(OVERFLOW_LOGGERS[0]).warning("Inotify queue overflowed; lost")
        assert recorder.overflows == 1
    finally:
        w.stop()
        parent.setLevel(saved)
    assert logging.getLogger(OVERFLOW_LOGGERS[0]).level == logging.NOTSET


def test_hook_is_removed_on_stop(root: Path, recorder: Recorder) -> None:
    w = DepositWatcher(root, recorder.on_event, recorder.on_overflow)
    w.start()
    w.stop()
    logging.getLogger(OVERFLOW_LOGGERS[0]).warning("Inotify queue overflowed")
    assert recorder.overflows == 0
    assert not w.is_alive()
    w.stop()  # idempotent


def test_real_kernel_queue_overflow_reaches_on_overflow(
    root: Path, recorder: Recorder, watcher: DepositWatcher
) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 100_000:
        pytest.skip("max_queued_events too large to overflow quickly")
    files = [root / "a.bin", root / "b.bin"]
    for f in files:
        f.write_bytes(b"")
    reader = watcher._observer._inotify_fd  # type: ignore[union-attr]
    with reader._lock:  # stall watchdog's reader so the kernel queue fills up
        # one IN_CLOSE_WRITE per open/close; alternating names so the kernel cannot coalesce;
        # the reader may already hold one buffer (~2,500 events) read before it blocked
        for i in range(limit + 8192):
            os.close(os.open(files[i % 2], os.O_WRONLY))
    # once at the overflow, once when watchdog has re-added its watches
    assert recorder.wait_for(lambda r: r.overflows >= 2, timeout=20)
    assert watcher.is_alive()
    after = root / "acme" / "after.json"
    after.write_text("{}")
    assert recorder.wait_for(lambda r: EventKind.CLOSED in r.kinds_for(after), timeout=20)


def test_second_overflow_call_waits_for_watchdog_rebuild(
    root: Path, recorder: Recorder, watcher: DepositWatcher
) -> None:
    emitter = next(iter(watcher._observer.emitters))  # type: ignore[union-attr]
    group_lock = emitter._inotify._lock  # type: ignore[attr-defined]
    with group_lock:  # as watchdog holds it while it logs this and rebuilds
        logging.getLogger("watchdog.observers.inotify").warning(
            "Inotify queue overflowed; reconciling recursive watches below %r", bytes(root)
        )
        assert not recorder.wait_for(lambda r: r.overflows > 0, timeout=0.2)
    assert recorder.wait_for(lambda r: r.overflows == 1)


def test_is_alive_false_before_start(root: Path, recorder: Recorder) -> None:
    assert not DepositWatcher(root, recorder.on_event, recorder.on_overflow).is_alive()


def test_missing_root_raises_and_leaves_no_hook(tmp_path: Path, recorder: Recorder) -> None:
    threads_before = threading.active_count()
    w = DepositWatcher(tmp_path / "absent", recorder.on_event, recorder.on_overflow)
    with pytest.raises(OSError):  # noqa: PT011 - the errno is the kernel's business
        w.start()
    assert not w.is_alive()
    deadline = time.monotonic() + WAIT
    while threading.active_count() > threads_before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == threads_before  # no leaked inotify reader
    logging.getLogger(OVERFLOW_LOGGERS[0]).warning("Inotify queue overflowed")
    assert recorder.overflows == 0


def test_classify_maps_watchdog_events() -> None:
    assert classify(FileClosedEvent("/r/a.json")) == (EventKind.CLOSED, Path("/r/a.json"))
    assert classify(FileMovedEvent("/r/.a", "/r/a.json")) == (EventKind.MOVED, Path("/r/a.json"))
    assert classify(FileCreatedEvent("/r/a.json")) == (EventKind.CREATED, Path("/r/a.json"))
    assert classify(DirCreatedEvent("/r/site")) == (EventKind.DIR_CREATED, Path("/r/site"))
    assert classify(FileCreatedEvent(b"/r/b.json")) == (EventKind.CREATED, Path("/r/b.json"))
    assert classify(FileDeletedEvent("/r/a.json")) is None
    assert classify(DirModifiedEvent("/r")) is None


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
