"""The inotify watches on the deposit tree, as bookkeeping, and the pace of overflow rebuilds.

Pure: no system calls. The adapter in `watcher.py` asks the kernel and records the answers
here, so the rules (which watch a path has, which watches a rebuild leaves stale, how soon a
rebuild may follow the last one) are tested without inotify.

A folder is known by its inode (`Key`), not only by its path: after an overflow the kernel
may have dropped the events that told of a rename or a deletion, so a path can point at
another folder than the one its watch is on. Asking "is this inode watched?" is what lets a
rebuild add only the watches that are missing instead of removing and re-adding all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

Key = int  # st_dev and st_ino of a watched folder, as one int (`key_of`): smaller than a tuple


def key_of(st_dev: int, st_ino: int) -> Key:
    return (st_dev << 64) | st_ino


@dataclass(slots=True)
class Folder:
    """One watched folder: its watch descriptor, where it is now and the walk that saw it."""

    wd: int
    path: bytes
    key: Key
    seen: int  # generation of the last walk that found it (or that added it)


class WatchTable:
    """Watched folders by watch descriptor and by inode, kept consistent.

    `record` returns the watch descriptors it displaced (a stale entry that held the same
    inode): the caller removes those from the kernel, so that no watch lives on unknown. Two
    entries may share a path for a while (a folder deleted and made again while its
    IN_IGNORED was lost): only the live one gets events, and the next rebuild drops the other.
    """

    def __init__(self) -> None:
        self._by_wd: dict[int, Folder] = {}
        self._by_key: dict[Key, Folder] = {}
        self.generation = 0

    def __len__(self) -> int:
        return len(self._by_wd)

    def get(self, wd: int) -> Folder | None:
        return self._by_wd.get(wd)

    def path_of(self, wd: int) -> bytes | None:
        folder = self._by_wd.get(wd)
        return folder.path if folder is not None else None

    def at_key(self, key: Key) -> Folder | None:
        return self._by_key.get(key)

    def begin_walk(self) -> int:
        """Start a rebuild walk: folders it does not see again are candidates for `unseen`."""
        self.generation += 1
        return self.generation

    def record(self, wd: int, path: bytes, key: Key) -> list[int]:
        """`wd` watches the folder `key`, now at `path`; returns the wds this displaced."""
        displaced: list[int] = []
        other = self._by_key.get(key)
        if other is not None and other.wd != wd:
            self.forget(other.wd)
            displaced.append(other.wd)
        folder = self._by_wd.get(wd)
        if folder is None:
            folder = Folder(wd, path, key, self.generation)
            self._by_wd[wd] = folder
        else:
            self._unindex(folder)
            folder.path, folder.key, folder.seen = path, key, self.generation
        self._by_key[key] = folder
        return displaced

    def forget(self, wd: int) -> Folder | None:
        """Drop a watch the kernel removed (IN_IGNORED) or that we remove."""
        folder = self._by_wd.pop(wd, None)
        if folder is not None:
            self._unindex(folder)
        return folder

    def subtree(self, path: bytes) -> list[Folder]:
        """The folder at `path` and every watched folder below it (a folder moved away)."""
        prefix = path.rstrip(b"/") + b"/"
        return [f for f in self._by_wd.values() if f.path == path or f.path.startswith(prefix)]

    def unseen(self, generation: int) -> list[Folder]:
        """Folders that walk `generation` did not find: deleted, moved out, or unreadable."""
        return [f for f in self._by_wd.values() if f.seen < generation]

    def _unindex(self, folder: Folder) -> None:
        if self._by_key.get(folder.key) is folder:
            del self._by_key[folder.key]


@dataclass
class RebuildPacer:
    """When the next overflow rebuild may start, so that a storm of overflows costs bounded CPU.

    The first overflow after a quiet spell (`cap` seconds without a rebuild) is handled at
    once: that is the common case, a burst of reports, and the rescan should not wait. An
    overflow that comes back within `cap` of the last rebuild means a storm: the gap between
    rebuilds doubles from `base` up to `cap`, so a flood that never stops costs one walk of
    the tree (and one rescan) every `cap` seconds. Overflows in between are coalesced.
    """

    base: float = 0.5
    cap: float = 30.0
    _gap: float = 0.0
    _last_end: float | None = None

    def plan(self, now: float) -> float:
        """The monotonic time at which the rebuild for overflows seen by `now` may start."""
        if self._last_end is None or now - self._last_end >= self.cap:
            self._gap = 0.0
            return now
        self._gap = min(max(2 * self._gap, self.base), self.cap)
        return max(now, self._last_end + self._gap)

    def finished(self, now: float) -> None:
        self._last_end = now
