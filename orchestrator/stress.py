"""``orchestrator stress``: load and faults against a pipeline, then its invariants checked.

The tool runs the service as a child process (``python -m orchestrator run``), feeds its
directory sources with files, kills (SIGKILL) and freezes (SIGSTOP/SIGCONT) it on a schedule, and
samples the OS while it works. At the end it drains the service (SIGTERM) and judges, from the OS,
the stage programs' audit log and the store -- never from the service's own counters:

- ``limits``: no stage ever had more live runs than its limit: process groups sampled from
  ``/proc`` and the stage programs' own ``flock`` probes (``overlap`` lines in the audit log);
- ``accounted``: every generated item is in the store, in exactly one state, terminal or in flight;
- ``single_terminal``: no item reached a terminal state twice;
- ``no_survivors``: no process of any run is left after the final shutdown;
- ``status_file``: every sample of the status file was complete, valid JSON;
- ``health``: after every restart the service wrote a fresh status file again;
- ``clean_exit``: the final SIGTERM drained the service to exit 0;
- ``reloads`` (with ``--reload-every``): the SIGHUPs took effect -- the status file showed the
  synthetic ``store`` stage at more than one limit (each reload draws it anew between 1 and its
  configured 5, which stays the bound the ``limits`` invariant checks; a user's config is never
  rewritten, only reloaded as it is).

Without ``-c`` it builds a synthetic pipeline, extract(1) → convert(1) → store(5) of
``python -m orchestrator.fakestage`` programs, in a temporary state folder. With ``-c`` it drives
the user's pipeline as configured (point it at a staging state folder: the tool writes into the
config's directory sources and kills the service).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from orchestrator.config import SourceType, load_config
from orchestrator.reaper import STATE_MARKER, other_pids, proc_environ, proc_stat

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from orchestrator.config import Config

__all__ = ["DEFAULT_FAULTS", "StressOptions", "run_stress"]

#: Fault rates of the synthetic pipeline when ``--faults`` is not given: every kind, rarely.
DEFAULT_FAULTS = (
    "fail=0.05,hang=0.01,silent=0.01,ignore-term=0.01,orphan=0.02,flood=0.01,signal=0.02,"
    "garbage=0.02"
)
#: How often the OS and the status file are sampled.
SAMPLE_INTERVAL = 0.05
#: How long a restarted service may take to write a fresh status file.
HEALTH_WAIT = 20.0
#: How long the final SIGTERM may take to drain the service.
DRAIN_WAIT = 60.0


@attrs.frozen(kw_only=True)
class StressOptions:
    """What ``orchestrator stress`` was asked to do."""

    config: Path | None = None
    items: int = 200
    duration: float = 60.0
    faults: str = DEFAULT_FAULTS
    kill_every: float | None = None
    freeze_every: float | None = None
    freeze_for: float = 1.0
    #: SIGHUP the service this often (a reload); the synthetic config is rewritten first.
    reload_every: float | None = None
    workdir: Path | None = None


@attrs.define
class _Samples:
    """What the sampler thread saw."""

    peak: dict[str, int] = attrs.field(factory=dict)
    status_reads: int = 0
    status_bad: list[str] = attrs.field(factory=list)
    samples: int = 0
    #: Per stage, every limit (``concurrency``) the status file showed.
    limits_seen: dict[str, set[int]] = attrs.field(factory=dict)


def _synthetic_config(root: Path, faults: str, *, store_limit: int = 5) -> Path:
    audit = root / "audit.jsonl"
    locks = root / "locks"
    fake = [sys.executable, "-m", "orchestrator.fakestage"]

    def stage(name: str, limit: int, duration: str, concurrency: int | None = None) -> str:
        # The lock files (--limit) are the bound the limits invariant checks; a reload may set
        # the stage's concurrency below it.
        command = [*fake, "--duration", duration, "--faults", faults, "--audit", str(audit),
                   "--lock-dir", str(locks), "--limit", str(limit)]  # fmt: skip
        return (
            f'\n[[stages]]\nname = "{name}"\ncommand = {json.dumps(command)}\n'
            f'concurrency = {concurrency or limit}\ntimeout = "5s"\nstall_timeout = "2s"\n'
            f'grace_period = "300ms"\nretries = 3\nbackoff = "100ms"\nbackoff_max = "1s"\n'
            f'output_limit = "256 KB"\n'
        )

    text = (
        'state_dir = "state"\nshutdown_grace = "10s"\n'
        "# The tool's own SIGKILLs are not the items' fault.\nmax_interruptions = 1000\n"
        '[http]\nlisten = false\n[status]\ninterval = "500ms"\n[log]\nlevel = "WARNING"\n'
        '[[sources]]\nname = "load"\ntype = "directory"\npath = "inbox"\nsettle = "0s"\n'
        'poll_interval = "200ms"\nroute = ["extract", "convert", "store"]\n'
        + stage("extract", 1, "0.01:0.05")
        + stage("convert", 1, "0.01:0.05")
        + stage("store", 5, "0.05:0.2", concurrency=store_limit)
    )
    path = root / "stress.toml"
    # Whole or not at all: a restart or a reload may read it at any moment.
    part = path.with_suffix(".toml.part")
    part.write_text(text)
    part.replace(path)
    return path


def _run_processes(state_dir: str) -> Iterator[tuple[int, int, str]]:
    """(pid, pgid, stage) of live processes carrying the state folder's marker."""
    marker = f"{STATE_MARKER}={state_dir}".encode()
    for pid in other_pids():
        env = proc_environ(pid)
        if env is None or marker not in env:
            continue
        st = proc_stat(pid)
        if st is None or st[0] == "Z":
            continue
        stage = next((e[len(b"ORCH_STAGE=") :] for e in env if e.startswith(b"ORCH_STAGE=")), b"?")
        yield pid, st[1], stage.decode()


