"""CPU cost of the store's work per item, alone: a claim and a result for each of N items.

Usage (from the repository root)::

    .venv/bin/python tools/store_cost.py            # 2,000 items, 100 operations per commit
    .venv/bin/python tools/store_cost.py -n 5000 --group 20

What it measures: the SQL a run costs the store's thread (`op_start_run` + `op_finish_run`, six
statements), on one connection in this thread, committed in groups as the committer does, with
``synchronous=NORMAL`` (the service fsyncs the WAL from another thread, beside the next
transaction). Not measured: the fsync itself, and the hops between the loop and the thread.
It prints microseconds per item, wall and CPU of this thread; compare it with the loop's CPU
per item from ``tools/bench.py --profile`` to see which side a batch waits for.

``--contended`` runs the same work in a second thread while the main thread stands in for the
trio loop (Python work, and a system call that lets the GIL go every few microseconds, as the
loop's spawns, pipes and epoll calls do), and prints both: what sharing the GIL with a busy loop
costs the store's thread.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

import attrs

from orchestrator.runner import Outcome, RunResult
from orchestrator.store.records import ItemState, NewItem, Transition
from orchestrator.store.sqlite import connect, op_finish_run, op_ingest, op_start_run


def measure(n: int, group: int) -> tuple[float, float]:
    """(wall, CPU) seconds per item for ``n`` claims and results, ``group`` items a commit."""
    with tempfile.TemporaryDirectory(prefix="store-cost-") as tmp:
        conn = connect(Path(tmp) / "store.db", synchronous="NORMAL")
        try:
            conn.execute("BEGIN IMMEDIATE")
            items = op_ingest(conn, [
                NewItem(id=f"in:f{i}", source="in", key=f"f{i}", route=("s",), path=f"/in/f{i}")
                for i in range(n)
            ])  # fmt: skip
            conn.execute("COMMIT")
            result = RunResult(
                outcome=Outcome.OK, exit_code=0, signal=None, pid=None, duration=0.001,
                tail="", reason="exit 0",
            )  # fmt: skip
            done = Transition(state=ItemState.DONE, stage_index=1, attempts=1, reason=None)
            wall, cpu = time.perf_counter(), time.thread_time()
            for start in range(0, n, group):
                conn.execute("BEGIN IMMEDIATE")
                for run_id, item in enumerate(items[start : start + group], start + 1):
                    op_start_run(conn, item, "s", 0.0, "instance", run_id=run_id, pid=None)
                    running = attrs.evolve(item, state=ItemState.RUNNING, attempts=1)
                    op_finish_run(
                        conn, run_id=run_id, item=running, result=result, transition=done,
                        log_path=None,
                    )  # fmt: skip
                conn.execute("COMMIT")
            return (time.perf_counter() - wall) / n, (time.thread_time() - cpu) / n
        finally:
            conn.close()


def _stand_in_loop(stop: threading.Event) -> int:
    """Python work with a GIL-releasing system call every few microseconds, until ``stop``."""
    fd = os.open(os.devnull, os.O_RDONLY)
    rounds = 0
    try:
        while not stop.is_set():
            for _ in range(300):
                pass
            os.fstat(fd)
            rounds += 1
    finally:
        os.close(fd)
    return rounds


def measure_contended(n: int, group: int) -> tuple[float, float]:
    """`measure` in a thread of its own while this thread plays the busy loop."""
    out: list[tuple[float, float]] = []
    stop = threading.Event()

    def work() -> None:
        try:
            out.append(measure(n, group))
        finally:
            stop.set()

    worker = threading.Thread(target=work)
    worker.start()
    _stand_in_loop(stop)
    worker.join()
    return out[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-n", type=int, default=2000, help="items (default 2000)")
    parser.add_argument("--group", type=int, default=100, help="items per commit (default 100)")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best is shown")
    parser.add_argument(
        "--contended", action="store_true",
        help="also measure it beside a stand-in for a busy loop sharing the GIL",
    )  # fmt: skip
    args = parser.parse_args()
    variants = [("alone", measure)]
    if args.contended:
        variants.append(("beside a busy loop", measure_contended))
    for label, how in variants:
        runs = [how(args.n, args.group) for _ in range(args.repeat)]
        wall, cpu = min(runs)
        print(
            f"claim + result per item, {label}: {wall * 1e6:.0f} µs wall, {cpu * 1e6:.0f} µs CPU "
            f"({args.n} items, {args.group} per commit, best of {args.repeat})"
        )


if __name__ == "__main__":
    main()
