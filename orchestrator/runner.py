"""Run one stage command in its own process group, watched for timeout and silence, its tree
killed.

A run is one process group (its pgid is its pid; a Ctrl+C on our terminal does not reach it,
and with a terminal it gets a session of its own, see `new_session`), its exit is waited on
through a pidfd from the trio loop, and stdout+stderr arrive on one pipe that trio reads. Every
chunk of output re-arms the stall deadline and goes to a size-capped log file (written from a
worker thread, never from the loop) and to an in-memory tail.

Ending a run, whatever the reason::

    timeout / stall / cancel ──► SIGTERM to the group ──► grace_period ──► SIGKILL to the group
    leader exits (any reason) ──► SIGKILL sweep of the group, *before* the leader is reaped

The sweep happens while the leader is still a zombie, so its pid -- which is the group id --
cannot have been reused by an unrelated process: we only ever signal our own group. A grandchild
that ignores SIGTERM or outlives its parent therefore never survives the run.

Why not ``trio.run_process``: it spawns from a worker thread (about 1,000 spawns/s against
about 2,800/s here, see ../shared/notes/perf-facts.md) and its ``deliver_cancel`` is cancelled as
soon as the leader exits, which is exactly when the sweep must happen.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import math
import os
import select
import shutil
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

try:  # CPython's private spawner behind subprocess (see _spawn_vfork); typeshed's types of it
    # are narrower than what it takes (cwd and preexec_fn may be None), hence Callable[..., int].
    import _posixsubprocess

    _fork_exec: Callable[..., int] | None = _posixsubprocess.fork_exec
except ImportError:  # not CPython on a POSIX system: os.posix_spawn does it all
    _fork_exec = None

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from pathlib import Path

__all__ = [
    "Command", "Outcome", "RunEnvironment", "RunResult", "StageEnvironment", "find_program",
    "run_command",
]  # fmt: skip

#: How much of a run's output is kept in memory for the tail (the log file keeps the rest).
TAIL_BYTES = 8192
#: How many lines of that tail are kept in the store and shown in errors.
TAIL_LINES = 20
#: Output is written to the run log in chunks of about this size (one thread hop each).
FLUSH_BYTES = 256 * 1024
#: After the leader exited and its group was swept, how long to wait for the output pipe to
#: close. Only a process that left the group (setsid) can hold it open longer; we stop reading.
EOF_WAIT = 2.0
#: After the sweep, how long the pipe may stay open before processes that left the group are
#: searched for by their marker.
ESCAPE_CHECK = 0.1
#: Upper bound on waiting for a SIGKILLed leader to exit (a process stuck in the kernel, state D).
KILL_WAIT = 30.0
#: How often the descriptors a child would inherit are listed again (see `_inherited_fds`).
FD_SCAN_INTERVAL = 1.0
_fd_scan: tuple[float, list[int]] = (-math.inf, [])
#: Idle epoll sets kept for the next runs (one per concurrent run is enough).
EPOLL_POOL = 64
_EPOLLS: list[select.epoll] = []
#: Signals Python sets to SIG_IGN that a child must get back at their default disposition.
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ)
#: A fixed shell trampoline used only to change directory before exec: the user's argv is passed
#: as positional parameters, so the shell never parses any of it.
_CHDIR_TRAMPOLINE = (
    "/bin/sh", "-c", 'cd -- "$1" || exit 127; shift; unset OLDPWD; exec "$@"', "orchestrator-cd",
)  # fmt: skip


class Outcome(enum.StrEnum):
    """How a run ended."""

    OK = "ok"  #: exit status 0
    FAILED = "failed"  #: non-zero exit status, or the command could not be started
    TIMEOUT = "timeout"  #: ran longer than the stage's ``timeout``; killed
    STALLED = "stalled"  #: no output for the stage's ``stall_timeout``; killed
    KILLED = "killed"  #: ended by a signal nobody here sent
    INTERRUPTED = "interrupted"  #: the instance running it died (set at recovery)
    CANCELLED = "cancelled"  #: the service shut down while it ran; killed


def _env_problem(env: Mapping[str, str]) -> str | None:
    """Why exec cannot take ``env`` (a name with "=", a NUL byte), or None."""
    if "=" in "".join(env):
        return f"illegal environment variable name in {sorted(env)!r}"
    if "\0" in "".join(env.values()):  # exec would cut the value short there
        return "embedded null byte"
    return None


def _encode_env(env: Mapping[str, str]) -> list[bytes]:
    return [f"{k}={v}".encode(_FS_ENCODING, "surrogateescape") for k, v in env.items()]


class StageEnvironment:
    """What every run of a stage gets in its environment, checked and encoded for exec once.

    ``per_run`` names the entries each run sets itself (`RunEnvironment`): they are left out
    of the encoded part, and a run that leaves one empty gets the stage's value of it.
    """

    __slots__ = ("encoded", "per_run", "problem", "values")

    def __init__(self, values: Mapping[str, str], per_run: Iterable[str]) -> None:
        self.values = dict(values)
        self.per_run = frozenset(per_run)
        constant = {k: v for k, v in self.values.items() if k not in self.per_run}
        self.problem = _env_problem(constant)
        self.encoded: tuple[bytes, ...] = () if self.problem else tuple(_encode_env(constant))


class RunEnvironment(Mapping[str, str]):
    """One run's environment: its stage's (`StageEnvironment`) with the run's own entries.

    A read-only mapping like any other, for `Command.env`; the spawn encodes only the run's
    own entries (about a tenth of a typical environment) instead of all of it.
    """

    __slots__ = ("_own", "stage")

    def __init__(self, stage: StageEnvironment, own: Mapping[str, str]) -> None:
        unknown = own.keys() - stage.per_run
        if unknown:
            raise ValueError(f"not declared per run: {sorted(unknown)!r}")
        self.stage = stage
        # As a dict update with the run's non-empty values: an empty one keeps the stage's.
        self._own: dict[str, str] = {}
        for key in stage.per_run:
            value = own.get(key)
            if value:
                self._own[key] = value
            elif key in stage.values:
                self._own[key] = stage.values[key]

    def __getitem__(self, key: str) -> str:
        if key in self.stage.per_run:
            return self._own[key]
        return self.stage.values[key]

    def __iter__(self) -> Iterator[str]:
        yield from (k for k in self.stage.values if k not in self.stage.per_run)
        yield from self._own

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def encoded(self) -> list[bytes]:
        """``NAME=value`` entries for exec. Raises ValueError where exec cannot take them."""
        problem = self.stage.problem or _env_problem(self._own)
        if problem is not None:
            raise ValueError(problem)
        return [*self.stage.encoded, *_encode_env(self._own)]


@attrs.frozen(kw_only=True)
class Command:
    """What to run and how to watch it."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    #: The file to execute; None looks ``argv[0]`` up (PATH when it has no slash). argv[0] is
    #: passed to the program unchanged either way.
    executable: str | None = None
    cwd: str | None = None
    timeout: float | None = None
    stall_timeout: float | None = None
    grace_period: float = 10.0
    #: Where stdout+stderr go; None keeps only the in-memory tail.
    log_path: str | os.PathLike[str] | None = None
    #: The log file stops growing at this many bytes (the tail still follows the output).
    output_limit: int = 1_048_576
    #: Environment entries (``"ORCH_RUN=12"``) that only this run's processes carry. When a
    #: process that left the group still holds the output pipe after the leader exited, every
    #: process carrying all of them is found in /proc and killed.
    marker: tuple[str, ...] = ()
    #: End the run only once every process carrying ``marker`` is gone, those that left the
    #: group too (found in /proc): for a stage whose slot means "one at a time", a helper the
    #: run left behind must not overlap the next run. (Elsewhere the service ends such
    #: helpers within seconds, in the background: a look costs about a spawn.)
    sweep_escaped: bool = False


