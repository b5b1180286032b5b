"""Whether a SIGHUP means "reload" or "the terminal hung up" (`orchestrator.reload`)."""

from __future__ import annotations

import os
import signal

__all__ = ["Terminal"]


class Terminal:
    """Whether a SIGHUP means that the service's terminal is gone.

    Built at start-up, when the service either has a controlling terminal (started by hand, from
    a shell) or has none (systemd, a container, ``setsid``). A SIGHUP means "the terminal hung
    up" only when there was one and it is gone now: the kernel takes a hung-up terminal away from
    its session, and its file descriptors stop being terminals, before the SIGHUP is sent.
    Otherwise -- ``systemctl reload``, ``kill -HUP`` -- it asks for a reload.

    Both methods make system calls on ``/dev/tty``: call them in a worker thread.
    """

    def __init__(self) -> None:
        self.had = _controlling_terminal()
        #: Which of stdin, stdout and stderr were terminals at start-up.
        self._ttys = [fd for fd in (0, 1, 2) if os.isatty(fd)]
        #: Started with SIGHUP ignored (``nohup``): a hang-up is to be ignored, as asked. Read
        #: before the service takes SIGHUP over.
        self.nohup = signal.getsignal(signal.SIGHUP) is signal.SIG_IGN

    def gone(self) -> bool:
        """The service had a terminal and has lost it (the terminal hung up)."""
        if not self.had:
            return False
        return not _controlling_terminal() or any(not os.isatty(fd) for fd in self._ttys)


def _controlling_terminal() -> bool:
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        return os.isatty(fd)
    finally:
        os.close(fd)
