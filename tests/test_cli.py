from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import TYPE_CHECKING

import attrs
import pytest
from servicekit import DEFAULT_PIPELINE, Service, service_config

from orchestrator.cli import EXIT_CONFIG, EXIT_OK, EXIT_UNKNOWN, EXIT_USAGE, main

if TYPE_CHECKING:
    from pathlib import Path

BAD = """
    state_dir = 5
    [http]
    listen = true
    [pools]
    gpu = 0
    [[sources]]
    name = "in"
    type = "ftp"
    path = "inbox"
    route = ["extract", "ocr"]
    [[stages]]
    name = "extract"
    command = "extract {path}"
    concurency = 2
    timeout = "soon"
    pools = ["tpu"]
"""


def test_check_reports_every_error_with_its_path_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(textwrap.dedent(BAD))
    assert main(["check", "-c", str(config)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    for expected in (
        "state_dir:",
        "http.listen:",
        "pools.gpu: must be >= 1, got 0",
        'sources[0].type: expected one of directory, jsonl, json, got "ftp"',
        'sources[0].route[1]: unknown stage "ocr" (stages: extract)',
        "stages[0].command: expected an array",
        'stages[0].concurency: unknown key (did you mean "concurrency"?)',
        'stages[0].timeout: expected a duration like "30s", got "soon"',
        'stages[0].pools[0]: unknown pool "tpu" (pools: gpu)',
    ):
        assert expected in err, (expected, err)


def test_every_command_refuses_a_missing_config(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    for command in ("check", "run", "batch"):
        assert main([command, "-c", str(tmp_path / "nope.toml")]) == EXIT_CONFIG
    assert "cannot read config" in capsys.readouterr().err


def test_check_json_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "ok.toml"
    config.write_text(
        textwrap.dedent("""
        [pools]
        gpu = 1
        [[sources]]
        name = "in"
        type = "directory"
        path = "inbox"
        route = ["extract"]
        [[stages]]
        name = "extract"
        command = ["extract", "{path}"]
        pools = ["gpu"]
        timeout = "30m"
        """)
    )
    assert main(["check", "-c", str(config), "--json"]) == EXIT_OK
    plan = json.loads(capsys.readouterr().out)
    assert plan["sources"][0]["route"] == ["extract"]
    assert plan["stages"][0]["timeout"] == 1800
    assert plan["pools"] == {"gpu": {"size": 1, "stages": ["extract"]}}
    assert plan["http"] == "127.0.0.1:8787"
    assert plan["ok"] is True
    # An invalid config: --json says so on stdout, every error with its path (a program
    # validating configs got nothing there: acceptance, session 15), exit 2.
    config.write_text(
        config.read_text().replace('timeout = "30m"', 'timeout = "soon"\nretries = -1')
    )
    assert main(["check", "-c", str(config), "--json"]) == EXIT_CONFIG
    answer = json.loads(capsys.readouterr().out)
    assert answer["ok"] is False
    assert answer["errors"] == [
        'stages[0].timeout: expected a duration like "30s", got "soon"',
        "stages[0].retries: must be >= 0, got -1",
    ]


LEAN_BATCH = """
    [http]
    listen = false
    [log]
    level = "DEBUG"
    [[sources]]
    name = "in"
    type = "directory"
    path = "in"
    route = ["env"]
    settle = "0s"
    [[stages]]
    name = "env"
    command = ["sh", "-c", "env > \\"$ORCH_PATH.env\\""]
"""


def test_batch_start_up_shortcuts_leave_no_trace(tmp_path: Path) -> None:
    """What `batch` skips at start-up (loguru's default sink, the collector, other commands'
    options, unused source types) changes nothing anyone sees: the stages' environment, the
    log lines, the collector once the service runs, the modules a directory batch loads."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "one").write_text("1")
    (tmp_path / "c.toml").write_text(textwrap.dedent(LEAN_BATCH))
    probe = textwrap.dedent("""
        import gc, sys
        import orchestrator.workers as workers
        seen = []
        original = workers.Engine.serve_worker
        async def serve_worker(self, stage, number):
            seen.append(gc.isenabled())
            await original(self, stage, number)
        workers.Engine.serve_worker = serve_worker
        from orchestrator.cli import main
        code = main(["batch", "-c", "c.toml", "--no-progress"])
        loaded = sorted(m for m in sys.modules if m.startswith("orchestrator.sources."))
        loaded += sorted(m for m in ("orchestrator.reload", "orchestrator.calls") if m in sys.modules)
        print("RESULT", code, all(seen) and bool(seen), gc.isenabled(), ",".join(loaded))
        """)
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    result = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT"))
    _, code, collecting_while_serving, collecting_after, loaded = result.split(" ")
    assert code == "0"
    assert collecting_while_serving == "True"
    assert collecting_after == "True"
    # (nor the SIGHUP reloader, nor Python stages' support: a batch never reloaded, of commands)
    assert loaded == "orchestrator.sources.directory,orchestrator.sources.ops"
    env = (tmp_path / "in" / "one.env").read_text()
    assert "ORCH_ITEM=in:one" in env
    assert "LOGURU" not in env
    # Our console sink, and only ours: every line once, in our format (loguru's default has
    # " | " between its fields).
    ok_lines = [line for line in proc.stderr.splitlines() if "run ok in" in line]
    assert len(ok_lines) == 1, proc.stderr
    assert " | " not in ok_lines[0]


def test_a_user_set_loguru_autoinit_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "one").write_text("1")
    (tmp_path / "c.toml").write_text(textwrap.dedent(LEAN_BATCH))
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "batch", "-c", "c.toml", "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "LOGURU_AUTOINIT": "yes"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "LOGURU_AUTOINIT=yes" in (tmp_path / "in" / "one.env").read_text()


def test_a_command_alone_behaves_as_in_the_whole_app(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`main` builds only the command it is asked for; help, errors and the rest are the same."""
    assert main(["batch", "--help"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "Usage: orchestrator batch" in out
    assert "--no-progress" in out
    assert main(["batch", "--bogus"]) == EXIT_USAGE
    assert "No such option: --bogus" in capsys.readouterr().err
    assert main(["bat"]) == EXIT_USAGE
    assert "No such command 'bat'" in capsys.readouterr().err
    assert main(["--version"]) == EXIT_OK
    assert capsys.readouterr().out.startswith("orchestrator ")
    assert main(["--help"]) == EXIT_OK
    out = capsys.readouterr().out
    for command in ("check", "run", "batch", "items", "show", "requeue", "status", "health"):
        assert command in out


def test_the_collector_is_back_on_after_a_failed_start(tmp_path: Path) -> None:
    import gc

    assert gc.isenabled()
    assert main(["batch", "-c", str(tmp_path / "nope.toml")]) == EXIT_CONFIG
    assert main(["run", "-c", str(tmp_path / "nope.toml")]) == EXIT_CONFIG
    assert gc.isenabled()


def test_source_types_are_imported_on_first_use() -> None:
    import orchestrator.sources as sources

    assert sources.JsonlSource.__module__ == "orchestrator.sources.jsonl"
    assert sources.Position.__module__ == "orchestrator.sources.ops"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = sources.Nope  # type: ignore[attr-defined]


TYPO = """
    [http]
    listen = false
    [[sources]]
    name = "in"
    type = "directory"
    path = "in"
    route = ["s"]
    settle = "0s"
    [[stages]]
    name = "s"
    command = ["sh", "-c", "true", "{pathh}"]
"""


def test_check_and_batch_warn_about_a_misspelt_placeholder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "typo.toml"
    config.write_text(textwrap.dedent(TYPO))
    warning = (
        "stages[0].command[3]: {pathh} is not a placeholder (did you mean {path}?); it is passed"
        " to the command as written"
    )
    assert main(["check", "-c", str(config)]) == EXIT_OK
    assert warning in capsys.readouterr().out
    assert main(["check", "-c", str(config), "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["warnings"] == [warning]
    (tmp_path / "in").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "batch", "-c", str(config), "--no-progress"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"config: {warning}" in proc.stderr


def test_check_shows_each_source_and_stage_as_it_runs_and_warns_about_a_missing_cwd(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Acceptance (session 15): a record source was shown with a pattern and a settle it cannot
    # have, and without its id_field; a stage's cwd, env and workdir were not shown, and a cwd
    # that does not exist was found only by the first run.
    config = tmp_path / "c.toml"
    config.write_text(textwrap.dedent("""
        [[sources]]
        name = "rec"
        type = "jsonl"
        path = "r.jsonl"
        id_field = "id"
        route = ["s"]
        [[stages]]
        name = "s"
        command = ["true"]
        cwd = "nowhere"
        env = { MODE = "x" }
        workdir = true
        """))  # fmt: skip
    assert main(["check", "-c", str(config), "--json"]) == EXIT_OK
    plan = json.loads(capsys.readouterr().out)
    [source] = plan["sources"]
    assert source["id_field"] == "id"
    assert "pattern" not in source
    assert "settle" not in source
    [stage] = plan["stages"]
    assert (stage["cwd"], stage["env"], stage["workdir"]) == (str(tmp_path / "nowhere"),
                                                             {"MODE": "x"}, True)  # fmt: skip
    assert plan["warnings"] == [
        f"stages[0].cwd: {str(tmp_path / 'nowhere')!r} is not a folder (yet); every run of "
        "this stage fails until it is"
    ]
    assert main(["check", "-c", str(config)]) == EXIT_OK
    said = " ".join(capsys.readouterr().out.split())
    assert "id_field id" in said
    assert "pattern" not in said
    assert "env MODE" in said


def test_check_warns_about_a_program_it_cannot_find_or_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by an acceptance tester (session 17): `command = ["extractt"]` passed `check`, and
    # every item of the batch died after all its attempts ("not found in PATH").
    # Given: a misspelt program, a script that is not there, one that cannot be executed, one
    # missing from the stage's own PATH; and programs that are fine, or named by a placeholder.
    monkeypatch.setenv("PATH", os.defpath)
    (tmp_path / "plain.sh").write_text("echo\n")
    (tmp_path / "plain.sh").chmod(0o644)
    config = tmp_path / "c.toml"
    config.write_text(textwrap.dedent("""
        [[stages]]
        name = "typo"
        command = ["extractt", "{path}"]
        [[stages]]
        name = "gone"
        command = ["bin/run.sh"]
        [[stages]]
        name = "plain"
        command = ["./plain.sh"]
        [[stages]]
        name = "own_path"
        command = ["true"]
        env = { PATH = "/nowhere" }
        [[stages]]
        name = "fine"
        command = ["true"]
        [[stages]]
        name = "given"
        command = ["{path}"]
        """))  # fmt: skip

    # When
    assert main(["check", "-c", str(config), "--json"]) == EXIT_OK

    # Then: a warning each, not an error: the service may run with another PATH.
    fails = "every run of this stage fails"
    expected = [
        f"stages[0].command[0]: 'extractt' is not found in PATH here; {fails} unless it is in "
        "the PATH the service runs with",
        f"stages[1].command[0]: {str(tmp_path / 'bin/run.sh')!r} does not exist (yet); {fails} "
        "until it does",
        f"stages[2].command[0]: {str(tmp_path / 'plain.sh')!r} is not an executable file; "
        f"{fails} until it is",
        f"stages[3].command[0]: 'true' is not found in the stage's PATH; {fails} until it is",
    ]
    assert json.loads(capsys.readouterr().out)["warnings"] == expected
    assert main(["check", "-c", str(config)]) == EXIT_OK
    said = capsys.readouterr().out
    for warning in expected:
        assert f"warning: {warning}" in said


def test_check_piped_keeps_each_path_on_one_line_however_long(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by an acceptance tester (session 17): into a pipe, `check` wrapped at 80 columns,
    # cutting the state folder and the sources' paths in two (grep missed them), as `items`
    # and `status` did before.
    # Given: a config in a folder with a long name; output into a pipe with no $COLUMNS.
    monkeypatch.delenv("COLUMNS", raising=False)
    folder = tmp_path / ("a-rather-long-folder-name-" * 4)
    folder.mkdir()
    config = folder / "c.toml"
    config.write_text(textwrap.dedent("""
        [[sources]]
        name = "in"
        type = "directory"
        path = "inbox"
        route = ["s"]
        [[stages]]
        name = "s"
        command = ["true", "{path}"]
        """))  # fmt: skip

    # When
    assert main(["check", "-c", str(config)]) == EXIT_OK

    # Then: each path is whole on its line.
    out = capsys.readouterr().out.splitlines()
    assert any(str(folder / "state") in line for line in out), out
    assert any(str(folder / "inbox") in line for line in out), out


def test_the_quick_exit_loses_no_output(tmp_path: Path) -> None:
    """`entry` ends the process without tearing down the interpreter: the log file (written by
    loguru's queue thread), stdout and the exit code are all still there."""
    (tmp_path / "in").mkdir()
    for i in range(300):
        (tmp_path / "in" / f"f{i:03}").write_text(str(i))
    config = textwrap.dedent("""
        [http]
        listen = false
        [log]
        file = "logs/o.log"
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["s"]
        settle = "0s"
        [[stages]]
        name = "s"
        retries = 0
        """)  # fmt: skip

    def batch(command: str) -> subprocess.CompletedProcess[str]:
        (tmp_path / "c.toml").write_text(f"{config}command = {command}\n")
        return subprocess.run(
            [sys.executable, "-m", "orchestrator", "batch", "-c", "c.toml", "--json",
             "--no-progress"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
            # Buffered, as stdout is for most users: nothing may be left in the buffer.
            env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"},
        )  # fmt: skip

    proc = batch('["true"]')
    assert proc.returncode == EXIT_OK, proc.stderr
    assert json.loads(proc.stdout)["states"] == {"done": 300}
    log = (tmp_path / "logs" / "o.log").read_text()
    assert sum("run ok in" in line for line in log.splitlines()) == 300
    # A batch with a dead item still exits 1.
    (tmp_path / "in" / "new").write_text("x")
    proc = batch('["false"]')
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["states"] == {"dead": 1}


def test_the_batch_summary_adds_up_the_counts_per_stage(tmp_path: Path) -> None:
    from orchestrator.cli import _batch_summary
    from orchestrator.config import load_config
    from orchestrator.store.sqlite import BatchCounts, Recovery
    from orchestrator.supervisor import ServiceResult
    from orchestrator.workers import Tally

    config = tmp_path / "c.toml"
    config.write_text(textwrap.dedent("""
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["a", "b"]
        [[stages]]
        name = "a"
        command = ["true"]
        [[stages]]
        name = "b"
        command = ["true"]
        """))  # fmt: skip
    counts = BatchCounts(
        states={"done": 3, "dead": 1},
        failed=[("in:x", "dead", '["a", "b"]', 1, "exit 1")],
        runs={  # [runs, with a duration, total duration, longest, total slot wait]
            ("a", "ok"): [4, 4, 8.0, 3.5, 2.0],
            ("b", "ok"): [3, 3, 3.0, 2.0, 0.0],
            ("b", "failed"): [2, 1, 5.0, 5.0, 1.0],
        },
    )
    result = ServiceResult(
        tally=Tally(), interrupted=False, recovery=Recovery(interrupted=0, poisoned=0),
        admitted=frozenset(), batch_rows=counts,
    )  # fmt: skip
    summary = _batch_summary(load_config(config), result, elapsed=2.0)
    assert (summary["items"], summary["items_per_second"], summary["ok"]) == (4, 2.0, False)
    assert summary["failed_items"] == [
        {"id": "in:x", "state": "dead", "stage": "b", "reason": "exit 1"}
    ]
    # The rate counts the items that reached their end, not those an interrupted batch left
    # queued (acceptance, session 15: "queued 6 in 2.42s (2.5/s)").
    left = attrs.evolve(result, batch_rows=attrs.evolve(counts, states={"done": 2, "queued": 6}),
                        interrupted=True)  # fmt: skip
    summary = _batch_summary(load_config(config), left, elapsed=2.0)
    assert (summary["items"], summary["items_per_second"]) == (8, 1.0)
    stuck = attrs.evolve(left, batch_rows=attrs.evolve(counts, states={"queued": 1}))
    assert _batch_summary(load_config(config), stuck, elapsed=2.0)["items_per_second"] is None
    assert summary["stages"]["a"] == {
        "runs": 4, "outcomes": {"ok": 4}, "mean_duration": 2.0, "max_duration": 3.5,
        "mean_slot_wait": 0.5,
    }  # fmt: skip
    assert summary["stages"]["b"] == {
        "runs": 5, "outcomes": {"ok": 3, "failed": 2}, "mean_duration": 2.0,
        "max_duration": 5.0, "mean_slot_wait": 0.2,
    }  # fmt: skip


def test_a_postgresql_state_is_a_warning_for_check_and_refused_by_stress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The key is accepted so configs written for it keep working; nothing can run it yet.
    config = tmp_path / "pg.toml"
    config.write_text('state = "postgresql://orch@db/orch"\n[[stages]]\nname = "s"\n'
                      'command = ["true"]\n')  # fmt: skip
    assert main(["check", "-c", str(config)]) == EXIT_OK
    assert "the PostgreSQL store is not available in this version" in capsys.readouterr().out
    assert main(["stress", "-c", str(config), "--items", "1", "--duration", "1s"]) == EXIT_USAGE
    assert "it needs the SQLite store" in capsys.readouterr().err


def test_every_command_refuses_a_config_that_is_a_fifo_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Found by an acceptance tester (session 16): `-c` naming a FIFO with no writer hung
    # every command in open(), for ever -- `health` too, which watchdogs run.
    # Given: the config path is a FIFO nobody writes to (a writer comes after 5 s, should a
    # command wait: it then reads an empty config and the test fails instead of hanging).
    fifo = tmp_path / "orchestrator.toml"
    os.mkfifo(fifo)

    def writer() -> None:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader waiting: nothing to unblock
            pass

    unblock = threading.Timer(5.0, writer)
    unblock.start()
    try:
        # When: each command that reads a config is given it.
        for command, code in [
            (["run"], EXIT_CONFIG), (["batch"], EXIT_CONFIG), (["items"], EXIT_CONFIG),
            (["show", "x"], EXIT_CONFIG), (["status"], EXIT_CONFIG),
            (["requeue", "x"], EXIT_CONFIG), (["reload"], EXIT_CONFIG), (["health"], EXIT_UNKNOWN),
        ]:  # fmt: skip
            # Then: it says what is wrong, with the exit of a config it cannot read.
            assert main([*command, "-c", str(fifo)]) == code, command
            captured = capsys.readouterr()
            assert "cannot read config: not a regular file (a FIFO)" in captured.err + captured.out
        # `check` reads a pipe (below), and this one at once: nobody writes, an empty config.
        for command in (["check"], ["check", "--json"]):
            assert main([*command, "-c", str(fifo)]) == EXIT_CONFIG, command
            captured = capsys.readouterr()
            assert "at least one stage is required" in captured.err + captured.out
    finally:
        unblock.cancel()
        unblock.join()


def test_check_reads_a_config_from_a_pipe(tmp_path: Path) -> None:
    # Found by an acceptance tester (session 16): `envsubst < t.toml | orchestrator check -c
    # /dev/stdin` (a config made in CI) was refused once FIFOs were, though it worked before.
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "check", "-c", "/dev/stdin"],
        input='[[stages]]\nname = "x"\ncommand = ["true"]\n', capture_output=True, text=True,
        timeout=30, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "/dev/stdin: ok" in proc.stdout


def test_a_config_from_a_pipe_has_its_relative_paths_in_the_current_folder(tmp_path: Path) -> None:
    # Found by an acceptance tester (session 17): `envsubst < t.toml | orchestrator check -c
    # /dev/stdin` resolved relative paths against /dev: the plan showed /dev/state, and a
    # Python stage's module beside the config was looked for in /dev (exit 2).
    # Given: a folder holding a stage module, and a config with relative paths on a pipe.
    (tmp_path / "pipestages.py").write_text("async def work(run):\n    pass\n")
    config = textwrap.dedent("""
        state_dir = "state"
        [[sources]]
        name = "in"
        type = "directory"
        path = "inbox"
        route = ["py"]
        [[stages]]
        name = "py"
        call = "pipestages:work"
        """)  # fmt: skip

    # When: check reads it from its stdin, run from that folder.
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "check", "-c", "/dev/stdin", "--json"],
        input=config, cwd=tmp_path, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip

    # Then: the paths are in the current folder, and the module is found there.
    assert proc.returncode == 0, proc.stdout + proc.stderr
    plan = json.loads(proc.stdout)
    assert plan["state_dir"] == str(tmp_path / "state")
    assert plan["sources"][0]["path"] == str(tmp_path / "inbox")


def test_a_config_in_a_folder_keeps_its_folder_and_one_under_dev_has_none(tmp_path: Path) -> None:
    from pathlib import Path

    from orchestrator.config import config_folder

    (tmp_path / "c.toml").write_text("")
    os.mkfifo(tmp_path / "fifo")
    assert config_folder(tmp_path / "c.toml") == tmp_path
    for path in ("/dev/stdin", "/dev/fd/63", "/proc/self/fd/0", str(tmp_path / "fifo")):
        assert config_folder(Path(path)) == Path.cwd(), path


def _until_running(proc: subprocess.Popen[bytes], folder: Path) -> None:
    """Wait until the service in ``folder`` runs: its status file says so (it takes its
    signals by then)."""
    deadline = time.monotonic() + 15
    while True:
        with contextlib.suppress(OSError, ValueError):
            if json.loads((folder / "state" / "status.json").read_text())["state"] == "running":
                return
        assert proc.poll() is None, (folder / "service.log").read_text()
        assert time.monotonic() < deadline, (folder / "service.log").read_text()
        time.sleep(0.02)


@pytest.mark.parametrize("again", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP],
                         ids=["sigterm", "sigint", "sighup"])  # fmt: skip
def test_signals_that_keep_coming_after_sigterm_leave_a_clean_drain_clean(
    tmp_path: Path, again: signal.Signals
) -> None:
    # Found by an acceptance tester (session 16): a second SIGTERM in a short drain's last
    # moments (GNU timeout sends two) ended the service by the signal, exit 143, no "stopped"
    # line: trio hands the signals it has not read back to the default action when it stops
    # taking them. (A second SIGINT while it drains still stops at once: test_supervisor.py.)
    # Given: a service running, with nothing to do (its drain is short).
    service = Service(tmp_path, service_config(DEFAULT_PIPELINE, listen="false"))
    try:
        _until_running(service.proc, tmp_path)
        # When: SIGTERM, then the signal again and again until the process is gone.
        service.signal(signal.SIGTERM)
        while service.proc.poll() is None:  # (not yet reaped: the pid is still its own)
            service.signal(again)
            time.sleep(0.002)
        # Then: it drained and stopped as after one, the extra signals said.
        assert service.wait() == EXIT_OK, service.log
    finally:
        service.stop()
    assert "orchestrator stopped:" in service.log
    assert f"{again.name}: already stopping" in service.log


def test_run_takes_a_sighup_during_its_start_up(tmp_path: Path) -> None:
    # Found by an acceptance tester (session 16): a SIGHUP in `run`'s first half second, while
    # Python imports, ended it by the default action (exit 129, nothing logged).
    # Given: `orchestrator run`, started as its console script starts it, that gets a SIGHUP
    # while it imports the command line (before it reads its config) and one after.
    (tmp_path / "in").mkdir()
    config = tmp_path / "orchestrator.toml"
    config.write_text(service_config(DEFAULT_PIPELINE, listen="false"))
    code = textwrap.dedent(f"""
        import os, signal, sys

        class HangUpWhileImporting:
            def find_spec(self, name, path=None, target=None):
                if name in ("orchestrator.cli", "orchestrator.supervisor"):
                    os.kill(os.getpid(), signal.SIGHUP)

        sys.meta_path.insert(0, HangUpWhileImporting())
        sys.argv = ["orchestrator", "run", "-c", {str(config)!r}]
        from orchestrator.launcher import launch

        launch()
        """)
    log = tmp_path / "service.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        # When: it runs.
        _until_running(proc, tmp_path)
        # Then: the first is said (the config it read is the new one); the second is a reload
        # once the service runs; it goes on until SIGTERM, and drains as ever.
        deadline = time.monotonic() + 10
        while "reloaded; limits: unchanged" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        assert proc.poll() is None, log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == EXIT_OK, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert text.count("SIGHUP before the config was read: nothing to reload") == 1
    assert text.count("reloaded; limits: unchanged") == 1
    assert "orchestrator stopped:" in text


@pytest.mark.parametrize(
    ("importing", "sig"),
    [("orchestrator.cli", signal.SIGTERM), ("orchestrator.supervisor", signal.SIGINT)],
    ids=["sigterm-before-the-config", "sigint-after-the-config"],
)
def test_run_stopped_during_its_start_up_exits_0_saying_so(
    tmp_path: Path, importing: str, sig: signal.Signals
) -> None:
    # Found by an acceptance tester (session 17): a SIGTERM in `run`'s first half second, while
    # Python imports, ended it by the default action (exit 143, nothing logged).
    # Given: `orchestrator run`, started as its console script starts it, that gets the signal
    # while it imports the command line (before it reads its config) or the service (after)
    (tmp_path / "in").mkdir()
    config = tmp_path / "orchestrator.toml"
    config.write_text(service_config(DEFAULT_PIPELINE, listen="false"))
    code = textwrap.dedent(f"""
        import os, sys

        class StopWhileImporting:
            def find_spec(self, name, path=None, target=None):
                if name == {importing!r}:
                    os.kill(os.getpid(), {int(sig)})

        sys.meta_path.insert(0, StopWhileImporting())
        sys.argv = ["orchestrator", "run", "-c", {str(config)!r}]
        from orchestrator.launcher import launch

        launch()
        """)

    # When: it runs
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=30, check=False)  # fmt: skip

    # Then: it stops at once, exit 0, saying why; nothing was started
    assert proc.returncode == EXIT_OK, proc.stderr
    assert f"WARNING {sig.name} before the service started: stopping" in proc.stderr
    assert not (tmp_path / "state").exists()
