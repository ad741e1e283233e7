"""Python's cyclic garbage collector, held off while the daemon builds its big structures.

Building the registry of 100,000 jobs allocates a few million objects; the collector runs a
full pass each time the heap grows by a quarter, so it scanned the same long-lived objects again
and again: half of the registry's build time. None of what the start-up and a reload build
forms reference cycles (tuples, slotted records, dicts), so reference counting frees it all and
the collector has nothing to find there. After READY, the objects alive are moved out of the
collector's sight (`gc.freeze`): they live as long as the daemon, and each later full pass would
otherwise walk them again (a pause of a few hundred ms on a worker or the inotify thread).
"""

from __future__ import annotations

import ctypes
import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic collection inside; the collector is on again afterwards if it was on."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def settle() -> None:
    """Once, after the start-up: collect what is garbage, freeze what is left, and give the
    memory the start freed (the sync's rows, the walk's listings) back to the system."""
    gc.collect()
    gc.freeze()
    release_free_memory()


def release_free_memory() -> None:
    """glibc keeps freed memory for the process's next allocations (tens of MiB after the
    start at 100,000 jobs); `malloc_trim` returns what it can. Elsewhere: nothing to do."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)
