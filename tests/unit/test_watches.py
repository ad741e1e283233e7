"""The watch bookkeeping and the rebuild pace, without inotify (pure)."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from backupwatch.watches import RebuildPacer, WatchTable


def test_record_and_look_up_by_wd_key_and_path() -> None:
    table = WatchTable()
    assert table.record(1, b"/r", 100) == []
    assert table.record(2, b"/r/a", 101) == []
    assert len(table) == 2
    assert table.path_of(2) == b"/r/a"
    folder = table.at_key(101)
    assert folder is not None
    assert folder.wd == 2
    assert table.path_of(3) is None


def test_a_renamed_folder_keeps_its_wd_under_the_new_path() -> None:
    table = WatchTable()
    table.record(2, b"/r/a", 101)
    assert table.record(2, b"/r/b", 101) == []
    assert table.path_of(2) == b"/r/b"
    assert len(table) == 1


def test_a_stale_entry_for_the_same_inode_is_displaced() -> None:
    """The inode was freed and reused while its IN_IGNORED was lost: the kernel gave the
    folder a new wd, and the old one goes back to the caller for removal."""
    table = WatchTable()
    table.record(2, b"/r/a", 101)
    assert table.record(7, b"/r/a", 101) == [2]
    assert table.path_of(2) is None
    assert table.path_of(7) == b"/r/a"
    assert len(table) == 1


def test_two_folders_may_share_a_path_until_the_stale_one_is_pruned() -> None:
    table = WatchTable()
    table.record(2, b"/r/a", 101)
    assert table.record(5, b"/r/a", 555) == []
    assert len(table) == 2
    generation = table.begin_walk()
    table.record(5, b"/r/a", 555)
    assert [f.wd for f in table.unseen(generation)] == [2]


def test_forget_removes_every_index() -> None:
    table = WatchTable()
    table.record(2, b"/r/a", 101)
    forgotten = table.forget(2)
    assert forgotten is not None
    assert forgotten.path == b"/r/a"
    assert table.forget(2) is None
    assert table.at_key(101) is None
    assert len(table) == 0


def test_subtree_is_the_folder_and_what_is_below_not_its_namesakes() -> None:
    table = WatchTable()
    for wd, path in enumerate([b"/r", b"/r/a", b"/r/a/log", b"/r/ab", b"/r/b/a"], start=1):
        table.record(wd, path, wd)
    assert sorted(f.path for f in table.subtree(b"/r/a")) == [b"/r/a", b"/r/a/log"]


def test_unseen_are_the_folders_a_walk_did_not_record_again() -> None:
    table = WatchTable()
    table.record(1, b"/r", 1)
    table.record(2, b"/r/a", 2)
    generation = table.begin_walk()
    table.record(1, b"/r", 1)
    table.record(3, b"/r/new", 3)
    assert [f.wd for f in table.unseen(generation)] == [2]


def test_pacer_handles_an_isolated_overflow_at_once() -> None:
    pacer = RebuildPacer(base=0.5, cap=30)
    assert pacer.plan(100.0) == 100.0
    pacer.finished(101.0)
    assert pacer.plan(200.0) == 200.0  # quiet for longer than cap: at once again


def test_pacer_doubles_the_gap_in_a_storm_up_to_the_cap() -> None:
    pacer = RebuildPacer(base=0.5, cap=30)
    now = 0.0
    starts = []
    for _ in range(10):
        start = pacer.plan(now)
        starts.append(start)
        now = start + 0.1  # the rebuild takes 0.1 s; the next overflow comes during it
        pacer.finished(now)
    gaps = [round(b - (a + 0.1), 6) for a, b in itertools.pairwise(starts)]
    assert gaps == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]


@given(
    st.lists(
        st.tuples(st.floats(0, 100), st.floats(0, 5)),
        min_size=1,
        max_size=50,
    )
)
def test_pacer_never_starts_two_rebuilds_closer_than_the_gap_in_a_storm(
    steps: list[tuple[float, float]],
) -> None:
    """However overflows arrive, a rebuild never starts before one requested, and within a
    storm (less than `cap` apart) never less than `base` after the previous one ended."""
    pacer = RebuildPacer(base=0.5, cap=30)
    now = 0.0
    last_end: float | None = None
    for wait, duration in steps:
        now += wait
        start = pacer.plan(now)
        assert start >= now
        if last_end is not None and now - last_end < 30:
            assert start - last_end >= 0.5 - 1e-9
        now = start + duration
        pacer.finished(now)
        last_end = now
