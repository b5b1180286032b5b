"""One instance per state folder: an OS file lock held for the life of the process.

Two instances on one store would each believe they own the stage and pool limits, so a second
``run`` or ``batch`` on the same ``state_dir`` refuses to start. The lock is an ``flock`` on
``state_dir/orchestrator.lock``: the kernel drops it when the process dies however it dies, so a
``kill -9`` never leaves a stale lock behind, and its descriptor is close-on-exec, so stage
programs (and orphans of a dead instance) never hold it.

The folder is this user's alone (`check_state_dir`): the service writes and removes files in it
on its own, so a folder other users can write in -- or ``work`` or ``runs`` in it a link to
elsewhere -- would let them point those writes and removals at files of their choosing.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import os
import pwd
import re
import socket
import stat
import time
from typing import TYPE_CHECKING

import attrs

from orchestrator.errors import StoreLocked, StoreUnavailable

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "LOCK_NAME", "LOOP_BLOCKED_BY", "STATE_SUBDIRS", "STORE_FAILED", "InstanceLock",
    "acquire_instance_lock", "check_state_dir",
]  # fmt: skip

#: The lock file's name inside ``state_dir``.
LOCK_NAME = "orchestrator.lock"
#: What an instance that stops because its store failed notes in the lock file (`note_end`).
STORE_FAILED = "its store failed"
#: What the watchdog notes when a run blocked the event loop and it ended the process.
LOOP_BLOCKED_BY = "its event loop was blocked by run"
_BLOCKED_BY_RE = re.compile(rf"ended: {LOOP_BLOCKED_BY} (\d+)")
#: The folders in ``state_dir`` the service makes files in and removes them from by itself (the
#: items' workdirs, the run logs): each must be a real folder of this user's, never a link.
STATE_SUBDIRS = ("work", "runs")
#: Files in it the service writes and replaces, which must be its own regular files when there:
#: the run journal (`orchestrator.journal`) and the one it is rewritten through.
STATE_FILES = ("journal", "journal.new")


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

    The folder is made (0700) when it is not there, and checked when it is (`check_state_dir`:
    its warnings are logged).

    Raises:
        StoreLocked: another live process holds it; the message names its pid and host.
        StoreUnavailable: the folder cannot be made or the lock file opened (a file in the way,
            no permission, a read-only or full file system), or it is not safe to use
            (`check_state_dir`).
    """
    path = state_dir / LOCK_NAME
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Checked before the lock file is opened: in a folder others can write in, it could
        # be their link to a file the truncation below would empty.
        warnings = check_state_dir(state_dir)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except (FileExistsError, NotADirectoryError):
        raise StoreUnavailable(
            f"cannot use the state folder {str(state_dir)!r}: it, or a folder above it, is a file"
        ) from None
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.errno == errno.ELOOP:
            why = f"{LOCK_NAME!r} in it is a link; remove it"
        raise StoreUnavailable(f"cannot use the state folder {str(state_dir)!r}: {why}") from None
    if warnings:
        # Here, not at the top: the store (and so the read-only commands) import this module.
        from loguru import logger

        for warning in warnings:
            logger.warning("{}", warning)
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


