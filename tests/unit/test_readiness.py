"""The one "not yet" rule (SPEC §3, §5 step 3), as pure functions."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from backupwatch.readiness import (
    CLOSE_GRACE,
    Content,
    StagedState,
    Wait,
    Writer,
    report_wait,
    staged_wait,
)

SETTLE = 120.0
seconds = st.floats(min_value=0, max_value=10_000, allow_nan=False)
writers = st.builds(Writer, open=st.booleans(), closed_for=st.none() | seconds)


@given(writers, seconds)
def test_a_whole_json_document_is_judged_at_once(writer: Writer, unchanged: float) -> None:
    assert report_wait(Content.COMPLETE, writer, unchanged, SETTLE) is None


@given(st.sampled_from([Content.INCOMPLETE, Content.UNREADABLE]), seconds)
def test_a_writer_that_holds_the_file_open_is_waited_for_however_long_it_pauses(
    content: Content, unchanged: float
) -> None:
    """Issue 6 item 1: a paused writer (sleep 7, a 2 KB/s sftp) is never judged before it
    closes; only an event (its close) ends the wait."""
    wait = report_wait(content, Writer(open=True), unchanged, SETTLE)
    assert wait == Wait(None, "its writer still holds it open")


def test_not_json_after_a_close_is_rejected_after_a_short_grace() -> None:
    closed_now = Writer(closed_for=0.0)
    wait = report_wait(Content.INCOMPLETE, closed_now, 0.0, SETTLE)
    assert wait is not None
    assert wait.recheck_in == CLOSE_GRACE
    assert (
        report_wait(Content.INCOMPLETE, Writer(closed_for=CLOSE_GRACE), CLOSE_GRACE, SETTLE) is None
    )


def test_a_change_after_the_close_restarts_the_grace() -> None:
    """`echo … > f; echo … >> f`: the second write after the first close."""
    wait = report_wait(Content.INCOMPLETE, Writer(closed_for=5.0), 0.2, SETTLE)
    assert wait is not None
    assert wait.recheck_in == pytest.approx(CLOSE_GRACE - 0.2)


@given(seconds)
def test_without_any_observed_writer_not_json_waits_for_the_settle_time(unchanged: float) -> None:
    """A file that was already there (or already open) when its folder came under watch."""
    wait = report_wait(Content.INCOMPLETE, Writer.unobserved(), unchanged, SETTLE)
    if unchanged >= SETTLE:
        assert wait is None
    else:
        assert wait is not None
        assert wait.recheck_in == pytest.approx(SETTLE - unchanged)


@given(st.none() | seconds, seconds)
def test_an_unreadable_report_is_polled_until_the_settle_time_then_judged(
    closed_for: float | None, unchanged: float
) -> None:
    """Issue 6 item 2: rsync --inplace makes the file readable just after closing it."""
    wait = report_wait(Content.UNREADABLE, Writer(closed_for=closed_for), unchanged, SETTLE)
    if unchanged >= SETTLE:
        assert wait is None
    else:
        assert wait is not None
        assert wait.recheck_in is not None
        assert 0 < wait.recheck_in <= min(2.0, SETTLE - unchanged) + 1e-9


@given(writers, seconds, st.sampled_from(list(Content)))
def test_every_wait_ends_by_an_event_or_a_positive_recheck(
    writer: Writer, unchanged: float, content: Content
) -> None:
    wait = report_wait(content, writer, unchanged, SETTLE)
    if wait is not None:
        assert wait.recheck_in is None or wait.recheck_in > 0
        assert wait.why


def test_present_staged_files_never_wait() -> None:
    assert staged_wait([StagedState.PRESENT, StagedState.PRESENT], 0.0, SETTLE) is None
    assert staged_wait([], 0.0, SETTLE) is None


@pytest.mark.parametrize("state", [StagedState.ABSENT, StagedState.SHORT, StagedState.UNREADABLE])
@given(quiet=seconds)
def test_a_staged_file_still_arriving_waits_until_the_folder_is_quiet(
    state: StagedState, quiet: float
) -> None:
    """Issue 6 item 3: one rsync of a folder sends STATUS.json before database/…"""
    wait = staged_wait([StagedState.PRESENT, state], quiet, SETTLE)
    if quiet >= SETTLE:
        assert wait is None
    else:
        assert wait is not None
        assert wait.recheck_in == pytest.approx(SETTLE - quiet)
