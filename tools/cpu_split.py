"""Where a batch's CPU goes, per item: the loop's thread, our other threads, the stage processes.

Usage (from the repository root)::

    .venv/bin/python tools/cpu_split.py                 # 2,000 x `true`, 3 batches
    .venv/bin/python tools/cpu_split.py -n 5000 --repeat 5
    PYTHONPATH=/tmp/base .venv/bin/python tools/cpu_split.py   # another checkout (worktree)

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
import resource
import statistics
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-n", type=int, default=2000, help="items per batch (default 2000)")
    parser.add_argument("--repeat", type=int, default=3, help="batches (default 3)")
    args = parser.parse_args()
    one_batch(50)  # warm-up: the service's modules are imported by the first batch
    runs = []
    for _ in range(args.repeat):
        run = one_batch(args.n)
        runs.append(run)
        print(
            f"{run['items_per_second']:7.0f} items/s   CPU per item: loop {run['loop_us']:4.0f} µs,"
            f" other threads {run['threads_us']:4.0f} µs, stage processes"
            f" {run['children_us']:4.0f} µs   (loop / stage processes"
            f" {run['loop_us'] / run['children_us']:.2f}); loop thread also waiting for a CPU"
            f" {run['loop_wait_us']:.0f} µs, blocked {run['loop_blocked_us']:.0f} µs",
            flush=True,
        )
    if len(runs) > 1:
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(
            f"median: {med['items_per_second']:.0f} items/s, loop {med['loop_us']:.0f} µs, other"
            f" threads {med['threads_us']:.0f} µs, stage processes {med['children_us']:.0f} µs"
        )


if __name__ == "__main__":
    main()
