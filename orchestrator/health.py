"""``orchestrator health``: is the service alive and well, judged from outside by its status file.

The service rewrites ``status.json`` every ``status.interval``; a service whose event loop hangs
stops rewriting it, so the file's age tells. The verdict:

==========  =====  ==================================================================================
ok          0      updated less than 2 intervals ago, its process alive
warning     1      updated 2 to 4 intervals ago; or the service itself reports problems; or it is
                   still starting (recovering a dead instance's runs, say), for less than
                   `STARTING_LIMIT`
critical    2      older than 4 intervals; or its process is gone (or the pid now belongs to a
                   younger process); or it stopped (or failed: its store did); or it has been
                   starting for `STARTING_LIMIT` or longer; or there is no (readable) status file
==========  =====  ==================================================================================

`watch` judges again and again and runs a restart command when the verdict is critical, with
exponential backoff between restarts -- a supervisor for devices without systemd.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import time
from typing import TYPE_CHECKING, Any

import attrs

from orchestrator.files import read_without_waiting

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from orchestrator.config import Config

__all__ = ["CRITICAL", "OK", "WARNING", "Verdict", "judge", "starting_limit", "watch"]

OK, WARNING, CRITICAL = 0, 1, 2
LEVEL_NAMES = {OK: "ok", WARNING: "warning", CRITICAL: "critical"}
#: Fresh below this many intervals; critical from CRITICAL_AGE on.
WARNING_AGE = 2
CRITICAL_AGE = 4
#: A process that started this long after the service says it started is not the service.
START_TOLERANCE = 2.0
#: A service that says ``starting`` for this long is stuck in its start-up: critical. Generous:
#: ending a dead instance's runs waits their ``grace_period``, and a big store takes a while.
STARTING_LIMIT = 900.0
#: How long `watch` waits for the restart command to end (to report its exit status). One still
#: running after that -- the service itself, run in the foreground -- is left running (reaped
#: when it ends); its status file is what is judged.
RESTART_CMD_WAIT = 5.0
#: The shortest pause between two judgements of `watch`.
MIN_WATCH_INTERVAL = 0.1
#: A status file's last states: the service stopped, or (with a ``reason``) its store failed.
ENDED = ("stopped", "failed")


@attrs.frozen(kw_only=True)
class Verdict:
    """How healthy the service looks, and why."""

    level: int
    reasons: tuple[str, ...]
    path: str
    age: float | None = None
    interval: float | None = None
    pid: int | None = None
    pid_alive: bool | None = None
    host: str | None = None
    #: the service's own word: starting, running, draining, stopped
    state: str | None = None

    @property
    def status(self) -> str:
        return LEVEL_NAMES[self.level]

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status, "exit": self.level, "reasons": list(self.reasons),
            "path": self.path, "age": None if self.age is None else round(self.age, 3),
            "interval": self.interval, "pid": self.pid, "pid_alive": self.pid_alive,
            "host": self.host, "state": self.state,
        }  # fmt: skip

    def describe(self) -> str:
        """One line for people."""
        if self.level == OK:
            assert self.age is not None
            return (
                f"ok: {self.state or 'running'}, pid {self.pid} on {self.host}; status updated"
                f" {self.age:.1f}s ago (every {self.interval:g}s)"
            )
        return f"{self.status}: " + "; ".join(self.reasons)


def judge(
    path: Path, *, interval: float, now: float | None = None,
    starting_limit: float = STARTING_LIMIT,
) -> Verdict:  # fmt: skip
    """Judge the status file at ``path`` (blocking reads: not for the event loop).

    Args:
        path: the status file.
        interval: the configured ``status.interval``; the file's own ``interval`` wins.
        now: the current unix time (tests).
    """
    now = time.time() if now is None else now
    where = str(path)
    try:
        doc = json.loads(read_without_waiting(path))
        updated = float(doc["updated_unix"])
    except FileNotFoundError:
        return Verdict(level=CRITICAL, path=where,
                       reasons=(f"no status file at {where!r}; is the service running?",))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return Verdict(level=CRITICAL, path=where,
                       reasons=(f"cannot read the status file {where!r}: {exc}",))  # fmt: skip
    interval = float(doc.get("interval") or interval)
    age = max(0.0, now - updated)
    pid = doc.get("pid")
    host = doc.get("host")
    state = doc.get("state")
    reasons: list[str] = []
    level = OK
    alive: bool | None = None
    if isinstance(pid, int) and host == socket.gethostname():
        alive, why = _alive(pid, _started(doc))
        if not alive and state not in ENDED:
            level = CRITICAL
            reasons.append(why)
    if state in ENDED:  # its last word: no need to say its process is gone too
        level = CRITICAL
        reasons.append(f"the service stopped at {doc.get('updated', '?')}")
        if state == "failed":
            reasons[-1] += f": {doc.get('reason') or 'it failed'}"
    elif age >= CRITICAL_AGE * interval:
        level = CRITICAL
        reasons.append(
            f"status file is {age:.1f}s old (more than {CRITICAL_AGE} intervals of"
            f" {interval:g}s): the service is hung, frozen or dead, or cannot write this file"
            " (its log and /health say so)"
        )
    elif age >= WARNING_AGE * interval:
        level = max(level, WARNING)
        reasons.append(
            f"status file is {age:.1f}s old (more than {WARNING_AGE} intervals of {interval:g}s)"
        )
    if state == "starting" and level != CRITICAL:
        since = _started(doc)
        took = max(0.0, now - since) if since is not None else 0.0
        phase = doc.get("phase") or "starting"
        if took >= starting_limit:
            level = CRITICAL
            reasons.append(
                f"still starting (pid {pid}) after {took:.0f}s (more than {starting_limit:g}s),"
                f" stuck at: {phase}"
            )
        else:
            level = max(level, WARNING)
            reasons.append(f"starting (pid {pid}) for {took:.1f}s: {phase}")
    health = doc.get("health")
    if isinstance(health, dict) and health.get("reasons") and state not in ENDED:
        level = max(level, WARNING)
        own = [str(r) for r in health["reasons"]]
        if alive is False or age >= WARNING_AGE * interval:
            # The service's word as of that write, not now: its "14s ago" read as current on a
            # service dead for minutes (found by an acceptance tester, session 17).
            own = [f"its last status (written {age:.0f}s ago) said: {r}" for r in own]
        reasons += own
    return Verdict(level=level, reasons=tuple(reasons), path=where, age=age, interval=interval,
                   pid=pid if isinstance(pid, int) else None, pid_alive=alive, host=host,
                   state=state)  # fmt: skip


def _started(doc: dict[str, Any]) -> float | None:
    try:
        return dt.datetime.fromisoformat(doc["started"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return None


def _alive(pid: int, started: float | None) -> tuple[bool, str]:
    """Whether ``pid`` is the service's process, and if not, why."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False, f"its process (pid {pid}) is gone"
    except PermissionError:
        pass  # alive, another user's
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open("/proc/stat", "rb") as f:
            btime = next(int(line.split()[1]) for line in f if line.startswith(b"btime "))
    except (OSError, StopIteration, ValueError):
        return True, ""  # no /proc: trust the pid
    fields = stat.rsplit(b")", 1)[1].split()
    if fields[0] == b"Z":
        return False, f"its process (pid {pid}) is gone (a zombie)"
    process_start = btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    if started is not None and process_start > started + START_TOLERANCE:
        return False, f"its process (pid {pid}) is gone; that pid now belongs to another process"
    return True, ""


