"""The ``orchestrator`` command's first step, and the signals the service does not take itself.

The service takes its signals (`orchestrator.supervisor.SIGNALS_HANDLED`) through trio from just
after it has locked its state folder until its store is closed. Before and after, each had its
default action, which ends the process on the spot (found by an acceptance tester, session 16):

- before: ``run`` imports Python for about half a second before it reads its config; a SIGHUP
  then (a reload sent to a service just started) ended it: exit 129, nothing logged;
- after: trio hands a signal that came in a drain's last moments back to the handler it found,
  the default one: a second SIGTERM (GNU ``timeout`` sends two) ended a clean drain with exit
  143 and no "stopped" line.

`launch` is the command (and ``python -m orchestrator``): for ``run`` it takes SIGHUP, SIGTERM
and SIGINT before anything else is imported -- keep this module's imports light (the standard
library and `orchestrator.terminal`). `EDGES` holds the service's signals on both sides of
trio's receiver. Before the service runs, each does what it did, except ``run``'s:

- SIGHUP: one that came before the config was read is only logged (the config read is the new
  one); one that came after is acted on -- a reload -- once the service runs; a hang-up of its
  terminal still ends it;
- SIGTERM and SIGINT: one that came before the service's modules were imported stops ``run``
  there, exit 0 and a line logged, before anything started (`stopped_early`); one that came
  after asks for the drain once the service runs (found by an acceptance tester, session 17:
  in the first half second, a SIGTERM ended ``run`` with exit 143 and nothing logged).

After,
each is kept in `EdgeSignals.late`, for the command line to log as "already stopping", and the
process exits as the drain had it.

Handlers, never ``SIG_IGN``: an ignored signal stays ignored in the stages' processes (exec keeps
it), a handler is reset there.
"""

from __future__ import annotations

import signal
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from orchestrator.terminal import Terminal

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from types import FrameType

    _Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers

__all__ = ["EDGES", "EdgeSignals", "launch"]


