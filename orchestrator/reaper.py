"""End what a dead instance left running, before this instance starts anything.

When an instance dies by ``kill -9``, OOM or a crash, its runs' process groups live on. If one
of them is an ``extract`` limited to one at a time and the new instance started its own, the limit
would be broken. So at start-up -- holding the state folder's lock, before any worker exists --
every leftover process is found and ended:

- by **environment marker**: every run's environment carries ``ORCH_STATE=<state_dir>``; a process
  found in ``/proc`` with that marker is a leftover (no live instance of this state exists but us,
  and we have started nothing yet). This finds a grandchild that left its group (setsid, double
  fork) too;
- by **recorded group**: each run's pgid and the leader's start time are in the store; a leader
  still alive with the same start time is the same process, never a reused pid.

Each is sent SIGTERM (by group where the group is known to be ours), given ``grace`` seconds, then
SIGKILL. Blocking: call from a worker thread.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING

import attrs

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable, Iterable, Iterator

__all__ = [
    "Leftover", "ReapReport", "SeenRun", "find_leftovers", "other_pids", "proc_environ", "proc_start_time",
    "proc_stat", "reap",
]  # fmt: skip

#: The environment variable that marks every process of a run with its state folder.
STATE_MARKER = "ORCH_STATE"
#: How often to look whether the signalled processes are gone.
POLL = 0.05
#: After SIGKILL, how long to wait for the kernel to finish them before giving up (state D).
KILL_WAIT = 5.0


def proc_environ(pid: int) -> list[bytes] | None:
    """The ``NAME=value`` entries of ``pid``'s environment, or None when gone or not ours."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return None


def other_pids() -> Iterator[int]:
    """Every pid in /proc but ours."""
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me:
            yield int(entry)


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, pgid, start time in clock ticks) of ``pid``, or None if it is gone."""
    # Raw system calls, not open(): the store's thread reads this for every run it claims.
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)  # procfs hands the whole line over in one read
    except OSError:
        return None
    finally:
        os.close(fd)
    if not data:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[2]), int(fields[19])


def proc_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), or None if it is gone."""
    st = proc_stat(pid)
    return st[2] if st is not None else None


@attrs.frozen
class SeenRun:
    """A dead instance's run, as its leftover process's environment tells it."""

    run: int
    item: str
    stage: str
    attempt: int
    instance: str | None


@attrs.frozen
class Leftover:
    """A process (and maybe its group) left by a dead instance."""

    pid: int
    start: int
    #: Signal the whole group: it is the group of a run we recorded, or led by a marked process.
    pgid: int | None
    #: The run it belongs to, from its environment (found by marker only).
    run: SeenRun | None = attrs.field(default=None, eq=False)


def _seen_run(env: list[bytes]) -> SeenRun | None:
    marks = {}
    for entry in env:
        if entry.startswith(b"ORCH_"):
            name, _, value = entry.partition(b"=")
            marks[name.decode(errors="replace")] = value.decode(errors="replace")
    try:
        return SeenRun(
            run=int(marks["ORCH_RUN"]), item=marks["ORCH_ITEM"], stage=marks["ORCH_STAGE"],
            attempt=int(marks["ORCH_ATTEMPT"]), instance=marks.get("ORCH_INSTANCE"),
        )  # fmt: skip
    except (KeyError, ValueError):
        return None


def find_leftovers(state_dir: str, recorded: Iterable[tuple[int, int | None]]) -> list[Leftover]:
    """Live processes of dead runs of ``state_dir``.

    Args:
        state_dir: the value of the ``ORCH_STATE`` marker to look for.
        recorded: ``(pgid, leader start time)`` of every run the store says was running.
    """
    marker = f"{STATE_MARKER}={state_dir}".encode()
    found: dict[int, Leftover] = {}
    groups: set[int] = set()
    for leader, start in recorded:
        st = proc_stat(leader)
        if st is not None and start is not None and st[2] == start and st[0] != "Z":
            found[leader] = Leftover(leader, st[2], leader)
            groups.add(leader)
    for pid in other_pids():
        env = proc_environ(pid)  # None: gone, or not ours to read (then not ours to kill)
        if env is None or marker not in env:
            continue
        st = proc_stat(pid)
        if st is None or st[0] == "Z":
            continue
        # A marked process leading its own group: the group is a run's; signal all of it.
        group = st[1] if st[1] == pid or st[1] in groups else None
        known = found.get(pid)
        if known is None:
            found[pid] = Leftover(pid, st[2], group, _seen_run(env))
        elif known.run is None and known.start == st[2]:  # a recorded leader: say whose it is
            found[pid] = attrs.evolve(known, run=_seen_run(env))
    return sorted(found.values(), key=lambda lo: lo.pid)


