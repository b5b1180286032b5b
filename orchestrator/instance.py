"""One instance per state folder: an OS file lock held for the life of the process.

Two instances on one store would each believe they own the stage and pool limits, so a second
``run`` or ``batch`` on the same ``state_dir`` refuses to start. The lock is an ``flock`` on
``state_dir/orchestrator.lock``: the kernel drops it when the process dies however it dies, so a
``kill -9`` never leaves a stale lock behind, and its descriptor is close-on-exec, so stage
programs (and orphans of a dead instance) never hold it.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import time
from typing import TYPE_CHECKING

import attrs

from orchestrator.errors import StoreLocked, StoreUnavailable

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["LOCK_NAME", "LOOP_BLOCKED_BY", "STORE_FAILED", "InstanceLock", "acquire_instance_lock"]

#: The lock file's name inside ``state_dir``.
LOCK_NAME = "orchestrator.lock"
#: What an instance that stops because its store failed notes in the lock file (`note_end`).
STORE_FAILED = "its store failed"
#: What the watchdog notes when a run blocked the event loop and it ended the process.
LOOP_BLOCKED_BY = "its event loop was blocked by run"
_BLOCKED_BY_RE = re.compile(rf"ended: {LOOP_BLOCKED_BY} (\d+)")


@attrs.define
class InstanceLock:
    """The held lock; `release` (or process exit) gives it up."""

    path: Path
    fd: int | None
    #: What the lock file said when this instance took it: the previous holder's line, and how
    #: that one ended when it could say (`note_end`).
    previous: str = ""
    #: The length of this holder's own line in the file.
    _line_length: int = 0

    @property
    def previous_blamed(self) -> frozenset[int] | None:
        """The runs the previous holder's end is to be blamed on, as it said (`note_end`):
        none when its store failed (a full disk: its open runs were ended by that, not by
        their items), the run that blocked its event loop, or None (it did not say: it was
        killed, all its open runs count)."""
        if f"ended: {STORE_FAILED}" in self.previous:
            return frozenset()
        match = _BLOCKED_BY_RE.search(self.previous)
        return frozenset([int(match.group(1))]) if match else None

    def note_end(self, why: str) -> None:
        """Say in the lock file how this instance ends, for the next one (best effort).

        Written in place right after the holder's line, inside the block the file already has,
        so that it gets written on a full disk too -- the case it is for.
        """
        if self.fd is None:
            return
        try:
            os.pwrite(self.fd, f"ended: {why}\n".encode(), self._line_length)
        except OSError:
            pass

    def lost(self) -> str | None:
        """Why this lock no longer guards the state folder -- its file was deleted or replaced,
        so another instance can take a new one -- or None (blocking: call from a thread)."""
        if self.fd is None:
            return "the lock was released"
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return f"the lock file {str(self.path)!r} was deleted"
        except OSError as exc:
            return f"the lock file {str(self.path)!r} cannot be checked: {exc.strerror or exc}"
        held = os.fstat(self.fd)
        if (on_disk.st_dev, on_disk.st_ino) != (held.st_dev, held.st_ino):
            return f"the lock file {str(self.path)!r} was replaced"
        return None

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


def acquire_instance_lock(state_dir: Path) -> InstanceLock:
    """Take the state folder's lock or fail at once (blocking file work: call from a thread).

    Raises:
        StoreLocked: another live process holds it; the message names its pid and host.
        StoreUnavailable: the folder cannot be made or the lock file opened (a file in the way,
            no permission, a read-only or full file system).
    """
    path = state_dir / LOCK_NAME
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except (FileExistsError, NotADirectoryError):
        raise StoreUnavailable(
            f"cannot use the state folder {str(state_dir)!r}: it, or a folder above it, is a file"
        ) from None
    except OSError as exc:
        raise StoreUnavailable(
            f"cannot use the state folder {str(state_dir)!r}: {exc.strerror or exc}"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreLocked(
            f"another orchestrator is already running on {str(state_dir)!r} ({holder}); "
            "stop it first, or give this one another state_dir"
        ) from None
    previous = os.pread(fd, 4096, 0).decode(errors="replace")
    os.ftruncate(fd, 0)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    line = f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode()
    os.pwrite(fd, line, 0)
    return InstanceLock(path, fd, previous, len(line))
