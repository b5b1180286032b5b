"""The run journal: every run is written down before it starts, so that none goes unrecorded.

A run's record in the store (its claim) is committed with the next group commit after its spawn,
and its result with a later one; a service killed in between (SIGKILL, the OOM killer) lost
both. Recovery finds a dead instance's runs that are still running by their environment marker,
but one that ended before the next start -- a short run, most of them -- left no trace at all:
its stage ran again and `show` listed one run (found by an acceptance tester, session 17). Its
id was also handed out again, to another run.

So every run is written to ``state_dir/journal`` before it starts (``S``: run id, item, attempt,
stage) and when its result is known (``E``: outcome, exit code, signal, duration), each as one
``write`` of about 60 bytes to an ``O_APPEND`` file: no fsync (a SIGKILL does not lose what the
kernel has; a power cut ends the runs too), and on the event loop, by design -- a thread hop
would cost ten times the write. A run is let go once its result is durable in the store. The
file is rewritten with only the runs not yet let go whenever it passes `JOURNAL_COMPACT_BYTES`,
and removed at a clean stop.

At the next start, recovery (`store.sqlite.op_recover`) records the runs the store lacks as
interrupted, so that they count; a run whose result was known (``E``) but not yet durable is
closed with what it did, and its item re-queued without counting an interruption: it did
nothing wrong. Run ids continue after the journal's highest.
"""

from __future__ import annotations

import os
import stat
import time
from typing import TYPE_CHECKING

import attrs
from loguru import logger

from orchestrator.errors import StoreUnavailable

if TYPE_CHECKING:
    from orchestrator.runner import RunResult

__all__ = ["JOURNAL_NAME", "RUN_ID_GAP", "JournalRun", "RunJournal", "read_journal"]

#: The journal's file name in ``state_dir``.
JOURNAL_NAME = "journal"
#: The journal is rewritten with only the runs not yet durable once it grows past this.
JOURNAL_COMPACT_BYTES = 1 << 20
#: At most this much of a journal is read at start (one far larger is not one the service
#: wrote: it keeps its own near `JOURNAL_COMPACT_BYTES`).
JOURNAL_READ_MAX = 64 << 20
#: Run ids go on this far past the highest known after a start that found a journal (an
#: unclean stop): a file system that failed may have lost the journal's last lines (it has no
#: fsync), and a run id is never to be handed out twice.
RUN_ID_GAP = 1000
#: Ids, seqs and attempts above this are not read (SQLite's integers stop at 2**63 - 1).
_ID_LIMIT = 1 << 62
_HEADER = b"orchestrator run journal 1 "


@attrs.frozen
class JournalRun:
    """What the journal says of one run (`read_journal`)."""

    run: int
    seq: int
    attempt: int
    stage: str
    #: time.time() when it was written down, just before the run started.
    started: float
    instance: str | None = None
    #: Its result, once known: outcome, exit code, signal, duration in seconds.
    outcome: str | None = None
    exit_code: int | None = None
    signal: int | None = None
    duration: float | None = None


