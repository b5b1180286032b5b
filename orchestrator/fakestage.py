"""A stage program that misbehaves on purpose, for stress tests and fire drills.

Synopsis::

    python -m orchestrator.fakestage --duration 0.05:0.2 --faults fail=0.1,hang=0.02 \\
        --audit audit.jsonl --lock-dir locks --limit 1

    python -m orchestrator.fakestage --wrap --fail-rate 0.05 --hang-rate 0.01 -- real-tool ARGS

Every run appends its start and end to the audit log (JSON lines: event, monotonic time, pid,
item, stage, attempt) and, with ``--lock-dir``/``--limit N``, holds one of N non-blocking
``flock`` slots for its whole life: if all N are held by other runs, the stage's limit was
exceeded and an ``overlap`` line is written -- recorded by the OS, not inferred.

Behaviours (``--mode`` forces one; ``--faults`` draws one by probability, else ``ok``):

=============  ==========================================================================
ok             sleep a random duration, exit 0
fail           exit 3 after a short while
hang           sleep forever, silently (ends by ``timeout`` or ``stall_timeout``)
silent         print a line, then go silent forever (ends by ``stall_timeout``)
ignore-term    ignore SIGTERM and hang (the kill must escalate to SIGKILL)
orphan         fork a grandchild that outlives this process (the group sweep must end it)
flood          write megabytes of output, exit 0
signal         die by SIGSEGV
garbage        write random bytes to stdout, exit 0
=============  ==========================================================================

With ``--wrap -- CMD...`` it is the ``[faults]`` wrapper: it draws a delay, a failure or a hang at
the given rates, and otherwise ``exec``s CMD unchanged.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import random
import signal
import sys
import time

__all__ = ["BEHAVIOURS", "main", "parse_faults"]

#: What a fake run can do.
BEHAVIOURS = ("ok", "fail", "hang", "silent", "ignore-term", "orphan", "flood", "signal",
              "garbage")  # fmt: skip
#: Exit status of the ``fail`` behaviour (and of an injected failure).
FAIL_STATUS = 3
#: How long "forever" is: far beyond any test's timeout, short enough to end on its own.
FOREVER = 3600.0


def parse_faults(spec: str) -> dict[str, float]:
    """``"fail=0.1,hang=0.02"`` → ``{"fail": 0.1, "hang": 0.02}``; rates must sum to at most 1."""
    rates: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        if name not in BEHAVIOURS or name == "ok":
            raise ValueError(f"unknown fault {name!r}; known: {', '.join(BEHAVIOURS[1:])}")
        rate = float(value)
        if not 0 <= rate <= 1:
            raise ValueError(f"fault rate must be between 0 and 1, got {part!r}")
        rates[name] = rate
    if sum(rates.values()) > 1 + 1e-9:
        raise ValueError(f"fault rates add up to more than 1: {spec!r}")
    return rates


def _rng(seed: str | None) -> random.Random:
    if seed is None:
        # Deterministic per (item, stage, attempt), different across attempts.
        key = "|".join(os.environ.get(k, "") for k in ("ORCH_ITEM", "ORCH_STAGE", "ORCH_ATTEMPT"))
        seed = hashlib.sha256(key.encode()).hexdigest() if key.strip("|") else None
    return random.Random(seed)


def _draw(rng: random.Random, rates: dict[str, float]) -> str:
    x = rng.random()
    for name, rate in rates.items():
        if x < rate:
            return name
        x -= rate
    return "ok"


class _Audit:
    def __init__(self, path: str | None) -> None:
        self.path = path
        self.base = {
            "pid": os.getpid(),
            "item": os.environ.get("ORCH_ITEM"),
            "stage": os.environ.get("ORCH_STAGE"),
            "attempt": os.environ.get("ORCH_ATTEMPT"),
            "run": os.environ.get("ORCH_RUN"),
        }

    def note(self, event: str, **extra: object) -> None:
        if self.path is None:
            return
        line = json.dumps({"event": event, "t": time.monotonic(), **self.base, **extra}) + "\n"
        # One write() of an O_APPEND file: lines from concurrent runs never interleave.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def _take_slot(lock_dir: str, limit: int, stage: str) -> int | None:
    os.makedirs(lock_dir, exist_ok=True)
    for i in range(limit):
        fd = os.open(os.path.join(lock_dir, f"{stage}-{i}.lock"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        return fd  # held until this process (and any child that inherited it) is gone
    return None


def _duration(spec: str, rng: random.Random) -> float:
    low, _, high = spec.partition(":")
    return rng.uniform(float(low), float(high or low))


def _behave(mode: str, seconds: float, rng: random.Random, audit: _Audit) -> int:
    out = sys.stdout
    if mode == "ok":
        time.sleep(seconds)
        return 0
    if mode == "fail":
        print("fakestage: injected failure", flush=True)
        time.sleep(seconds / 2)
        return FAIL_STATUS
    if mode == "hang":
        time.sleep(FOREVER)
        return 0
    if mode == "silent":
        print("fakestage: working... (and now silence)", flush=True)
        time.sleep(FOREVER)
        return 0
    if mode == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("fakestage: ignoring SIGTERM", flush=True)
        time.sleep(FOREVER)
        return 0
    if mode == "orphan":
        child = os.fork()
        if child == 0:  # the grandchild: outlives its parent, in the run's process group
            audit.base["pid"] = os.getpid()
            audit.note("orphan-start", parent=os.getppid())
            time.sleep(FOREVER)
            os._exit(0)
        audit.note("forked", child=child)
        time.sleep(seconds)
        return 0
    if mode == "flood":
        chunk = (("x" * 79) + "\n") * 1024
        for _ in range(int(2 * 1024 * 1024 / len(chunk)) + 1):
            out.write(chunk)
        out.flush()
        return 0
    if mode == "signal":
        out.flush()
        os.kill(os.getpid(), signal.SIGSEGV)
        time.sleep(5)
        return 0
    if mode == "garbage":
        sys.stdout.buffer.write(rng.randbytes(64 * 1024))
        sys.stdout.buffer.flush()
        time.sleep(seconds)
        return 0
    raise ValueError(f"unknown mode {mode!r}")


def _wrap(args: argparse.Namespace, rng: random.Random) -> int:
    if not args.command:
        print("fakestage: --wrap needs a command after --", file=sys.stderr)
        return 2
    x = rng.random()
    if x < args.fail_rate:
        print("fakestage: injected failure (faults.fail_rate)", file=sys.stderr, flush=True)
        return FAIL_STATUS
    x -= args.fail_rate
    if x < args.hang_rate:
        print("fakestage: injected hang (faults.hang_rate)", file=sys.stderr, flush=True)
        time.sleep(FOREVER)
        return 0
    x -= args.hang_rate
    if x < args.delay_rate:
        time.sleep(args.delay)
    os.execvp(args.command[0], args.command)
    return 127  # pragma: no cover -- execvp does not return


def main(argv: list[str] | None = None) -> int:
    """Run one fake stage (or wrap a real one); return the exit status."""
    p = argparse.ArgumentParser(prog="python -m orchestrator.fakestage",
                                description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("--mode", choices=BEHAVIOURS, help="force one behaviour")
    p.add_argument("--faults", default="", help='rates, e.g. "fail=0.1,hang=0.02,flood=0.01"')
    p.add_argument("--duration", default="0.01:0.05", help="seconds, or LOW:HIGH (uniform)")
    p.add_argument("--audit", default=os.environ.get("ORCH_FAKE_AUDIT"),
                   help="append start/end/overlap lines (JSON) to this file "
                   "(default: $ORCH_FAKE_AUDIT, which `orchestrator stress` sets)")  # fmt: skip
    p.add_argument("--lock-dir", default=os.environ.get("ORCH_FAKE_LOCK_DIR"),
                   help="folder of the limit's flock slots (default: $ORCH_FAKE_LOCK_DIR)")  # fmt: skip
    p.add_argument("--limit", type=int, default=0, help="the stage's limit (slots to try)")
    p.add_argument("--seed", help="random seed (default: from item, stage and attempt)")
    p.add_argument("--wrap", action="store_true", help="[faults] wrapper mode: exec the command")
    p.add_argument("--fail-rate", type=float, default=0.0)
    p.add_argument("--hang-rate", type=float, default=0.0)
    p.add_argument("--delay-rate", type=float, default=0.0)
    p.add_argument("--delay", type=float, default=1.0)
    p.add_argument("command", nargs="*", help="with --wrap: the real command")
    args = p.parse_args(argv)
    rng = _rng(args.seed)
    if args.wrap:
        return _wrap(args, rng)
    try:
        rates = parse_faults(args.faults)
    except ValueError as exc:
        p.error(str(exc))
    audit = _Audit(args.audit)
    stage = os.environ.get("ORCH_STAGE", "stage")
    if args.lock_dir and args.limit > 0 and _take_slot(args.lock_dir, args.limit, stage) is None:
        audit.note("overlap", limit=args.limit)
    mode = args.mode or _draw(rng, rates)
    audit.note("start", mode=mode)
    status = _behave(mode, _duration(args.duration, rng), rng, audit)
    audit.note("end", mode=mode, status=status)
    return status


if __name__ == "__main__":
    sys.exit(main())
