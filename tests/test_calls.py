"""Python stages (``call = "module:function"``): checked at start, run in the loop under the same
limits, pools, retries, timeouts and shutdown as commands. Real batches and a real service, in
processes of their own; the stage functions prove limits with `flock` on real lock files."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

from servicekit import PY, Service

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

#: The stage functions, written beside each test's config as ``stagefuncs.py``.
MODULE = '''
import fcntl, json, os, time
import trio

async def record(run):
    """Hold the "solo" lock for the run (OVERLAP if another run has it); write what it got."""
    fd = os.open(os.path.join(os.path.dirname(__file__), "solo.lock"), os.O_CREAT | os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            with open(os.path.join(os.path.dirname(__file__), "overlaps"), "a") as f:
                f.write(run.item + "\\n")
        await trio.sleep(0.03)
        fields = {k: getattr(run, k) for k in
                  ("item", "stage", "attempt", "run", "path", "name", "workdir", "payload")}
        fields["prep"] = open(os.path.join(run.workdir, "prep")).read()
        await trio.Path(run.workdir, "py.json").write_text(json.dumps(fields))
        run.log.info("recorded")
    finally:
        os.close(fd)

async def flaky(run):
    if "hopeless" in run.name:
        from orchestrator.calls import Fatal
        raise Fatal("not a document")
    if run.attempt == 1 or "never" in run.name:
        raise ValueError("boom")

async def forever(run):
    try:
        await trio.sleep_forever()
    finally:
        with open(os.path.join(os.path.dirname(__file__), "ended"), "a") as f:
            f.write(run.item + "\\n")

async def messy(run):
    """Times out, and its cleanup raises: its nursery's group holds the Cancelled and the error."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.sleep_forever)
        try:
            await trio.sleep_forever()
        finally:
            raise OSError("cleanup failed")

async def blocks_the_loop(run):
    time.sleep(1.2)  # the mistake the watchdog is there to name

async def exits(run):
    import sys
    sys.exit(3)  # what a script's main does; argparse too

async def threaded(run):
    await trio.to_thread.run_sync(time.sleep, 1.0)  # a thread: the timeout cannot reach it

def not_async(run):
    pass