def read_journal(path: str | os.PathLike[str]) -> dict[int, JournalRun] | None:
    """The runs a journal file holds, by run id; None when there is no journal (the last
    instance stopped cleanly, or there was none); blocking.

    A line it cannot read (cut short by a full disk, or garbage) is passed over, as is a number
    SQLite cannot hold. Only the first `JOURNAL_READ_MAX` bytes are read: the service keeps its
    journal near `JOURNAL_COMPACT_BYTES`, so more is not one it wrote.

    Raises:
        StoreUnavailable: it is not a regular file (a FIFO, say, would wait for a writer for
            ever), or cannot be read.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreUnavailable(f"cannot read the run journal {os.fspath(path)!r}: {exc}") from None
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StoreUnavailable(
                f"cannot read the run journal {os.fspath(path)!r}: it is not a regular file;"
                " move it away"
            )
        try:
            data = f.read(JOURNAL_READ_MAX)
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot read the run journal {os.fspath(path)!r}: {exc}"
            ) from None
    instance: str | None = None
    runs: dict[int, JournalRun] = {}
    for line in data.split(b"\n"):
        try:
            if line.startswith(_HEADER):
                instance = line[len(_HEADER) :].decode() or None
            elif line.startswith(b"S "):
                _, run, seq, attempt, started, stage = line.decode().split(" ", 5)
                entry = JournalRun(_id(run), _id(seq), _id(attempt), stage, float(started),
                                   instance)  # fmt: skip
                runs[entry.run] = entry
            elif line.startswith(b"E "):
                _, run, outcome, code, sig, duration = line.decode().split(" ")
                known = runs.get(_id(run))
                if known is not None:
                    runs[known.run] = attrs.evolve(
                        known, outcome=outcome, exit_code=None if code == "-" else int(code),
                        signal=None if sig == "-" else int(sig), duration=float(duration),
                    )  # fmt: skip
        except (ValueError, UnicodeDecodeError):
            continue
    return runs


def _id(text: str) -> int:
    """A run id, item seq or attempt as written: a positive integer SQLite can hold.

    Found by an acceptance tester (session 17): a line with a run id of 2**63 made run ids go
    on after it, and every start crashed at its first claim.
    """
    value = int(text)
    if not 0 < value < _ID_LIMIT:
        raise ValueError(f"out of range: {text}")
    return value


class RunJournal:
    """This instance's journal, open for appending (see the module docstring).

    Synopsis::

        journal = RunJournal.create(state_dir / "journal", instance)
        journal.started(run_id, item.seq, attempt, stage)   # before the spawn
        journal.ended(run_id, result)                        # the result known
        journal.settled(run_id)                              # the result durable
        journal.close()                                      # at the stop
    """

    def __init__(self, path: str, fd: int, header: bytes) -> None:
        self.path = path
        self._fd: int | None = fd
        self._header = header
        self._size = len(header)
        #: The lines of each run not yet let go.
        self._live: dict[int, list[bytes]] = {}
        self._failed = False
        #: The last write may have left half a line (a full disk).
        self._cut = False

    @classmethod
    def create(cls, path: str | os.PathLike[str], instance: str) -> RunJournal:
        """Start a new journal at ``path``, replacing what was there (recovery has read it);
        blocking (a worker thread).

        Raises:
            StoreUnavailable: it cannot be written (a full disk, a read-only file system).
        """
        header = _HEADER + instance.encode() + b"\n"
        try:
            fd = _open_new(os.fspath(path), header)
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot write the run journal {os.fspath(path)!r}: {exc}"
            ) from None
        return cls(os.fspath(path), fd, header)

    def started(self, run: int, seq: int, attempt: int, stage: str) -> None:
        """Write down a run about to start."""
        line = f"S {run} {seq} {attempt} {time.time():.3f} {stage}\n".encode()
        self._live[run] = [line]
        self._append(line)

    def ended(self, run: int, result: RunResult) -> None:
        """Write down a run's result, known now and not yet durable in the store."""
        code = "-" if result.exit_code is None else result.exit_code
        sig = "-" if result.signal is None else result.signal
        line = f"E {run} {result.outcome.value} {code} {sig} {result.duration:.3f}\n".encode()
        lines = self._live.get(run)
        if lines is not None:
            lines.append(line)
        self._append(line)

    def settled(self, run: int) -> None:
        """Let a run go: its result is durable in the store."""
        self._live.pop(run, None)
        if self._size > JOURNAL_COMPACT_BYTES and self._fd is not None:
            self._compact()

    def close(self) -> None:
        """Close the journal; remove it when every run in it is durable in the store."""
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        if not self._live:
            try:
                os.unlink(self.path)
            except OSError as exc:  # the next start reads it again: nothing is lost
                logger.warning("cannot remove the run journal {}: {}", self.path, exc)

    def _append(self, line: bytes) -> None:
        if self._fd is None:
            return
        if self._cut:  # a line cut short by a full disk: this one must not be glued to it
            line = b"\n" + line
        try:
            written = os.write(self._fd, line)
        except OSError as exc:
            self._cut = True
            self._fail(exc)
            return
        self._cut = written < len(line)
        self._size += written

    def _compact(self) -> None:
        """Rewrite the journal with only the runs not yet durable (a few hundred bytes)."""
        assert self._fd is not None
        live = b"".join(line for lines in self._live.values() for line in lines)
        try:
            fd = _open_new(self.path, self._header + live)
        except OSError as exc:
            self._fail(exc)
            return
        os.close(self._fd)
        self._fd = fd
        self._size = len(self._header) + len(live)
        self._cut = False

    def _fail(self, exc: OSError) -> None:
        if not self._failed:
            self._failed = True
            logger.warning(
                "cannot write the run journal {}: {}; a run the service is killed during may "
                "go unrecorded", self.path, exc,
            )  # fmt: skip


def _open_new(path: str, content: bytes) -> int:
    """A new file at ``path`` holding ``content`` (written beside it, then renamed over it: a
    reader never sees half of it), open for appending, private to the user."""
    temp = f"{path}.new"
    try:
        os.unlink(temp)
    except FileNotFoundError:
        pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
    fd = os.open(temp, flags, 0o600)
    try:
        os.write(fd, content)
        os.rename(temp, path)
    except BaseException:
        os.close(fd)
        raise
    return fd