class EdgeSignals:
    """The service's signals while trio does not take them: before the service runs, and after.

    Synopsis (`orchestrator.cli`)::

        EDGES.note(SIGNALS_HANDLED)      # before trio.run, which puts in its own SIGINT handler
        # in trio.run: EDGES.take(), then serve(on_start=EDGES.started), then EDGES.leave()
        for signum in EDGES.take_late(): ...   # logged once trio.run is back
        EDGES.give_back()                # main: the handlers as found (not after `launch`)
    """

    def __init__(self) -> None:
        #: The handlers stay until the process exits (`launch`): `give_back` does nothing.
        self.to_the_end = False
        #: The service took its signals through trio (so any from now on come after it let
        #: them go).
        self.running = False
        #: SIGHUPs ``run`` got before it read its config: nothing to reload, it read it after.
        self.early_hangups = 0
        #: The signals that came after the service let them go, in order. Logged by the command
        #: line, not here: a handler may have interrupted a line being logged.
        self.late: list[int] = []
        self._config_read = False
        #: A SIGHUP came after the config was read: it is acted on once the service runs.
        self._hangup_pending = False
        #: SIGTERMs and SIGINTs ``run`` got before its service ran, in order (`hold_stops`).
        self._stops: list[int] = []
        #: The terminal ``run`` was started from, if any: its hang-up ends it, as it did.
        self._terminal: Terminal | None = None
        self._found: dict[int, _Handler] = {}  # as found: `give_back` puts them back
        self._inner: dict[int, _Handler] = {}  # in trio.run, before `take`: what they did

    def hold_hangups(self) -> None:
        """Take SIGHUP for ``run``, first thing: noted, and acted on once the service runs.

        A hang-up of the terminal it was started from still ends it, as SIGHUP's default
        action did: nothing runs yet, and the service would no longer see it as one.
        """
        found = signal.getsignal(signal.SIGHUP)
        # Ignored (nohup): it stays so, as asked; the service reads that (`Terminal.nohup`).
        if found is not signal.SIG_IGN and found is not None:
            self._terminal = Terminal()
            self._found.setdefault(signal.SIGHUP, found)
            signal.signal(signal.SIGHUP, self._hangup)

    def hold_stops(self) -> None:
        """Take SIGTERM and SIGINT for ``run``, first thing: noted, then a stop before the
        service starts (`stopped_early`) or its drain once it runs (`started`)."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            found = signal.getsignal(signum)
            if found is not signal.SIG_IGN and found is not None:  # (ignored: it stays so)
                self._found.setdefault(signum, found)
                signal.signal(signum, self._stop)

    def stopped_early(self) -> int | None:
        """The first SIGTERM or SIGINT that came before now (None: none did); those noted are
        forgotten, as ``run`` stops without starting its service."""
        stops, self._stops = self._stops, []
        return stops[0] if stops else None

    def config_read(self) -> int:
        """The config has been read: a SIGHUP from now on asks for it to be read again.

        Returns:
            How many SIGHUPs came before (`early_hangups`).
        """
        self._config_read = True
        return self.early_hangups

    def note(self, signals: Iterable[int]) -> None:
        """Remember how ``signals`` are handled, before ``trio.run`` (it has its own SIGINT
        handler while it runs; it is not the one to put back)."""
        self.running = False
        self.late.clear()
        for signum in signals:
            found = signal.getsignal(signum)
            if found is not None:
                self._found.setdefault(signum, found)

    def take(self) -> None:
        """Handle the noted signals, in ``trio.run``, before the service opens its receiver
        (which puts these handlers back when it closes). An ignored signal stays ignored."""
        for signum in self._found:
            handler = signal.getsignal(signum)
            if handler is not signal.SIG_IGN and handler is not None:
                self._inner[signum] = handler
                signal.signal(signum, self._handle)

    def started(self) -> None:
        """The service runs and takes its signals (its ``on_start``): a SIGHUP that came after
        the config was read is sent again, to it."""
        self.running = True
        if self._hangup_pending:
            self._hangup_pending = False
            signal.raise_signal(signal.SIGHUP)
        stops, self._stops = self._stops, []
        for signum in stops:
            signal.raise_signal(signum)

    def leave(self) -> None:
        """The service is back, still in ``trio.run``. Had it not run (a start-up that failed),
        the handlers ``trio.run`` had are put back: a signal ends the process as it did."""
        if not self.running:
            for signum, handler in self._inner.items():
                signal.signal(signum, handler)
        self._inner.clear()

    def take_late(self) -> list[int]:
        """The signals that came after the service let them go, since the last call."""
        late, self.late = self.late, []
        return late

    def give_back(self) -> None:
        """Put every handler back as found (unless `to_the_end`), and forget what was seen."""
        if self.to_the_end:
            return
        for signum, handler in self._found.items():
            signal.signal(signum, handler)
        self._found.clear()
        self._inner.clear()
        self.late.clear()
        self.running = self._config_read = self._hangup_pending = False
        self.early_hangups = 0
        self._stops = []
        self._terminal = None

    def _hangup(self, signum: int, frame: FrameType | None) -> None:
        if self._terminal is not None and self._terminal.gone():
            _default_action(signum)
        elif self._config_read:
            self._hangup_pending = True
        else:
            self.early_hangups += 1

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self._stops.append(signum)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.running:
            self.late.append(signum)
            return
        inner = self._inner.get(signum, signal.SIG_DFL)
        if callable(inner):
            inner(signum, frame)
        elif inner == signal.SIG_DFL:
            _default_action(signum)


def _default_action(signum: int) -> None:
    """What ``signum`` does when nobody takes it (for these: end the process)."""
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


#: The process's one set of signal handlers.
EDGES = EdgeSignals()


def launch() -> NoReturn:
    """The ``orchestrator`` command (and ``python -m orchestrator``): `orchestrator.cli.entry`,
    with ``run``'s SIGHUP, SIGTERM and SIGINT taken before the command line is imported
    (`EdgeSignals`)."""
    EDGES.to_the_end = True
    if sys.argv[1:2] == ["run"]:
        EDGES.hold_hangups()
        EDGES.hold_stops()
    from orchestrator.cli import entry

    entry()