@attrs.frozen
class ReapReport:
    """What `reap` did."""

    found: int
    terminated: int
    killed: int
    survivors: tuple[int, ...]
    #: The runs the leftovers belonged to (by their environment), one each.
    runs: tuple[SeenRun, ...] = ()


def _alive(lo: Leftover) -> bool:
    st = proc_stat(lo.pid)
    return st is not None and st[2] == lo.start and st[0] != "Z"


def _signal(lo: Leftover, sig: int) -> None:
    if not _alive(lo):  # checked right before: never signal a reused pid
        return
    try:
        if lo.pgid is not None:
            os.killpg(lo.pgid, sig)
        else:
            os.kill(lo.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_at_their_deadlines(
    leftovers: list[Leftover], grace: Callable[[Leftover], float], hurry: threading.Event | None
) -> list[Leftover]:
    """Wait for the SIGTERMed ``leftovers`` to go, each up to its own ``grace`` (or until
    ``hurry`` is set); SIGKILL each one still there at its deadline. Returns those killed."""
    start = time.monotonic()
    waiting = [(start + grace(lo), lo) for lo in leftovers]
    killed = []
    while waiting:
        now = time.monotonic()
        hurried = hurry is not None and hurry.is_set()
        still = []
        due = []
        for deadline, lo in waiting:
            if not _alive(lo):
                continue
            if hurried or now >= deadline:
                due.append(lo)
            else:
                still.append((deadline, lo))
        # Every one due is looked at before any is signalled: a group's SIGKILL also ends the
        # other leftovers in that group, which were then found gone and counted as ended by
        # SIGTERM -- or not, by a race (a flaky count, seen in CI in session 17).
        for lo in due:
            _signal(lo, signal.SIGKILL)
            killed.append(lo)
        waiting = still
        if waiting:
            time.sleep(POLL)
    return killed


def _wait_gone(leftovers: list[Leftover], seconds: float) -> list[Leftover]:
    deadline = time.monotonic() + seconds
    alive = [lo for lo in leftovers if _alive(lo)]
    while alive and time.monotonic() < deadline:
        time.sleep(POLL)
        alive = [lo for lo in alive if _alive(lo)]
    return alive


def reap(
    state_dir: str, recorded: Iterable[tuple[int, int | None]],
    grace: float | Callable[[Leftover], float], ended: Callable[[int], bool] | None = None,
    hurry: threading.Event | None = None,
) -> ReapReport:  # fmt: skip
    """Find the leftovers of ``state_dir``; SIGTERM them, wait up to ``grace``, SIGKILL the rest.

    After the SIGKILL round, ``/proc`` is searched again: a marked process that ignored SIGTERM
    while its group's leader exited (so its group could no longer be signalled safely) is killed
    by pid.

    Args:
        grace: seconds, or each leftover's own (its stage's ``grace_period``).
        hurry: once set, those still alive get SIGKILL at once (a second SIGINT).
        ended: only the marked processes of runs this says have ended (by run id), and none
            without a run id: a live service's sweep for what its ended runs left running.
            None: every marked process (no run of this state folder is going on).
    """

    def search(recorded: Iterable[tuple[int, int | None]]) -> list[Leftover]:
        found = find_leftovers(state_dir, recorded)
        if ended is None:
            return found
        return [lo for lo in found if lo.run is not None and ended(lo.run.run)]

    leftovers = search(recorded)
    for lo in leftovers:
        _signal(lo, signal.SIGTERM)
    alive = _kill_at_their_deadlines(
        leftovers, grace if callable(grace) else (lambda _lo: grace), hurry
    )
    # Only a process we signalled can have left its group since: with none found, no search.
    # A straggler is a process the first search did not find (one found again while it dies
    # of our signals is the same process: same pid and start time, counted once).
    stragglers = []
    if leftovers:
        handled = {(lo.pid, lo.start) for lo in leftovers}
        stragglers = [lo for lo in search(()) if (lo.pid, lo.start) not in handled]
    for lo in stragglers:
        _signal(attrs.evolve(lo, pgid=None), signal.SIGKILL)
    survivors = _wait_gone(alive + stragglers, KILL_WAIT)
    runs = {lo.run.run: lo.run for lo in leftovers + stragglers if lo.run is not None}
    return ReapReport(
        found=len(leftovers) + len(stragglers), terminated=len(leftovers) - len(alive),
        killed=len(alive) + len(stragglers), survivors=tuple(lo.pid for lo in survivors),
        runs=tuple(runs[k] for k in sorted(runs)),
    )  # fmt: skip
