"""sd_notify without a dependency: ``READY=1``, ``WATCHDOG=1``, ``STATUS=…``, ``STOPPING=1``.

systemd passes a unix datagram socket in ``NOTIFY_SOCKET`` to a ``Type=notify`` service (a
leading ``@`` names a socket in the abstract namespace) and, with ``WatchdogSec=``, the watchdog
period in ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``: the process it is meant for). A notification
is one datagram of ``KEY=value`` lines (sd_notify(3)).

The socket is non-blocking: a notification systemd cannot take at once is dropped rather than
stall the caller -- the event loop, which must never block -- and the next one (a watchdog ping
comes every half period) carries on. Without ``NOTIFY_SOCKET`` there is no `Notifier` at all.

Synopsis::

    notifier = Notifier.from_environ(os.environ)
    if notifier is not None:
        notifier.notify("READY=1", "STATUS=running")
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["Notifier"]


class Notifier:
    """A connected ``NOTIFY_SOCKET``; `notify` never blocks and never raises."""

    def __init__(self, address: str, *, watchdog_usec: int | None = None) -> None:
        """Connect to ``address`` (a path, or ``@name`` for the abstract namespace).

        Args:
            address: the socket, as ``NOTIFY_SOCKET`` gives it.
            watchdog_usec: ``WATCHDOG_USEC``: systemd's watchdog period, or None (no watchdog).

        Raises:
            OSError: the socket cannot be reached (no such file, refused).
        """
        self.address = address
        self.watchdog_usec = watchdog_usec
        target = "\0" + address[1:] if address.startswith("@") else address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.setblocking(False)
            self._sock.connect(target)
        except OSError:
            self._sock.close()
            raise
        self._failed = False
        #: The last ``STATUS=`` systemd took, whoever sent it (None: none yet).
        self.status: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier | None:
        """The notifier ``environ`` asks for, or None when not run by systemd (or unreachable).

        ``WATCHDOG_USEC`` counts only when ``WATCHDOG_PID`` is unset or names this process.
        """
        address = environ.get("NOTIFY_SOCKET")
        if not address:
            return None
        usec: int | None = None
        pid = environ.get("WATCHDOG_PID")
        if pid is None or pid == str(os.getpid()):
            try:
                usec = int(environ.get("WATCHDOG_USEC", "")) or None
            except ValueError:
                usec = None
        try:
            return cls(address, watchdog_usec=usec)
        except OSError as exc:
            logger.warning(
                "cannot reach NOTIFY_SOCKET {!r}: {}; not notifying systemd", address, exc
            )
            return None

    @property
    def watchdog_interval(self) -> float | None:
        """How often to send ``WATCHDOG=1``: half the watchdog period (seconds), or None."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` as one notification; False when it could not be sent (logged once)."""
        data = "\n".join(lines).encode()
        try:
            self._sock.send(data)
        except OSError as exc:  # BlockingIOError included: systemd is behind; drop this one
            if not self._failed:
                self._failed = True
                logger.warning("cannot notify systemd ({}): {}", lines[0] if lines else "", exc)
            return False
        self._failed = False
        for line in lines:
            if line.startswith("STATUS="):
                self.status = line.removeprefix("STATUS=")
        return True

    def close(self) -> None:
        self._sock.close()
