"""SPEC §3 and §5: whether a report, or a staged file it names, may be judged yet.

There is one rule for every "not yet", so that a writer that pauses, a file the server may not
read yet and a staged file still in flight are all waited out the same way and never judged
early (a wrong rejection turns into a false MISSING at the deadline):
- a report whose bytes are not yet a complete JSON object is judged only once its writer has
  closed it (or renamed it into place); where no writer could be observed (the file was already
  there, or open, when its folder came under watch), once it has stayed unchanged for
  `report_settle_seconds`;
- a report the server may not read waits the same way, since its mode may still change (rsync
  --inplace makes it readable only after closing it), and is then rejected with what to fix;
- a staged file that is absent, shorter than reported or unreadable is judged only once its
  site folder has been quiet for `report_settle_seconds` (a transfer may still be writing it).

Everything here is pure: the daemon passes what it observed (inotify events, its own clock),
and gets back either None (judge now) or a `Wait`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

CLOSE_GRACE = 1.0
"""After a close, a report that is still not JSON gets this long before it is rejected: some
agents write a report in two opens (`echo … > f; echo … >> f`) and close it in between."""
UNREADABLE_POLL = 2.0
"""A report the server may not read is looked at again this often while it waits: a chmod
arrives as an event too, but a poll costs nothing and needs no event."""


class Content(enum.Enum):
    COMPLETE = "complete"  # a whole JSON object: nothing a writer adds can still make it valid
    INCOMPLETE = "incomplete"  # empty, cut short, or not JSON (yet)
    UNREADABLE = "unreadable"  # the server may not open it (mode, owner)


@dataclass(frozen=True)
class Writer:
    """What inotify said about the file's writer since the daemon has been watching it."""

    open: bool = False  # created under watch, and no close or rename into place seen since
    closed_for: float | None = None  # seconds since its last close or rename; None: never seen

    @classmethod
    def unobserved(cls) -> Writer:
        """No event seen: the file was there before the watch, or its events were lost."""
        return cls()


@dataclass(frozen=True)
class Wait:
    """Not yet: look again after `recheck_in` seconds, or only on an event when it is None."""

    recheck_in: float | None
    why: str


def report_wait(
    content: Content, writer: Writer, unchanged_for: float, settle: float
) -> Wait | None:
    """None when the report may be judged now, else how to wait for it (SPEC §3)."""
    if content is Content.COMPLETE:
        return None
    if writer.open:
        return Wait(None, "its writer still holds it open")
    if content is Content.UNREADABLE:
        if unchanged_for >= settle:
            return None
        return Wait(min(UNREADABLE_POLL, settle - unchanged_for), "the server may not read it yet")
    if writer.closed_for is not None:
        quiet = min(writer.closed_for, unchanged_for)
        if quiet >= CLOSE_GRACE:
            return None
        return Wait(CLOSE_GRACE - quiet, "it is not valid JSON; its writer has just closed it")
    if unchanged_for >= settle:
        return None
    return Wait(settle - unchanged_for, "it is not valid JSON and may still be being written")


class StagedState(enum.Enum):
    PRESENT = "present"  # as long as the report says, or longer: judge it now
    ABSENT = "absent"
    SHORT = "short"
    UNREADABLE = "unreadable"


def staged_wait(states: list[StagedState], quiet_for: float, settle: float) -> Wait | None:
    """None when every staged file may be judged now; else wait for the site folder to be quiet.

    An absent, short or unreadable staged file is what a transfer still in flight looks like
    (one `rsync` of a folder sends `STATUS.json` before `database/…`); SPEC §5 step 3.
    """
    if all(state is StagedState.PRESENT for state in states):
        return None
    if quiet_for >= settle:
        return None
    return Wait(settle - quiet_for, "a staged file it names is still arriving")
