"""Tests for `orchestrator.runner`: real children on the real clock, checked through /proc.

Every test that starts a process tree proves its end by looking at the OS, not only at the
`RunResult`: the leader (our own child) must be fully reaped, and every other member of its
process group must be gone or a zombie that is no longer ours (orphans are reparented to PID 1 or
a subreaper, which may not reap them promptly).

The last section pins down bugs found in review (fixed since).
"""

from __future__ import annotations

import errno
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from orchestrator import runner
from orchestrator.runner import EOF_WAIT, Command, Outcome, RunResult, run_command

PY = sys.executable
#: The environment most children get: ours, with unbuffered Python output.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
#: Slack for "at least this long" timing assertions (timer and scheduling granularity).
EPS = 0.05


# --- helpers -----------------------------------------------------------------------------------


def cmd(argv: tuple[str, ...], env: dict[str, str] = ENV, **kw: Any) -> Command:
    return Command(argv=argv, env=env, **kw)


def py(code: str, *args: str) -> tuple[str, ...]:
    return (PY, "-c", code, *args)


def sh(script: str, *args: str) -> tuple[str, ...]:
    return ("/bin/sh", "-c", script, "sh", *args)


def proc_stat(pid: int) -> tuple[str, int, int, int, int] | None:
    """(state, ppid, pgrp, session, tty_nr) of ``pid`` from /proc, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3]), int(fields[4])


def is_dead(pid: int) -> bool:
    """True if ``pid`` no longer runs: gone, or a zombie that is not ours to reap."""
    st = proc_stat(pid)
    return st is None or (st[0] in "ZX" and st[1] != os.getpid())


async def assert_dead(pid: int, timeout: float = 2.0) -> None:
    """Poll for up to ``timeout`` seconds for ``pid`` to be dead (see `is_dead`)."""
    with trio.move_on_after(timeout):
        while not is_dead(pid):
            await trio.sleep(0.02)
    assert is_dead(pid), f"pid {pid} still alive: {proc_stat(pid)}"


def assert_reaped(pid: int) -> None:
    """Our direct child ``pid`` was waited for: no /proc entry, not even a zombie."""
    assert proc_stat(pid) is None, f"leader {pid} not reaped: {proc_stat(pid)}"


def live_group_members(pgid: int) -> list[int]:
    """Pids of the processes in group ``pgid`` that are not zombies."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st is not None and st[2] == pgid and st[0] not in "ZX":
                members.append(int(entry))
    return members