'''


def _setup(tmp_path: Path, stages: str, *, files: tuple[str, ...] = (), extra: str = "") -> Path:
    (tmp_path / "stagefuncs.py").write_text(MODULE)
    inbox = tmp_path / "in"
    inbox.mkdir(exist_ok=True)
    for name in files:
        (inbox / name).write_text(name)
    config = tmp_path / "orchestrator.toml"
    config.write_text(textwrap.dedent(f"""
        state_dir = "state"
        shutdown_grace = "0.5s"
        [http]
        listen = false
        {extra}
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        settle = "0s"
        poll_interval = "0.1s"
        route = {json.dumps([line.split('"')[1] for line in stages.splitlines()
                             if line.strip().startswith("name =")])}
        """) + textwrap.dedent(stages))  # fmt: skip
    return config


def _orchestrator(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "orchestrator", *args], cwd=cwd, capture_output=True, text=True, timeout=60,
        check=False,
    )  # fmt: skip


def _show(config: Path, item: str) -> dict[str, Any]:
    proc = _orchestrator("show", "-c", str(config), item, "--json", cwd=config.parent)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


def test_check_imports_each_function_and_reports_every_problem_with_its_path(
    tmp_path: Path,
) -> None:
    config = _setup(tmp_path, """
        [[stages]]
        name = "a"
        call = "nosuchmodule:f"
        [[stages]]
        name = "b"
        call = "stagefuncs:missing"
        [[stages]]
        name = "c"
        call = "stagefuncs:not_async"
        [[stages]]
        name = "d"
        call = "stagefuncs:record"
        stall_timeout = "5s"
        env = { A = "1" }
        [[stages]]
        name = "e"
        """)  # fmt: skip
    # The functions are imported even though the rest of the config has problems (they were
    # only once it had none: acceptance, issue 2): every problem at once, in file order.
    for command in ("check", "batch", "run"):
        proc = _orchestrator(command, "-c", str(config), cwd=tmp_path)
        assert proc.returncode == 2, (command, proc.stderr)
        assert proc.stderr.splitlines()[1:] == [
            "  stages[0].call: cannot import 'nosuchmodule': No module named 'nosuchmodule'",
            "  stages[1].call: 'stagefuncs' has no 'missing'",
            "  stages[2].call: 'stagefuncs:not_async' is not an async function (async def)",
            '  stages[3].stall_timeout: only for stages with a "command", not a "call"',
            '  stages[3].env: only for stages with a "command", not a "call"',
            '  stages[4]: needs "command" (a program and its arguments) or "call" (an async'
            ' Python function, "module:function")',
        ], command
    assert not (tmp_path / "state").exists()  # nothing started


def test_a_module_that_exits_at_import_is_a_config_error_not_a_silent_success(
    tmp_path: Path,
) -> None:
    # Found by an acceptance tester: `import sys; sys.exit()` in the stage's module made check
    # and batch --json exit 0 with no output at all.
    config = _setup(tmp_path, """
        [[stages]]
        name = "a"
        call = "quitter:f"
        """, files=("x",))  # fmt: skip
    (tmp_path / "quitter.py").write_text("import sys\nsys.exit()\n")
    for args in (("check",), ("batch", "--json", "--no-progress")):
        proc = _orchestrator(*args, "-c", str(config), cwd=tmp_path)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "stages[0].call: importing 'quitter' failed: it called sys.exit(None)" in (
            proc.stderr
        ), args
    assert not (tmp_path / "state").exists()


def test_a_route_of_commands_and_a_python_stage_shares_workdirs_and_keeps_its_pool(
    tmp_path: Path,
) -> None:
    # Given: prep (a command) → py (the function, 4 workers but a pool of 1) → post (a command)
    out = tmp_path / "out"
    out.mkdir()
    config = _setup(tmp_path, f"""
        [[stages]]
        name = "prep"
        command = ["sh", "-c", "echo prepared > \\"$1/prep\\"", "sh", "{{workdir}}"]
        [[stages]]
        name = "py"
        call = "stagefuncs:record"
        concurrency = 4
        pools = ["solo"]
        [[stages]]
        name = "post"
        command = ["cp", "{{workdir}}/py.json", "{out}/{{name}}.json"]
        """, files=tuple(f"f{i}" for i in range(12)), extra="[pools]\nsolo = 1")  # fmt: skip
    proc = _orchestrator("check", "-c", str(config), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "py: call stagefuncs:record (Python, in the service)" in proc.stdout
    # When: the batch runs
    proc = _orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    # Then: all done, one function run at a time (the lock file), each given its item's values
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["states"] == {"done": 12}
    assert not (tmp_path / "overlaps").exists()
    runs = set()
    for i in range(12):
        got = json.loads((out / f"f{i}.json").read_text())
        shown = _show(config, f"in:f{i}")
        (py_run,) = [r for r in shown["runs"] if r["stage"] == "py"]
        assert got == {
            "item": f"in:f{i}", "stage": "py", "attempt": 1, "run": py_run["id"],
            "path": str(tmp_path / "in" / f"f{i}"), "name": f"f{i}",
            "workdir": got["workdir"], "payload": "", "prep": "prepared\n",
        }  # fmt: skip
        assert got["workdir"].startswith(str(tmp_path / "state" / "work") + "/")
        assert (py_run["outcome"], py_run["pid"]) == ("ok", None)
        runs.add(py_run["id"])
    assert len(runs) == 12


def test_an_exception_is_a_failed_run_retried_then_dead_with_its_traceback(
    tmp_path: Path,
) -> None:
    config = _setup(tmp_path, """
        [[stages]]
        name = "py"
        call = "stagefuncs:flaky"
        retries = 1
        backoff = "0.05s"
        """, files=("once", "never", "hopeless"))  # fmt: skip
    proc = _orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["states"] == {"done": 1, "dead": 2}
    hopeless = _show(config, "in:hopeless")
    assert len(hopeless["runs"]) == 1  # Fatal: not retried
    assert hopeless["item"]["reason"] == "py: raised Fatal: not a document (fatal; not retried)"
    once = _show(config, "in:once")
    assert [r["outcome"] for r in once["runs"]] == ["failed", "ok"]
    never = _show(config, "in:never")
    assert never["item"]["reason"] == "py: raised ValueError: boom (after 2 attempts)"
    last = never["runs"][-1]
    assert last["outcome"] == "failed"
    assert last["exit_code"] is None
    assert "ValueError: boom" in last["tail"]
    assert "stagefuncs.py" in last["tail"]  # the traceback, where the function raised


def test_sys_exit_is_a_failed_run_and_a_thread_past_the_timeout_a_timeout(
    tmp_path: Path,
) -> None:
    # Given: a function that calls sys.exit, and one whose thread outlasts its timeout
    config = _setup(tmp_path, """
        [[stages]]
        name = "py"
        call = "stagefuncs:exits"
        timeout = "0.3s"
        """, files=("a", "b"))  # fmt: skip

    # When / Then: the batch goes on to its summary; each item is dead with its reason
    proc = _orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["states"] == {"dead": 2}
    (run,) = _show(config, "in:a")["runs"]
    assert (run["outcome"], run["reason"]) == ("failed", "raised SystemExit: 3")

    config.write_text(config.read_text().replace("stagefuncs:exits", "stagefuncs:threaded"))
    (tmp_path / "in" / "c").write_text("")
    proc = _orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    (run,) = _show(config, "in:c")["runs"]
    assert run["outcome"] == "timeout"
    assert run["duration"] >= 1.0
    assert "past its timeout of 0.3s" in run["reason"]
    # It says the slots were held meanwhile, and never to abandon the thread (which would
    # end the run while the work goes on outside the limit: acceptance, session 15).
    assert "its slots were held until it returned" in run["reason"]
    assert "abandon" not in run["reason"]


def test_a_function_past_its_timeout_is_cancelled_and_a_shutdown_cancels_it_too(
    tmp_path: Path,
) -> None:
    config = _setup(tmp_path, """
        [[stages]]
        name = "py"
        call = "stagefuncs:forever"
        timeout = "0.3s"
        """, files=("slow",))  # fmt: skip
    proc = _orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    shown = _show(config, "in:slow")
    assert shown["item"]["state"] == "dead"
    (run,) = shown["runs"]
    assert run["outcome"] == "timeout"
    assert 0.25 < run["duration"] < 5
    assert "timed out after 0.3s; cancelled" in shown["item"]["reason"]
    assert (tmp_path / "ended").read_text() == "in:slow\n"  # its finally: ran

    # A function whose cleanup raises on its way out of the timeout: a timeout, with the error.
    config.write_text(config.read_text().replace("stagefuncs:forever", "stagefuncs:messy"))
    (tmp_path / "in" / "messy").write_text("")
    proc = _orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    shown = _show(config, "in:messy")
    (run,) = shown["runs"]
    assert run["outcome"] == "timeout"
    assert "timed out after 0.3s; cancelled, then raised ExceptionGroup" in shown["item"]["reason"]
    assert "OSError: cleanup failed" in run["tail"]
    config.write_text(config.read_text().replace("stagefuncs:messy", "stagefuncs:forever"))

    # A service with no timeout: SIGTERM drains it, the function is cancelled after the
    # grace, and its item waits, queued, for the next start.
    config.write_text(config.read_text().replace('timeout = "0.3s"\n', ""))
    (tmp_path / "in" / "second").write_text("")
    service = Service(tmp_path, config.read_text())
    try:
        service.wait_log(r"ingested 1 item")
        time.sleep(0.3)
        service.signal(signal.SIGTERM)
        assert service.wait(20) == 0, service.log
    finally:
        service.stop()
    assert "run cancelled by shutdown; item re-queued" in service.log
    assert (tmp_path / "ended").read_text() == "in:slow\nin:second\n"
    second = _show(config, "in:second")
    assert second["item"]["state"] == "queued"
    # No process was there to kill (the reason said "process group killed": acceptance)
    assert [r["reason"] for r in second["runs"]] == ["cancelled by shutdown"]


def test_the_worked_example_counts_every_file(tmp_path: Path) -> None:
    # configs/python.toml with its pystages.py, on a copy of configs/ (it writes beside itself)
    configs = tmp_path / "configs"
    shutil.copytree(CONFIGS, configs, ignore=shutil.ignore_patterns("state*", "out", "counts"))
    config = configs / "python.toml"
    proc = _orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    inbox = sorted(p.name for p in (configs / "example" / "inbox").iterdir())
    assert json.loads(proc.stdout)["states"] == {"done": len(inbox)}
    for name in inbox:
        text = (configs / "example" / "inbox" / name).read_text()
        counts = json.loads((configs / "example" / "counts" / f"{name}.json").read_text())
        assert counts == {"item": f"docs:{name}", "lines": len(text.splitlines()),
                          "words": len(text.split())}  # fmt: skip


def test_a_function_that_blocks_the_loop_is_named_by_the_watchdog(tmp_path: Path) -> None:
    config = _setup(tmp_path, """
        [[stages]]
        name = "py"
        call = "stagefuncs:blocks_the_loop"
        """, files=("x",), extra='[watchdog]\nloop_stall_warn = "0.4s"')  # fmt: skip
    proc = _orchestrator("batch", "-c", str(config), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # The worker task running it is named, with the function's line in its stack.
    assert re.search(r"event loop blocked for [\d.]+s by task 'worker:py:0'; its stack:\n"
                     r"(.*\n)*.*time\.sleep\(1\.2\)", proc.stderr), proc.stderr  # fmt: skip


def test_only_the_run_that_blocked_the_event_loop_counts_toward_a_poison_item(
    tmp_path: Path,
) -> None:
    # Found by an acceptance tester (session 15): a Python stage that blocks the event loop
    # past loop_stall_timeout ends the service (exit 70); every run going on then was counted
    # as interrupted, so an innocent item beside it ended dead as a "poison item" too.
    (tmp_path / "blocker.py").write_text(
        textwrap.dedent("""
        import time
        import trio

        async def act(run):
            if run.name == "block":
                await trio.sleep(0.5)  # the innocent run is going on by then
                time.sleep(15)         # blocks the event loop
            else:
                await trio.sleep(3)
        """)
    )
    inbox = tmp_path / "in"
    inbox.mkdir()
    for name in ("block", "innocent"):
        (inbox / name).write_text("")
    config = tmp_path / "orchestrator.toml"
    config.write_text(textwrap.dedent("""
        state_dir = "state"
        max_interruptions = 1
        [http]
        listen = false
        [watchdog]
        loop_stall_warn = "0.5s"
        loop_stall_timeout = "1.5s"
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        settle = "0s"
        route = ["act"]
        [[stages]]
        name = "act"
        call = "blocker:act"
        concurrency = 2
        """))  # fmt: skip
    first = _orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    assert first.returncode == 70, first.stderr
    lock = (tmp_path / "state" / "orchestrator.lock").read_text()
    assert "ended: its event loop was blocked by run" in lock

    # When: the next batch recovers (max_interruptions = 1: one counted interruption is death)
    config.write_text(config.read_text().replace('"1.5s"', '"30s"'))
    again = _orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)

    # Then: the blocker is dead as a poison item; the innocent item ran again and is done
    summary = json.loads(again.stdout)
    assert summary["states"] == {"dead": 1, "done": 1}, again.stderr
    [dead] = summary["failed_items"]
    assert dead["id"] == "in:block"
    assert "poison item: interrupted 1 times" in dead["reason"]
    innocent = _show(config, "in:innocent")
    assert innocent["item"]["interruptions"] == 0
    reasons = [r["reason"] for r in innocent["runs"] if r["outcome"] == "interrupted"]
    assert reasons
    assert "its event loop was blocked by run" in reasons[0]
