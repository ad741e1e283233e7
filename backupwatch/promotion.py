"""SPEC §5 step 6: putting a verified backup into final storage, and nothing else.

What lands in final storage must be what was verified, reachable only from there: no name in
the agent's folder may keep a link to it (an agent that wrote through `D/.keep` would change a
validated backup). And a crash at any line, or two workers promoting the same report bytes,
must leave neither an orphan copy nor a second copy behind.

Two ways in:
- **link**: on one filesystem, a hard link from the staged file (its name in D stays until the
  entry is committed, so a crash before the commit loses nothing; a retry finds the link again
  by inode). The staged file must have no other link: after our link it has exactly two.
- **copy**: across filesystems, under `fs.protected_hardlinks`, or when the staged file has
  another link. The copy goes to a temp file named after the report and the job, in
  `<final root>/.backupwatch-tmp/`, locked with flock while a worker owns it: a second worker
  (or daemon) on the same bytes waits instead of copying again, and a retry after a crash
  finds the temp it linked into place and reuses that link. The temp is removed once the entry
  is committed; the daemon removes the leftovers of crashes at start.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from backupwatch.fsutil import (
    Identity,
    copy_hashing,
    ensure_real_dir,
    link_unique,
    link_unique_at,
    open_dir,
)
from backupwatch.names import fit_name

log = structlog.get_logger(__name__)

TEMP_DIR = ".backupwatch-tmp"
TEMP_MAX_AGE = 24 * 3600.0  # a temp whose report never came back is removed after this long


class StagedChanged(Exception):
    """The staged file was replaced or rewritten while it was being promoted."""


class PromotionBusy(Exception):
    """Another worker or daemon is promoting these very report bytes right now."""


class AlreadyCommitted(Exception):
    """Another worker or daemon committed these report bytes while this one waited."""


@dataclass(frozen=True)
class Facts:
    """What was verified: the copy or link must be exactly this."""

    sha256: str
    size: int


@dataclass
class Claim:
    """A locked temp file of the copy path; released (unlinked, unlocked) after the commit."""

    dir_path: Path
    name: str
    fd: int

    @property
    def path(self) -> Path:
        return self.dir_path / self.name

    def release(self) -> None:
        """Remove the temp name (if it is still ours) and drop the lock."""
        with contextlib.suppress(OSError), open_dir(self.dir_path) as dir_fd:
            if _holds(dir_fd, self.name, Identity.of(os.fstat(self.fd))):
                os.unlink(self.name, dir_fd=dir_fd)
        os.close(self.fd)


@dataclass
class Promoted:
    """A staged file now in final storage (not yet committed)."""

    path: Path
    method: str  # "link" or "copy"
    staged: Identity
    claim: Claim | None = None

    def placed(self) -> Identity:
        """The inode at the final name: the staged file's (a link) or the verified copy's."""
        return self.staged if self.claim is None else Identity.of(os.fstat(self.claim.fd))

    def undo(self) -> None:
        """The commit failed: take back the final name this promotion made, release the temp."""
        ours = self.placed()
        with contextlib.suppress(OSError), open_dir(self.path.parent) as dir_fd:
            if _holds(dir_fd, self.path.name, ours):
                os.unlink(self.path.name, dir_fd=dir_fd)
        self.release()

    def release(self) -> None:
        if self.claim is not None:
            self.claim.release()
            self.claim = None


@dataclass(frozen=True)
class Request:
    """One promotion: the staged file (opened beneath D), where it goes, what was verified."""

    dir_fd: int
    fd: int
    base: str
    target: Path
    facts: Facts
    key: str  # report SHA-256 and job id: names the temp of the copy path
    temp_root: Path
    committed: Callable[[], bool]
    progress: Callable[[], None]


def promote(request: Request) -> Promoted:
    """Link (or copy) the staged file to `request.target` or a free variant of it.

    Raises StagedChanged, PromotionBusy or AlreadyCommitted; OSError for anything else.
    """
    ensure_real_dir(request.target.parent)
    staged = Identity.of(os.fstat(request.fd))
    # The final folder opened once, for the link and the checks after it (issue 10's burst).
    with open_dir(request.target.parent) as dir_fd:
        try:
            final = link_unique_at(
                request.dir_fd,
                request.base,
                dir_fd,
                request.target.parent,
                request.target.name,
                staged,
            )
        except OSError as exc:
            # EXDEV: final storage is on another filesystem. EPERM: fs.protected_hardlinks
            # refuses to link an agent's file the daemon may read but not write. Both: a
            # verified copy.
            if exc.errno not in (errno.EXDEV, errno.EPERM):
                raise
            return _copy(request, staged)
        if not _holds(dir_fd, final.name, staged):
            raise StagedChanged("was replaced while it was being validated")
        if os.fstat(request.fd).st_nlink > 2:
            # Another name in the agent's reach shares the inode (`ln staged D/.keep`): the
            # agent could rewrite final storage through it, so store a copy of our own.
            os.unlink(final.name, dir_fd=dir_fd)
            log.warning("promotion.extra_link", staged=request.base, action="verified copy")
            return _copy(request, staged)
    return Promoted(final, "link", staged)


def _copy(request: Request, staged: Identity) -> Promoted:
    claim = claim_temp(request.temp_root, f"{request.key}.tmp")
    try:
        if request.committed():
            raise AlreadyCommitted
        final = _reuse_earlier_copy(request, claim) or _fresh_copy(request, claim)
    except BaseException:
        claim.release()
        raise
    return Promoted(final, "copy", staged, claim)


def _reuse_earlier_copy(request: Request, claim: Claim) -> Path | None:
    """A crash after the temp was verified and linked into place: that link is the copy.

    The temp is linked only after its bytes were verified, so a temp with a second link is
    a verified copy; one with a single link may be cut short and is copied again.
    """
    st = os.fstat(claim.fd)
    if st.st_nlink < 2 or st.st_size != request.facts.size:
        return None
    with open_dir(claim.dir_path) as temp_dir_fd:
        final = link_unique(
            temp_dir_fd,
            claim.name,
            request.target.parent,
            request.target.name,
            Identity.of(st),
        )
    log.info("promotion.copy_reused", final=str(final))
    return final


def _fresh_copy(request: Request, claim: Claim) -> Path:
    os.ftruncate(claim.fd, 0)
    digest, size = copy_hashing(request.fd, claim.fd, request.progress)
    os.fsync(claim.fd)
    if (digest, size) != (request.facts.sha256, request.facts.size):
        raise StagedChanged("changed while it was being copied to final storage")
    with open_dir(claim.dir_path) as temp_dir_fd:
        final = link_unique(
            temp_dir_fd,
            claim.name,
            request.target.parent,
            request.target.name,
            Identity.of(os.fstat(claim.fd)),
        )
    with open_dir(final.parent) as dir_fd:
        os.fsync(dir_fd)
    return final


def claim_temp(temp_root: Path, name: str) -> Claim:
    """Open (creating) and lock `temp_root/name`; PromotionBusy if someone else holds it."""
    ensure_real_dir(temp_root, mode=0o750)
    with open_dir(temp_root) as dir_fd:
        for _ in range(3):
            fd = os.open(
                name,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o640,
                dir_fd=dir_fd,
            )
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise PromotionBusy from None
            if _holds(dir_fd, name, Identity.of(os.fstat(fd))):
                return Claim(temp_root, name, fd)
            os.close(fd)  # its holder removed the name between our open and our lock
    raise PromotionBusy


def ensure_sole_link(final: Path, facts: Facts, progress: Callable[[], None]) -> None:
    """After the commit and the staged file's removal, the final file must have one link.

    An agent that linked the staged file after our check (`ln` racing the daemon) still shares
    the inode: replace the final name by a verified copy, so that the agent's link now points
    at a file final storage no longer uses.
    """
    try:
        fd = os.open(final, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    try:
        if os.fstat(fd).st_nlink <= 1:
            return
        _replace_by_copy(final, fd, facts, progress)
    finally:
        os.close(fd)


def _replace_by_copy(final: Path, fd: int, facts: Facts, progress: Callable[[], None]) -> None:
    claim = claim_temp(final.parent, f".{fit_name(final.name, len('..sole.tmp'))}.sole.tmp")
    try:
        os.ftruncate(claim.fd, 0)
        digest, size = copy_hashing(fd, claim.fd, progress)
        os.fsync(claim.fd)
        if (digest, size) != (facts.sha256, facts.size):
            log.error(
                "promotion.tampered",
                final=str(final),
                sha256=digest,
                expected=facts.sha256,
                hint="the agent rewrote the backup through another link before it was copied",
            )
            return
        with open_dir(final.parent) as dir_fd:
            os.rename(claim.name, final.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            os.fsync(dir_fd)
        log.warning("promotion.extra_link_removed", final=str(final), action="verified copy")
    finally:
        claim.release()


def release_temp(temp_root: Path, key: str) -> None:
    """Remove the temp of a committed promotion left by a crash (if nobody holds it)."""
    try:
        claim = claim_temp(temp_root, f"{key}.tmp")
    except (PromotionBusy, OSError):
        return
    claim.release()


@dataclass(frozen=True)
class Leftover:
    name: str
    report_sha256: str


def clean_temps(temp_root: Path, committed: Callable[[str], bool], now: float | None = None) -> int:
    """At start: remove the temps of crashed promotions whose report was committed, or that are
    older than TEMP_MAX_AGE (their report never came back). Temps someone holds are kept."""
    now = time.time() if now is None else now
    removed = 0
    for leftover in _leftovers(temp_root):
        with contextlib.suppress(PromotionBusy, OSError):
            claim = claim_temp(temp_root, leftover.name)
            age = now - os.fstat(claim.fd).st_mtime
            if committed(leftover.report_sha256) or age > TEMP_MAX_AGE:
                claim.release()
                removed += 1
                log.info("promotion.temp_removed", temp=leftover.name, age_s=round(age))
            else:
                os.close(claim.fd)
    return removed


def _leftovers(temp_root: Path) -> Iterator[Leftover]:
    try:
        with os.scandir(temp_root) as entries:
            names = [e.name for e in entries if e.is_file(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in names:
        sha, _, rest = name.partition("-")
        if len(sha) == 64 and rest.endswith(".tmp"):
            yield Leftover(name, sha)


def _holds(dir_fd: int, name: str, identity: Identity) -> bool:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return stat.S_ISREG(st.st_mode) and Identity.of(st) == identity
