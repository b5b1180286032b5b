"""Benchmarks of the orchestrator, as ratios against baselines measured in the same invocation.

Usage (from the repository root)::

    .venv/bin/python tools/bench.py                 # all scenarios, full size, table
    .venv/bin/python tools/bench.py --quick         # smaller (a), (b), shorter (d), (e)
    .venv/bin/python tools/bench.py --only a,c      # some scenarios
    .venv/bin/python tools/bench.py --json          # every figure as JSON on stdout
    .venv/bin/python tools/bench.py --profile       # where the time of (a) goes (py-spy/cProfile)
    .venv/bin/python tools/bench.py --only a --against /tmp/base   # (a) against another checkout

Scenarios (each repetition in a fresh temporary folder; every figure is the median of
``--repeat`` runs, 3 by default; the machine is shared and noisy, so only the ratios are
meant to be compared between runs):

a  throughput: 2,000 empty files through a one-stage ``true`` pipeline at concurrency 2, with
   ``orchestrator batch`` as a subprocess, timed from process start to exit (start-up
   included). Baseline: ``seq 2000 | xargs -P2 -I{} true``, measured right before each batch.
   Ratio = orchestrator items/s / xargs items/s (target >= 0.55).
b  makespan: N items (150; 100 with --quick) through extract(1) -> convert(1) -> store(5), each
   stage ``sleep 0.02``. Ideal = (N + 2) * t, t the measured mean wall time of one
   ``sleep 0.02`` process (50 runs, measured right before each batch). Ratio = ideal /
   makespan, the makespan being the batch's own ``elapsed_seconds`` (target >= 0.95).
c  idle RSS of ``orchestrator run`` (one directory source on an empty folder, one stage) after
   3 s, from /proc/<pid>/status VmRSS, in MiB (target <= 45); then SIGTERM, which must end it
   with exit 0 within 10 s. Baseline: an idle ``python -c 'import trio; trio.run(...)'``.
d  polling cost: CPU (utime + stime from /proc/<pid>/stat) of ``orchestrator run`` over a 15 s
   window (8 s with --quick), its one directory source polling a folder of 10,000 files every
   2 s, all of them known already (their items are put in the store as done before the start,
   so nothing is ingested: the steady state of a big inbox). Target: under 2% of one core.
   Baseline: the same service on an empty folder, measured right before (what the service costs
   without the poller's scans). Then one new file is dropped, to show the poller is alive.
e  detection latency: files created one at a time at random moments (60; 30 with --quick) in a
   folder polled every 0.5 s with settle 0.5 s; the one stage appends its start time. Latency =
   stage start - file creation. Target: p99 within poll_interval + settle + 100 ms (1.1 s).

d and e run once per invocation (no --repeat): each is already a long sample.

Nothing here imports the product: it is driven through its command line, as a user would.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

TARGETS = {
    "a_ratio": (">=", 0.55),
    "b_ratio": (">=", 0.95),
    "c_rss_mib": ("<=", 45.0),
    "d_cpu_pct": ("<=", 2.0),
    "e_p99_s": ("<=", 0.5 + 0.5 + 0.1),
}

# --------------------------------------------------------------------------------------------
# helpers


def orchestrator_argv() -> list[str]:
    """How to start the CLI: the venv's console script, else ``python -m orchestrator``."""
    script = Path(sys.executable).parent / "orchestrator"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "orchestrator"]


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("ORCHESTRATOR_CONFIG", None)
    env.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    return env


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def make_files(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"f{i:05d}").touch()
    # Make the files older than any settle time, and the mtimes distinct enough not to matter.
    past = time.time() - 60
    for entry in os.scandir(folder):
        os.utime(entry.path, (past, past))