def _sample(state_dir: Path, status: Path, samples: _Samples, stop: threading.Event) -> None:
    while not stop.wait(SAMPLE_INTERVAL):
        groups: dict[str, set[int]] = {}
        for _pid, pgid, stage in _run_processes(str(state_dir)):
            groups.setdefault(stage, set()).add(pgid)
        for stage, pgids in groups.items():
            samples.peak[stage] = max(samples.peak.get(stage, 0), len(pgids))
        samples.samples += 1
        with contextlib.suppress(FileNotFoundError):
            text = status.read_text()
            samples.status_reads += 1
            try:
                doc = json.loads(text)
            except ValueError as exc:
                samples.status_bad.append(f"{exc} in {text[:80]!r}")
                continue
            for stage, facts in doc.get("stages", {}).items():
                samples.limits_seen.setdefault(stage, set()).add(facts.get("concurrency"))


def _feed(config: Config, n: int, start: int) -> int:
    """Write ``n`` inputs into the config's directory (and jsonl) sources; return how many."""
    written = 0
    for source in config.sources:
        if source.type is SourceType.DIRECTORY:
            source.path.mkdir(parents=True, exist_ok=True)
            suffix = source.pattern[0].replace("*", "") if "*" in source.pattern[0] else ".dat"
            for i in range(start, start + n):
                tmp = source.path / f".stress-{i}.tmp"
                tmp.write_text(f"stress item {i}\n")
                tmp.rename(source.path / f"stress {i:05} $(x){suffix}")
                written += 1
        elif source.type is SourceType.JSONL:
            source.path.parent.mkdir(parents=True, exist_ok=True)
            with open(source.path, "a") as f:
                for i in range(start, start + n):
                    record = {"id": f"stress-{i}", "n": i}
                    f.write(json.dumps(record) + "\n")
                    written += 1
    return written


def _wait_status(status: Path, pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError):
            doc = json.loads(status.read_text())
            if doc.get("pid") == pid and doc.get("state") == "running":
                return True
        time.sleep(0.05)
    return False


def _store_facts(db: Path) -> dict[str, Any]:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        states = dict(conn.execute("SELECT state, count(*) FROM items GROUP BY state").fetchall())
        total = conn.execute("SELECT count(*) FROM items").fetchone()[0]
        twice = conn.execute(
            "SELECT count(*) FROM (SELECT item_seq FROM events WHERE state IN"
            " ('done', 'dead', 'rejected') AND event != 'requeued' GROUP BY item_seq"
            " HAVING count(*) > 1)"
        ).fetchone()[0]
        runs = conn.execute(
            "SELECT stage, outcome, duration, slot_wait, attempt FROM runs"
            " WHERE outcome IS NOT NULL"
        ).fetchall()
    return {"states": states, "total": total, "twice": twice, "runs": runs}


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    values = sorted(values)
    out = {f"p{int(q * 100)}": values[min(len(values) - 1, int(q * len(values)))]
           for q in (0.5, 0.9, 0.99)}  # fmt: skip
    out["max"] = values[-1]
    return {k: round(v, 4) for k, v in out.items()}


def _audit_facts(audit: Path) -> dict[str, Any]:
    overlaps: list[dict[str, Any]] = []
    modes: dict[str, int] = {}
    if audit.exists():
        for line in audit.read_text().splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "overlap":
                overlaps.append(event)
            elif event.get("event") == "start":
                modes[event.get("mode", "?")] = modes.get(event.get("mode", "?"), 0) + 1
    return {"overlaps": overlaps, "modes": modes}


