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
the user's pipeline through a copy of the config in its own work folder (`_private_copy`): the
stages and their commands are the user's, but the sources, the state folder, the folders done and
dead inputs are moved to and the log file are all in the work folder, so that no input, record,
state or log of the user's is ever written, moved or deleted; the HTTP server is off (a service
of the user's may hold its port).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
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
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from orchestrator.config import SourceType, WatchdogConfig, load_config
from orchestrator.reaper import STATE_MARKER, other_pids, proc_environ, proc_stat
from orchestrator.watchdog import FAULTHANDLER_MARGIN

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from orchestrator.config import Config

__all__ = ["DEFAULT_FAULTS", "StressOptions", "check_freeze", "run_stress"]

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
    #: Per pool: most live process groups of the stages naming it at once.
    pool_peak: dict[str, int] = attrs.field(factory=dict)
    status_reads: int = 0
    status_bad: list[str] = attrs.field(factory=list)
    samples: int = 0
    #: Per stage, every limit (``concurrency``) the status file showed; per pool, as ``pool:NAME``.
    limits_seen: dict[str, set[int]] = attrs.field(factory=dict)
    #: The reloads the status file reported, by (service pid, reload number).
    reload_records: dict[tuple[int, int], dict[str, Any]] = attrs.field(factory=dict)
    #: Loop blocks the status file's health reported: by (pid, task, seconds as written), the
    #: wall-clock (start, end) it ran; ``seconds`` None for one seen only going on.
    loop_blocks: dict[tuple[int, str, str | None], tuple[float, float]] = attrs.field(factory=dict)


#: How the watchdog words a loop block among the health reasons (`Watchdog.health_reasons`).
_BLOCKED_NOW = re.compile(r"event loop blocked now by task (?P<task>.*)")
_WAS_BLOCKED = re.compile(
    r"event loop was blocked for (?P<seconds>[0-9.]+)s by task (?P<task>.*) (?P<ago>[0-9]+)s ago"
)


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


def _toml_string(text: str) -> str:
    escaped = "".join(
        "\\\"" if ch == '"' else "\\\\" if ch == "\\"
        else f"\\u{ord(ch):04x}" if ord(ch) < 0x20 or ord(ch) == 0x7F else ch
        for ch in text
    )  # fmt: skip
    return f'"{escaped}"'


def _toml_value(value: Any) -> str:
    """``value`` (as `tomllib` gives it) written back as TOML, tables inline."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        pairs = (f"{_toml_string(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(pairs) + "}"
    return str(value.isoformat())  # a date or time


def _write_config(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as a TOML config, whole or not at all (the service may read it at once)."""
    text = "".join(f"{_toml_string(key)} = {_toml_value(value)}\n" for key, value in data.items())
    part = path.with_name(path.name + ".part")
    part.write_text(text, encoding="utf-8")
    part.replace(path)


def _private_copy(user: Path, root: Path) -> tuple[Path, dict[str, Any]]:
    """Write a copy of the user's config ``user`` that keeps every file it writes in ``root``.

    The stages are the user's (commands, limits, timeouts); relative paths the service would
    have taken against the config's folder (a stage's ``cwd``, a command's program) are made
    absolute. Rewritten: ``state_dir`` (``root/state``), ``status.file`` and ``log.file`` (left
    out: the status goes in the state folder, the log to the service log), each source's
    ``path`` (``root/inputs/NAME``, a records file keeping its name there), a ``move:`` of
    ``on_done``/``on_dead`` (``root/moved/NAME/done`` or ``dead``), and ``http.listen``
    (false). Returns the copy's path and its data (the reloads rewrite the limits).
    """
    config = load_config(user)
    with open(user, "rb") as f:
        data = tomllib.load(f)
    data["state_dir"] = str(root / "state")
    for table in ("status", "log"):
        if table in data:
            data[table] = {k: v for k, v in data[table].items() if k != "file"}
    data["http"] = {**data.get("http", {}), "listen": False}
    for raw, source in zip(data.get("sources", []), config.sources, strict=True):
        inputs = root / "inputs" / source.name
        directory = source.type is SourceType.DIRECTORY
        raw["path"] = str(inputs if directory else inputs / source.path.name)
        for key in ("on_done", "on_dead"):
            if getattr(source, key).action == "move":
                raw[key] = f"move:{root / 'moved' / source.name / key[3:]}"
    for raw, stage in zip(data["stages"], config.stages, strict=True):
        if stage.cwd is not None:
            raw["cwd"] = str(stage.cwd)
        program = stage.command[0] if stage.command else ""
        if "/" in program and "{" not in program and not os.path.isabs(program):
            raw["command"] = [str(config.base_dir / program), *stage.command[1:]]
    path = root / f"{user.stem}.stress.toml"
    _write_config(path, data)
    return path, data