@attrs.frozen(kw_only=True)
class RunResult:
    """What happened to one run. ``exit_code`` is None when the process was ended by a signal."""

    outcome: Outcome
    exit_code: int | None
    signal: int | None
    pid: int | None
    duration: float
    tail: str
    reason: str
    #: Signals this runner sent to the group, in order ("SIGTERM", "SIGKILL").
    signals_sent: tuple[str, ...] = ()
    output_bytes: int = 0
    #: Not worth retrying: a Python stage raised `orchestrator.calls.Fatal`.
    fatal: bool = False
    #: Processes of the run that it left running outside its group, ended before it ended
    #: (`Command.sweep_escaped`).
    escaped: int = 0


def _killpg(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


class _Output:
    """The run's pipe, drained without blocking: tail in memory, capped copy in the log file."""

    def __init__(self, fd: int, log_path: str | os.PathLike[str] | None, limit: int) -> None:
        self.fd = fd
        self.log_path = log_path
        self.limit = limit
        self.tail = bytearray()
        self.total = 0
        self.written = 0
        self.truncated = False
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.log_fd: int | None = None
        #: Why the log file could not be written (a full disk): the run goes on without it.
        self.log_error: str | None = None
        self.eof = False

    def read(self) -> bool:
        """Take one chunk from the pipe, which is readable (it never blocks then); True when
        anything (data or EOF) arrived."""
        chunk = os.read(self.fd, 65536)
        if not chunk:
            self.eof = True
            return True
        self.total += len(chunk)
        self.tail += chunk
        if len(self.tail) > TAIL_BYTES:
            del self.tail[: len(self.tail) - TAIL_BYTES]
        self._keep(chunk)
        return True

    def _keep(self, chunk: bytes) -> None:
        if self.log_path is None or self.truncated or self.log_error is not None:
            return
        room = self.limit - self.written - self.pending_size
        if len(chunk) > room:
            chunk = chunk[: max(room, 0)]
            self.truncated = True
            chunk += f"\n[orchestrator: output truncated at {self.limit} bytes]\n".encode()
        self.pending.append(chunk)
        self.pending_size += len(chunk)

    async def flush(self) -> None:
        if not self.pending:
            return
        data = b"".join(self.pending)
        self.pending.clear()
        self.pending_size = 0
        self.written += len(data)
        await trio.to_thread.run_sync(self._write, data)

    def _write(self, data: bytes) -> None:
        if self.log_error is not None:
            return
        try:
            if self.log_fd is None:
                assert self.log_path is not None
                os.makedirs(os.path.dirname(self.log_path) or ".", mode=0o700, exist_ok=True)
                # Never through a link (ELOOP: the run goes on without its log).
                self.log_fd = os.open(
                    self.log_path,
                    os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW,
                    0o600,
                )
            view = memoryview(data)
            while view:
                view = view[os.write(self.log_fd, view) :]
        except OSError as exc:
            self.log_error = exc.strerror or str(exc)
            self.pending.clear()
            self.pending_size = 0

    @property
    def open(self) -> bool:
        """Whether there is anything for `aclose` to do."""
        return bool(self.pending) or self.log_fd is not None

    async def aclose(self) -> None:
        """Write what is pending to the log and close it (only then a thread hop)."""
        if not self.open:
            return
        try:
            await self.flush()
        finally:
            if self.log_fd is not None:
                fd, self.log_fd = self.log_fd, None
                await trio.to_thread.run_sync(_close_quietly, fd)

    def tail_text(self) -> str:
        if not self.tail:
            return ""
        lines = bytes(self.tail).decode(errors="replace").splitlines()
        return "\n".join(lines[-TAIL_LINES:])


class _Watch:
    """One epoll set holding the run's pidfd and its pipe, so one task waits for both.

    The trio loop waits for the set itself to become readable; what is ready is then read
    without blocking. A source that has said all it will (the leader exited, the pipe reached
    EOF) leaves the set before the next wait, so the wait never spins on it. Sets are reused
    from run to run (the loop's registration of a set stays valid): `close` ends the run's use
    of it.
    """

    def __init__(self, pidfd: int, output: _Output) -> None:
        self.pidfd = pidfd
        self.output = output
        self.leader_exited = False
        self.epoll = _EPOLLS.pop() if _EPOLLS else select.epoll(2)
        try:
            self.epoll.register(pidfd, select.EPOLLIN)
            self.epoll.register(output.fd, select.EPOLLIN)
        except BaseException:
            self.epoll.close()  # never back to the pool with an entry left in it
            raise
        self._watching_pid = self._watching_output = True

    def poll(self) -> bool:
        """Take what is ready now; True when output (or EOF) arrived."""
        got = False
        for fd, _ in self.epoll.poll(0):
            if fd == self.pidfd:
                self.leader_exited = True
            elif not self.output.eof:
                got = self.output.read() or got
        return got

    async def wait(self, on_data: Callable[[], None] | None = None) -> None:
        """Until something is ready (then take it); flushes the log as output piles up."""
        self._leave(pid=self.leader_exited, output=self.output.eof)
        await trio.lowlevel.wait_readable(self.epoll.fileno())
        if self.poll() and on_data is not None:
            on_data()
        if self.output.pending_size >= FLUSH_BYTES:
            await self.output.flush()

    def _leave(self, *, pid: bool, output: bool) -> None:
        """Take the pidfd and/or the pipe out of the set, each at most once."""
        if pid and self._watching_pid:
            self.epoll.unregister(self.pidfd)
            self._watching_pid = False
        if output and self._watching_output:
            self.epoll.unregister(self.output.fd)
            self._watching_output = False

    async def until_leader_exits(self, on_data: Callable[[], None] | None = None) -> None:
        while not self.leader_exited:
            await self.wait(on_data)

    async def until_eof(self) -> None:
        while not self.output.eof:
            await self.wait()

    def close(self) -> None:
        """Close the run's pidfd and pipe and give the set back for the next run.

        Each source still in the set leaves it *before* its descriptor is closed: closing
        alone takes it out only when no other process holds the description, and a sibling
        run's child keeps copies of our close-on-exec descriptors for a moment after its
        exec has let the spawning thread go on. A pooled set left holding a finished run's
        pidfd would report it, under the same number, as the next run's leader exiting.
        """
        self._leave(pid=True, output=True)
        os.close(self.pidfd)
        os.close(self.output.fd)
        if len(_EPOLLS) < EPOLL_POOL:
            _EPOLLS.append(self.epoll)
        else:
            self.epoll.close()


def kill_marked(marker: tuple[str, ...], *, newer_than: int = 0) -> list[int]:
    """SIGKILL every live process whose environment holds every entry of ``marker``.

    ``newer_than``: only look at pids above it (a run's processes came after its leader; a
    pid that wrapped around is missed here and found by the service's next sweep).
    Blocking (reads /proc): call it from a worker thread. Returns the pids signalled.
    """
    from orchestrator.reaper import other_pids, proc_environ

    wanted = {m.encode() for m in marker}
    return [
        pid for pid in other_pids()
        if pid > newer_than and _kill_if_marked(pid, proc_environ(pid), wanted)
    ]  # fmt: skip


def _kill_if_marked(pid: int, env: list[bytes] | None, wanted: set[bytes]) -> bool:
    """SIGKILL ``pid`` when its environment ``env`` holds every entry of ``wanted``; whether
    it was signalled."""
    if env is None or not wanted <= set(env):
        return False
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _wait_exited(pid: int, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``pid`` to exit (blocking); whether it has (or is
    gone already)."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        poller = select.poll()  # not select.select: the descriptor may be above FD_SETSIZE
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(max(0.0, timeout) * 1000))
    finally:
        os.close(pidfd)


#: Leaders of runs started and not reaped yet (`reap_orphans` never reaps one of them).
_LEADERS: set[int] = set()
_subreaper = False
_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper(on: bool = True) -> bool:
    """Make this process the one that inherits the processes runs leave behind, instead of
    init, once their parents are gone (``PR_SET_CHILD_SUBREAPER``; Linux), or (``on`` False)
    no longer. Then a helper a run started outside its process group (``setsid``) shows as a
    child of ours (`reap_orphans`). Whether it is one now."""
    global _subreaper
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        done = libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0
    except (OSError, AttributeError):
        done = False
    _subreaper = on and done
    return _subreaper


def reap_orphans() -> list[int]:
    """Reap the children of ours that runs left behind and that have exited; return those
    still alive. Cheap (one read of our own /proc entry, and one per such child): call it from
    the loop's thread, the one that spawns and reaps the runs' leaders, so that none of them
    is taken for one. Children in our own process group are not runs' and are left alone."""
    if not _subreaper:
        return []
    try:
        fd = os.open(f"/proc/self/task/{os.getpid()}/children", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        listed = os.read(fd, 1 << 20).split()
    finally:
        os.close(fd)
    from orchestrator.reaper import proc_stat

    alive = []
    ours = os.getpgrp()
    for pid in map(int, listed):
        if pid in _LEADERS:
            continue
        stat = proc_stat(pid)
        if stat is None or stat[1] == ours:
            # In our own process group: not a run's (each run has a group of its own) but a
            # child this process started -- a Python stage's `subprocess.Popen`, whose status
            # is its own to take (found by an acceptance tester, session 16: reaped here, it
            # read as exit 0).
            continue
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        if done == 0:
            alive.append(pid)
    return alive


def end_escaped(marker: tuple[str, ...], leader: int, candidates: Sequence[int] = ()) -> list[int]:
    """SIGKILL the processes of a run (by ``marker``) that are still alive once its group is
    gone, and wait until they are (at most `KILL_WAIT`). Blocking: from a worker thread.

    ``candidates`` (children of ours that runs left, `reap_orphans`) are looked at closely: one
    caught in the middle of an exec shows no environment for a moment, and is read again
    (found by an acceptance tester, session 16: `setsid flock LOCK sleep` starting as its run
    ended was missed, and held the lock through the next runs).
    """
    from orchestrator.reaper import proc_environ

    killed = kill_marked(marker, newer_than=leader)
    wanted = {m.encode() for m in marker}
    for pid in candidates:
        if pid in killed:
            continue
        for _ in range(EXEC_READ_TRIES):
            env = proc_environ(pid)
            if env is None or env != [b""]:
                break
            time.sleep(EXEC_READ_PAUSE)  # mid-exec: no environment to read yet
        if _kill_if_marked(pid, env, wanted):
            killed.append(pid)
    deadline = time.monotonic() + KILL_WAIT
    for pid in killed:
        with contextlib.suppress(OSError):  # (no descriptor to watch it by: go on)
            _wait_exited(pid, deadline - time.monotonic())
    return killed


#: How often, and how far apart, `end_escaped` reads the environment of a process in the
#: middle of an exec (it shows none for a moment).
EXEC_READ_TRIES = 20
EXEC_READ_PAUSE = 0.002
#: At most so many looks at a run's end for what it left (`_end_escaped`): each kill can
#: leave a child of the killed one to be found at the next.
ESCAPE_ROUNDS = 10


async def _end_escaped(marker: tuple[str, ...], leader: int) -> list[int]:
    """End what a run left outside its group before the run ends (`Command.sweep_escaped`):
    look, kill, wait, and look again until a look finds nothing of the run's."""
    ended: list[int] = []
    with trio.CancelScope(shield=True):
        for _ in range(ESCAPE_ROUNDS):
            candidates = reap_orphans()
            if _subreaper and not candidates:
                break  # (the rule: nothing left behind, one read of our /proc entry)
            killed = await trio.to_thread.run_sync(end_escaped, marker, leader, candidates)
            if not killed:
                break
            ended += killed
        reap_orphans()  # those just killed
    return ended


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _inherited_fds() -> list[int]:
    """Our descriptors above 2 that a child would inherit (Python makes its own close-on-exec,
    but a library or an embedding program may not), listed at most every `FD_SCAN_INTERVAL`.

    Listing ``/proc/self/fd`` costs about as much as the rest of a spawn, and what it finds
    changes rarely: descriptors this process inherited are there from the start, and one a
    library makes inheritable later is found within the interval. Closing a listed descriptor
    that has been closed since is harmless (the child closes it, or it was close-on-exec).
    """
    global _fd_scan
    now = time.monotonic()
    if now - _fd_scan[0] < FD_SCAN_INTERVAL:
        return _fd_scan[1]
    fds = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                if os.get_inheritable(fd):
                    fds.append(fd)
            except OSError:
                pass  # the listing's own descriptor, already closed
    _fd_scan = (now, fds)
    return fds


#: How long a child whose exec failed may take to exit before its error report is taken for a
#: stale one (see `_spawn_vfork`); only reached when an exec fails.
EXEC_FAILURE_EXIT_WAIT = 0.1
#: ``fork_exec`` lost its last argument (``allow_vfork``) in CPython 3.14.
_FORK_EXEC_VFORK_ARG: tuple[bool, ...] = (True,) if sys.version_info < (3, 14) else ()
_FS_ENCODING = sys.getfilesystemencoding()


_new_session: bool | None = None


def new_session() -> bool:
    """Whether runs start in a session of their own (else in a process group of their own in
    ours): only when this process has a controlling terminal, checked once.

    A process group is what a run needs -- its pgid is what is signalled and swept, and
    Ctrl+C on a terminal goes to the foreground group only. A session adds one thing: no
    controlling terminal, so a stage that opens /dev/tty (to prompt for a password) fails at
    once instead of being stopped for reading from a terminal it does not own. Without a
    terminal of ours there is none to open anyway, and a session costs: where the kernel's
    scheduler autogroups are on (the default of most distributions), every new session gets a
    scheduler group made for it -- CPU work at each spawn, and each run then gets as much CPU
    as the whole service beside it: 5-15 % of the throughput of a trivial stage
    (BENCHMARKS.md, session 6).
    """
    global _new_session
    if _new_session is None:
        try:
            os.close(os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY | os.O_CLOEXEC))
        except OSError:  # ENXIO: no controlling terminal
            _new_session = False
        else:
            _new_session = True
    return _new_session


def find_program(program: str, env: Mapping[str, str], folder: Path) -> str | None:
    """The file a stage's program (its command's first word) is: with a "/", relative to
    ``folder`` (the config's), whether it is there or not; a bare name looked up in the PATH
    of ``env`` (the stage's own), else in ours; None when it is not found there.

    Blocking (a look in each PATH folder): not for the event loop.
    """
    if "/" in program:
        return str(folder / program)
    found = shutil.which(program, path=env.get("PATH", os.environ.get("PATH", os.defpath)))
    return None if found is None else os.path.abspath(found)


def _spawn(cmd: Command, wfd: int) -> int:
    """Start ``cmd`` in a process group of its own (a session where `new_session`), stdin
    from /dev/null, stdout and stderr on ``wfd``.

    Raises OSError when it cannot be started (nothing of it is left then).
    """
    global _fork_exec
    executable = cmd.executable or cmd.argv[0]
    if "/" not in executable:
        # Looked up in the command's own PATH (a stage may set one), not ours.
        found = shutil.which(executable, path=cmd.env.get("PATH", os.defpath))
        if found is None:
            raise FileNotFoundError(errno.ENOENT, "not found in PATH", executable)
        executable = found
    if _fork_exec is not None:
        try:
            return _spawn_vfork(cmd, wfd, executable)
        except TypeError as exc:
            if "argument" not in str(exc):
                raise
            # A CPython whose private fork_exec takes other arguments: use the public API.
            _fork_exec = None
    return _spawn_posix(cmd, wfd, executable)


class _SpawnFds:
    """One thread's descriptors for `_spawn_vfork`: /dev/null for the children's stdin, and the
    pipe on which a child whose exec fails reports why (its read end never blocks)."""

    def __init__(self) -> None:
        self.null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        self.err_read, self.err_write = os.pipe()
        os.set_blocking(self.err_read, False)

    def __del__(self, _close: Callable[[int], None] = os.close) -> None:
        # Bound at definition: at interpreter exit this module's globals may be gone already.
        for fd in (self.null, self.err_read, self.err_write):
            with contextlib.suppress(OSError):
                _close(fd)


_spawn_fds = threading.local()


def _spawn_vfork(cmd: Command, wfd: int, executable: str) -> int:
    """Spawn through CPython's own ``_posixsubprocess.fork_exec``, the one `subprocess` uses.

    On Linux it vforks with every signal blocked and lets other threads run while the child
    execs (``os.posix_spawn`` holds the GIL until the exec); the child closes every other
    descriptor with one ``close_range`` and changes directory itself, so a ``cwd`` needs no
    shell. Alone, a spawn costs about a fifth less than with ``os.posix_spawn``; inside a
    busy batch the loop wins back the GIL after the exec, and the two come out even.

    Unlike `subprocess`, the error pipe is not made for each run: the parent only resumes
    once the vforked child has exec'd or failed, so whatever the pipe holds then is this
    child's report, and an empty pipe is a successful exec -- one read, no extra descriptors.
    """
    fds = getattr(_spawn_fds, "fds", None)
    if fds is None:
        fds = _spawn_fds.fds = _SpawnFds()
    env = cmd.env
    if cmd.cwd is None and isinstance(env, RunEnvironment):
        env_list = env.encoded()  # the stage's part was encoded once
    else:
        if cmd.cwd is not None:  # what a shell does on cd: PWD names the folder, OLDPWD goes
            env = {k: v for k, v in env.items() if k != "OLDPWD"}
            env["PWD"] = os.path.abspath(cmd.cwd)
        problem = _env_problem(env)
        if problem is not None:
            raise ValueError(problem)
        env_list = _encode_env(env)
    assert _fork_exec is not None
    session = new_session()
    pid = _fork_exec(
        cmd.argv, [os.fsencode(executable)], True, (fds.err_write,), cmd.cwd, env_list,
        fds.null, -1, -1, wfd, -1, wfd, fds.err_read, fds.err_write,
        True, session, -1 if session else 0, None, None, None, -1, None, *_FORK_EXEC_VFORK_ARG,
    )  # fmt: skip
    try:
        report = os.read(fds.err_read, 4096)
    except BlockingIOError:
        return pid
    return _exec_failed(cmd, pid, executable, report)


def _exec_failed(cmd: Command, pid: int, executable: str, report: bytes) -> int:
    """The error pipe held ``report`` (``OSError:<hex errno>:[noexec]``) after spawning ``pid``.

    It is ``pid``'s own when ``pid`` exits at once (reaped here; OSError raised). Where vfork
    is emulated by fork (QEMU user mode), a report can arrive after its spawn has returned
    and be read at the next one: a child still running after `EXEC_FAILURE_EXIT_WAIT` is
    that next one, and keeps running (its own failure, if any, shows as exit 255).
    """
    if not _wait_exited(pid, EXEC_FAILURE_EXIT_WAIT):
        return pid
    os.waitpid(pid, 0)
    _, hex_errno, detail = [*report.split(b":", 2), b"", b""][:3]
    try:
        code = int(hex_errno, 16)
    except ValueError:
        code = errno.EIO
    if detail.startswith(b"noexec") and cmd.cwd is not None:  # chdir is what fails before exec
        raise OSError(code, f"cannot enter {cmd.cwd!r}: {os.strerror(code)}")
    raise OSError(code, os.strerror(code), executable)


def _spawn_posix(cmd: Command, wfd: int, executable: str) -> int:
    """Spawn with ``os.posix_spawn``: where ``_posixsubprocess.fork_exec`` is not there."""
    argv = cmd.argv
    if cmd.cwd is not None:
        argv = (*_CHDIR_TRAMPOLINE, os.path.abspath(cmd.cwd), executable, *argv[1:])
        executable = argv[0]
    actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_DUP2, wfd, 1),
        (os.POSIX_SPAWN_DUP2, wfd, 2),
    ]
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inherited_fds() if fd != wfd]
    group: dict[str, Any] = {"setsid": True} if new_session() else {"setpgroup": 0}
    return os.posix_spawn(
        executable, argv, cmd.env, file_actions=actions, setsigdef=_RESET_SIGNALS, **group
    )


