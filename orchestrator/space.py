"""The state folder's disk: whether it is full, and what fills it.

A full state disk stops the store (its writes, and a read-only connection that has to make the
WAL's shared-memory file), so a message about it names the real cause and what holds the space:
the run logs (``runs/``), the items' workdirs (``work/``) and the store itself. Plain blocking
file work, no event loop: the read commands use it too.

Synopsis::

    if disk_full(config.state_dir):
        print(full_disk_note(config.state_dir))
        # the file system of 'state' is full (0 B free): run logs (runs/) take 2.1 MB, ...
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from orchestrator.config import DB_FILENAME
from orchestrator.durations import format_size

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["FULL_BELOW", "disk_full", "free_bytes", "full_disk_note", "room_missing", "tree_usage"]

#: Less free space than this on the state folder's file system is a full disk (or less than an
#: eighth of a smaller file system): the store's shared-memory file alone takes 32 KiB, a
#: transaction a few pages of WAL, the status file a few KB, a run's log up to its
#: ``output_limit`` (1 MB by default).
FULL_BELOW = 1 << 20


def free_bytes(folder: Path | str) -> int | None:
    """The space an ordinary user may still write on ``folder``'s file system (None: unknown)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def room_missing(folder: Path | str) -> int:
    """How many bytes must be freed on ``folder``'s file system for it not to be full (0: it is
    not, or it cannot be told)."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return 0
    wanted = min(FULL_BELOW, st.f_blocks * st.f_frsize // 8)
    return max(0, wanted - st.f_bavail * st.f_frsize)


def disk_full(folder: Path | str) -> bool:
    """Whether ``folder``'s file system is full (`FULL_BELOW`)."""
    return room_missing(folder) > 0


def tree_usage(path: Path | str) -> int:
    """The disk space (as ``du`` counts it) the files under ``path`` take; links not followed,
    what cannot be read not counted."""
    total = 0
    try:
        entries = list(os.scandir(path))
    except OSError:
        return 0
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                total += tree_usage(entry.path)
            else:
                total += entry.stat(follow_symlinks=False).st_blocks * 512
        except OSError:
            continue  # removed meanwhile
    return total


def full_disk_note(state_dir: Path) -> str | None:
    """Say that the state folder's file system is full and what in the folder holds the space,
    or None when it is not full."""
    free = free_bytes(state_dir)
    if free is None or not disk_full(state_dir):
        return None
    store = 0
    for name in (DB_FILENAME, f"{DB_FILENAME}-wal", f"{DB_FILENAME}-shm"):
        try:
            store += os.lstat(state_dir / name).st_blocks * 512
        except OSError:
            continue
    return (
        f"the file system of the state folder {str(state_dir)!r} is full ({format_size(free)} "
        f"free): run logs (runs/) take {format_size(tree_usage(state_dir / 'runs'))}, workdirs "
        f"(work/) {format_size(tree_usage(state_dir / 'work'))}, the store "
        f"{format_size(store)}; free some space (`orchestrator purge` removes old items with "
        "their logs and workdirs)"
    )