def write_config(
    folder: Path, route: list[str], stages: list[tuple[str, list[str], int]], *,
    settle: str = "0s", poll_interval: str = "1s",
) -> Path:  # fmt: skip
    lines = [
        'state_dir = "state"',
        "[log]",
        'level = "WARNING"',
        "[http]",
        "listen = false",
        "[[sources]]",
        'name = "in"',
        'type = "directory"',
        'path = "inbox"',
        f"route = {json.dumps(route)}",
        f"settle = {json.dumps(settle)}",
        f"poll_interval = {json.dumps(poll_interval)}",
    ]
    for name, command, concurrency in stages:
        lines += [
            "[[stages]]",
            f"name = {json.dumps(name)}",
            f"command = {json.dumps(command)}",
            f"concurrency = {concurrency}",
        ]
    path = folder / "bench.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def run_batch(
    config: Path, *, timeout: float = 600, pythonpath: str | None = None, module: bool = False
) -> dict[str, Any]:
    """Run ``orchestrator batch`` and time it from process start to exit.

    ``pythonpath``: a checkout whose ``orchestrator`` package runs instead of the installed one
    (started as ``python -m orchestrator``: the console script names this checkout's entry
    point, which another checkout may not have). ``module``: start it that way anyway (both
    sides of ``--against``, so that they start alike).
    """
    start = [sys.executable, "-m", "orchestrator"] if module or pythonpath else orchestrator_argv()
    argv = [*start, "batch", "-c", str(config), "--json", "--no-progress"]
    env = child_env()
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    t0 = time.perf_counter()
    proc = subprocess.run(
        argv, cwd=config.parent, env=env, capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    try:
        summary = json.loads(proc.stdout)
    except json.JSONDecodeError:
        summary = None
    return {"wall": wall, "rc": proc.returncode, "summary": summary, "stderr": proc.stderr[-2000:]}


def batch_ok(res: dict[str, Any], n: int) -> str | None:
    """None when the batch did all ``n`` items; otherwise what went wrong."""
    s = res["summary"]
    if res["rc"] != 0 or s is None or not s.get("ok") or s.get("items") != n:
        items = None if s is None else s.get("items")
        states = None if s is None else s.get("states")
        return f"exit {res['rc']}, items {items}/{n}, states {states}: {res['stderr'].strip()}"
    return None


def read_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM... of a process, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key.startswith("Vm") and value.strip().endswith("kB"):
                out[key] = int(value.split()[0])
    return out


# --------------------------------------------------------------------------------------------
# the machine


def _spread(ratios: list[float]) -> str:
    """The per-run ratios' range (and quartiles from 4 runs): on a shared machine one run of
    (a) says little, and the median of three not much more."""
    if len(ratios) < 2:
        return ""
    spread = f"; runs {min(ratios):.3f}-{max(ratios):.3f}"
    if len(ratios) >= 4:
        low, mid, high = statistics.quantiles(ratios, n=4, method="inclusive")
        spread += f", quartiles {low:.3f}/{mid:.3f}/{high:.3f}"
    return spread


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count() or 0
    mem = "?"
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    versions: dict[str, str] = {}
    for dist in ("orchestrator", "trio", "loguru"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:
            versions[dist] = "?"
    return {
        "nproc": nproc,
        "cpu": model,
        "memory": mem,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "os": _os_name(),
        "sqlite": sqlite3.sqlite_version,
        "versions": versions,
        "loadavg_start": os.getloadavg(),
        "product": product_state(),
    }


def product_state() -> dict[str, Any]:
    """The commit measured, and whether the product's files differ from it (work in progress)."""

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              check=False)  # fmt: skip
        return proc.stdout.rstrip() if proc.returncode == 0 else ""

    porcelain = git("status", "--porcelain", "--", "orchestrator")
    changed = [line[3:] for line in porcelain.splitlines() if len(line) > 3]
    commit = git("rev-parse", "--short", "HEAD").strip() or "?"
    return {"commit": commit, "uncommitted_product_files": changed}


def _os_name() -> str:
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        for line in f:
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip().strip('"')
    return platform.system()


# --------------------------------------------------------------------------------------------
# (a) throughput


def bench_a(n: int, repeat: int, against: str | None = None) -> dict[str, Any]:
    """Scenario (a); with ``against`` (a checkout), each run also times that checkout's batch
    on the same files, the two in alternating order, against the same xargs baseline."""
    reps = []
    others: list[float] = []
    for r in range(repeat):
        with tempfile.TemporaryDirectory(prefix="bench-a-") as tmp:
            folder = Path(tmp)
            config = write_config(folder, ["s"], [("s", ["true"], 2)])
            # The baseline, right before.
            t0 = time.perf_counter()
            subprocess.run(["sh", "-c", f"seq {n} | xargs -P2 -I{{}} true"], check=True)
            base_wall = time.perf_counter() - t0
            order = [None] if against is None else [None, against][:: 1 if r % 2 == 0 else -1]
            for tree in order:
                shutil.rmtree(folder / "state", ignore_errors=True)
                shutil.rmtree(folder / "inbox", ignore_errors=True)
                make_files(folder / "inbox", n)
                ran = run_batch(config, pythonpath=tree, module=against is not None)
                error = batch_ok(ran, n)
                if error:
                    return {"error": f"batch failed{f' ({tree})' if tree else ''}: {error}"}
                if tree is None:
                    res = ran
                else:
                    others.append(base_wall / ran["wall"])
                    log(f"  a[{r + 1}/{repeat}] {tree}: ratio {others[-1]:.3f}")
        rep: dict[str, Any] = {
            "xargs_wall": base_wall,
            "xargs_ips": n / base_wall,
            "orch_wall": res["wall"],
            "orch_ips": n / res["wall"],
            "orch_elapsed": res["summary"]["elapsed_seconds"],
            "orch_internal_ips": res["summary"]["items_per_second"],
        }
        rep["ratio"] = rep["orch_ips"] / rep["xargs_ips"]
        log(
            f"  a[{r + 1}/{repeat}] xargs {rep['xargs_ips']:.0f}/s, orchestrator "
            f"{rep['orch_ips']:.0f}/s wall ({rep['orch_internal_ips']}/s own), "
            f"ratio {rep['ratio']:.3f}"
        )
        reps.append(rep)
    out: dict[str, Any] = {"n": n, "repeats": reps}
    for key in reps[0]:
        out[key] = median([rep[key] for rep in reps])
    # The headline ratio is the ratio of the medians; the median of per-pair ratios is kept too.
    out["ratio_of_pairs"] = out.pop("ratio")
    out["ratio"] = out["orch_ips"] / out["xargs_ips"]
    if against is not None:
        out["against"] = {"tree": against, "ratios": others, "ratio": median(others)}
        log(
            f"  a: this checkout {out['ratio_of_pairs']:.3f}, {against} {median(others):.3f}"
            " (medians of the per-run ratios, alternated)"
        )
    return out


# --------------------------------------------------------------------------------------------
# (b) makespan

SLEEP = "0.02"


def measure_sleep(count: int = 50) -> float:
    t0 = time.perf_counter()
    for _ in range(count):
        subprocess.run(["sleep", SLEEP], check=True)
    return (time.perf_counter() - t0) / count


def db_span(state_db: Path) -> float | None:
    """From the first item's ingest to the last run's end, as the store recorded them."""
    try:
        conn = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True)
        try:
            first = conn.execute("SELECT min(created_at) FROM items").fetchone()[0]
            last = conn.execute("SELECT max(ended_at) FROM runs").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return None
    if first is None or last is None:
        return None
    return float(last - first)