async def run_command(cmd: Command, *, on_spawn: Callable[[int], None] | None = None) -> RunResult:
    """Run ``cmd`` to its end and return how it ended; never leaves a process of the run behind.

    Args:
        cmd: the argv (no shell), environment, limits and log file.
        on_spawn: called with the pid (which is also the pgid) right after the spawn, before the
            first checkpoint.

    Returns:
        A `RunResult`. A command that cannot be started is ``failed`` with the OS error as reason.

    Raises:
        trio.Cancelled: when the caller is cancelled; the process tree is killed
            (SIGTERM, ``grace_period``, SIGKILL) before it propagates.
    """
    clock = trio.current_time
    started = clock()

    def failed(reason: str, pid: int | None = None) -> RunResult:
        return RunResult(
            outcome=Outcome.FAILED, exit_code=None, signal=None, pid=pid,
            duration=clock() - started, tail="", reason=reason,
        )  # fmt: skip

    try:
        rfd, wfd = os.pipe()
    except OSError as exc:  # a full descriptor table: nothing was started
        return failed(f"cannot start {cmd.argv[0]!r}: {exc.strerror or exc}")
    try:
        pid = _spawn(cmd, wfd)
    except OSError as exc:
        os.close(rfd)
        return failed(f"cannot start {cmd.argv[0]!r}: {exc.strerror or exc}")
    except ValueError as exc:  # a NUL byte in an argument or the environment (from a record)
        os.close(rfd)
        return failed(f"cannot start {cmd.argv[0]!r}: {exc} in its arguments or environment")
    finally:
        os.close(wfd)
    _LEADERS.add(pid)
    output = _Output(rfd, cmd.log_path, cmd.output_limit)
    try:
        pidfd = os.pidfd_open(pid)
        try:
            watch = _Watch(pidfd, output)
        except BaseException:
            os.close(pidfd)
            raise
    except OSError as exc:
        # Started, but it cannot be watched (a full descriptor table): end its group now
        # rather than leave it running unwatched; the item is retried like any failed run.
        _killpg(pid, signal.SIGKILL)
        os.close(rfd)
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(os.waitpid, pid, 0)
        _LEADERS.discard(pid)
        return failed(f"cannot watch {cmd.argv[0]!r} (killed): {exc.strerror or exc}", pid)
    signals_sent: list[str] = []
    reaped: int | None = None
    escaped: list[int] = []

    async def kill_tree() -> None:
        signals_sent.append("SIGTERM")
        _killpg(pid, signal.SIGTERM)
        with trio.move_on_after(cmd.grace_period) as grace:
            await watch.until_leader_exits()
        if grace.cancelled_caught:
            signals_sent.append("SIGKILL")
            _killpg(pid, signal.SIGKILL)
            with trio.move_on_after(KILL_WAIT):
                await watch.until_leader_exits()
        # else: the leader obeyed SIGTERM; reap() sweeps whatever is left of the group.

    async def reap() -> int:
        # The leader has exited (pidfd readable): sweep its group while the zombie still holds
        # the pid, then reap it.
        _killpg(pid, signal.SIGKILL)
        done, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 -- WNOHANG never blocks
        if done == 0:
            # Still not gone after SIGKILL and KILL_WAIT: stuck in the kernel. Wait in a
            # thread so that the loop never blocks on it.
            with trio.CancelScope(shield=True):
                _, status = await trio.to_thread.run_sync(os.waitpid, pid, 0)
        _LEADERS.discard(pid)
        return status

    async def sweep_marked() -> None:
        # A run we killed: its processes that left the group (setsid, output elsewhere) are
        # found by its environment marker and killed too, before its slot is released. (One
        # holding the pipe is found below whatever the outcome; the service's stop sweeps the
        # rest.)
        if cmd.marker:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(kill_marked, cmd.marker)

    timeout_at = started + cmd.timeout if cmd.timeout is not None else math.inf
    stall = cmd.stall_timeout if cmd.stall_timeout is not None else math.inf
    outcome: Outcome | None = None
    try:
        if on_spawn is not None:
            on_spawn(pid)
        deadline = min(timeout_at, started + stall)
        timed_out = False
        if deadline == math.inf:  # nothing to watch the time for: no cancel scope to pay for
            await watch.until_leader_exits()
        else:
            with trio.CancelScope(deadline=deadline) as watched:
                rearm = None
                if stall != math.inf:

                    def rearm() -> None:
                        watched.deadline = min(timeout_at, clock() + stall)

                await watch.until_leader_exits(rearm)
            timed_out = watched.cancelled_caught
        if timed_out:
            # A leader that exited by itself before we could act was not timed out: the loop
            # was late, not the run (found by an acceptance tester, session 16: a service
            # stopped with SIGSTOP for longer than a timeout recorded the runs that had ended
            # well meanwhile as "timeout", and ran them again or made their items dead).
            watch.poll()
            timed_out = not watch.leader_exited
        if timed_out:
            outcome = Outcome.TIMEOUT if clock() >= timeout_at else Outcome.STALLED
            with trio.CancelScope(shield=True):
                await kill_tree()
        reaped = await reap()
        if timed_out:
            await sweep_marked()
        elif cmd.sweep_escaped and cmd.marker:
            # Found by an acceptance tester (session 16): a `setsid` helper of a run of a
            # concurrency-1 stage held the tool's lock while the next run started. Such a
            # helper, its parent gone, is our child now (`become_subreaper`): when we have
            # none but the runs' leaders (the rule), there is nothing to look for.
            escaped = await _end_escaped(cmd.marker, pid)
        if not output.eof:  # what is left in the pipe is there already: the group is gone
            watch.poll()
        if not output.eof:
            if cmd.marker:
                with trio.move_on_after(ESCAPE_CHECK):
                    await watch.until_eof()
                if not output.eof:
                    # Someone outside the swept group holds the pipe: a process that left it.
                    await trio.to_thread.run_sync(kill_marked, cmd.marker)
            with trio.move_on_after(EOF_WAIT):
                await watch.until_eof()
    except BaseException:
        if reaped is None:
            with trio.CancelScope(shield=True):
                await kill_tree()
                reaped = await reap()
                await sweep_marked()
        raise
    finally:
        watch.close()
        if output.open:
            with trio.CancelScope(shield=True):
                await output.aclose()

    duration = clock() - started
    exit_code: int | None = os.waitstatus_to_exitcode(reaped)
    sig: int | None = None
    if exit_code is not None and exit_code < 0:
        sig, exit_code = -exit_code, None
    if outcome is None:
        if sig is not None:
            outcome = Outcome.KILLED
        elif exit_code == 0:
            outcome = Outcome.OK
        else:
            outcome = Outcome.FAILED
    reason = _describe(outcome, exit_code, sig, cmd)
    if output.truncated:
        reason += f" (log truncated at {cmd.output_limit} bytes)"
    if output.log_error is not None:
        reason += f" (run log not written: {output.log_error})"
    return RunResult(
        outcome=outcome, exit_code=exit_code, signal=sig, pid=pid, duration=duration,
        tail=output.tail_text(), reason=reason, signals_sent=tuple(signals_sent),
        output_bytes=output.total, escaped=len(escaped),
    )  # fmt: skip


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _describe(outcome: Outcome, exit_code: int | None, sig: int | None, cmd: Command) -> str:
    if outcome is Outcome.OK:
        return "exit 0"
    if outcome is Outcome.TIMEOUT:
        return f"timed out after {cmd.timeout:g}s; process group killed"
    if outcome is Outcome.STALLED:
        return f"no output for {cmd.stall_timeout:g}s; process group killed"
    if sig is not None:
        return f"killed by {_signame(sig)}"
    if exit_code == 127 and cmd.cwd is not None:
        return f"exit 127 (command not found, or cannot enter {cmd.cwd!r})"
    return f"exit {exit_code}"
