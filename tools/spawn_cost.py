"""What one spawn of `true` costs, alone, by how it is spawned: wall time, the child's CPU, ours.

Usage (from the repository root)::

    .venv/bin/python tools/spawn_cost.py               # 1,000 spawns per way, 3 rounds
    .venv/bin/python tools/spawn_cost.py -n 2000 --rounds 5

Four ways, alternated round by round (the machine's speed drifts), each spawn waited for before
the next, with the runner's settings (stdin /dev/null, output to a pipe, SIGPIPE and SIGXFSZ
back to default):

- ``posix_spawn setsid`` / ``posix_spawn setpgid``: ``os.posix_spawn`` with a new session or
  only a new process group;
- ``fork_exec setsid`` / ``fork_exec setpgid``: CPython's ``_posixsubprocess.fork_exec`` (what
  the runner uses; it also closes every other descriptor in the child).

Where the kernel's scheduler autogroups are on (``/proc/sys/kernel/sched_autogroup_enabled``),
every new session gets a scheduler group made (and later freed) for it: that is the difference
between the ``setsid`` and ``setpgid`` rows. Nothing else runs meanwhile, so this is the floor;
inside a batch the GIL and the other threads add to the parent's side (see cpu_split.py).
"""

from __future__ import annotations

import _posixsubprocess
import argparse
import os
import resource
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

TRUE = "/bin/true" if os.path.exists("/bin/true") else "/usr/bin/true"


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def spawners() -> dict[str, Callable[[int], int]]:
    """Each way to spawn `true` with its stdout and stderr on ``wfd``; returns the pid."""
    env = dict(os.environ)
    env_list = [f"{k}={v}".encode() for k, v in env.items()]
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    err_read, err_write = os.pipe()
    vfork_arg = (True,) if sys.version_info < (3, 14) else ()

    def posix(session: bool) -> Callable[[int], int]:
        def spawn(wfd: int) -> int:
            actions = [
                (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, wfd, 1),
                (os.POSIX_SPAWN_DUP2, wfd, 2),
            ]
            group = {"setsid": True} if session else {"setpgroup": 0}
            return os.posix_spawn(
                TRUE, ["true"], env, file_actions=actions,
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ), **group,
            )  # fmt: skip

        return spawn

    def fork_exec(session: bool) -> Callable[[int], int]:
        def spawn(wfd: int) -> int:
            pid = _posixsubprocess.fork_exec(
                ["true"], [os.fsencode(TRUE)], True, (err_write,), None, env_list,
                null, -1, -1, wfd, -1, wfd, err_read, err_write,
                True, session, -1 if session else 0, None, None, None, -1, None, *vfork_arg,
            )  # fmt: skip
            return int(pid)

        return spawn

    return {
        "posix_spawn setsid": posix(True),
        "posix_spawn setpgid": posix(False),
        "fork_exec setsid": fork_exec(True),
        "fork_exec setpgid": fork_exec(False),
    }


def measure(spawn: Callable[[int], int], n: int) -> dict[str, float]:
    """Microseconds per spawn: the spawn call, spawn to reaped, the child's CPU, ours."""
    call = 0.0
    children, ours = _cpu(resource.RUSAGE_CHILDREN), _cpu(resource.RUSAGE_SELF)
    started = time.perf_counter()
    for _ in range(n):
        rfd, wfd = os.pipe()
        t0 = time.perf_counter()
        pid = spawn(wfd)
        call += time.perf_counter() - t0
        os.close(wfd)
        os.waitpid(pid, 0)
        os.close(rfd)
    wall = time.perf_counter() - started
    return {
        "call_us": call / n * 1e6,
        "wall_us": wall / n * 1e6,
        "child_cpu_us": (_cpu(resource.RUSAGE_CHILDREN) - children) / n * 1e6,
        "our_cpu_us": (_cpu(resource.RUSAGE_SELF) - ours) / n * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-n", type=int, default=1000, help="spawns per way and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args()
    autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")
    state = autogroup.read_text().strip() if autogroup.exists() else "absent"
    print(f"scheduler autogroups: {state}; spawning {TRUE}, {args.n} per way and round")
    ways = spawners()
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in ways}
    for r in range(args.rounds):
        order = list(ways) if r % 2 == 0 else list(reversed(ways))
        for name in order:
            runs[name].append(measure(ways[name], args.n))
    print(
        f"{'':22s} {'call':>8s} {'to reaped':>10s} {'child CPU':>10s} {'our CPU':>9s}  (µs, medians)"
    )
    for name, rows in runs.items():
        med = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
        print(
            f"{name:22s} {med['call_us']:8.0f} {med['wall_us']:10.0f}"
            f" {med['child_cpu_us']:10.0f} {med['our_cpu_us']:9.0f}"
        )


if __name__ == "__main__":
    main()