def bench_b(n: int, repeat: int) -> dict[str, Any]:
    reps = []
    for r in range(repeat):
        with tempfile.TemporaryDirectory(prefix="bench-b-") as tmp:
            folder = Path(tmp)
            make_files(folder / "inbox", n)
            cmd = ["sleep", SLEEP]
            config = write_config(
                folder, ["extract", "convert", "store"],
                [("extract", cmd, 1), ("convert", cmd, 1), ("store", cmd, 5)],
            )  # fmt: skip
            t = measure_sleep()
            res = run_batch(config)
            span = db_span(folder / "state" / "orchestrator.db")
        error = batch_ok(res, n)
        if error:
            return {"error": f"batch failed: {error}"}
        summary = res["summary"]
        ideal = (n + 2) * t
        rep: dict[str, Any] = {
            "t_sleep": t,
            "ideal": ideal,
            "makespan": summary["elapsed_seconds"],
            "makespan_store": span if span is not None else float("nan"),
            "wall": res["wall"],
            "ratio": ideal / summary["elapsed_seconds"],
            "ratio_wall": ideal / res["wall"],
            "ratio_store": ideal / span if span else float("nan"),
            "stage_mean_duration": {k: v["mean_duration"] for k, v in summary["stages"].items()},
        }
        log(
            f"  b[{r + 1}/{repeat}] t {t * 1000:.2f} ms, ideal {ideal:.3f}s, makespan "
            f"{rep['makespan']:.3f}s (wall {rep['wall']:.3f}s), ratio {rep['ratio']:.3f}"
        )
        reps.append(rep)
    out: dict[str, Any] = {"n": n, "repeats": reps}
    for key in (
        "t_sleep",
        "ideal",
        "makespan",
        "makespan_store",
        "wall",
        "ratio_wall",
        "ratio_store",
    ):
        out[key] = median([rep[key] for rep in reps])
    out["ratio"] = median([rep["ratio"] for rep in reps])
    # Overhead per item on the bottleneck (the one-slot stages), beyond the process itself.
    out["overhead_per_item_ms"] = (out["makespan"] - out["ideal"]) / n * 1000
    return out


# --------------------------------------------------------------------------------------------
# (c) idle RSS and clean SIGTERM

TRIO_IDLE = "import trio; trio.run(trio.sleep, 60)"


def bench_c(repeat: int, wait: float = 3.0) -> dict[str, Any]:
    reps = []
    for r in range(repeat):
        with tempfile.TemporaryDirectory(prefix="bench-c-") as tmp:
            folder = Path(tmp)
            (folder / "inbox").mkdir()
            config = write_config(folder, ["s"], [("s", ["true"], 1)])
            stderr_path = folder / "stderr.txt"
            with open(stderr_path, "wb") as err:
                proc = subprocess.Popen(
                    [*orchestrator_argv(), "run", "-c", str(config)], cwd=folder,
                    env=child_env(), stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                )  # fmt: skip
                ref = subprocess.Popen(
                    [sys.executable, "-c", TRIO_IDLE], stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )  # fmt: skip
                try:
                    time.sleep(wait)
                    alive = proc.poll() is None
                    status = read_status(proc.pid) if alive else {}
                    ref_status = read_status(ref.pid)
                finally:
                    ref.kill()
                    ref.wait()
                if not alive:
                    return {"error": f"`orchestrator run` exited early ({proc.returncode}): "
                            + stderr_path.read_text()[-2000:]}  # fmt: skip
                t0 = time.perf_counter()
                proc.send_signal(signal.SIGTERM)
                try:
                    rc: int | None = proc.wait(timeout=10)
                    exit_s: float | None = time.perf_counter() - t0
                except subprocess.TimeoutExpired:
                    rc, exit_s = None, None
                    proc.kill()
                    proc.wait()
            rep: dict[str, Any] = {
                "rss_mib": status["VmRSS"] / 1024,
                "rss_mb": status["VmRSS"] * 1024 / 1e6,
                "hwm_mib": status.get("VmHWM", 0) / 1024,
                "trio_idle_rss_mib": ref_status["VmRSS"] / 1024,
                "sigterm_rc": rc,
                "sigterm_exit_s": exit_s,
                "clean_exit": rc == 0,
                "stderr": stderr_path.read_text()[-500:],
            }
        log(
            f"  c[{r + 1}/{repeat}] RSS {rep['rss_mib']:.1f} MiB (trio idle "
            f"{rep['trio_idle_rss_mib']:.1f}), SIGTERM -> exit {rc} in "
            f"{'-' if exit_s is None else f'{exit_s:.2f}s'}"
        )
        reps.append(rep)
    out: dict[str, Any] = {"repeats": reps, "wait_s": wait}
    for key in ("rss_mib", "rss_mb", "hwm_mib", "trio_idle_rss_mib"):
        out[key] = median([rep[key] for rep in reps])
    exits = [rep["sigterm_exit_s"] for rep in reps if rep["sigterm_exit_s"] is not None]
    out["sigterm_exit_s"] = median(exits) if exits else None
    out["clean_exit"] = all(rep["clean_exit"] for rep in reps)
    out["ratio_to_trio_idle"] = out["rss_mib"] / out["trio_idle_rss_mib"]
    return out