def _draw_limits(data: dict[str, Any], bounds: dict[str, int], draw: random.Random) -> None:
    """Draw each stage's ``concurrency`` and each pool's size anew in ``data``: between 1 and
    its configured limit (``bounds``: ``NAME`` or ``pool:NAME``), and different from the last
    one when it can be."""

    def new(current: int, bound: int) -> int:
        choices = [n for n in range(1, bound + 1) if n != current]
        return draw.choice(choices) if choices else current

    for stage in data["stages"]:
        stage["concurrency"] = new(stage.get("concurrency", 1), bounds[stage["name"]])
    pools = data.get("pools", {})
    for name in pools:
        pools[name] = new(pools[name], bounds[f"pool:{name}"])


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


def _sample(
    state_dir: Path, status: Path, pools: dict[str, tuple[str, ...]], samples: _Samples,
    stop: threading.Event,
) -> None:  # fmt: skip
    while not stop.wait(SAMPLE_INTERVAL):
        groups: dict[str, set[int]] = {}
        for _pid, pgid, stage in _run_processes(str(state_dir)):
            groups.setdefault(stage, set()).add(pgid)
        for stage, pgids in groups.items():
            samples.peak[stage] = max(samples.peak.get(stage, 0), len(pgids))
        for pool, stages in pools.items():
            live = len(set().union(*(groups.get(s, set()) for s in stages)))
            samples.pool_peak[pool] = max(samples.pool_peak.get(pool, 0), live)
        samples.samples += 1
        with contextlib.suppress(FileNotFoundError):
            text = status.read_text()
            samples.status_reads += 1
            try:
                doc = json.loads(text)
            except ValueError as exc:
                samples.status_bad.append(f"{exc} in {text[:80]!r}")
                continue
            _note_status(doc, samples)


def _note_status(doc: dict[str, Any], samples: _Samples) -> None:
    """Record the limits, the reload and the loop blocks a status document shows."""
    for stage, facts in doc.get("stages", {}).items():
        samples.limits_seen.setdefault(stage, set()).add(facts.get("concurrency"))
    for pool, facts in (doc.get("pools") or {}).items():
        samples.limits_seen.setdefault(f"pool:{pool}", set()).add(facts.get("size"))
    pid = doc.get("pid", 0)
    reload = doc.get("reload")
    if isinstance(reload, dict) and reload.get("number") is not None:
        samples.reload_records[pid, reload["number"]] = reload
    updated = doc.get("updated_unix") or time.time()
    for reason in (doc.get("health") or {}).get("reasons", []):
        if m := _WAS_BLOCKED.fullmatch(reason):
            end = updated - float(m["ago"])
            samples.loop_blocks[pid, m["task"], m["seconds"]] = (end - float(m["seconds"]), end)
        elif m := _BLOCKED_NOW.fullmatch(reason):
            start, _ = samples.loop_blocks.get((pid, m["task"], None), (updated, updated))
            samples.loop_blocks[pid, m["task"], None] = (start, updated)


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
        recorded = {
            run: (item, stage, attempt)
            for run, item, stage, attempt in conn.execute(
                "SELECT runs.id, items.id, runs.stage, runs.attempt FROM runs"
                " JOIN items ON items.seq = runs.item_seq"
            )
        }
    return {"states": states, "total": total, "twice": twice, "runs": runs, "recorded": recorded}


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
    #: Each run the stage programs saw start, by its ORCH_RUN: (item, stage, attempt), per start.
    started: dict[int, list[tuple[str, str, int]]] = {}
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
                with contextlib.suppress(TypeError, ValueError):
                    started.setdefault(int(event["run"]), []).append(
                        (event["item"], event["stage"], int(event["attempt"]))
                    )
    return {"overlaps": overlaps, "modes": modes, "started": started}


def _recorded_verdict(started: dict[int, list[tuple[str, str, int]]],
                      recorded: dict[int, tuple[str, str, int]]) -> dict[str, Any]:  # fmt: skip
    """Every run the stage programs saw start is in the store, under its own id, once.

    Found by an acceptance tester (session 17): a run the service was killed before recording
    left no trace once it had ended (its stage ran again with no word), and its id was handed
    out again. The run journal records them; this checks it from the programs' side.
    """
    twice = {run: starts for run, starts in started.items() if len(starts) > 1}
    missing = {run: starts[0] for run, starts in started.items() if run not in recorded}
    other = {run: (starts[0], recorded[run]) for run, starts in started.items()
             if run in recorded and recorded[run] != starts[0]}  # fmt: skip
    problems = []
    if twice:
        problems.append(
            f"{len(twice)} run id(s) given to more than one run: {list(twice.items())[:3]}"
        )
    if missing:
        problems.append(f"{len(missing)} run(s) not in the store: {list(missing.items())[:3]}")
    if other:
        problems.append(
            f"{len(other)} run id(s) the store gives to another run: {list(other.items())[:3]}"
        )
    return {
        "held": not problems,
        "evidence": "; ".join(problems)
        or f"each of the {len(started)} run(s) the stage programs saw start is in the store once,"
        " under its own id"
        + ("" if started else " (no audit log: a config's own stages are not checked)"),
    }