def our_children() -> list[int]:
    pids: list[int] = []
    for tid in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            with open(f"/proc/{os.getpid()}/task/{tid}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except FileNotFoundError:  # the thread ended meanwhile
            pass
    return pids


def open_fds() -> set[str]:
    # Collected first: an object of an earlier test that holds a file (a connection) must not
    # close it between two calls.
    gc.collect()
    return set(os.listdir("/proc/self/fd"))


def our_zombies() -> list[int]:
    """Our children that exited and were never waited for."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st is not None and st[0] == "Z" and st[1] == os.getpid():
                found.append(int(name))
    return found


@pytest.fixture(params=["fork_exec", "posix_spawn"])
def spawner(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each way a run is spawned: CPython's ``fork_exec`` (the default) and the
    ``os.posix_spawn`` fallback (where fork_exec is missing or takes other arguments)."""
    if request.param == "posix_spawn":
        monkeypatch.setattr(runner, "_fork_exec", None)
    else:
        assert runner._fork_exec is not None
    return str(request.param)


async def wait_for_file(path: Path, timeout: float = 10.0) -> str:
    with trio.fail_after(timeout):
        while not path.exists():
            await trio.sleep(0.01)
    return path.read_text()


async def assert_group_gone(result: RunResult, *others: int) -> None:
    """The leader is reaped, ``others`` are dead and nothing of the group still runs."""
    assert result.pid is not None
    assert_reaped(result.pid)
    for pid in others:
        await assert_dead(pid)
    assert live_group_members(result.pid) == []


#: Python: write ``text`` to the file ``sys.argv[1]`` atomically (readers never see half of it).
WRITE_ATOMIC = """
def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)
"""

#: Python child that ignores SIGTERM, then records "pid monotonic-time" and sleeps.
IGNORE_TERM = (
    "import os, signal, sys, time\n"
    + WRITE_ATOMIC
    + """
signal.signal(signal.SIGTERM, signal.SIG_IGN)
write_atomic(sys.argv[1], f"{os.getpid()} {time.monotonic()}")
print("ready")
time.sleep(1000)
"""
)


# --- exit status and output --------------------------------------------------------------------


async def test_run_command_exit_zero_is_ok() -> None:
    spawned: list[int] = []
    result = await run_command(cmd(py("print('hello')")), on_spawn=spawned.append)
    assert result.outcome is Outcome.OK
    assert (result.exit_code, result.signal, result.signals_sent) == (0, None, ())
    assert result.tail == "hello"
    assert result.reason == "exit 0"
    assert result.output_bytes == len("hello\n")
    assert spawned == [result.pid]
    assert_reaped(result.pid)


async def test_run_command_nonzero_exit_is_failed_with_interleaved_tail() -> None:
    code = """
import sys
for i in range(5):
    print(f"out {i}", file=sys.stdout, flush=True)
    print(f"err {i}", file=sys.stderr, flush=True)
sys.exit(3)
"""
    result = await run_command(cmd(py(code)))
    assert result.outcome is Outcome.FAILED
    assert (result.exit_code, result.signal) == (3, None)
    assert result.reason == "exit 3"
    # One pipe for both streams: the tail keeps their exact order.
    assert result.tail.splitlines() == [f"{s} {i}" for i in range(5) for s in ("out", "err")]
    assert_reaped(result.pid)


async def test_run_command_tail_keeps_only_last_lines() -> None:
    result = await run_command(cmd(py("for i in range(100): print(f'line {i}')")))
    assert result.outcome is Outcome.OK
    assert result.tail.splitlines() == [f"line {i}" for i in range(80, 100)]
    assert result.output_bytes == sum(len(f"line {i}\n") for i in range(100))


async def test_run_command_tail_survives_invalid_utf8() -> None:
    result = await run_command(cmd(py("import sys; sys.stdout.buffer.write(b'a\\xff\\xfeb\\n')")))
    assert result.outcome is Outcome.OK
    assert result.tail == "a\ufffd\ufffdb"


async def test_run_command_foreign_signal_is_killed() -> None:
    result = await run_command(cmd(py("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")))
    assert result.outcome is Outcome.KILLED
    assert (result.exit_code, result.signal) == (None, signal.SIGKILL)
    assert result.signals_sent == ()
    assert result.reason == "killed by SIGKILL"
    assert_reaped(result.pid)


# --- timeout, grace period, final sweep --------------------------------------------------------


async def test_run_command_timeout_kills_leader_and_grandchild(tmp_path: Path) -> None:
    gc_file = tmp_path / "gc.pid"
    timeout, grace = 0.5, 1.0
    started = time.monotonic()
    result = await run_command(
        cmd(
            sh('sleep 1000 & echo $! > "$1"; exec sleep 1000', str(gc_file)),
            timeout=timeout,
            grace_period=grace,
        )
    )
    wall = time.monotonic() - started
    assert result.outcome is Outcome.TIMEOUT
    assert result.signals_sent == ("SIGTERM",)
    assert (result.exit_code, result.signal) == (None, signal.SIGTERM)
    assert result.reason == "timed out after 0.5s; process group killed"
    assert timeout - EPS <= result.duration < timeout + grace + 2
    assert wall < timeout + grace + 2
    await assert_group_gone(result, int(gc_file.read_text()))


async def test_run_command_term_ignoring_leader_is_killed_after_grace(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    timeout, grace = 0.5, 0.5
    result = await run_command(
        cmd(py(IGNORE_TERM, str(ready)), timeout=timeout, grace_period=grace)
    )
    assert result.outcome is Outcome.TIMEOUT
    assert result.signals_sent == ("SIGTERM", "SIGKILL")
    # Killed by our SIGKILL, which proves SIGTERM was ignored rather than obeyed.
    assert (result.exit_code, result.signal) == (None, signal.SIGKILL)
    assert "ready" in result.tail
    assert timeout + grace - EPS <= result.duration < timeout + grace + 2
    await assert_group_gone(result)


async def test_run_command_term_ignoring_grandchild_is_swept(tmp_path: Path) -> None:
    # Given a leader that obeys SIGTERM and a grandchild that ignores it
    ready = tmp_path / "ready"
    timeout, grace = 1.0, 5.0
    started = time.monotonic()
    # When the run times out
    result = await run_command(
        cmd(
            sh('"$1" -c "$2" "$3" & exec sleep 1000', PY, IGNORE_TERM, str(ready)),
            timeout=timeout,
            grace_period=grace,
        )
    )
    # Then the leader dies of SIGTERM at once, and the final SIGKILL sweep takes the grandchild
    # without waiting for the grace period.
    gc_pid, ready_at = ready.read_text().split()
    assert float(ready_at) < started + timeout, "precondition: SIG_IGN set before SIGTERM"
    assert result.outcome is Outcome.TIMEOUT
    assert result.signals_sent == ("SIGTERM",)
    assert result.signal == signal.SIGTERM
    assert timeout - EPS <= result.duration < timeout + 1.5
    await assert_group_gone(result, int(gc_pid))


async def test_run_command_sigterm_reaches_whole_group_first(tmp_path: Path) -> None:
    # Given a leader that ignores SIGTERM (so the grace period runs) and a grandchild that
    # records the SIGTERM it gets before exiting
    ready, got_term = tmp_path / "ready", tmp_path / "got_term"
    grandchild = (
        "import os, signal, sys, time\n"
        + WRITE_ATOMIC
        + """
def on_term(signum, frame):
    write_atomic(sys.argv[2], "TERM")
    os._exit(0)
signal.signal(signal.SIGTERM, on_term)
write_atomic(sys.argv[1], str(os.getpid()))
time.sleep(1000)
"""
    )
    script = 'trap "" TERM; "$1" -c "$2" "$3" "$4" & exec sleep 1000'  # sleep inherits SIG_IGN
    spawned: list[int] = []
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: run_command(
                    cmd(sh(script, PY, grandchild, str(ready), str(got_term)), grace_period=0.5),
                    on_spawn=spawned.append,
                )
            )
            gc_pid = int(await wait_for_file(ready))
            # When the run is cancelled
            scope.cancel()
    # Then the grandchild got SIGTERM (to the group, not only the leader) and could clean up
    assert got_term.read_text() == "TERM"
    assert_reaped(spawned[0])
    await assert_dead(gc_pid)
    assert live_group_members(spawned[0]) == []


# --- stall detection ---------------------------------------------------------------------------


async def test_run_command_silence_is_stalled() -> None:
    stall = 0.5
    result = await run_command(
        cmd(
            py("import time; print('started'); time.sleep(1000)"),
            stall_timeout=stall,
            timeout=10,
            grace_period=1,
        )
    )
    assert result.outcome is Outcome.STALLED
    assert result.reason == "no output for 0.5s; process group killed"
    assert result.signals_sent == ("SIGTERM",)
    assert result.tail == "started"
    assert stall - EPS <= result.duration < stall + 1.5
    await assert_group_gone(result)


async def test_run_command_output_rearms_stall_deadline() -> None:
    code = "import time\nfor i in range(10):\n    print(i)\n    time.sleep(0.1)\n"
    result = await run_command(cmd(py(code), stall_timeout=0.5, timeout=10))
    assert result.outcome is Outcome.OK
    assert result.signals_sent == ()
    assert result.duration >= 1.0 - EPS  # twice the stall timeout: it was re-armed
    assert result.tail.splitlines() == [str(i) for i in range(10)]


async def test_run_command_steady_output_still_times_out() -> None:
    code = "import time\nwhile True:\n    print('tick')\n    time.sleep(0.05)\n"
    result = await run_command(cmd(py(code), stall_timeout=0.5, timeout=0.8, grace_period=1))
    assert result.outcome is Outcome.TIMEOUT
    assert 0.8 - EPS <= result.duration < 0.8 + 1.5
    await assert_group_gone(result)


# --- leader exits, descendants remain ----------------------------------------------------------


async def test_run_command_exit_sweeps_grandchild_holding_pipe(tmp_path: Path) -> None:
    gc_file = tmp_path / "gc.pid"
    started = time.monotonic()
    result = await run_command(cmd(sh('sleep 1000 & echo $! > "$1"; echo bye', str(gc_file))))
    assert time.monotonic() - started < 3
    assert result.outcome is Outcome.OK
    assert result.exit_code == 0
    assert result.signals_sent == ()  # the sweep is not a signal "sent" for the outcome
    assert result.tail == "bye"
    assert result.duration < 3
    await assert_group_gone(result, int(gc_file.read_text()))


async def test_run_command_escaped_pipe_holder_does_not_block(tmp_path: Path) -> None:
    # A descendant that left the group (setsid) cannot be swept and keeps the pipe open: the
    # runner gives up reading after EOF_WAIT instead of waiting for it.
    escaped_file = tmp_path / "escaped.pid"
    code = (
        "import os, sys, time\n"
        + WRITE_ATOMIC
        + """
if os.fork() == 0:
    os.setsid()
    write_atomic(sys.argv[1], str(os.getpid()))
    time.sleep(1000)
    os._exit(0)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
print("leader done")
"""
    )
    escaped: int | None = None
    try:
        result = await run_command(cmd(py(code, str(escaped_file))))
        escaped = int(escaped_file.read_text())
        assert result.outcome is Outcome.OK
        assert result.tail == "leader done"
        assert EOF_WAIT - EPS <= result.duration < EOF_WAIT + 1.5
        assert_reaped(result.pid)
    finally:
        if escaped is None and escaped_file.exists():
            escaped = int(escaped_file.read_text())
        if escaped is not None:
            os.kill(escaped, signal.SIGKILL)


async def test_run_command_kills_a_marked_process_that_left_the_group(tmp_path: Path) -> None:
    # A descendant that left the group (setsid) but carries the run's marker and holds the pipe
    # is found in /proc and killed: the run returns promptly and leaves nothing behind.
    escaped_file = tmp_path / "escaped.pid"
    code = (
        "import os, sys, time\n"
        + WRITE_ATOMIC
        + """
if os.fork() == 0:
    os.setsid()
    write_atomic(sys.argv[1], str(os.getpid()))
    time.sleep(1000)
    os._exit(0)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
print("leader done")
"""
    )
    env = {**os.environ, "ORCH_RUN": "run-under-test", "ORCH_STATE": str(tmp_path)}
    escaped: int | None = None
    try:
        result = await run_command(cmd(
            py(code, str(escaped_file)), env=env,
            marker=("ORCH_RUN=run-under-test", f"ORCH_STATE={tmp_path}"),
        ))  # fmt: skip
        escaped = int(escaped_file.read_text())
        assert result.outcome is Outcome.OK
        assert result.duration < EOF_WAIT
        deadline = time.monotonic() + 5
        while not is_dead(escaped) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert is_dead(escaped)
    finally:
        if escaped is not None and not is_dead(escaped):
            os.kill(escaped, signal.SIGKILL)


async def test_a_killed_run_takes_its_marked_escapees_with_it_even_off_the_pipe(
    tmp_path: Path,
) -> None:
    # A descendant that left the group (setsid) and the pipe (output to /dev/null) is not seen
    # by the end-of-output check; a run we kill (its timeout) still finds it by its marker.
    escaped_file = tmp_path / "escaped.pid"
    code = (
        "import os, sys, time\n"
        + WRITE_ATOMIC
        + """
if os.fork() == 0:
    os.setsid()
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    write_atomic(sys.argv[1], str(os.getpid()))
    time.sleep(1000)
    os._exit(0)
time.sleep(1000)
"""
    )
    env = {**os.environ, "ORCH_RUN": "run-under-test", "ORCH_STATE": str(tmp_path)}
    escaped: int | None = None
    try:
        result = await run_command(cmd(
            py(code, str(escaped_file)), env=env, timeout=1.0,
            marker=("ORCH_RUN=run-under-test", f"ORCH_STATE={tmp_path}"),
        ))  # fmt: skip
        escaped = int(escaped_file.read_text())
        assert result.outcome is Outcome.TIMEOUT
        deadline = time.monotonic() + 5
        while not is_dead(escaped) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert is_dead(escaped)
    finally:
        if escaped is not None and not is_dead(escaped):
            os.kill(escaped, signal.SIGKILL)


# --- argv, cwd, environment --------------------------------------------------------------------

HOSTILE_ARGS = (
    "two words",
    "'single'",
    '"double"',
    "semi;colon",
    "amp&",
    "$(touch PWNED)",
    "`touch PWNED`",
    "; touch PWNED",
    "line1\nline2",
    "",
    "--",
    "-c",
    "*",
    "$HOME",
    "back\\slash",
    "> PWNED",
    "ünïcødé",
)
DUMP_ARGV = "import json, sys\nopen(sys.argv[1], 'w').write(json.dumps(sys.argv[2:]))"


@pytest.mark.parametrize("where", ["inherited", "tmp_path", "hostile_dir"])
async def test_run_command_hostile_argv_reaches_child_verbatim(
    tmp_path: Path, where: str, spawner: str
) -> None:
    out = tmp_path / "argv.json"
    cwd = {
        "inherited": None,
        "tmp_path": tmp_path,
        "hostile_dir": tmp_path / "d $(touch PWNED); & 'q' \"dq\" `touch PWNED`\nx",
    }[where]
    if cwd is not None:
        cwd.mkdir(exist_ok=True)
    result = await run_command(
        cmd(py(DUMP_ARGV, str(out), *HOSTILE_ARGS), cwd=None if cwd is None else str(cwd))
    )
    assert result.outcome is Outcome.OK, result.tail
    assert json.loads(out.read_text()) == list(HOSTILE_ARGS)
    for folder in (tmp_path, cwd or tmp_path, Path.cwd()):
        assert not (folder / "PWNED").exists()


async def test_run_command_cwd_is_child_working_dir(tmp_path: Path, spawner: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    result = await run_command(
        cmd(py("import os; print(os.getcwd()); open('marker', 'w').close()"), cwd=str(work))
    )
    assert result.outcome is Outcome.OK
    assert result.tail == os.path.realpath(work)
    assert (work / "marker").exists()


@pytest.mark.parametrize("kind", ["missing", "file"])
async def test_run_command_bad_cwd_is_failed_and_runs_nothing(
    tmp_path: Path, kind: str, spawner: str
) -> None:
    cwd = tmp_path / "nowhere"
    if kind == "file":
        cwd.write_text("not a folder")
    result = await run_command(cmd(py("open('ran', 'w').close()"), cwd=str(cwd)))
    assert result.outcome is Outcome.FAILED
    assert str(cwd) in result.reason
    if spawner == "fork_exec":  # the child's chdir fails before exec, and says so
        assert (result.exit_code, result.signal, result.pid) == (None, None, None)
        assert result.reason.startswith("cannot start")
        expected = "No such file or directory" if kind == "missing" else "Not a directory"
        assert expected in result.reason
        assert our_zombies() == []
    else:  # the chdir trampoline's shell exits 127 and says why
        assert (result.exit_code, result.signal) == (127, None)
        assert result.tail
        assert_reaped(result.pid)
    assert not (tmp_path / "ran").exists()
    assert not os.path.exists("ran")


@pytest.mark.parametrize("kind", ["not_on_path", "absolute", "not_executable", "directory"])
async def test_run_command_missing_executable_is_failed(
    tmp_path: Path, kind: str, spawner: str
) -> None:
    program = {
        "not_on_path": "orchestrator-test-no-such-command",
        "absolute": str(tmp_path / "missing"),
        "not_executable": str(tmp_path / "plain.txt"),
        "directory": str(tmp_path),
    }[kind]
    if kind == "not_executable":
        (tmp_path / "plain.txt").write_text("echo hi\n")
    spawned: list[int] = []
    await run_command(cmd(("true",)))  # warm-up: what the spawner keeps open from run to run
    fds = open_fds()
    result = await run_command(cmd((program, "arg")), on_spawn=spawned.append)
    assert result.outcome is Outcome.FAILED
    assert (result.exit_code, result.signal, result.pid) == (None, None, None)
    assert program in result.reason
    assert result.reason.startswith("cannot start")
    assert spawned == []
    assert open_fds() == fds  # both pipe ends closed
    assert our_zombies() == []  # a child whose exec failed was reaped


async def test_run_command_env_is_exactly_the_given_mapping(tmp_path: Path, spawner: str) -> None:
    env = {
        "PATH": os.environ["PATH"],
        "ORCH_X": "value with spaces; $(touch PWNED)\nsecond line",
        "ORCH_EMPTY": "",
    }
    out = tmp_path / "environ"
    code = "import sys; open(sys.argv[1], 'wb').write(open('/proc/self/environ', 'rb').read())"
    result = await run_command(cmd(py(code, str(out)), env=env))
    assert result.outcome is Outcome.OK
    seen = dict(entry.split("=", 1) for entry in out.read_bytes().decode().split("\0") if entry)
    assert seen == env  # nothing of ours (HOME, PYTHONUNBUFFERED, ...) leaks in
    assert not (tmp_path / "PWNED").exists()


# A stage's environment, checked and encoded once; each run adds its own entries.
PER_RUN = ("ORCH_ITEM", "ORCH_RUN", "ORCH_WORKDIR")


def test_run_environment_is_the_stage_environment_updated_with_the_run_values() -> None:
    stage = runner.StageEnvironment(
        {"PATH": "/bin", "ORCH_STAGE": "s", "ORCH_WORKDIR": "/outer", "ORCH_RUN": "7"}, PER_RUN
    )
    env = runner.RunEnvironment(
        stage, {"ORCH_ITEM": "in:a b", "ORCH_RUN": "12", "ORCH_WORKDIR": ""}
    )
    # What `dict(stage) | {non-empty run values}` gives: an empty value keeps the stage's.
    expected = {"PATH": "/bin", "ORCH_STAGE": "s", "ORCH_WORKDIR": "/outer", "ORCH_RUN": "12",
                "ORCH_ITEM": "in:a b"}  # fmt: skip
    assert dict(env) == expected
    assert len(env) == len(expected)
    assert env["ORCH_RUN"] == "12"
    assert env.get("ORCH_MISSING") is None
    assert sorted(env.encoded()) == sorted(f"{k}={v}".encode() for k, v in expected.items())
    # A run value the stage does not have, left empty: absent, as with a dict update.
    bare = runner.RunEnvironment(
        runner.StageEnvironment({"PATH": "/bin"}, PER_RUN), {"ORCH_ITEM": ""}
    )
    assert dict(bare) == {"PATH": "/bin"}
    with pytest.raises(ValueError, match="not declared per run"):
        runner.RunEnvironment(stage, {"ORCH_OTHER": "x"})


@pytest.mark.parametrize("where", ["stage", "run"])
def test_run_environment_refuses_what_exec_cannot_take(where: str) -> None:
    stage_values = {"PATH": "/bin", **({"BAD": "a\0b"} if where == "stage" else {})}
    stage = runner.StageEnvironment(stage_values, PER_RUN)
    env = runner.RunEnvironment(stage, {"ORCH_ITEM": "a\0b" if where == "run" else "ok"})
    with pytest.raises(ValueError, match="null byte"):
        env.encoded()
    named = runner.StageEnvironment({"A=B": "x"}, PER_RUN)
    with pytest.raises(ValueError, match="illegal environment variable name"):
        runner.RunEnvironment(named, {}).encoded()


@pytest.mark.parametrize("cwd", [False, True])
async def test_a_run_gets_exactly_its_run_environment(
    tmp_path: Path, spawner: str, cwd: bool
) -> None:
    stage = runner.StageEnvironment(
        {"PATH": os.environ["PATH"], "ORCH_STAGE": "s", "ORCH_WORKDIR": "/outer"}, PER_RUN
    )
    env = runner.RunEnvironment(
        stage, {"ORCH_ITEM": "it $(touch PWNED)\nx", "ORCH_RUN": "3", "ORCH_WORKDIR": ""}
    )
    out = tmp_path / "environ"
    code = "import sys; open(sys.argv[1], 'wb').write(open('/proc/self/environ', 'rb').read())"
    where = str(tmp_path) if cwd else None
    result = await run_command(Command(argv=py(code, str(out)), env=env, cwd=where))
    assert result.outcome is Outcome.OK, result.reason
    seen = dict(entry.split("=", 1) for entry in out.read_bytes().decode().split("\0") if entry)
    assert seen == {**dict(env), **({"PWD": str(tmp_path)} if cwd else {})}
    assert seen["ORCH_WORKDIR"] == "/outer"  # left empty by the run: the stage's
    assert seen["ORCH_RUN"] == "3"
    assert not (tmp_path / "PWNED").exists()


async def test_run_command_child_sigpipe_is_default() -> None:
    # With SIGPIPE at SIG_IGN (Python's own setting), `yes` would get EPIPE and exit 1 with
    # "Broken pipe"; at the default it is killed by SIGPIPE (status 141 in the shell).
    started = time.monotonic()
    result = await run_command(
        cmd(sh('(yes; echo "yes status $?" >&2) | head -n 1'), timeout=5, grace_period=1)
    )
    assert time.monotonic() - started < 5
    assert result.outcome is Outcome.OK, result.tail
    assert sorted(result.tail.splitlines()) == ["y", "yes status 141"]  # two writers: any order


async def test_run_command_child_signal_dispositions_are_reset() -> None:
    # grep reads its own /proc status; Python (us) has SIGPIPE and SIGXFSZ at SIG_IGN.
    result = await run_command(cmd(("grep", "-E", "^Sig(Ign|Blk):", "/proc/self/status")))
    assert result.outcome is Outcome.OK
    masks = {k: int(v, 16) for k, v in (line.split(":\t") for line in result.tail.splitlines())}
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        assert not masks["SigIgn"] & (1 << (sig - 1)), sig
    assert masks["SigBlk"] == 0


@pytest.mark.parametrize("session", [True, False], ids=["new_session", "own_group"])
async def test_run_command_child_gets_own_group_devnull_stdin_and_no_runner_fds(
    tmp_path: Path, session: bool, spawner: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whether a run gets a session of its own follows our controlling terminal (a test of
    # that, on a real terminal, is below); both ways are checked here.
    monkeypatch.setattr(runner, "_new_session", session)
    code = (
        "import json, os, sys\n"
        + WRITE_ATOMIC
        + """
fds = []
for fd in range(3, 1024):
    try:
        os.fstat(fd)
    except OSError:
        continue
    fds.append(fd)
pid = os.getpid()
with open(f"/proc/{pid}/stat") as f:
    tty = int(f.read().rsplit(")", 1)[1].split()[4])
info = dict(
    pid=pid, pgid=os.getpgid(0), sid=os.getsid(0), tty=tty, fds=fds,
    stdin=os.readlink("/proc/self/fd/0"), stdin_data=sys.stdin.read(),
    out=os.readlink("/proc/self/fd/1"), err=os.readlink("/proc/self/fd/2"),
)
write_atomic(sys.argv[1], json.dumps(info))
"""
    )
    # Our inheritable fds (none of them the runner's) are the only ones a child may see.
    inheritable = {int(fd) for fd in open_fds() if int(fd) > 2 and _inheritable(int(fd))}
    results: dict[int, RunResult] = {}

    async def one(i: int) -> None:
        results[i] = await run_command(
            cmd(py(code, str(tmp_path / f"info{i}")), log_path=tmp_path / f"log{i}")
        )

    async with trio.open_nursery() as nursery:  # concurrent runs must not leak fds to each other
        for i in range(4):
            nursery.start_soon(one, i)
    pipes = set()
    for i in range(4):
        info = json.loads((tmp_path / f"info{i}").read_text())
        assert results[i].outcome is Outcome.OK
        assert info["pid"] == info["pgid"] == results[i].pid
        if session:
            assert info["sid"] == info["pid"]
            assert info["tty"] == 0  # no controlling terminal: our Ctrl+C never reaches it
        else:
            assert info["sid"] == os.getsid(0)
            assert info["pgid"] != os.getpgid(0)  # a background group: no Ctrl+C either
        assert set(info["fds"]) <= inheritable
        assert (info["stdin"], info["stdin_data"]) == ("/dev/null", "")
        assert info["out"] == info["err"]
        assert info["out"].startswith("pipe:")
        pipes.add(info["out"])
    assert len(pipes) == 4


def _inheritable(fd: int) -> bool:
    try:
        return os.get_inheritable(fd)
    except OSError:  # closed meanwhile (e.g. the listdir fd itself)
        return False


# --- log file ----------------------------------------------------------------------------------


async def test_run_command_log_is_capped_with_marker(tmp_path: Path) -> None:
    limit = 100_000
    log = tmp_path / "logs" / "nested" / "run.log"
    code = """
import sys
w = sys.stdout.buffer.write
for i in range(3000):
    w(b"%06d" % i + b"x" * 993 + b"\\n")
w(b"END\\n")
"""
    expected_start = b"".join(b"%06d" % i + b"x" * 993 + b"\n" for i in range(101))
    result = await run_command(cmd(py(code), log_path=log, output_limit=limit))
    assert result.outcome is Outcome.OK
    assert result.output_bytes == 3000 * 1000 + 4
    data = log.read_bytes()
    marker = f"\n[orchestrator: output truncated at {limit} bytes]\n".encode()
    assert len(data) <= limit + 200
    assert data.endswith(marker)
    assert data[:limit] == expected_start[:limit]
    assert result.tail.endswith("END")
    assert "log truncated at 100000 bytes" in result.reason
    assert log.stat().st_mode & 0o077 == 0  # private to the service user


async def test_run_command_small_output_is_logged_verbatim(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    code = "import sys\nfor i in range(3):\n    print('o', i, flush=True)\n    print('e', i, file=sys.stderr, flush=True)\n"
    result = await run_command(cmd(py(code), log_path=log))
    assert result.outcome is Outcome.OK
    expected = b"".join(b"o %d\ne %d\n" % (i, i) for i in range(3))
    assert log.read_bytes() == expected
    assert result.output_bytes == len(expected)
    assert "truncated" not in result.reason


async def test_run_command_no_output_creates_no_log(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "run.log"
    result = await run_command(cmd(("true",), log_path=log))
    assert result.outcome is Outcome.OK
    assert result.output_bytes == 0
    assert not log.exists()
    assert not log.parent.exists()


# --- cancellation from outside -----------------------------------------------------------------


async def test_run_command_outer_cancel_kills_group(tmp_path: Path) -> None:
    info, gc_file = tmp_path / "info", tmp_path / "gc.pid"
    script = 'echo $$ $(cut -d" " -f5,6 /proc/$$/stat) > "$1"; sleep 1000 & echo $! > "$2"; exec sleep 1000'
    spawned: list[int] = []
    returned: list[RunResult] = []
    started = time.monotonic()
    with trio.move_on_after(0.3) as scope:
        returned.append(
            await run_command(
                cmd(sh(script, str(info), str(gc_file)), grace_period=2),
                on_spawn=spawned.append,
            )
        )
    elapsed = time.monotonic() - started
    assert scope.cancelled_caught  # run_command raised Cancelled, the scope caught it
    assert returned == []
    assert elapsed < 0.3 + 1.5  # the leader obeyed SIGTERM: no grace period wait
    pid, pgid, sid = map(int, info.read_text().split())
    assert spawned == [pid]
    assert pid == pgid
    assert sid == (pid if runner.new_session() else os.getsid(0))
    assert_reaped(pid)
    await assert_dead(int(gc_file.read_text()))
    assert live_group_members(pid) == []


async def test_run_command_outer_cancel_waits_grace_then_kills(tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    spawned: list[int] = []
    grace = 0.4
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                lambda: run_command(
                    cmd(py(IGNORE_TERM, str(ready)), grace_period=grace),
                    on_spawn=spawned.append,
                )
            )
            await wait_for_file(ready)
            cancelled_at = time.monotonic()
            scope.cancel()
    elapsed = time.monotonic() - cancelled_at
    assert scope.cancelled_caught
    assert grace - EPS <= elapsed < grace + 1.5
    assert_reaped(spawned[0])
    assert live_group_members(spawned[0]) == []


# --- many runs ---------------------------------------------------------------------------------


async def test_run_command_many_concurrent_runs_leave_no_zombies_or_fds() -> None:
    await run_command(cmd(("true",)))  # warm-up: whatever trio opens lazily
    fds = open_fds()
    # Children left by other tests in this process (a browser driver still exiting, say) are
    # not this test's business; ours must all be gone.
    before = set(our_children())
    send, receive = trio.open_memory_channel[int](0)
    results: list[RunResult] = []

    async def worker() -> None:
        async for _ in receive:
            results.append(await run_command(cmd(("true",))))

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(worker)
        async with send:
            for i in range(200):
                await send.send(i)
    elapsed = time.monotonic() - started
    assert len(results) == 200
    assert {r.outcome for r in results} == {Outcome.OK}
    pids = {r.pid for r in results}
    assert len(pids) == 200
    assert not (set(our_children()) - before)
    for pid in pids:  # every one reaped: not even a zombie left
        with pytest.raises(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    assert open_fds() == fds
    assert elapsed < 15


# --- regressions: bugs found in review, fixed ---------------------------------------------------


async def test_run_command_looks_up_program_in_command_path(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / "orchestrator-test-tool"
    tool.write_text("#!/bin/sh\necho tool ran\n")
    tool.chmod(0o755)
    env = {"PATH": f"{bindir}:/usr/bin:/bin"}
    with_cwd = await run_command(cmd((tool.name,), env=env, cwd=str(tmp_path)))
    assert with_cwd.outcome is Outcome.OK
    without_cwd = await run_command(cmd((tool.name,), env=env))
    assert without_cwd.outcome is Outcome.OK, without_cwd.reason


async def test_run_command_log_write_error_still_returns_result() -> None:
    result = await run_command(cmd(("echo", "hi"), log_path=Path("/dev/full")))
    assert result.outcome is Outcome.OK


async def test_run_command_on_spawn_error_leaves_no_process() -> None:
    spawned: list[int] = []

    def on_spawn(pid: int) -> None:
        spawned.append(pid)
        raise RuntimeError("cannot record pid")

    try:
        with pytest.raises(RuntimeError, match="cannot record pid"):
            await run_command(cmd(("sleep", "1000")), on_spawn=on_spawn)
        assert_reaped(spawned[0])
    finally:
        if spawned and proc_stat(spawned[0]) is not None:  # clean up what the bug leaves
            os.killpg(spawned[0], signal.SIGKILL)
            os.waitpid(spawned[0], 0)


async def test_run_command_cwd_keeps_env_exact_but_pwd(tmp_path: Path, spawner: str) -> None:
    # The chdir trampoline leaves the environment as given, except PWD, which names the cwd
    # (as a shell would set it; OLDPWD is removed).
    env = {"PATH": os.environ["PATH"], "ORCH_X": "1"}
    out = tmp_path / "environ"
    code = "import sys; open(sys.argv[1], 'wb').write(open('/proc/self/environ', 'rb').read())"
    result = await run_command(cmd(py(code, str(out)), env=env, cwd=str(tmp_path)))
    assert result.outcome is Outcome.OK
    seen = dict(e.split("=", 1) for e in out.read_bytes().decode().split("\0") if e)
    assert seen.pop("PWD") == str(tmp_path)
    assert seen == env


async def test_run_command_child_does_not_inherit_our_fds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Descriptors are listed at most every FD_SCAN_INTERVAL; this one appears between two runs.
    await run_command(cmd(("true",)))
    monkeypatch.setattr(runner, "FD_SCAN_INTERVAL", 0.0)
    rfd, wfd = os.pipe()
    try:
        os.set_inheritable(wfd, True)
        code = "import os, sys; os.fstat(int(sys.argv[1]))"  # exit 1 (OSError) if not inherited
        result = await run_command(cmd(py(code, str(wfd))))
        assert result.outcome is Outcome.FAILED, "the child holds our pipe's write end"
    finally:
        os.close(rfd)
        os.close(wfd)


async def test_a_reused_epoll_set_never_reports_a_finished_runs_descriptor() -> None:
    # The kernel lets a vfork parent go on at exec's point of no return, *before* the child has
    # closed its copies of our close-on-exec descriptors. A run that ends in that moment closes
    # its pidfd while the description is still open in the sibling, so closing alone does not
    # take it out of the epoll set; the set went back to the pool with it, and the next run to
    # get the same descriptor number read the old "leader exited" and SIGKILLed its own live
    # group (found by the kill -9 soak: a prep run "killed by SIGKILL" 2 ms after it started).
    # The sibling's copy is played here by a dup that outlives the close.
    finished = subprocess_pid(("true",))
    pidfd = os.pidfd_open(finished)
    os.waitid(os.P_PID, finished, os.WEXITED | os.WNOWAIT)  # exited: its pidfd is readable
    rfd, wfd = os.pipe()
    watch = runner._Watch(pidfd, runner._Output(rfd, None, 1024))
    await watch.until_leader_exits()
    sibling_copy = os.dup(pidfd)
    watch.close()  # closes pidfd and rfd, gives the set back to the pool
    os.close(wfd)
    os.waitpid(finished, 0)

    alive = subprocess_pid(("sleep", "30"))
    try:
        fresh = os.pidfd_open(alive)
        if fresh != pidfd:  # the next run's pidfd gets the finished one's number
            os.dup2(fresh, pidfd)
            os.close(fresh)
        rfd2, wfd2 = os.pipe()
        watch2 = runner._Watch(pidfd, runner._Output(rfd2, None, 1024))
        assert watch2.epoll is watch.epoll  # the pooled set, as in a run
        watch2.poll()
        assert not watch2.leader_exited
        watch2.close()
        os.close(wfd2)
    finally:
        os.close(sibling_copy)
        os.kill(alive, signal.SIGKILL)
        os.waitpid(alive, 0)


def subprocess_pid(argv: tuple[str, ...]) -> int:
    """A plain child (not a run): its pid, for tests of the runner's parts."""
    return os.posix_spawnp(argv[0], list(argv), dict(os.environ))


async def test_a_run_that_cannot_be_watched_is_killed_reaped_and_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A full descriptor table after the spawn (pidfd_open fails with EMFILE; injected): the run
    # used to raise out of the runner -- stopping the engine -- with its process tree running
    # on unwatched. Now its group is killed and reaped, and the run is an ordinary failure.
    def no_pidfd(pid: int) -> int:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    fds = open_fds()
    before = set(our_children())
    spawned: list[int] = []
    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    result = await run_command(cmd(sh("sleep 30 & sleep 30")), on_spawn=spawned.append)
    monkeypatch.undo()
    assert result.outcome is Outcome.FAILED
    assert result.reason == "cannot watch '/bin/sh' (killed): Too many open files"
    assert result.pid is not None
    assert_reaped(result.pid)
    assert live_group_members(result.pid) == []  # the grandchild too
    assert not (set(our_children()) - before)
    assert open_fds() == fds
    assert spawned == []  # never reported as running


async def test_a_run_without_a_pipe_is_failed_and_starts_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_pipe() -> tuple[int, int]:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    before = set(our_children())
    monkeypatch.setattr(os, "pipe", no_pipe)
    result = await run_command(cmd(("true",)))
    monkeypatch.undo()
    assert (result.outcome, result.pid) == (Outcome.FAILED, None)
    assert result.reason == "cannot start 'true': Too many open files"
    assert set(our_children()) == before


def test_a_watch_that_cannot_register_never_goes_back_to_the_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The second registration fails (the kernel's epoll watch limit; a fake set plays it): the
    # set holds the first one, so it must be closed, not pooled for the next run.
    class HalfFullEpoll:
        def __init__(self) -> None:
            self.registered: list[int] = []
            self.closed = False

        def register(self, fd: int, mask: int) -> None:
            if self.registered:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.registered.append(fd)

        def close(self) -> None:
            self.closed = True

    fake = HalfFullEpoll()
    monkeypatch.setattr(runner, "_EPOLLS", [fake])
    rfd, wfd = os.pipe()
    try:
        with pytest.raises(OSError, match="No space left"):
            runner._Watch(rfd, runner._Output(wfd, None, 1024))
    finally:
        os.close(rfd)
        os.close(wfd)
    assert fake.closed
    assert runner._EPOLLS == []


# --- the spawner ---------------------------------------------------------------------------------


async def test_a_child_holds_only_stdin_stdout_and_stderr(spawner: str) -> None:
    # Neither our descriptors (the store, the epoll sets, the spawner's error pipe) nor the
    # run's own pipe under its original number reach the command.
    code = "import os; print(sorted(int(fd) for fd in os.listdir('/proc/self/fd')))"
    result = await run_command(cmd(py(code)))
    assert result.outcome is Outcome.OK, result.tail
    held = json.loads(result.tail)
    assert held[:3] == [0, 1, 2]
    assert len(held) == 4  # and the descriptor the listing itself had open
    stdin = await run_command(cmd(py("import os; print(os.readlink('/proc/self/fd/0'))")))
    assert stdin.tail == os.devnull


async def test_a_fork_exec_that_takes_other_arguments_falls_back_to_posix_spawn(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[int] = []

    def other_fork_exec(*args: Any) -> int:
        calls.append(len(args))
        raise TypeError(f"fork_exec() takes exactly {len(args) + 1} arguments ({len(args)} given)")

    monkeypatch.setattr(runner, "_fork_exec", other_fork_exec)
    result = await run_command(cmd(py("print('ran')"), cwd=str(tmp_path)))
    assert (result.outcome, result.tail) == (Outcome.OK, "ran")
    assert len(calls) == 1
    assert runner._fork_exec is None  # asked once, then never again
    again = await run_command(cmd(py("print('again')")))
    assert (again.outcome, again.tail, len(calls)) == (Outcome.OK, "again", 1)


async def test_a_stale_exec_failure_report_does_not_fail_a_child_that_runs() -> None:
    # Where vfork is emulated by fork, a failed exec's report can reach the error pipe after
    # its spawn returned, and be read at the next spawn: that next child runs on, unharmed.
    await run_command(cmd(("true",)))  # the thread's spawner descriptors exist
    fds = runner._spawn_fds.fds
    os.write(fds.err_write, b"OSError:2:")
    result = await run_command(cmd(py("import time; time.sleep(0.3); print('fine')")))
    assert (result.outcome, result.tail) == (Outcome.OK, "fine")
    with pytest.raises(BlockingIOError):  # the stale report was taken out
        os.read(fds.err_read, 100)
    assert our_zombies() == []


#: Runs under a terminal (or not) and reports what a run looked like: our own session and
#: terminal, whether runs get a session, and the run's pid, pgid, sid and terminal.
SESSION_PROBE = """
import json, os, sys, trio
from orchestrator.runner import Command, new_session, run_command
if sys.argv[2] == "tty":  # a session leader opening a terminal makes it its controlling one
    os.close(os.open(os.ttyname(0), os.O_RDWR))
code = ("import os; st = open('/proc/self/stat').read().rsplit(')', 1)[1].split();"
        " print(os.getpid(), os.getpgid(0), os.getsid(0), st[4])")
result = trio.run(run_command, Command(argv=(sys.executable, "-c", code), env=dict(os.environ)))
pid, pgid, sid, tty = map(int, result.tail.split())
st = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
with open(sys.argv[1], "w") as f:
    json.dump(dict(our_sid=os.getsid(0), our_tty=int(st[4]), new_session=new_session(),
                   run=[pid, pgid, sid, tty]), f)
"""


@pytest.mark.parametrize("terminal", [True, False], ids=["on_a_terminal", "no_terminal"])
def test_runs_get_a_session_of_their_own_only_under_a_terminal(
    tmp_path: Path, terminal: bool
) -> None:
    import subprocess

    out = tmp_path / "probe.json"
    primary, secondary = os.openpty() if terminal else (-1, -1)
    try:
        stdio = secondary if terminal else subprocess.DEVNULL
        proc = subprocess.run(
            [PY, "-c", SESSION_PROBE, str(out), "tty" if terminal else "none"],
            stdin=stdio, stdout=stdio, stderr=stdio, start_new_session=True, timeout=60,
            check=False,
        )  # fmt: skip
    finally:
        for fd in (primary, secondary):
            if fd >= 0:
                os.close(fd)
    assert proc.returncode == 0
    seen = json.loads(out.read_text())
    pid, pgid, sid, tty = seen["run"]
    assert pgid == pid  # its own process group either way
    assert tty == 0  # and never our terminal
    assert seen["new_session"] is terminal
    if terminal:
        assert seen["our_tty"] != 0  # the probe did have a controlling terminal
        assert sid == pid
    else:
        assert (seen["our_tty"], sid) == (0, seen["our_sid"])


@pytest.mark.parametrize("where", ["argument", "environment"])
async def test_a_nul_byte_in_an_argument_or_the_environment_fails_the_run(
    where: str, spawner: str
) -> None:
    # A record's value can hold a NUL; exec cannot pass it (it would cut the value short).
    await run_command(cmd(("true",)))  # warm-up: what the spawner keeps open from run to run
    fds = open_fds()
    argv, env = ("true", "a\0b"), dict(ENV)
    if where == "environment":
        argv, env["ORCH_ITEM"] = ("true",), "a\0b"
    result = await run_command(cmd(argv, env=env))
    assert result.outcome is Outcome.FAILED
    assert (result.exit_code, result.pid) == (None, None)
    assert result.reason.startswith("cannot start 'true'")
    assert "null byte" in result.reason
    assert open_fds() == fds
    assert our_zombies() == []


@pytest.mark.parametrize("limit", ["timeout", "stall_timeout"])
async def test_a_run_that_ended_while_the_loop_was_held_up_is_not_timed_out(limit: str) -> None:
    # Found by an acceptance tester (session 16): with the service stopped (SIGSTOP) past a
    # run's timeout, a run that had exited 0 meanwhile was recorded "timeout" on SIGCONT, and
    # run again. Here the loop is held up right after the spawn, as a frozen service is.
    def held_up(pid: int) -> None:
        time.sleep(0.6)  # the loop stands still; `true` exits meanwhile

    result = await run_command(cmd(("true",), **{limit: 0.2}), on_spawn=held_up)

    assert (result.outcome, result.exit_code, result.signals_sent) == (Outcome.OK, 0, ())


def test_reap_orphans_leaves_the_children_this_process_started_alone() -> None:
    # Found by an acceptance tester (session 16): a Python stage's `subprocess.Popen` child,
    # polled, was reaped as a run's orphan, and its exit 7 read as 0.
    from orchestrator.runner import become_subreaper, reap_orphans

    assert become_subreaper()
    try:
        own = subprocess.Popen(["sh", "-c", "exit 7"])  # our process group: ours to take
        # A run's leftover: a process of another group whose parent is gone (reparented here).
        subprocess.run(["sh", "-c", "setsid sh -c 'exit 3' & sleep 0.1"], check=True)
        time.sleep(0.3)
        assert reap_orphans() == []  # the leftover reaped, nothing alive
        children = f"/proc/self/task/{os.getpid()}/children"
        with open(children) as f:
            assert f.read().split() == [str(own.pid)]  # (no zombie of the leftover)
        assert own.wait(timeout=5) == 7  # and the exit status of our own child still there
    finally:
        become_subreaper(False)