def check_state_dir(state_dir: Path) -> list[str]:
    """Refuse a state folder other users could redirect the service's writes and removals
    through; the warnings for one they can only look into (blocking: call from a thread).

    The service makes and removes the items' workdirs in ``state_dir/work`` and writes run logs
    in ``state_dir/runs`` by itself. Found by an acceptance tester (session 16): an existing
    folder was taken as it was. One of another user's, mode 0777, was used by root; that user
    replaced ``work`` by a link to a folder of theirs, and root, removing a done item's
    workdir, removed that folder's files -- and, with ``runs`` a link, wrote run logs there.
    So the folder, and ``work`` and ``runs`` in it when they are there, must be this user's
    own, and no other user may write in them (a sticky bit does not help: a new link is all
    it takes); ``work`` and ``runs`` must be real folders, not links. A group only this user
    is in (a private group named after it) may write, as Debian's OpenSSH allows for ``~/.ssh``.

    A folder others can read is only warned about: its files are private (0600) and its
    folders closed (0700), but their names show -- and ``state_dir = "."`` (the config's own
    folder, mode 0755 as ``mkdir`` makes it) must keep working.

    Returns:
        the warnings, each one line.

    Raises:
        StoreUnavailable: the folder is not safe to use; the message says why and what to do.
        FileNotFoundError: there is no such folder (yet): it will be made private.
    """
    where = str(state_dir)
    try:
        st = os.stat(state_dir)  # through a link: the config's writer chose it
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise StoreUnavailable(
            f"cannot use the state folder {where!r}: {exc.strerror or exc}"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise StoreUnavailable(f"cannot use the state folder {where!r}: it is not a folder")
    problem = _unsafe(st)
    if problem is not None:
        raise StoreUnavailable(
            f"cannot use the state folder {where!r} ({_owner_mode(st)}): {problem}"
        )
    for name in STATE_SUBDIRS:
        inside = state_dir / name
        try:
            sub = os.lstat(inside)
        except FileNotFoundError:
            continue  # made 0700 when first needed
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot use the state folder {where!r}: {name!r} in it: {exc.strerror or exc}"
            ) from None
        if stat.S_ISLNK(sub.st_mode):
            problem = (
                f"{name!r} in it is a link (to {os.readlink(inside)!r}), and orchestrator would "
                "write and remove files where it points; remove the link (orchestrator makes "
                "the folder), or point state_dir at the other disk to keep the state there"
            )
        elif not stat.S_ISDIR(sub.st_mode):
            problem = f"{name!r} in it is not a folder; move it away (orchestrator makes it)"
        else:
            problem = _unsafe(sub)
            if problem is not None:
                problem = f"{name!r} in it ({_owner_mode(sub)}): {problem}"
        if problem is not None:
            raise StoreUnavailable(f"cannot use the state folder {where!r}: {problem}")
    for name in STATE_FILES:
        problem = _not_own_file(state_dir / name)
        if problem is not None:
            raise StoreUnavailable(
                f"cannot use the state folder {where!r}: {name!r} in it {problem}"
            )
    if st.st_mode & 0o007 or (st.st_mode & 0o070 and not _own_group(st.st_gid)):
        return [
            f"other users can look into the state folder {where!r} (mode "
            f"{stat.S_IMODE(st.st_mode):04o}): the files in it are private, their names are "
            "not; chmod 700 it"
        ]
    return []


def _not_own_file(path: Path) -> str | None:
    """Why ``path`` (when it is there) is not a regular file of this user's, or None.

    Found by an acceptance tester (session 17): a link, a folder or a FIFO at the run journal's
    place crashed every start with a traceback, or (a FIFO) hung it for good.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot be looked at: {exc.strerror or exc}"
    if stat.S_ISLNK(st.st_mode):
        return "is a link; remove it (orchestrator writes the file itself)"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file; move it away (orchestrator writes the file itself)"
    if st.st_uid != os.geteuid():
        return (
            f"belongs to {_user(st.st_uid)}, not to {_user(os.geteuid())} who runs orchestrator;"
            " remove it"
        )
    return None


def _unsafe(st: os.stat_result) -> str | None:
    """Why another user could put links in the folder ``st`` describes, or None."""
    me = os.geteuid()
    if st.st_uid != me:
        return (
            f"it belongs to {_user(st.st_uid)}, not to {_user(me)} who runs orchestrator, and "
            "that user could put links in it that make orchestrator write or remove files "
            f"elsewhere; run orchestrator as {_user(st.st_uid)}, or give it a state_dir of "
            f"{_user(me)}'s own"
        )
    if st.st_mode & 0o002:
        who = "every user"
    elif st.st_mode & 0o020 and not _own_group(st.st_gid):
        who = f"the group {_group(st.st_gid)}"
    else:
        return None
    return (
        f"{who} can write in it, and could put links in it that make orchestrator write or "
        "remove files elsewhere; chmod 700 it"
    )


def _owner_mode(st: os.stat_result) -> str:
    return f"owner {_user(st.st_uid)}, mode {stat.S_IMODE(st.st_mode):04o}"


def _own_group(gid: int) -> bool:
    """Whether ``gid`` is this user's private group: its primary group, named after it, with
    no other member."""
    try:
        user = pwd.getpwuid(os.geteuid())
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    return (
        gid == user.pw_gid and group.gr_name == user.pw_name and set(group.gr_mem) <= {user.pw_name}
    )


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"