def starting_limit(config: Config) -> float:
    """How long a service of ``config`` may say ``starting``: `STARTING_LIMIT`, or longer when
    ending a dead instance's leftovers may take longer (twice the longest ``grace_period``)."""
    return max(STARTING_LIMIT, 2 * max(s.grace_period for s in config.stages) + 60)


def watch(
    judge_now: Callable[[], Verdict], restart_argv: Sequence[str] | None, *,
    interval: float, backoff: float, backoff_max: float,
    report: Callable[[Verdict, str | None], None],
    sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
    rounds: int | None = None,
) -> None:  # fmt: skip
    """Judge every ``interval`` until interrupted; run ``restart_argv`` when critical.

    The first restart happens at the first critical verdict; while the service stays critical,
    the next waits ``backoff`` seconds, doubling up to ``backoff_max``; a verdict that is not
    critical resets it. The command runs without a shell, with ``ORCH_HEALTH_STATUS``,
    ``ORCH_HEALTH_REASONS`` and (when that process still exists, e.g. frozen) ``ORCH_HEALTH_PID``
    in its environment.

    Args:
        judge_now: returns the current verdict.
        restart_argv: the restart command, or None to only report.
        interval: seconds between verdicts.
        backoff: the pause after a restart before the next one, doubling while still critical.
        backoff_max: the longest pause between restarts.
        report: called with each verdict, and the action taken (or None).
        sleep: waits (tests).
        clock: monotonic seconds (tests).
        rounds: stop after this many verdicts (tests); None runs until interrupted.
    """
    delay = backoff
    next_restart = 0.0
    children: list[subprocess.Popen[bytes]] = []
    done = 0
    while rounds is None or done < rounds:
        done += 1
        children = [c for c in children if c.poll() is None]
        verdict = judge_now()
        action: str | None = None
        if verdict.level != CRITICAL:
            delay = backoff
            next_restart = 0.0
        elif restart_argv and clock() >= next_restart:
            action = _restart(restart_argv, verdict, children)
            next_restart = clock() + delay
            action += f"; next restart no sooner than {delay:g}s from now"
            delay = min(delay * 2, backoff_max)
        report(verdict, action)
        sleep(max(interval, MIN_WATCH_INTERVAL))


def _restart(argv: Sequence[str], verdict: Verdict, children: list[subprocess.Popen[bytes]]) -> str:
    env = dict(os.environ)
    env["ORCH_HEALTH_STATUS"] = verdict.status
    env["ORCH_HEALTH_REASONS"] = "; ".join(verdict.reasons)
    if verdict.pid is not None and verdict.pid_alive:
        env["ORCH_HEALTH_PID"] = str(verdict.pid)
    try:
        child = subprocess.Popen(list(argv), env=env, stdin=subprocess.DEVNULL,
                                 start_new_session=True)  # fmt: skip
    except OSError as exc:
        return f"cannot run the restart command {list(argv)!r}: {exc}"
    try:
        code = child.wait(RESTART_CMD_WAIT)
    except subprocess.TimeoutExpired:
        children.append(child)
        return f"restart command {list(argv)!r} still running after {RESTART_CMD_WAIT:g}s; left running"
    return f"ran restart command {list(argv)!r}: exit status {code}"
