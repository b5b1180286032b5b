"""Reading a file named by a user without waiting on it."""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["read_without_waiting"]

#: What a path that is not a regular file (nor a folder) names, for its error.
_FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}


def read_without_waiting(path: str | os.PathLike[str] | Path, *, stream_ok: bool = False) -> bytes:
    """The bytes of the regular file at ``path``, opened without waiting.

    A plain ``open`` of a named pipe waits for a writer, for ever: every command hung on a
    config that was one, ``health`` (which watchdogs run) on a status file that was one (found
    by an acceptance tester, session 16). ``stream_ok``: a pipe or a terminal is read to its
    end instead (at once when nobody writes to it).

    Raises:
        OSError: the file cannot be read, or is not a regular file (a FIFO, a device, a
            socket); a folder is `IsADirectoryError`, as ``open`` says it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    with open(fd, "rb") as file:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR))
        if stream_ok and (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)):
            # Opened, it no longer waits for a writer: with none, a read ends at once; with
            # one (`cat x.toml | orchestrator check -c /dev/stdin`), when it is done.
            os.set_blocking(fd, True)
            return file.read()
        if not stat.S_ISREG(mode):
            kind = _FILE_KINDS.get(stat.S_IFMT(mode), "a device")
            raise OSError(errno.EINVAL, f"not a regular file ({kind})")
        return file.read()
