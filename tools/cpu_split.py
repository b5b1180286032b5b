"""Where a batch's CPU goes, per item: the loop's thread, our other threads, the stage processes.

Usage (from the repository root)::

    .venv/bin/python tools/cpu_split.py                 # 2,000 x `true`, 3 batches
    .venv/bin/python tools/cpu_split.py -n 5000 --repeat 5
    PYTHONPATH=/tmp/base .venv/bin/python tools/cpu_split.py   # another checkout (worktree)
    .venv/bin/python tools/cpu_split.py --against /tmp/base --rounds 6   # the two, alternated

Each batch is scenario (a) of ``tools/bench.py`` -- one `true` stage at concurrency 2 over N
empty files -- run *in this process* (``orchestrator batch`` through its ``main``), so that the
CPU clock of each thread can be read before and after: the main thread runs the trio loop
(spawns, watches, the engine), the other threads are the store's and the helpers', and the
children's figure is the stage processes themselves (``RUSAGE_CHILDREN``). Start-up (imports) is
not counted: a small batch runs first, unreported. Compare checkouts batch by batch, alternated:
the machine's speed drifts, so compare the loop's CPU relative to the children's, which drifts
with it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from orchestrator.cli import main as cli_main

CONFIG = """\
state_dir = "state"
[log]
level = "WARNING"
[http]
listen = false
[[sources]]
name = "in"
type = "directory"
path = "inbox"
route = ["s"]
settle = "0s"
[[stages]]
name = "s"
command = ["true"]
concurrency = 2
"""


def _thread_cpu() -> dict[int, float]:
    """CPU seconds of every live thread of this process, by native id."""
    out = {}
    for thread in threading.enumerate():
        if thread.ident is None or thread.native_id is None:
            continue
        with contextlib.suppress(OSError, OverflowError):
            out[thread.native_id] = time.clock_gettime(time.pthread_getcpuclockid(thread.ident))
    return out


def _schedstat(native_id: int) -> tuple[float, float]:
    """(seconds on CPU, seconds runnable but waiting for a CPU) of one of our threads."""
    with open(f"/proc/self/task/{native_id}/schedstat") as f:
        on_cpu, waiting, _ = f.read().split()
    return int(on_cpu) / 1e9, int(waiting) / 1e9


def _process_cpu() -> float:
    """CPU seconds of every thread of this process, those already ended included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def one_batch(n: int) -> dict[str, float]:
    """Run one batch of ``n`` items; microseconds per item for each part, and the rate."""
    with tempfile.TemporaryDirectory(prefix="cpu-split-") as tmp:
        folder = Path(tmp)
        (folder / "inbox").mkdir()
        for i in range(n):
            (folder / "inbox" / f"f{i:05d}").touch()
        (folder / "c.toml").write_text(CONFIG)
        main_id = threading.main_thread().native_id
        before, children, process = _thread_cpu(), _children_cpu(), _process_cpu()
        sched, wall = _schedstat(main_id), time.perf_counter()
        out = io.StringIO()
        with contextlib.chdir(folder), contextlib.redirect_stdout(out):
            try:
                cli_main(["batch", "-c", "c.toml", "--json", "--no-progress"])
            except SystemExit as exc:
                if exc.code not in (0, None):
                    raise RuntimeError(f"the batch failed (exit {exc.code})") from None
        after, children = _thread_cpu(), _children_cpu() - children
        process = _process_cpu() - process
        (on_cpu, waiting), wall = _schedstat(main_id), time.perf_counter() - wall
        on_cpu, waiting = on_cpu - sched[0], waiting - sched[1]
    summary = json.loads(out.getvalue())
    main = after.get(main_id, 0.0) - before.get(main_id, 0.0)
    # Threads that started and ended within the batch (the store's) count too.
    others = process - main
    return {
        "items_per_second": summary["items_per_second"],
        "loop_us": main / n * 1e6,
        "threads_us": others / n * 1e6,
        "children_us": children / n * 1e6,
        # The loop's thread over the batch's wall time: on CPU, waiting for a CPU, and the rest
        # (blocked: the vfork wait of each spawn, the GIL, idle in epoll).
        "loop_wait_us": waiting / n * 1e6,
        "loop_blocked_us": (wall - on_cpu - waiting) / n * 1e6,
    }


def _line(run: dict[str, float]) -> str:
    return (
        f"{run['items_per_second']:7.0f} items/s   CPU per item: loop {run['loop_us']:4.0f} µs,"
        f" other threads {run['threads_us']:4.0f} µs, stage processes"
        f" {run['children_us']:4.0f} µs   (loop / stage processes"
        f" {run['loop_us'] / run['children_us']:.2f}); loop thread also waiting for a CPU"
        f" {run['loop_wait_us']:.0f} µs, blocked {run['loop_blocked_us']:.0f} µs"
    )


def _median_line(runs: list[dict[str, float]]) -> str:
    med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    ours = statistics.median((r["loop_us"] + r["threads_us"]) / r["children_us"] for r in runs)
    return (
        f"median of {len(runs)}: {med['items_per_second']:.0f} items/s, loop {med['loop_us']:.0f}"
        f" µs, other threads {med['threads_us']:.0f} µs, stage processes"
        f" {med['children_us']:.0f} µs, ours / stage processes {ours:.3f}"
    )


def alternate(other: str, rounds: int, n: int) -> None:
    """Batches of this checkout and of ``other`` (its ``orchestrator`` package first on the
    path), two at a time, in alternating order; then the medians of each."""
    here = str(Path(__file__).resolve().parent.parent)
    checkouts = {"this checkout": here, other: str(Path(other).resolve())}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in checkouts}
    order = list(checkouts)
    for i in range(rounds):
        for name in order if i % 2 == 0 else order[::-1]:
            env = {**os.environ, "PYTHONPATH": checkouts[name]}
            out = subprocess.run(
                [sys.executable, __file__, "-n", str(n), "--repeat", "2", "--json"],
                env=env, cwd=checkouts[name], capture_output=True, text=True, check=True,
            ).stdout  # fmt: skip
            for line in out.splitlines():
                runs[name].append(json.loads(line))
                print(f"{name}: {_line(runs[name][-1])}", flush=True)
    for name, done in runs.items():
        print(f"{name}: {_median_line(done)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-n", type=int, default=2000, help="items per batch (default 2000)")
    parser.add_argument("--repeat", type=int, default=3, help="batches (default 3)")
    parser.add_argument("--json", action="store_true", help="one JSON object per batch")
    parser.add_argument(
        "--against", metavar="DIR",
        help="alternate with the checkout in DIR (e.g. a git worktree), two batches at a time",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=6, help="with --against (default 6)")
    args = parser.parse_args()
    if args.against:
        alternate(args.against, args.rounds, args.n)
        return
    one_batch(50)  # warm-up: the service's modules are imported by the first batch
    runs = []
    for _ in range(args.repeat):
        run = one_batch(args.n)
        runs.append(run)
        print(json.dumps(run) if args.json else _line(run), flush=True)
    if len(runs) > 1 and not args.json:
        print(_median_line(runs))


if __name__ == "__main__":
    main()