def run_stress(
    options: StressOptions, *, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Run the stress test; return the report (``report["ok"]`` is whether every invariant held).

    Args:
        options: what to do.
        log: a callable taking a line of progress text (None: quiet).
    """
    say: Callable[[str], None] = log or (lambda _line: None)
    check_freeze(options)
    # mkdtemp, not TemporaryDirectory: the latter's finalizer would delete the evidence kept.
    owned = options.workdir is None and options.config is None
    root = Path(options.workdir or tempfile.mkdtemp(prefix="orchestrator-stress-"))
    root.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] | None = None
    if options.config is None:
        config_path = _synthetic_config(root, options.faults)
    else:
        user = options.config.resolve()
        config_path, data = _private_copy(user, root)
        say(f"{user} runs as a copy, {config_path}: its stages and commands as they are, its "
            f"sources, state, moved inputs and log in {root}; no file of yours is touched")  # fmt: skip
    report = _run(options, config_path, data, root, say)
    report["user_config"] = None if options.config is None else str(options.config.resolve())
    if owned and report["ok"]:
        shutil.rmtree(root, ignore_errors=True)
        # Found by an acceptance tester (session 17): the report still named files in the
        # folder just removed.
        report.update(workdir=None, service_log=None, config=None)
    else:  # keep the evidence (and a user's config's audit log and service log)
        report["workdir"] = str(root)
    return report


def check_freeze(options: StressOptions) -> None:
    """Refuse a ``--freeze-for`` the service cannot live through.

    The watchdog's last resort, faulthandler, ends the process ``watchdog.loop_stall_timeout``
    plus `FAULTHANDLER_MARGIN` seconds after the heartbeat last re-armed it; its clock runs on
    while the process is stopped, so a longer SIGSTOP ends the service (exit 1) the moment it is
    continued -- a failed verdict that says nothing of the pipeline.

    Raises:
        ValueError: the freeze is that long.
    """
    if not options.freeze_every:
        return
    watchdog = load_config(options.config).watchdog if options.config else WatchdogConfig()
    deadline = watchdog.loop_stall_timeout + FAULTHANDLER_MARGIN
    if options.freeze_for >= deadline - 1:
        raise ValueError(
            f"--freeze-for {options.freeze_for:g}s is too long: a service stopped for "
            f"{deadline:g}s (watchdog.loop_stall_timeout {watchdog.loop_stall_timeout:g}s + "
            f"{FAULTHANDLER_MARGIN:g}s) is ended by its faulthandler as soon as it runs again; "
            f"freeze it for less than {deadline - 1:g}s"
        )


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
    options: StressOptions, config_path: Path, data: dict[str, Any] | None, root: Path,
    say: Callable[[str], None],
) -> dict[str, Any]:  # fmt: skip
    config = load_config(config_path)
    state_dir = config.state_dir
    status = config.status_path
    audit = root / "audit.jsonl"
    service_log = root / "service.log"
    db = config.db_path
    if db is None:
        raise ValueError("stress needs the SQLite store; the PostgreSQL store is not available")
    limits = {s.name: s.concurrency for s in config.stages}
    pool_limits = dict(config.pools)
    pool_stages = {p: tuple(s.name for s in config.stages if p in s.pools) for p in pool_limits}
    samples = _Samples()
    stop = threading.Event()
    sampler = threading.Thread(target=_sample,
                               args=(state_dir, status, pool_stages, samples, stop),
                               daemon=True)  # fmt: skip
    #: Wall-clock (start, end) of each freeze: the service's loop stood still then, by design.
    frozen: list[tuple[float, float]] = []
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
    if options.config is not None and any(s.call for s in config.stages):
        # A `call` stage's module is imported from the user's config folder, not the copy's.
        user_dir = str(options.config.resolve().parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [user_dir, env.get("PYTHONPATH")]))

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
                began = time.time()
                proc.send_signal(signal.SIGSTOP)
                time.sleep(options.freeze_for)
                proc.send_signal(signal.SIGCONT)
                frozen.append((began, time.time()))
                freezes += 1
                next_freeze = time.monotonic() + (options.freeze_every or 0)
            if now >= next_reload:
                if data is None:  # the lock files stay those of 5
                    _synthetic_config(root, options.faults, store_limit=draw.randint(1, 5))
                else:  # the copy: limits drawn anew, never above the user's
                    _draw_limits(data, {**limits, **{f"pool:{p}": n for p, n in
                                                     pool_limits.items()}}, draw)  # fmt: skip
                    _write_config(config_path, data)
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
    over_pools = {p: (samples.pool_peak.get(p, 0), lim) for p, lim in pool_limits.items()
                  if samples.pool_peak.get(p, 0) > lim}  # fmt: skip
    in_flight = sum(n for s, n in store["states"].items()
                    if s in ("queued", "running", "retry_wait"))  # fmt: skip
    terminal = sum(n for s, n in store["states"].items() if s in ("done", "dead", "rejected"))
    invariants = {
        "limits": {
            "held": not over and not over_pools and not audit_facts["overlaps"],
            "evidence": f"peak live process groups per stage {samples.peak} (limits {limits}) "
            + (f"and per pool {samples.pool_peak} (limits {pool_limits}) " if pool_limits else "")
            + f"over {samples.samples} samples of /proc; flock overlaps in the audit log: "
            f"{len(audit_facts['overlaps'])}",
        },
        "processed": {
            # Nothing done proves nothing: the invariants below hold of an idle service too.
            "held": fed > 0 and terminal > 0 and bool(store["runs"]),
            "evidence": f"{terminal} of {fed} generated item(s) reached a terminal state; "
            f"{len(store['runs'])} run(s) ended"
            + ("" if fed else "; no input was generated (no directory or jsonl source?)"),
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
    invariants["recorded"] = _recorded_verdict(audit_facts["started"], store["recorded"])
    invariants["event_loop"] = _loop_verdict(samples, frozen)
    if options.reload_every:
        invariants["reloads"] = _reload_verdict(
            samples, reloads,
            # Each reload draws the synthetic store's limit, or every limit above 1 of a copy.
            ["store"] if data is None
            else [k for k, n in {**limits, **{f"pool:{p}": n for p, n in pool_limits.items()}}
                  .items() if n > 1],
        )  # fmt: skip
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
        "pools": pool_limits,
        "service_log": str(service_log) if service_log.exists() else None,
        "command": shlex.join(
            [sys.executable, "-m", "orchestrator", "run", "-c", str(config_path)]
        ),
    }
    return report


def _loop_verdict(samples: _Samples, frozen: list[tuple[float, float]]) -> dict[str, Any]:
    """Held unless the service's watchdog reported its event loop blocked outside the freezes.

    The watchdog itself leaves out a stop of the whole process; a block it still reports within
    a second or two of one of the tool's freezes is put down to the freeze, not counted.
    """
    slack = 2.0  # the "N s ago" of the status file is whole seconds; blocks are seen late
    blocks, during = [], []
    for (pid, task, seconds), (start, end) in sorted(samples.loop_blocks.items(),
                                                     key=lambda kv: kv[1]):  # fmt: skip
        if seconds is None and any(k[:2] == (pid, task) and k[2] is not None
                                   for k in samples.loop_blocks):  # fmt: skip
            continue  # seen going on, then seen ended: counted once, ended
        text = f"{seconds or '?'}s by task {task} (pid {pid})"
        if any(start < b + slack and end > a - slack for a, b in frozen):
            during.append(text)
        else:
            blocks.append(text)
    evidence = (f"the service reported its event loop blocked: {'; '.join(blocks)}" if blocks
                else "the service never reported its event loop blocked")  # fmt: skip
    if during:
        evidence += f"; not counted, during the tool's own freezes: {'; '.join(during)}"
    return {"held": not blocks, "evidence": evidence}


def _reload_verdict(samples: _Samples, sent: int, changing: list[str]) -> dict[str, Any]:
    """Held when every reload the status file reported was applied and, if any was sent, the
    limits in ``changing`` (stage names, ``pool:NAME``) showed more than one value."""
    refused = [r for r in samples.reload_records.values() if not r.get("ok")]
    applied = len(samples.reload_records) - len(refused)
    seen = {k: sorted(v for v in vals if v is not None)
            for k, vals in samples.limits_seen.items()}  # fmt: skip
    unchanged = [k for k in changing if len(seen.get(k, [])) <= 1]
    evidence = (
        f"{sent} SIGHUP(s); {applied} reload(s) applied, {len(refused)} refused "
        f"(as the status file showed); limits it showed: {seen}"
    )
    if refused:
        errors = sorted({e for r in refused for e in r.get("errors", [])})
        evidence += f"; refused with: {'; '.join(errors[:3]) or 'no error given'}"
    if sent and unchanged:
        evidence += f"; never changed: {', '.join(unchanged)}"
    return {
        "held": not refused and (not sent or (applied > 0 and not unchanged)),
        "evidence": evidence,
    }


def _all_terminal(db: Path, fed: int) -> bool:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as conn:
            total, open_ = conn.execute(
                "SELECT count(*), sum(state IN ('queued', 'running', 'retry_wait')) FROM items"
            ).fetchone()
    except sqlite3.Error:
        return False
    return bool(total == fed and not open_)