# --------------------------------------------------------------------------------------------
# (d) CPU of polling a big folder

D_FILES = 10_000
D_POLL = "2s"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process so far, in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of proc(5); the split starts at field 3 (state).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def items_in(state_db: Path) -> int:
    conn = sqlite3.connect(f"file:{state_db}?mode=ro", uri=True, timeout=5)
    try:
        return int(conn.execute("SELECT count(*) FROM items").fetchone()[0])
    finally:
        conn.close()


def mark_known(state_db: Path, inbox: Path, names: list[str]) -> None:
    """Record ``names`` as items of source "in" that are done, as an earlier run would have."""
    now = time.time()
    conn = sqlite3.connect(state_db, timeout=5)
    try:
        with conn:
            conn.executemany(
                "INSERT INTO items (id, source, key, path, route, stage_index, state, created_at,"
                " updated_at) VALUES (?, 'in', ?, ?, '[\"s\"]', 1, 'done', ?, ?)",
                [(f"in:{n}", n, str(inbox / n), now, now) for n in names],
            )
    finally:
        conn.close()


def _start_run(config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            [*orchestrator_argv(), "run", "-c", str(config)], cwd=config.parent,
            env=child_env(), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
        )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> int | None:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def _cpu_window(proc: subprocess.Popen[bytes], warmup: float, window: float) -> float | None:
    """CPU share of one core (%) of ``proc`` over ``window`` seconds, after ``warmup``."""
    time.sleep(warmup)
    if proc.poll() is not None:
        return None
    c0, t0 = cpu_seconds(proc.pid), time.monotonic()
    time.sleep(window)
    if proc.poll() is not None:
        return None
    c1, t1 = cpu_seconds(proc.pid), time.monotonic()
    return (c1 - c0) / (t1 - t0) * 100