def run_stress(
    options: StressOptions, *, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the stress test; return the report (``report["ok"]`` is whether every invariant held).

    Args:
        options: what to do.
        log: a callable taking a line of progress text (None: quiet).
    """
    say: Callable[[str], None] = log or (lambda _line: None)
    # mkdtemp, not TemporaryDirectory: the latter's finalizer would delete the evidence kept.
    owned = options.workdir is None and options.config is None
    root = Path(options.workdir or tempfile.mkdtemp(prefix="orchestrator-stress-"))
    if options.config is None:
        config_path = _synthetic_config(root, options.faults)
    else:
        config_path = options.config.resolve()
    report = _run(options, config_path, root, say)
    if owned and report["ok"]:
        shutil.rmtree(root, ignore_errors=True)
        report["workdir"] = None
    else:  # keep the evidence (and a user's config's audit log and service log)
        report["workdir"] = str(root)
    return report


def _stop_service(proc: subprocess.Popen[bytes]) -> int | None:
    """SIGCONT (it may be frozen) and SIGTERM the service; SIGKILL it after DRAIN_WAIT.

    Returns its exit status, or None when it had to be killed.
    """
    proc.send_signal(signal.SIGCONT)
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=DRAIN_WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def _run(
    options: StressOptions, config_path: Path, root: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    config = load_config(config_path)
    state_dir = config.state_dir
    status = config.status_path
    audit = root / "audit.jsonl"
    service_log = root / "service.log"
    db = config.db_path
    if db is None:
        raise ValueError("stress needs the SQLite store; the PostgreSQL store is not available")
    limits = {s.name: s.concurrency for s in config.stages}
    samples = _Samples()
    stop = threading.Event()
    sampler = threading.Thread(target=_sample, args=(state_dir, status, samples, stop),
                               daemon=True)  # fmt: skip
    restarts = kills = freezes = reloads = 0
    draw = random.Random()
    unhealthy: list[str] = []
    fed = 0

    # Fake stages without --audit/--lock-dir (configs/stress.toml) find them here.
    # `python3` in a config means this interpreter (a virtual environment's, say).
    env = {
        **os.environ, "ORCH_FAKE_AUDIT": str(audit), "ORCH_FAKE_LOCK_DIR": str(root / "locks"),
        "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]),
    }  # fmt: skip

    def start() -> subprocess.Popen[bytes]:
        with open(service_log, "ab") as err:
            return subprocess.Popen(
                [sys.executable, "-m", "orchestrator", "run", "-c", str(config_path)],
                stdout=subprocess.DEVNULL, stderr=err, start_new_session=True, env=env,
            )  # fmt: skip

    t0 = time.monotonic()
    proc = start()
    sampler.start()
    try:
        say(f"service pid {proc.pid}; state {state_dir}")
        if not _wait_status(status, proc.pid, HEALTH_WAIT):
            unhealthy.append(f"start (pid {proc.pid}): no fresh status within {HEALTH_WAIT:g}s")
        # Feed the load in waves, about one a second over the first 60% of the run, so that
        # arrivals overlap with kills, freezes and runs for most of it.
        waves = max(1, min(options.items, int(options.duration * 0.6)))
        per_wave = [options.items // waves + (1 if i < options.items % waves else 0)
                    for i in range(waves)]  # fmt: skip
        next_kill = t0 + options.kill_every if options.kill_every else float("inf")
        next_freeze = t0 + options.freeze_every if options.freeze_every else float("inf")
        next_reload = t0 + options.reload_every if options.reload_every else float("inf")
        deadline = t0 + options.duration
        wave = 0
        next_wave = t0
        while time.monotonic() < deadline:
            now = time.monotonic()
            if wave < waves and now >= next_wave:
                fed += _feed(config, per_wave[wave], fed)
                wave += 1
                next_wave = now + options.duration * 0.6 / waves
            if now >= next_kill:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                proc = start()
                restarts += 1
                if not _wait_status(status, proc.pid, HEALTH_WAIT):
                    unhealthy.append(f"restart {restarts} (pid {proc.pid}): no fresh status")
                next_kill = time.monotonic() + (options.kill_every or 0)
            if now >= next_freeze:
                proc.send_signal(signal.SIGSTOP)
                time.sleep(options.freeze_for)
                proc.send_signal(signal.SIGCONT)
                freezes += 1
                next_freeze = time.monotonic() + (options.freeze_every or 0)
            if now >= next_reload:
                if options.config is None:  # ours to rewrite; the lock files stay those of 5
                    _synthetic_config(root, options.faults, store_limit=draw.randint(1, 5))
                proc.send_signal(signal.SIGHUP)
                reloads += 1
                next_reload = time.monotonic() + (options.reload_every or 0)
            if wave >= waves and _all_terminal(db, fed):
                break
            time.sleep(0.05)
        while wave < waves:  # a short duration still generates every item asked for
            fed += _feed(config, per_wave[wave], fed)
            wave += 1
    except BaseException:
        # Interrupted (Ctrl+C): the service is in a session of its own and hears nothing of
        # it; left running it would hold the state folder (or stay frozen) for good.
        say("interrupted: stopping the service")
        _stop_service(proc)
        stop.set()
        raise
    say(f"load: {fed} inputs; kills {kills}, freezes {freezes}; draining")
    exit_code = _stop_service(proc)
    elapsed = time.monotonic() - t0
    stop.set()
    sampler.join()
    survivors = sorted(pid for pid, _, _ in _run_processes(str(state_dir)))
    store = _store_facts(db)
    audit_facts = _audit_facts(audit)
    over = {s: (samples.peak.get(s, 0), lim) for s, lim in limits.items()
            if samples.peak.get(s, 0) > lim}  # fmt: skip
    in_flight = sum(n for s, n in store["states"].items()
                    if s in ("queued", "running", "retry_wait"))  # fmt: skip
    terminal = sum(n for s, n in store["states"].items() if s in ("done", "dead", "rejected"))
    invariants = {
        "limits": {
            "held": not over and not audit_facts["overlaps"],
            "evidence": f"peak live process groups per stage {samples.peak} (limits {limits}) "
            f"over {samples.samples} samples of /proc; flock overlaps in the audit log: "
            f"{len(audit_facts['overlaps'])}",
        },
        "accounted": {
            "held": store["total"] == fed and terminal + in_flight == store["total"],
            "evidence": f"{fed} inputs generated, {store['total']} items in the store: "
            f"{store['states']}",
        },
        "single_terminal": {
            "held": store["twice"] == 0,
            "evidence": f"{store['twice']} item(s) reached a terminal state more than once",
        },
        "no_survivors": {
            "held": not survivors,
            "evidence": f"processes carrying {STATE_MARKER}={state_dir} after shutdown: "
            f"{survivors or 'none'}",
        },
        "status_file": {
            "held": samples.status_reads > 0 and not samples.status_bad,
            "evidence": f"{samples.status_reads} reads, {len(samples.status_bad)} invalid"
            + (f": {samples.status_bad[:3]}" if samples.status_bad else ""),
        },
        "health": {
            "held": not unhealthy,
            "evidence": "; ".join(unhealthy)
            or f"fresh status after start and each of {restarts} restart(s)",
        },
        "clean_exit": {
            "held": exit_code == 0,
            "evidence": f"exit status after SIGTERM: {exit_code}",
        },
    }
    if options.reload_every:
        seen = {s: sorted(v for v in vals if v is not None)
                for s, vals in samples.limits_seen.items()}  # fmt: skip
        invariants["reloads"] = {
            # Only the synthetic config changes; a user's is reloaded as it is.
            "held": options.config is not None or len(seen.get("store", [])) > 1,
            "evidence": f"{reloads} SIGHUP(s); limits the status file showed: {seen}",
        }
    runs = store["runs"]
    outcomes: dict[str, int] = {}
    for _stage, outcome, *_ in runs:
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    latency = {
        s: _percentiles([r[2] for r in runs if r[0] == s and r[1] == "ok" and r[2] is not None])
        for s in limits
    }
    report = {
        "ok": all(v["held"] for v in invariants.values()),
        "invariants": invariants,
        "items": {"generated": fed, "states": store["states"]},
        "restarts": restarts,
        "kills": kills,
        "freezes": freezes,
        "reloads": reloads,
        "faults": audit_facts["modes"],
        "runs": outcomes,
        "retries": sum(1 for r in runs if r[4] > 1),
        "throughput": round(store["states"].get("done", 0) / elapsed, 2) if elapsed else None,
        "elapsed_seconds": round(elapsed, 2),
        "latency": latency,
        "slot_wait_mean": {
            s: round(statistics.mean([r[3] for r in runs if r[0] == s and r[3] is not None]), 4)
            for s in limits
            if any(r[0] == s and r[3] is not None for r in runs)
        },
        "config": str(config_path),
        "service_log": str(service_log) if service_log.exists() else None,
        "command": shlex.join(
            [sys.executable, "-m", "orchestrator", "run", "-c", str(config_path)]
        ),
    }
    return report


def _all_terminal(db: Path, fed: int) -> bool:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            total, open_ = conn.execute(
                "SELECT count(*), sum(state IN ('queued', 'running', 'retry_wait')) FROM items"
            ).fetchone()
    except sqlite3.Error:
        return False
    return bool(total == fed and not open_)