def bench_d(window: float, warmup: float = 4.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-d-") as tmp:
        folder = Path(tmp)
        inbox = folder / "inbox"
        inbox.mkdir()
        config = write_config(folder, ["s"], [("s", ["true"], 2)], settle="1s",
                              poll_interval=D_POLL)  # fmt: skip
        log_path = folder / "service.log"
        # Baseline: the same service on an empty folder. It also creates the store.
        proc = _start_run(config, log_path)
        base = _cpu_window(proc, warmup, window)
        rc = _stop(proc)
        if base is None or rc != 0:
            return {"error": f"baseline `run` failed ({rc}): {log_path.read_text()[-2000:]}"}
        # 10,000 files, all known: the store holds them as done items.
        names = [f"f{i:05d}" for i in range(D_FILES)]  # as make_files names them
        make_files(inbox, D_FILES)
        state_db = folder / "state" / "orchestrator.db"
        mark_known(state_db, inbox, names)
        proc = _start_run(config, log_path)
        try:
            busy = _cpu_window(proc, warmup, window)
            ingested_during = items_in(state_db) - D_FILES
            # Alive? A new file is taken within a couple of polls.
            (inbox / "new.dat").write_text("new")
            t0 = time.monotonic()
            while items_in(state_db) < D_FILES + 1 and time.monotonic() - t0 < 10:
                time.sleep(0.05)
            detected = time.monotonic() - t0 if items_in(state_db) == D_FILES + 1 else None
        finally:
            rc = _stop(proc)
        if busy is None or rc != 0:
            return {"error": f"`run` failed ({rc}): {log_path.read_text()[-2000:]}"}
    out: dict[str, Any] = {
        "files": D_FILES,
        "poll_interval": D_POLL,
        "window_s": window,
        "cpu_pct": busy,
        "idle_service_cpu_pct": base,
        "poller_cpu_pct": busy - base,
        "ingested_during_window": ingested_during,
        "new_file_detected_s": detected,
    }
    log(
        f"  d: {busy:.2f}% of a core with 10,000 known files (idle service {base:.2f}%, "
        f"poller {busy - base:.2f}%); new file taken in "
        f"{'-' if detected is None else f'{detected:.2f}s'}"
    )
    return out


# --------------------------------------------------------------------------------------------
# (e) detection latency

E_POLL = 0.5
E_SETTLE = 0.5
# The stage: one line per run, "<file name> <start time>", appended (O_APPEND: whole lines).
E_STAGE = ["sh", "-c", 'echo "$1 $(date +%s.%N)" >> "$2"', "stamp"]


def bench_e(n: int) -> dict[str, Any]:
    rng = random.Random(5)
    with tempfile.TemporaryDirectory(prefix="bench-e-") as tmp:
        folder = Path(tmp)
        inbox = folder / "inbox"
        inbox.mkdir()
        starts = folder / "starts.txt"
        config = write_config(
            folder, ["stamp"], [("stamp", [*E_STAGE, "{name}", str(starts)], 2)],
            settle=f"{E_SETTLE}s", poll_interval=f"{E_POLL}s",
        )  # fmt: skip
        log_path = folder / "service.log"
        proc = _start_run(config, log_path)
        created: dict[str, float] = {}
        try:
            time.sleep(2.0)  # start-up
            for i in range(n):
                time.sleep(rng.uniform(0.05, 0.6))
                name = f"e{i:03d}.dat"
                tmp_path = inbox / f".{name}.part"  # ignored by default until renamed
                tmp_path.write_text(name)
                os.rename(tmp_path, inbox / name)
                created[name] = time.time()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if starts.exists() and len(starts.read_text().splitlines()) >= n:
                    break
                time.sleep(0.05)
        finally:
            rc = _stop(proc)
        seen = {}
        if starts.exists():
            for line in starts.read_text().splitlines():
                name, _, at = line.rpartition(" ")
                seen[name] = float(at)
        if rc != 0 or len(seen) != n:
            return {"error": f"`run` exit {rc}, {len(seen)}/{n} started: "
                    + log_path.read_text()[-2000:]}  # fmt: skip
    latencies = sorted(seen[k] - created[k] for k in created)
    out: dict[str, Any] = {
        "n": n,
        "poll_interval": E_POLL,
        "settle": E_SETTLE,
        "target_s": E_POLL + E_SETTLE + 0.1,
        "p50_s": _quantile(latencies, 0.5),
        "p90_s": _quantile(latencies, 0.9),
        "p99_s": _quantile(latencies, 0.99),
        "max_s": latencies[-1],
        "min_s": latencies[0],
    }
    log(
        f"  e: latency p50 {out['p50_s']:.3f}s, p90 {out['p90_s']:.3f}s, p99 "
        f"{out['p99_s']:.3f}s, max {out['max_s']:.3f}s (target p99 <= {out['target_s']:.1f}s)"
    )
    return out


def _quantile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile by linear interpolation between closest ranks."""
    pos = (len(sorted_values) - 1) * q
    low = int(pos)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (pos - low)


# --------------------------------------------------------------------------------------------
# profile of (a)

# Runs in the child: counts the store's transactions (wrapping the method from the outside; the
# product is not changed), optionally under cProfile, then runs the CLI.
PROFILE_CHILD = textwrap.dedent(
    """
    import cProfile, json, sys
    from collections import Counter
    from orchestrator.store import sqlite as store_sqlite
    from orchestrator.cli import main

    counts_path, prof_path, config = sys.argv[1], sys.argv[2], sys.argv[3]
    sizes = Counter()
    original = store_sqlite.SqliteStore._commit

    def _commit(self, batch):
        original(self, batch)
        sizes[len(batch)] += 1

    store_sqlite.SqliteStore._commit = _commit
    argv = ["batch", "-c", config, "--json", "--no-progress"]
    if prof_path:
        prof = cProfile.Profile()
        rc = prof.runcall(main, argv)
        prof.dump_stats(prof_path)
    else:
        rc = main(argv)
    with open(counts_path, "w") as f:
        json.dump({"rc": rc, "batch_sizes": {str(k): v for k, v in sizes.items()}}, f)
    sys.exit(rc)
    """
)


def find_py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


def thread_id(label: str) -> str:
    """``thread (1234): MainThread`` -> ``1234`` (py-spy names a thread only once it knows it)."""
    return label.split("(", 1)[-1].split(")", 1)[0]


def classify(stack: list[str], commit_lines: set[str], main_tid: str) -> str:
    """One py-spy sample (frames root -> leaf, thread first) -> a cost category."""
    frames = stack[1:]
    leaf = frames[-1] if frames else ""
    joined = ";".join(frames)
    if thread_id(stack[0]) == main_tid:
        if "EpollIOManager.get_events" in leaf:
            return "main: idle in epoll (waiting for children / the store thread)"
        if "_batch_summary" in joined:
            return "main: batch summary (reading the store)"
        if "_spawn (orchestrator/runner.py" in joined:
            return "main: spawn (fork_exec or posix_spawn)"
        if "reap (orchestrator/runner.py" in joined:
            return "main: waitpid + killpg sweep"
        if "/loguru/" in joined or "loguru/" in leaf:
            return "main: logging (loguru)"
        if "trio/_core/_run.py:2532" in joined or "unrolled_run" in joined:
            if leaf.split(" (")[0].startswith(("Engine.", "run_command", "SqliteStore", "Slots.",
                                                "_Output", "expand_argv", "decide")):  # fmt: skip
                return "main: engine code (workers, runner, store facade)"
            if "orchestrator/" in leaf:
                return "main: engine code (workers, runner, store facade)"
            return "main: trio scheduling / machinery (cancel scopes, to_thread, wakeups)"
        return "main: start-up and exit (imports, config, typer)"
    # worker threads (trio's thread cache: the store's thread and the scan thread)
    if leaf.startswith("WorkerThread._work"):
        return "threads: idle (waiting for a job)"
    if "rmtree" in joined:
        return "store thread: rmtree of the item workdir (inside the transaction)"
    if "makedirs" in joined or "_claim" in leaf:
        return "store thread: mkdir of the item workdir (inside the transaction)"
    if "SqliteStore._commit" in leaf:
        if any(leaf.endswith(f":{n})") for n in commit_lines):
            return "store thread: COMMIT (WAL fsync)"
        return "store thread: BEGIN/SAVEPOINT/RELEASE"
    if "op_" in leaf or "_event (" in leaf:
        return "store thread: SQL statements (claim, finish, ingest)"
    if "DirectorySource.scan" in joined:
        return "threads: directory scan"
    if "SqliteStore._commit" in joined:
        return "store thread: other inside the transaction"
    if "wakeup_thread_and_signal_safe" in leaf or "run_sync_soon" in joined:
        return "threads: waking the trio loop (thread -> loop hand-off)"
    return "threads: other"


def _commit_lines() -> set[str]:
    """Line numbers of ``conn.execute("COMMIT")`` in the store module (read, not imported)."""
    src = ROOT / "orchestrator" / "store" / "sqlite.py"
    lines = set()
    with contextlib.suppress(OSError):
        for i, line in enumerate(src.read_text().splitlines(), 1):
            if 'execute("COMMIT")' in line:
                lines.add(str(i))
    return lines


def profile_a(n: int, top: int = 25) -> dict[str, Any]:
    out: dict[str, Any] = {"n": n}
    commit_lines = _commit_lines()
    py_spy = find_py_spy()
    with tempfile.TemporaryDirectory(prefix="bench-prof-") as tmp:
        folder = Path(tmp)
        # 1. cProfile (main thread only) + transaction counts.
        make_files(folder / "p1" / "inbox", n)
        config = write_config(folder / "p1", ["s"], [("s", ["true"], 2)])
        counts_path = folder / "counts.json"
        prof_path = Path(tmp) / "a.prof"
        argv = [sys.executable, "-c", PROFILE_CHILD, str(counts_path), str(prof_path), str(config)]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=config.parent, env=child_env(), capture_output=True,
                              text=True, timeout=600, check=False)  # fmt: skip
        out["cprofile_wall"] = time.perf_counter() - t0
        if proc.returncode != 0 or not counts_path.exists():
            return {"error": f"profiled batch failed ({proc.returncode}): {proc.stderr[-2000:]}"}
        sizes = json.loads(counts_path.read_text())["batch_sizes"]
        commits = sum(sizes.values())
        ops = sum(int(k) * v for k, v in sizes.items())
        out["store_commits"] = commits
        out["store_operations"] = ops
        out["commits_per_item"] = commits / n
        out["operations_per_commit"] = ops / commits if commits else None
        out["commit_batch_sizes"] = dict(sorted(sizes.items(), key=lambda kv: int(kv[0])))
        import io
        import pstats

        text = io.StringIO()
        stats = pstats.Stats(str(prof_path), stream=text)
        stats.sort_stats("tottime").print_stats(top)
        out["cprofile_top"] = text.getvalue()
        keep = Path(tempfile.gettempdir()) / "bench-a.prof"
        shutil.copy(prof_path, keep)
        out["cprofile_file"] = str(keep)

        # 2. py-spy, every thread, idle samples included (wall-clock view).
        if py_spy is None:
            out["py_spy"] = "not installed (.venv/bin/pip install py-spy)"
            return out
        make_files(folder / "p2" / "inbox", n)
        config = write_config(folder / "p2", ["s"], [("s", ["true"], 2)])
        raw = folder / "spy.txt"
        argv = [py_spy, "record", "--rate", "250", "--threads", "--idle", "--nonblocking",
                "--format", "raw", "--output", str(raw), "--",
                sys.executable, "-c", PROFILE_CHILD, str(folder / "c2.json"), "", str(config)]  # fmt: skip
        proc = subprocess.run(argv, cwd=config.parent, env=child_env(), capture_output=True,
                              text=True, timeout=600, check=False)  # fmt: skip
        if not raw.exists():
            out["py_spy"] = f"py-spy failed ({proc.returncode}): {proc.stderr[-1000:]}"
            return out
        per_thread: Counter[str] = Counter()
        categories: Counter[str] = Counter()
        lines = raw.read_text().splitlines()
        main_tid = next((thread_id(x) for x in lines if "MainThread" in x.split(";", 1)[0]), "")
        for line in lines:
            stack_text, _, count_text = line.rpartition(" ")
            if not stack_text:
                continue
            stack = stack_text.split(";")
            count = int(count_text)
            main = thread_id(stack[0]) == main_tid
            per_thread["MainThread" if main else "other threads"] += count
            categories[classify(stack, commit_lines, main_tid)] += count
        keep = Path(tempfile.gettempdir()) / "bench-a.py-spy.txt"
        shutil.copy(raw, keep)
        out["py_spy_file"] = str(keep)
        out["py_spy_samples_per_thread"] = dict(per_thread)
        main_total = per_thread["MainThread"] or 1
        other_total = per_thread["other threads"] or 1
        out["py_spy_categories"] = {
            cat: {
                "samples": cnt,
                "share_of_its_thread": cnt
                / (main_total if cat.startswith("main") else other_total),
            }
            for cat, cnt in categories.most_common()
        }
    return out


# --------------------------------------------------------------------------------------------
# report


def verdict(key: str, value: float | None) -> str:
    if value is None:
        return "?"
    op, target = TARGETS[key]
    good = value >= target if op == ">=" else value <= target
    return "OK" if good else "MISS"


def print_report(results: dict[str, Any]) -> None:
    m = results["machine"]
    print("machine")
    print(f"  nproc {m['nproc']}, CPU {m['cpu']}, memory {m['memory']}")
    print(f"  {m['os']}, kernel {m['kernel']}, {m['implementation']} {m['python']}, "
          f"SQLite {m['sqlite']}")  # fmt: skip
    print("  " + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
          + f"; loadavg at start {' '.join(f'{x:.2f}' for x in m['loadavg_start'])}")  # fmt: skip
    prod = m["product"]
    dirty = prod["uncommitted_product_files"]
    print(f"  product at commit {prod['commit']}"
          + (f" + uncommitted changes to {', '.join(dirty)}" if dirty else ""))  # fmt: skip
    print(f"  medians of {results['repeat']} runs; ratios against baselines measured in this run")
    print()
    rows: list[tuple[str, str, str, str, str]] = []
    a = results.get("a")
    if a is not None:
        if "error" in a:
            rows.append(("a throughput", "ERROR", "", ">= 0.55", a["error"][:60]))
        else:
            rows.append((
                f"a throughput, {a['n']} x true, conc 2",
                f"{a['orch_ips']:.0f} items/s (wall, start-up incl.)",
                f"xargs -P2 {a['xargs_ips']:.0f}/s",
                f"{a['ratio']:.3f} (>= 0.55) {verdict('a_ratio', a['ratio'])}",
                f"batch's own items_per_second {a['orch_internal_ips']:.0f}/s "
                f"(elapsed {a['orch_elapsed']:.2f}s of {a['orch_wall']:.2f}s wall)"
                + _spread([rep["ratio"] for rep in a["repeats"]]),
            ))  # fmt: skip
    b = results.get("b")
    if b is not None:
        if "error" in b:
            rows.append(("b makespan", "ERROR", "", ">= 0.95", b["error"][:60]))
        else:
            rows.append((
                f"b makespan, {b['n']} items, 1/1/5 x sleep {SLEEP}",
                f"{b['makespan']:.3f} s (elapsed_seconds)",
                f"ideal (N+2)*t = {b['ideal']:.3f} s, t = {b['t_sleep'] * 1000:.2f} ms",
                f"{b['ratio']:.3f} (>= 0.95) {verdict('b_ratio', b['ratio'])}",
                f"wall incl. start-up {b['wall']:.3f} s (ratio {b['ratio_wall']:.3f}); "
                f"first ingest -> last run end {b['makespan_store']:.3f} s "
                f"(ratio {b['ratio_store']:.3f}); "
                f"+{b['overhead_per_item_ms']:.2f} ms/item",
            ))  # fmt: skip
    c = results.get("c")
    if c is not None:
        if "error" in c:
            rows.append(("c idle RSS", "ERROR", "", "<= 45 MiB", c["error"][:60]))
        else:
            exit_s = c["sigterm_exit_s"]
            rows.append((
                "c idle RSS of `run` after 3 s",
                f"{c['rss_mib']:.1f} MiB ({c['rss_mb']:.1f} MB)",
                f"idle python+trio {c['trio_idle_rss_mib']:.1f} MiB "
                f"(x{c['ratio_to_trio_idle']:.2f})",
                f"<= 45 MiB {verdict('c_rss_mib', c['rss_mib'])}",
                "SIGTERM -> exit 0 within 10 s: "
                + ("yes" if c["clean_exit"] else "NO")
                + ("" if exit_s is None else f" (median {exit_s:.2f} s)"),
            ))  # fmt: skip
    d = results.get("d")
    if d is not None:
        if "error" in d:
            rows.append(("d polling CPU", "ERROR", "", "< 2% of a core", d["error"][:60]))
        else:
            detected = d["new_file_detected_s"]
            rows.append((
                f"d polling {d['files']:,} known files every {d['poll_interval']}",
                f"{d['cpu_pct']:.2f}% of a core ({d['window_s']:.0f} s window)",
                f"idle service, empty folder {d['idle_service_cpu_pct']:.2f}%",
                f"<= 2% {verdict('d_cpu_pct', d['cpu_pct'])}",
                f"poller's own share {d['poller_cpu_pct']:.2f}%; ingested during window "
                f"{d['ingested_during_window']}; a new file taken in "
                + ("NOT SEEN" if detected is None else f"{detected:.2f} s"),
            ))  # fmt: skip
    e = results.get("e")
    if e is not None:
        if "error" in e:
            rows.append(("e detection latency", "ERROR", "", "p99 <= 1.1 s", e["error"][:60]))
        else:
            rows.append((
                f"e detection latency, {e['n']} files, poll {e['poll_interval']:g}s "
                f"settle {e['settle']:g}s",
                f"p99 {e['p99_s']:.3f} s",
                f"poll + settle = {e['poll_interval'] + e['settle']:.1f} s",
                f"<= {e['target_s']:.1f} s {verdict('e_p99_s', e['p99_s'])}",
                f"p50 {e['p50_s']:.3f} s, p90 {e['p90_s']:.3f} s, min {e['min_s']:.3f} s, "
                f"max {e['max_s']:.3f} s (file created -> first stage started)",
            ))  # fmt: skip
    headers = ("scenario", "orchestrator", "baseline", "ratio / target", "notes")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]  # fmt: skip
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())
    p = results.get("profile")
    if p is not None:
        print()
        print(f"profile of (a), {p.get('n')} items")
        if "error" in p:
            print("  " + p["error"])
            return
        print(f"  store: {p['store_commits']} commits carrying {p['store_operations']} operations "
              f"= {p['commits_per_item']:.2f} commits/item, "
              f"{p['operations_per_commit']:.2f} ops/commit; "
              f"commit sizes {p['commit_batch_sizes']}")  # fmt: skip
        cats = p.get("py_spy_categories")
        if cats:
            print(
                f"  py-spy (wall clock, idle included; samples {p['py_spy_samples_per_thread']}):"
            )
            for cat, v in cats.items():
                print(f"    {v['share_of_its_thread'] * 100:5.1f}%  {v['samples']:6d}  {cat}")
            print(f"  raw samples: {p['py_spy_file']}")
        else:
            print(f"  py-spy: {p.get('py_spy')}")
        print(f"  cProfile (main thread only), top by own time; file {p['cprofile_file']}:")
        for line in p["cprofile_top"].splitlines():
            if line.strip():
                print("    " + line[:150])


# --------------------------------------------------------------------------------------------


def _shown(path: str) -> str:
    try:
        return os.path.relpath(path, ROOT) if Path(path).is_relative_to(ROOT) else path
    except ValueError:
        return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true",
                        help="smaller runs: (a) 1,000 files, (b) 100 items")  # fmt: skip
    parser.add_argument("--only", default="a,b,c,d,e", help="scenarios to run, e.g. a,c")
    parser.add_argument("--json", action="store_true", help="print every figure as JSON")
    parser.add_argument("--save", metavar="FILE", help="also write every figure as JSON to FILE")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure (median)")
    parser.add_argument("--against", metavar="DIR",
                        help="(a) only: also time the checkout in DIR (e.g. a git worktree of "
                        "another commit), alternated run by run")  # fmt: skip
    parser.add_argument("--profile", action="store_true",
                        help="also profile scenario (a) (cProfile + py-spy when installed)")  # fmt: skip
    args = parser.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - {"a", "b", "c", "d", "e"}
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    n_a = 1000 if args.quick else 2000
    n_b = 100 if args.quick else 150

    results: dict[str, Any] = {
        "command": " ".join([_shown(sys.executable), *sys.argv]),
        "quick": args.quick,
        "repeat": args.repeat,
        "machine": machine(),
        "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
    }
    # As an installed package is: byte-compiled (runs here never write bytecode themselves, and
    # an editable checkout's changed modules would otherwise be compiled again at every start).
    import compileall

    import orchestrator

    compileall.compile_dir(Path(orchestrator.__file__).parent, quiet=1)
    if args.against is not None:
        args.against = str(Path(args.against).resolve())
        if not (Path(args.against) / "orchestrator" / "__init__.py").exists():
            parser.error(f"--against: no orchestrator package in {args.against}")
        compileall.compile_dir(Path(args.against) / "orchestrator", quiet=1)
    started = time.time()
    if "a" in only:
        log(f"(a) throughput: {n_a} files, one `true` stage at concurrency 2")
        results["a"] = bench_a(n_a, args.repeat, against=args.against)
    if "b" in only:
        log(f"(b) makespan: {n_b} items, extract(1) -> convert(1) -> store(5), sleep {SLEEP}")
        results["b"] = bench_b(n_b, args.repeat)
    if "c" in only:
        log("(c) idle RSS of `orchestrator run`, then SIGTERM")
        results["c"] = bench_c(args.repeat)
    if "d" in only:
        window = 8.0 if args.quick else 15.0
        log(f"(d) CPU of `orchestrator run` polling {D_FILES:,} known files every {D_POLL}")
        results["d"] = bench_d(window)
    if "e" in only:
        n_e = 30 if args.quick else 60
        log(f"(e) detection latency: {n_e} files, poll {E_POLL}s, settle {E_SETTLE}s")
        results["e"] = bench_e(n_e)
    if args.profile:
        log(f"profile of (a): {n_a} files")
        results["profile"] = profile_a(n_a)
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["duration_s"] = time.time() - started

    if args.save:
        Path(args.save).write_text(json.dumps(results, indent=2, default=str) + "\n")
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        print_report(results)
    failed = any(isinstance(results.get(k), dict) and "error" in results[k]
                 for k in ("a", "b", "c", "d", "e", "profile"))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
