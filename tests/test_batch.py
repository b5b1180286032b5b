"""End to end through the real command line: real files, real processes, a real SQLite file."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from typing import TYPE_CHECKING

import pytest
from conftest import PROGRAMS, PY, fill, left_queued, open_db, processes_with_env
from servicekit import Service

from orchestrator.reaper import STATE_MARKER

if TYPE_CHECKING:
    from pathlib import Path

STAGE = str(PROGRAMS / "locked_stage.py")


def orchestrator(*args: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def intervals(record: Path, stage: str) -> list[tuple[float, float]]:
    starts: dict[str, float] = {}
    spans = []
    for line in record.read_text().splitlines():
        kind, st, t, pid, _item = line.split(" ", 4)
        if st != stage:
            continue
        if kind == "start":
            starts[pid] = float(t)
        elif kind == "end":
            spans.append((starts.pop(pid), float(t)))
    return spans


def max_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    live = peak = 0
    for _, d in events:
        live += d
        peak = max(peak, live)
    return peak


def test_seed_scenario_exclusive_stages_never_overlap(tmp_path: Path) -> None:
    # Given: 40 files in two sources racing for extract(1) -> convert(1) -> store(5), every stage
    # program holding a non-blocking flock on one of its stage's N lock slots for its whole run.
    locks = tmp_path / "locks"
    locks.mkdir()
    record = tmp_path / "record.txt"
    for src in ("a", "b"):
        (tmp_path / src).mkdir()
        for i in range(20):
            (tmp_path / src / f"{src}{i:02}.dat").write_text(str(i))

    def stage(name: str, limit: int, seconds: float) -> str:
        return textwrap.dedent(f"""
            [[stages]]
            name = "{name}"
            command = ["{PY}", "{STAGE}", "{locks}", "{limit}", "{record}", "{seconds}"]
            concurrency = {limit}
            """)

    sources = "".join(
        textwrap.dedent(f"""
            [[sources]]
            name = "{src}"
            type = "directory"
            path = "{src}"
            route = ["extract", "convert", "store"]
            settle = "0s"
            """)
        for src in ("a", "b")
    )
    config = tmp_path / "seed.toml"
    config.write_text(
        "[http]\nlisten = false\n"
        + sources
        + stage("extract", 1, 0.02)
        + stage("convert", 1, 0.02)
        + stage("store", 5, 0.25)
    )

    # When: the batch runs to the end.
    proc = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)

    # Then: every item is done, exactly once, and the OS saw no limit exceeded.
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["states"] == {"done": 40}
    assert "OVERLAP" not in record.read_text()
    assert max_overlap(intervals(record, "extract")) == 1
    assert max_overlap(intervals(record, "convert")) == 1
    store_peak = max_overlap(intervals(record, "store"))
    assert 2 <= store_peak <= 5  # the wide stage really ran in parallel, within its limit
    with open_db(tmp_path / "state" / "orchestrator.db") as db:
        runs = db.execute("SELECT stage, outcome, count(*) FROM runs GROUP BY stage, outcome")
        assert sorted(runs) == [("convert", "ok", 40), ("extract", "ok", 40), ("store", "ok", 40)]
    # And a second batch finds nothing new: files are never ingested twice.
    again = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["items"] == 0
    # And a third, with one new file, sums up that file only, not the store's history.
    (tmp_path / "a" / "late.dat").write_text("late")
    third = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    summary = json.loads(third.stdout)
    assert (summary["items"], summary["states"]) == (1, {"done": 1})
    assert {name: stage["runs"] for name, stage in summary["stages"].items()} == {
        "extract": 1, "convert": 1, "store": 1,
    }  # fmt: skip


def test_batch_exit_1_and_reason_when_an_item_is_dead(tmp_path: Path) -> None:
    # Given: a stage that always fails, with two retries and a short backoff.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.txt").write_text("x")
    config = tmp_path / "c.toml"
    config.write_text(
        textwrap.dedent(f"""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["boom"]
        settle = "0s"
        [[stages]]
        name = "boom"
        command = ["{PY}", "-c", "import sys; print('bad input', sys.argv[1]); sys.exit(4)", "{{name}}"]
        retries = 2
        backoff = "50ms"
        """)
    )

    # When
    proc = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)

    # Then: exit 1, the item dead with its reason, three runs, the tail kept.
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["states"] == {"dead": 1}
    [failed] = summary["failed_items"]
    assert failed["id"] == "in:x.txt"
    assert failed["stage"] == "boom"
    assert "exit 4" in failed["reason"]
    assert "after 3 attempts" in failed["reason"]
    assert summary["stages"]["boom"]["outcomes"] == {"failed": 3}
    with open_db(tmp_path / "state" / "orchestrator.db") as db:
        tails = [r[0] for r in db.execute("SELECT tail FROM runs ORDER BY id")]
    assert tails == ["bad input x.txt"] * 3


def test_run_ids_continue_after_logs_of_runs_the_store_never_recorded(tmp_path: Path) -> None:
    # Given: a state folder whose store records no run but whose runs/ holds the log of run 57
    # (what a service leaves when its store fails -- a full disk -- after spawning a run).
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.txt").write_text("x")
    runs = tmp_path / "state" / "runs"
    runs.mkdir(parents=True)
    (runs / "57.log").write_text("the old run's output\n")
    config = tmp_path / "c.toml"
    config.write_text(
        textwrap.dedent(f"""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["talk"]
        settle = "0s"
        [[stages]]
        name = "talk"
        command = ["{PY}", "-c", "print('new output')"]
        """)
    )

    # When
    proc = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)

    # Then: the new run got an id past 57, and the old log is untouched.
    assert proc.returncode == 0, proc.stderr
    with open_db(tmp_path / "state" / "orchestrator.db") as db:
        [(run_id,)] = db.execute("SELECT id FROM runs").fetchall()
    assert run_id > 57
    assert (runs / "57.log").read_text() == "the old run's output\n"
    assert (runs / f"{run_id}.log").read_text() == "new output\n"


def test_a_file_that_cannot_be_moved_on_done_fails_the_batch_with_the_reason(
    tmp_path: Path,
) -> None:
    # Given: on_done moves files into "done", which is a regular file, not a folder.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.txt").write_text("x")
    (tmp_path / "done").write_text("not a folder")
    config = tmp_path / "c.toml"
    config.write_text(
        textwrap.dedent("""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["ok"]
        settle = "0s"
        on_done = "move:done"
        [[stages]]
        name = "ok"
        command = ["true"]
        """)
    )

    # When
    proc = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    human = orchestrator("batch", "-c", str(config), "--no-progress", cwd=tmp_path)

    # Then: the item is done, but the batch exits 1 and says which file stayed and why.
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["states"] == {"done": 1}
    assert summary["ok"] is False
    moves = summary["failed_dispositions"]
    assert moves["count"] == 1
    [failed] = moves["first"]
    assert failed["id"] == "in:x.txt"
    assert "cannot move" in failed["reason"]
    assert (tmp_path / "in" / "x.txt").exists()
    # A second batch takes no new item, and tries the move again (the file is a leftover).
    assert human.returncode == 1, human.stderr
    said = " ".join(human.stdout.split())  # rich wraps at $COLUMNS when it is set
    assert "could not be moved or deleted" in said
    assert "in:x.txt: cannot move" in said


def test_shell_variables_in_an_sh_c_script_are_not_placeholders_and_run_nothing(
    tmp_path: Path,
) -> None:
    # Found by an acceptance tester (session 15): "${name}" in the script was filled in as the
    # placeholder {name}, so a file called "(touch PWNED).txt" made it "$(touch PWNED).txt".
    (tmp_path / "in").mkdir()
    for name in ("(touch PWNED).txt", "$(touch PWNED).txt"):
        (tmp_path / "in" / name).write_text("x")
    out = tmp_path / "out.txt"
    config = tmp_path / "c.toml"
    script = f'for name in "$@"; do echo "got ${{name}}" >> {out}; done'
    config.write_text(textwrap.dedent(f"""
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
        command = {json.dumps(["sh", "-c", script, "sh", "{name}"])}
        [[stages]]
        name = "careless"
        command = ["sh", "-c", "cat {{path}}"]
        """))  # fmt: skip

    check = orchestrator("check", "-c", str(config), cwd=tmp_path)
    proc = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)

    # Then: the names reached the script as data; nothing ran; check warns about the bare
    # {path} in the other stage's script (not substituted there), not about ${name}.
    assert proc.returncode == 0, proc.stderr
    assert sorted(out.read_text().splitlines()) == [
        "got $(touch PWNED).txt",
        "got (touch PWNED).txt",
    ]
    assert not list(tmp_path.rglob("PWNED"))
    assert (
        "stages[1].command[2]: {path} is not substituted inside the code of 'sh'"
        in check.stdout + check.stderr
    )
    assert "stages[0]" not in check.stdout + check.stderr


def test_a_background_helper_that_left_its_run_does_not_outlive_the_batch(
    tmp_path: Path,
) -> None:
    # Given: a stage that starts a helper in a session of its own, its output away from the
    # run's pipe, and exits 0 (the run ends well; the helper is out of its group and off the
    # pipe by then, so only the end-of-batch sweep can find it)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x").write_text("x")
    pidfile = tmp_path / "helper.pid"
    config = tmp_path / "c.toml"
    config.write_text(textwrap.dedent(f"""
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
        command = ["sh", "-c", "setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $! > {pidfile}; sleep 0.3"]
        """))  # fmt: skip
    helper = None
    try:
        # When
        proc = orchestrator("batch", "-c", str(config), "--no-progress", cwd=tmp_path)

        # Then: the batch did its work, and the helper is gone by its end, with a warning
        assert proc.returncode == 0, proc.stderr
        helper = int(pidfile.read_text())
        assert not os.path.exists(f"/proc/{helper}") or "Z" in _proc_state(helper)
        assert "left running in the background" in proc.stderr
    finally:
        if helper is not None and os.path.exists(f"/proc/{helper}"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(helper, signal.SIGKILL)


def test_a_service_ends_what_a_run_left_running_once_the_run_is_over_not_before(
    tmp_path: Path,
) -> None:
    # Given: a service whose stage starts a helper in a session of its own, off the run's pipe,
    # then ends: soon for "short" (once setsid is done), after 5 s for "long" (the helper of a
    # run still going is that run's business; once the run is over, nothing of it may live on).
    pids = tmp_path / "pids"
    pids.mkdir()
    stage = json.dumps([
        "sh", "-c", 'setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $! > "$2/$1.pid"; '
        'case "$1" in long) sleep 5;; *) sleep 0.3;; esac', "sh", "{name}", str(pids),
    ])  # fmt: skip
    service = _service(tmp_path, stage, route="s", grace="concurrency = 2")
    helpers: list[int] = []
    try:
        (tmp_path / "in" / "short").write_text("x")
        (tmp_path / "in" / "long").write_text("x")
        short = _wait_for_pid(pids / "short.pid", service)
        long = _wait_for_pid(pids / "long.pid", service)
        helpers += [short, long]

        # Then: the short run's helper is ended soon after its run, while the service runs on
        # and the long run's helper lives as long as its run does.
        deadline = time.monotonic() + 4
        while _proc_state(short) not in ("gone", "Z") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _proc_state(short) in ("gone", "Z"), service.log
        assert _proc_state(long) not in ("gone", "Z"), service.log
        assert service.proc.poll() is None
        service.wait_log(r"run ok .*item='in:long'", timeout=15)
        deadline = time.monotonic() + 10
        while _proc_state(long) not in ("gone", "Z") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _proc_state(long) in ("gone", "Z"), service.log
        assert service.proc.poll() is None
        service.wait_log(r"ended runs had left running in the background.*item 'in:long'")
        assert "item 'in:short'" in service.log
    finally:
        service.stop(20)
        for pid in helpers:
            if _proc_state(pid) not in ("gone", "Z"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def test_a_record_with_a_nul_byte_is_rejected_not_the_batch(tmp_path: Path) -> None:
    # Given: a JSONL record whose id holds a NUL (valid JSON), passed to the stage as {item} and
    # ORCH_ITEM: no program can be given that argument. Found in session 6: the spawn's
    # ValueError ended the whole batch; then (session 16) the item died at its every attempt,
    # and a requeue failed the same way: it is rejected as it is read.
    (tmp_path / "recs.jsonl").write_text('{"id": "a\\u0000b"}\n{"id": "fine"}\n')
    out = tmp_path / "ran.txt"
    config = tmp_path / "c.toml"
    config.write_text(
        textwrap.dedent(f"""
        [http]
        listen = false
        [[sources]]
        name = "recs"
        type = "jsonl"
        path = "recs.jsonl"
        id_field = "id"
        route = ["s"]
        [[stages]]
        name = "s"
        command = ["{PY}", "-c", "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + chr(10))", "{out}", "{{item}}"]
        retries = 1
        backoff = "10ms"
        """)
    )

    # When
    proc = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)

    # Then: the other item done, this one rejected with why; the stage ran only for the other.
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["states"] == {"done": 1, "rejected": 1}
    [failed] = summary["failed_items"]
    assert failed["id"] == f"recs:\x00{(tmp_path / 'recs.jsonl').stat().st_ino}:0"
    assert "'id' holds a NUL character" in failed["reason"]
    assert out.read_text() == "recs:fine\n"


def test_a_file_name_that_is_not_utf8_is_rejected_and_its_neighbours_run(tmp_path: Path) -> None:
    # Given: a Latin-1 file name beside a plain one. Found in session 6: the store could not
    # hold the name, so every ingest of the folder failed and the batch never ended.
    inbox = tmp_path / "in"
    inbox.mkdir()
    (inbox / "plain.txt").write_text("x")
    with open(os.path.join(os.fsencode(inbox), b"caf\xe9.txt"), "w") as f:
        f.write("y")
    config = tmp_path / "c.toml"
    config.write_text(
        textwrap.dedent(f"""
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
        command = ["{PY}", "-c", "pass", "{{path}}"]
        """)
    )

    # When: the batch, twice.
    proc = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    again = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)

    # Then: the plain file done, the other rejected with its name escaped and kept in place;
    # the second batch takes neither again.
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["states"] == {"done": 1, "rejected": 1}
    [failed] = summary["failed_items"]
    assert failed["id"] == "in:\x00caf\\xe9.txt"  # NUL: no real name holds one
    assert "not valid UTF-8" in failed["reason"]
    assert failed["stage"] is None  # it never reached one
    assert sorted(os.listdir(os.fsencode(inbox))) == [b"caf\xe9.txt", b"plain.txt"]
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["items"] == 0
    # A file named as the escaped name reads, backslash and all, is another file: it is taken
    # (found by an acceptance tester, session 16: it was skipped as taken already).
    (inbox / "caf\\xe9.txt").write_text("z")
    third = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert json.loads(third.stdout)["states"] == {"done": 1}


@pytest.mark.parametrize(
    ("kind", "path", "expected"),
    [
        ("jsonl", "fifo", "is a FIFO, not a regular file"),
        ("json", "adir", "is a folder, not a regular file"),
        ("directory", "loop", "Too many levels of symbolic links"),
        ("json", "latin1.json", "did not parse: not valid JSON: Expecting value"),
    ],
    ids=["jsonl_fifo", "json_folder", "directory_symlink_loop", "json_not_utf8"],
)
def test_a_source_that_keeps_failing_ends_the_batch_with_its_error(
    tmp_path: Path, kind: str, path: str, expected: str
) -> None:
    # Found in session 6: the poller was restarted for ever, so the batch never ended (and a
    # FIFO's open() blocked a thread that even a second Ctrl+C waited for).
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "adir").mkdir()
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    # (A number of 5,000 digits, or a byte that is not UTF-8 inside a string, failed the whole
    # file too; now its element alone is rejected. A byte outside any string is not JSON.)
    (tmp_path / "latin1.json").write_bytes(b'[{"id": "a"}, {"id": \xe9}]')
    keys = 'id_field = "id"' if kind == "json" else ""
    config = tmp_path / "c.toml"
    config.write_text(
        textwrap.dedent(f"""
        [http]
        listen = false
        [[sources]]
        name = "src"
        type = "{kind}"
        path = "{path}"
        {keys}
        poll_interval = "100ms"
        route = ["s"]
        [[stages]]
        name = "s"
        command = ["true"]
        """)
    )

    proc = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)

    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    assert list(summary["failed_sources"]) == ["src"]
    assert expected in summary["failed_sources"]["src"]
    assert summary["ok"] is False
    # The file system's refusals are said in a line each, not with a traceback each time the
    # poller restarts (log noise: acceptance, session 15); a bug would still show one.
    assert "Traceback" not in proc.stderr


def test_elements_that_repeat_an_id_in_a_json_array_are_said(tmp_path: Path) -> None:
    # Acceptance (session 15): {"id": 5} and {"id": "5"} (one id) gave "ingested 2 element(s)"
    # and nothing about the third element, which the jsonl source does say.
    (tmp_path / "a.json").write_text(json.dumps([{"id": 5}, {"id": "5"}, {"id": "x"},
                                                 {"id": "x", "v": 2}, {"id": "y"}]))  # fmt: skip
    config = tmp_path / "c.toml"
    config.write_text(textwrap.dedent("""
        [http]
        listen = false
        [[sources]]
        name = "a"
        type = "json"
        path = "a.json"
        id_field = "id"
        route = ["s"]
        [[stages]]
        name = "s"
        command = ["true"]
        """))  # fmt: skip
    proc = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["states"] == {"done": 3}
    assert (
        "2 element(s) repeat the id of an element before them in the array ('5', 'x'); only the"
        " first of each is taken"
    ) in proc.stderr


def _directory_batch_config(tmp_path: Path, path: str, settle: str) -> Path:
    config = tmp_path / "c.toml"
    config.write_text(textwrap.dedent(f"""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "{path}"
        settle = "{settle}"
        poll_interval = "0.1s"
        route = ["s"]
        [[stages]]
        name = "s"
        command = ["true"]
        """))  # fmt: skip
    return config


def test_a_batch_whose_folder_is_a_file_gives_the_source_up(tmp_path: Path) -> None:
    (tmp_path / "inbox").write_text("not a folder")
    config = _directory_batch_config(tmp_path, "inbox", "0s")
    proc = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["failed_sources"] == {"in": f"{str(tmp_path / 'inbox')!r} is not a folder"}


def test_a_batch_takes_what_its_folder_held_at_start_and_ends_while_files_keep_coming(
    tmp_path: Path,
) -> None:
    # Given: a file still settling when the batch starts, and a writer adding one every 0.1 s
    # for 8 s
    inbox = tmp_path / "in"
    inbox.mkdir()
    (inbox / "first").write_text("x")
    config = _directory_batch_config(tmp_path, "in", "1s")
    stop = time.monotonic() + 8
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time, pathlib
        i = 0
        while time.monotonic() < {stop}:
            pathlib.Path({str(inbox)!r}, f"later{{i}}").write_text("x")
            i += 1
            time.sleep(0.1)
        """)])  # fmt: skip
    try:
        # When
        started = time.monotonic()
        proc = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
        took = time.monotonic() - started

        # Then: it ended well before the writer stopped, with what the folder held when it
        # started (the first file and those written while it started up), not what came later
        assert proc.returncode == 0, proc.stderr
        assert took < 6, took
        (done,) = json.loads(proc.stdout)["states"].items()
        assert done[0] == "done"
        assert 1 <= done[1] < len(os.listdir(inbox)) - 5
    finally:
        writer.kill()
        writer.wait()


def test_a_subfolder_that_cannot_be_listed_is_skipped_and_the_rest_taken(tmp_path: Path) -> None:
    # A folder nested past the 4,096-byte path limit cannot be listed (ENAMETOOLONG): found in
    # session 6, it made every scan of the whole source fail.
    inbox = tmp_path / "in"
    inbox.mkdir()
    (inbox / "ok.txt").write_text("x")
    deep = os.open(inbox, os.O_RDONLY)
    try:
        for _ in range(22):
            os.mkdir("d" * 200, dir_fd=deep)
            inner = os.open("d" * 200, os.O_RDONLY, dir_fd=deep)
            os.close(deep)
            deep = inner
    finally:
        os.close(deep)
    config = tmp_path / "c.toml"
    config.write_text(
        textwrap.dedent("""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        recursive = true
        settle = "0s"
        route = ["s"]
        [[stages]]
        name = "s"
        command = ["true"]
        """)
    )

    proc = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["states"] == {"done": 1}
    assert "cannot list" in proc.stderr
    assert "skipped" in proc.stderr


def test_a_batch_whose_source_path_does_not_exist_says_so(tmp_path: Path) -> None:
    # A typo in a path ended a batch with "0 item(s)" and no word (found in session 6).
    config = tmp_path / "c.toml"
    config.write_text(
        textwrap.dedent("""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "inbxo"
        route = ["s"]
        [[stages]]
        name = "s"
        command = ["true"]
        """)
    )
    proc = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    # A folder that is not there is a typo or a mount that dropped: exit 1, with the reason
    # (it was exit 0 with a warning: a cron job reported success; acceptance, session 15).
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["items"] == 0
    assert summary["failed_sources"] == {"in": f"{str(tmp_path / 'inbxo')!r} does not exist"}


def test_a_workdir_that_cannot_be_made_kills_the_item_with_the_reason(tmp_path: Path) -> None:
    # Given: a stage that uses {workdir}, and the item's workdir blocked by a file (as a full
    # disk would block it).
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.txt").write_text("x")
    (tmp_path / "state" / "work").mkdir(mode=0o700, parents=True)
    (tmp_path / "state").chmod(0o700)
    (tmp_path / "state" / "work" / "1").write_text("not a folder")
    config = tmp_path / "c.toml"
    config.write_text(
        textwrap.dedent("""
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
        command = ["touch", "{workdir}/ran"]
        """)
    )

    # When
    proc = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)

    # Then: exit 1, nothing ran, the item is dead and says why (it can be requeued later).
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    [failed] = summary["failed_items"]
    assert failed["stage"] == "s"
    assert "cannot prepare its workdir" in failed["reason"]
    assert summary["stages"]["s"]["runs"] == 0


def test_batch_human_summary_and_check(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "one.txt").write_text("1")
    config = tmp_path / "c.toml"
    config.write_text(
        textwrap.dedent("""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["noop"]
        settle = "0s"
        [[stages]]
        name = "noop"
        command = ["true"]
        """)
    )
    check = orchestrator("check", "-c", str(config), cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert "noop" in check.stdout
    assert "in" in check.stdout
    proc = orchestrator("batch", "-c", str(config), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "1 item(s): done 1" in proc.stdout


def test_run_service_processes_new_files_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    # Given: the service running on an empty folder.
    import signal
    import time

    (tmp_path / "in").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    config = tmp_path / "svc.toml"
    config.write_text(
        textwrap.dedent(f"""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["copy"]
        settle = "100ms"
        poll_interval = "100ms"
        [[stages]]
        name = "copy"
        command = ["cp", "--", "{{path}}", "{out}"]
        """)
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", "-c", str(config)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # When: a file arrives while it runs.
        (tmp_path / "in" / "late arrival.txt").write_text("hello")
        deadline = time.monotonic() + 20
        while not (out / "late arrival.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / "late arrival.txt").read_text() == "hello"
        # Then: SIGTERM drains it and it exits 0.
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "SIGTERM: draining" in err
    # The log says when the service started (which one, on what) and when it stopped.
    assert f"starting: pid {proc.pid}, config {config}" in err
    assert "orchestrator stopped: 1 run(s), 1 item(s) done, 0 dead, 0 rejected" in err


def _service(tmp_path: Path, stage: str, *, route: str = "slow", path: str = "in",
             grace: str = "") -> Service:  # fmt: skip
    """``orchestrator run`` on ``tmp_path`` with one folder source and one stage ``stage``."""
    return Service(
        tmp_path,
        textwrap.dedent(f"""
        shutdown_grace = "1s"
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "{path}"
        route = ["{route}"]
        settle = "0s"
        poll_interval = "100ms"
        [[stages]]
        name = "{route}"
        {grace}
        command = {stage}
        """),
    )


def _wait_for_pid(pidfile: Path, service: Service) -> int:
    """The pid a stage wrote to ``pidfile`` once it started."""
    deadline = time.monotonic() + 20
    while not pidfile.exists() or not pidfile.read_text().strip():
        assert time.monotonic() < deadline, f"the stage never started; log:\n{service.log}"
        time.sleep(0.05)
    return int(pidfile.read_text())


def test_sigusr1_is_ignored_and_sighup_without_a_terminal_reloads(tmp_path: Path) -> None:
    # Found in session 6: SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 ended the service on the spot
    # and left its runs behind, reparented to init. (A SIGHUP from a closed terminal drains:
    # test_reload.py.)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a")
    pidfile = tmp_path / "stage.pid"
    service = _service(tmp_path, json.dumps(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"]))
    stage = _wait_for_pid(pidfile, service)
    service.signal(signal.SIGUSR1)
    service.signal(signal.SIGHUP)
    service.wait_log("SIGHUP: .* reloaded; limits: unchanged")
    assert service.proc.poll() is None
    assert os.path.exists(f"/proc/{stage}")  # its run goes on
    assert "SIGUSR1: ignored" in service.log
    service.signal(signal.SIGTERM)
    assert service.wait(20) == 0, service.log
    assert not os.path.exists(f"/proc/{stage}")  # killed and reaped before the exit


@pytest.mark.parametrize("removed", ["state_folder", "database"])
def test_a_service_whose_state_is_deleted_stops_with_exit_3(tmp_path: Path, removed: str) -> None:
    # Found in session 6: deleting the state folder went unnoticed; a second instance could then
    # start on it, reap the first one's live runs as leftovers and run items a second time.
    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"f{i}.txt").write_text(str(i))
    pidfile = tmp_path / "stage.pid"
    service = _service(tmp_path, json.dumps(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"]))
    stage = _wait_for_pid(pidfile, service)
    state = tmp_path / "state"
    if removed == "state_folder":
        shutil.rmtree(state)
    else:
        for db in state.glob("orchestrator.db*"):
            db.unlink()
    assert service.wait(30) == 3, service.log[-3000:]
    last = service.log.splitlines()[-1]
    assert last.startswith("orchestrator: the ")
    assert "was deleted while this service ran; stopping" in last
    assert not os.path.exists(f"/proc/{stage}")  # its run was ended, not left behind


def test_a_service_whose_store_fails_logs_why_and_leaves_its_status_file_saying_so(
    tmp_path: Path,
) -> None:
    # Found by an acceptance tester (session 17): the reason went to stderr only -- the [log]
    # file had no line about it -- and status.json kept saying "running".
    # Given: a service with a JSON log file and a short busy_timeout, running
    (tmp_path / "in").mkdir()
    service = Service(tmp_path, textwrap.dedent("""
        state_dir = "state"
        [http]
        listen = false
        [status]
        interval = "0.2s"
        [store]
        busy_timeout = "0.3s"
        [log]
        file = "logs/o.log"
        json = true
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        settle = "0s"
        poll_interval = "50ms"
        route = ["s"]
        [[stages]]
        name = "s"
        command = ["true"]
        """))  # fmt: skip
    deadline = time.monotonic() + 10
    while _status_state(tmp_path) != "running":
        assert service.proc.poll() is None, service.log
        assert time.monotonic() < deadline, service.log
        time.sleep(0.05)
    # When: another process holds the store's write lock past busy_timeout as a file comes
    holder = open_db(tmp_path / "state" / "orchestrator.db")
    with holder as db:
        db.execute("BEGIN EXCLUSIVE")
        (tmp_path / "in" / "a").write_text("a")
        code = service.wait(10)
        db.execute("ROLLBACK")

    # Then: exit 3; the log file says why, critical; the status file says it failed, and why
    assert code == 3, service.log[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "logs" / "o.log").read_text().splitlines()]
    critical = [line["message"] for line in lines if line["level"] == "CRITICAL"]
    assert len(critical) == 1, lines[-5:]
    assert "database is locked: the service stops (exit 3)" in critical[0]
    status = service.status()
    assert status["state"] == "failed"
    assert status["reason"].startswith("its store failed: cannot write the store")
    shown = orchestrator("status", "-c", str(service.config_path), cwd=tmp_path)
    assert "(gone), failed (its store failed: cannot write the" in shown.stdout


def _status_state(folder: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((folder / "state" / "status.json").read_text()).get("state")  # type: ignore[no-any-return]
    return None


def test_items_queued_for_a_stage_no_longer_in_the_config_are_warned_about_once(
    tmp_path: Path,
) -> None:
    # Found in session 6: each such item was "re-queued from outside" and refused again at
    # every look of the store watch -- a line per item per second, for ever.
    from orchestrator.store import NewItem

    left_queued(tmp_path / "state", [NewItem(id=f"in:{i}", source="in", key=str(i),
                                             route=("old",)) for i in range(20)])  # fmt: skip
    service = _service(tmp_path, '["true"]', route="new")
    time.sleep(4)  # a few looks of the store watch (every second)
    assert service.stop(20) == 0, service.log
    assert service.log.count("which is not in the config") == 1, service.log[-2000:]
    assert "re-queued from outside" not in service.log


def test_a_batch_says_why_items_left_at_a_stage_it_does_not_have_make_it_exit_1(
    tmp_path: Path,
) -> None:
    from orchestrator.store import NewItem

    # Given: three items an earlier config left queued at stage "old"; the config now has "new".
    left_queued(tmp_path / "state", [NewItem(id=f"in:{i}", source="in", key=str(i),
                                             route=("old",)) for i in range(3)])  # fmt: skip
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.txt").write_text("x")
    config = _directory_batch_config(tmp_path, "in", "0s")

    # When
    proc = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    human = orchestrator("batch", "-c", str(config), "--no-progress", cwd=tmp_path)

    # Then: exit 1, and the summary says which items wait where and what to do.
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["parked"] == {"count": 3, "stages": ["old"]}
    assert summary["states"]["queued"] == 3
    assert human.returncode == 1, human.stderr
    said = " ".join(human.stdout.split())
    assert "3 item(s) left queued at stage(s) 'old', which the config does not have" in said


def test_a_running_service_takes_parked_items_requeue_moves_to_a_stage_it_has(
    tmp_path: Path,
) -> None:
    # Given: items left waiting at stage "old", and a service whose config has only "new",
    # whose stage program records each item it gets.
    from orchestrator.store import ItemState, NewItem, connect
    from orchestrator.store.sqlite import op_get_item, op_ingest

    (tmp_path / "state").mkdir(mode=0o700)
    db = tmp_path / "state" / "orchestrator.db"
    conn = connect(db, create=True)
    with conn:
        op_ingest(conn, [NewItem(id=f"in:{i}", source="in", key=str(i), route=("old",))
                         for i in range(3)])  # fmt: skip
    conn.close()
    record = tmp_path / "record"
    service = _service(tmp_path, json.dumps(["sh", "-c", f'echo "$ORCH_ITEM" >> {record}']),
                       route="new")  # fmt: skip
    service.wait_log("which is not in the config")
    # The status file counts them, under the stage they wait at, which has no slots.
    deadline = time.monotonic() + 20
    while "old" not in (stages := service.status()["stages"]):
        assert time.monotonic() < deadline, stages
        time.sleep(0.1)
    assert (stages["old"]["queued"], stages["old"]["in_config"]) == (3, False)
    assert (stages["new"]["concurrency"], stages["new"]["in_config"]) == (1, True)
    # When: an operator moves them to "new" while it runs.
    moved = orchestrator("requeue", "--stage", "old", "--to", "new", "-c",
                         str(service.config_path), cwd=tmp_path)  # fmt: skip
    assert moved.returncode == 0, moved.stderr
    assert "3 items requeued" in moved.stdout
    # Then: the service picks them up by itself (store watch) and runs each once at "new".
    deadline = time.monotonic() + 20
    while not record.exists() or len(record.read_text().split()) < 3:
        assert time.monotonic() < deadline, service.log[-3000:]
        time.sleep(0.1)
    assert service.stop(20) == 0, service.log
    assert sorted(record.read_text().split()) == ["in:0", "in:1", "in:2"]
    conn = connect(db, create=False)
    assert {op_get_item(conn, f"in:{i}").state for i in range(3)} == {ItemState.DONE}
    conn.close()


def test_a_service_whose_folder_is_missing_says_so_once_and_takes_it_when_it_comes(
    tmp_path: Path,
) -> None:
    # Found in session 6: a typo in `path` looked like a healthy service that took nothing.
    out = tmp_path / "out"
    service = _service(tmp_path, json.dumps(["cp", "--", "{path}", str(out)]), path="inbox")
    time.sleep(1.5)  # several scans of a missing folder
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "a.txt").write_text("a")
    deadline = time.monotonic() + 20
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert service.stop(20) == 0, service.log
    assert out.read_text() == "a"
    inbox = str(tmp_path / "inbox")
    assert service.log.count(f"cannot list {inbox!r}: No such file or directory") == 1
    assert f"{inbox!r} can be listed again" in service.log


def test_items_whose_folder_goes_away_for_a_while_wait_for_it_and_are_not_killed(
    tmp_path: Path,
) -> None:
    # Found by an acceptance tester (session 15): while the source folder was away (a mount
    # that dropped for a few seconds) every queued item of it was dead, "vanished before its
    # run", though its file came back with the folder.
    done = tmp_path / "done.txt"
    stage = json.dumps(["sh", "-c", f'sleep 0.4; cat -- "$2" > /dev/null && echo "$1" >> {done}',
                        "sh", "{name}", "{path}"])  # fmt: skip
    (tmp_path / "in").mkdir()
    for i in range(6):
        (tmp_path / "in" / f"w{i}").write_text("x")
    # Two at a time: runs ready (their files checked) or going on when the folder goes fail on
    # it; they must wait for it as well, not count.
    service = _service(tmp_path, stage, grace="concurrency = 2")
    try:
        deadline = time.monotonic() + 20
        while not done.exists():
            assert time.monotonic() < deadline, service.log
            time.sleep(0.02)
        # When: the folder goes away for 2.5 s, its files with it
        (tmp_path / "in").rename(tmp_path / "away")
        time.sleep(2.5)
        (tmp_path / "away").rename(tmp_path / "in")
        deadline = time.monotonic() + 20
        while len(done.read_text().split()) < 6:
            assert time.monotonic() < deadline, service.log
            time.sleep(0.05)
    finally:
        assert service.stop(20) == 0, service.log
    # Then: every item is done, none dead, none "vanished" while its folder was away
    assert sorted(done.read_text().split()) == [f"w{i}" for i in range(6)]
    assert "vanished" not in service.log
    with open_db(tmp_path / "state" / "orchestrator.db") as db:
        assert db.execute("SELECT state, count(*) FROM items GROUP BY state").fetchall() == [
            ("done", 6)
        ]
        failed = db.execute("SELECT count(*) FROM runs WHERE outcome = 'failed'").fetchone()[0]
        attempts = db.execute("SELECT max(attempt) FROM runs").fetchone()[0]
    # Runs did fail on the missing folder (two at a time, ready ahead), and used no attempt.
    assert failed >= 1
    assert attempts == 1


def test_a_sigterm_during_start_up_recovery_waits_for_it_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    # Found in session 6: the signal receiver opened only after recovery, so a SIGTERM while a
    # dead instance's leftovers were being ended killed the service on the spot, leftovers alive.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a")
    pidfile, got_term = tmp_path / "stage.pid", tmp_path / "got_term"
    stubborn = (  # ignores SIGTERM, and says it got one
        "import os, signal, time; "
        f"signal.signal(signal.SIGTERM, lambda *_: open({str(got_term)!r}, 'a').write('x')); "
        f"open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    )
    command = json.dumps([PY, "-c", stubborn])
    first = _service(tmp_path, command, route="stubborn", grace='grace_period = "3s"')
    leftover = _wait_for_pid(pidfile, first)
    try:
        first.proc.kill()  # kill -9: the stage is left running
        first.proc.wait()
        second = _service(tmp_path, command, route="stubborn", grace='grace_period = "3s"')
        deadline = time.monotonic() + 20
        while not got_term.exists():  # recovery has begun ending the leftover
            assert time.monotonic() < deadline, "recovery never signalled the leftover"
            time.sleep(0.02)
        second.signal(signal.SIGTERM)
        assert second.wait(30) == 0, second.log[-3000:]
    finally:
        if os.path.exists(f"/proc/{leftover}"):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(leftover, signal.SIGKILL)  # clean up what a bug leaves
    assert "SIGTERM: draining" in second.log
    assert "ended 1 process(es) left running by a dead instance" in second.log
    # Recovery finished ending it: gone, or a zombie waiting for init (no longer ours).
    try:
        with open(f"/proc/{leftover}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        state = "gone"
    assert state in ("gone", "Z", "X"), state


def _stubborn_leftover(tmp_path: Path, grace: str) -> tuple[str, Path, int]:
    """A service config whose stage "stubborn" (its ``grace_period`` ``grace``) ignores SIGTERM,
    beside a stage "patient" with a 60 s grace; its first service killed with -9 while the run
    goes on. Returns the config, the file the leftover writes at SIGTERM, and its pid."""
    (tmp_path / "in").mkdir(exist_ok=True)
    (tmp_path / "in" / "a.txt").write_text("a")
    pidfile, got_term = tmp_path / "stage.pid", tmp_path / "got_term"
    stubborn = (
        "import os, signal, time; "
        f"signal.signal(signal.SIGTERM, lambda *_: open({str(got_term)!r}, 'a').write('x')); "
        f"open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    )
    config = textwrap.dedent(f"""
        shutdown_grace = "1s"
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["stubborn"]
        settle = "0s"
        [[stages]]
        name = "stubborn"
        command = {json.dumps([PY, "-c", stubborn])}
        grace_period = "{grace}"
        [[stages]]
        name = "patient"
        command = ["true"]
        grace_period = "60s"
        """)
    first = Service(tmp_path, config)
    leftover = _wait_for_pid(pidfile, first)
    first.proc.kill()  # kill -9: the stage is left running
    first.proc.wait()
    return config, got_term, leftover


def test_recovery_gives_each_leftover_its_own_stages_grace_not_the_longest(
    tmp_path: Path,
) -> None:
    # Found by an acceptance tester (session 15): recovery waited the longest grace_period of
    # all stages (here 60 s) for a leftover whose stage has 1 s.
    config, got_term, leftover = _stubborn_leftover(tmp_path, "1s")
    try:
        second = Service(tmp_path, config)
        second.wait_log("ended 1 process.es. left running by a dead instance", timeout=20)
        assert got_term.exists()
        assert second.stop(20) == 0, second.log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leftover, signal.SIGKILL)
    assert _proc_state(leftover) in ("gone", "Z")
    stamps = [line[11:23] for line in second.log.splitlines()
              if "starting:" in line or "left running by a dead instance" in line]  # fmt: skip
    t0, t1 = (sum(float(x) * m for x, m in zip(s.split(":"), (3600, 60, 1), strict=True))
              for s in stamps)  # fmt: skip
    assert 0.9 <= t1 - t0 < 10, stamps


def test_a_second_sigint_during_start_up_recovery_kills_the_leftovers_at_once(
    tmp_path: Path,
) -> None:
    # Found by an acceptance tester (session 15): signals during recovery were said nowhere and
    # acted on only once it had waited out the leftovers' grace; a second SIGINT never stopped.
    config, got_term, leftover = _stubborn_leftover(tmp_path, "60s")
    try:
        second = Service(tmp_path, config)
        deadline = time.monotonic() + 20
        while not got_term.exists():  # recovery has begun ending the leftover
            assert time.monotonic() < deadline, second.log
            time.sleep(0.02)
        started = time.monotonic()
        second.signal(signal.SIGINT)
        second.wait_log("SIGINT: start-up is still ending a dead instance's leftovers")
        second.signal(signal.SIGINT)
        assert second.wait(20) == 0, second.log
        assert time.monotonic() - started < 15  # not the 60 s grace
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(leftover, signal.SIGKILL)
    assert _proc_state(leftover) in ("gone", "Z")
    assert "start-up kills the dead instance's leftovers now (SIGKILL)" in second.log
    assert "second SIGINT: stopping now" in second.log


def test_done_items_workdirs_are_removed_and_a_dead_items_kept(tmp_path: Path) -> None:
    # Given: 300 records, each run writing into its workdir; one record fails for good
    records = [{"id": i} for i in range(300)] + [{"id": "bad"}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "orchestrator.toml").write_text(textwrap.dedent("""
        state_dir = "state"
        [http]
        listen = false
        [log]
        level = "WARNING"
        [[sources]]
        name = "rec"
        type = "jsonl"
        path = "r.jsonl"
        id_field = "id"
        route = ["s"]
        [[stages]]
        name = "s"
        command = ["sh", "-c", "echo x > \\"$1/out\\"; ! grep -q bad \\"$1/payload.json\\"", "sh", "{workdir}"]
        concurrency = 4
        """))  # fmt: skip

    # When: the batch has run
    done = orchestrator("batch", "-c", "orchestrator.toml", "--json", cwd=tmp_path)

    # Then: the batch's last done items' workdirs are gone too; only the dead one's is kept,
    # with what its run wrote
    assert json.loads(done.stdout)["states"] == {"done": 300, "dead": 1}
    left = list((tmp_path / "state" / "work").iterdir())
    assert len(left) == 1
    assert sorted(p.name for p in left[0].iterdir()) == ["out", "payload.json"]


def test_a_stage_that_uses_orch_workdir_gets_its_folder_and_one_that_does_not_name_it_fails_safely(
    tmp_path: Path,
) -> None:
    # Given: three folder sources. "inline": a shell script in the command uses $ORCH_WORKDIR;
    # "script": a script file does, its stage says workdir = true; "unsaid": the same script
    # file, its stage says nothing (no folder is made: it must not write into "/" instead).
    script = tmp_path / "stage.sh"
    script.write_text(
        '#!/bin/sh\necho "$ORCH_WORKDIR" > "$1.where"\necho x > "$ORCH_WORKDIR/out"\n'
    )
    script.chmod(0o755)
    sources = stages = ""
    for name, extra in (("inline", ""), ("script", "workdir = true"), ("unsaid", "")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text("x")
        command = (
            ["sh", "-c", 'echo x > "$ORCH_WORKDIR/out"'] if name == "inline"
            else [str(script), str(tmp_path / name)]
        )  # fmt: skip
        sources += textwrap.dedent(f"""
            [[sources]]
            name = "{name}"
            type = "directory"
            path = "{name}"
            route = ["{name}"]
            settle = "0s"
            """)
        stages += textwrap.dedent(f"""
            [[stages]]
            name = "{name}"
            command = {json.dumps(command)}
            {extra}
            """)
    config = tmp_path / "c.toml"
    config.write_text("[http]\nlisten = false\n" + sources + stages)

    # When
    proc = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)

    # Then: the first two are done; the third failed on a folder under state/work that does
    # not exist -- the variable was never empty -- and nothing was written into "/".
    summary = json.loads(proc.stdout)
    assert summary["states"] == {"done": 2, "dead": 1}, proc.stderr
    [failed] = summary["failed_items"]
    assert failed["id"] == "unsaid:f"
    where = (tmp_path / "unsaid.where").read_text().strip()
    assert where.startswith(str(tmp_path / "state" / "work") + "/")
    assert not os.path.exists("/out")


def test_a_payload_cut_short_by_a_full_disk_is_not_left_for_the_next_attempt(disk: Path) -> None:
    # Given: a disk with about 100 KB free, and a record of 300 KB
    from orchestrator.workers import _make_workdir

    filler = fill(disk)
    os.truncate(filler, max(0, filler.stat().st_size - 100_000))
    workdir = str(disk / "work" / "7")
    payload = json.dumps({"id": 7, "blob": "x" * 300_000})

    # When: the workdir is prepared
    with pytest.raises(OSError) as full:
        _make_workdir(workdir, payload)

    # Then: no half payload is left behind, so a later attempt writes it whole
    assert full.value.errno == errno.ENOSPC
    assert not os.path.exists(os.path.join(workdir, "payload.json"))
    filler.unlink()
    _make_workdir(workdir, payload)
    assert (disk / "work" / "7" / "payload.json").read_text() == payload
    assert oct((disk / "work" / "7" / "payload.json").stat().st_mode & 0o777) == "0o600"
    # The folders are private too, state_dir/work included (it was 0755: acceptance, session 15)
    assert oct((disk / "work").stat().st_mode & 0o777) == "0o700"
    assert oct((disk / "work" / "7").stat().st_mode & 0o777) == "0o700"


def test_runs_a_full_disk_ended_are_not_counted_toward_poison_items(
    disk: Path, tmp_path: Path
) -> None:
    # Found by an acceptance tester (session 15): a full state disk made each restart (as
    # Restart=on-failure does) leave its runs open; the next start counted them as
    # interruptions, and after three the items were dead as "poison" -- for the disk's fault.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x").write_text("x")
    started = tmp_path / "started"
    config = tmp_path / "c.toml"
    config.write_text(textwrap.dedent(f"""
        state_dir = "{disk / "state"}"
        max_interruptions = 1
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
        command = ["sh", "-c", "echo started > {started}; sleep 1; echo some output"]
        """))  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "batch", "-c", str(config), "--no-progress"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not started.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # When: the disk fills up while the run goes on; the batch ends with exit 3
        filler = fill(disk)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, err
    assert "ended: its store failed" in (disk / "state" / "orchestrator.lock").read_text()

    # Then: with room again, the next batch re-queues the item without counting that against
    # it (max_interruptions = 1 would have made it dead at once) and it is done.
    filler.unlink()
    again = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["states"] == {"done": 1}
    with open_db(disk / "state" / "orchestrator.db") as db:
        [(interruptions,)] = db.execute("SELECT interruptions FROM items").fetchall()
        reasons = [
            r[0] for r in db.execute("SELECT reason FROM runs WHERE outcome = 'interrupted'")
        ]
    assert interruptions == 0
    # (Its end, before the store failed under it, is known from the run journal.)
    [reason] = reasons
    assert reason.startswith("ended by itself (ok, exit code 0, 1.0")
    assert reason.endswith(
        "s), but its result was not recorded: the instance running it stopped: its store failed;"
        " not counted as an interruption"
    )


def test_a_start_on_a_disk_run_logs_filled_removes_logs_of_ended_runs_to_make_room(
    disk: Path, tmp_path: Path
) -> None:
    # Found by an acceptance tester (session 17): run logs filled the state disk; every restart
    # then failed (exit 3, "database or disk is full", naming neither the disk nor what filled
    # it) before the housekeeping that prunes logs ever ran.
    # Given: two ended runs with 300 KB logs each, a log of a run the store never recorded, and
    # the rest of the disk filled
    (tmp_path / "in").mkdir()
    config = tmp_path / "c.toml"
    config.write_text(textwrap.dedent(f"""
        state_dir = "{disk / "state"}"
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
        command = ["sh", "-c", "head -c $(cat \\"$0\\") /dev/zero", "{{path}}"]
        """))  # fmt: skip
    for name in ("a", "b"):
        (tmp_path / "in" / name).write_text("300000")
    first = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    assert json.loads(first.stdout)["states"] == {"done": 2}, first.stderr
    runs = disk / "state" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["1.log", "2.log"]
    (runs / "3.log").write_text("a run the store never recorded")
    filler = fill(disk)

    # When: a batch starts with a new file
    (tmp_path / "in" / "c").write_text("10")
    second = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)

    # Then: the oldest ended run's log made room and the batch went on; the others stay
    assert second.returncode == 0, second.stderr
    assert json.loads(second.stdout)["states"] == {"done": 1}
    assert "the state folder's file system is full (0 B free): removed 1 log(s) of ended runs, " \
           "oldest first" in second.stderr  # fmt: skip
    assert sorted(p.name for p in runs.iterdir()) == ["2.log", "3.log", "4.log"]

    # When: the disk is full again with nothing of the kind to remove
    for log in runs.iterdir():
        log.unlink()
    filler.unlink()
    fill(disk)
    (tmp_path / "in" / "d").write_text("10")
    third = orchestrator("batch", "-c", str(config), "--no-progress", cwd=tmp_path)

    # Then: exit 3, saying the disk is full and what holds the space
    assert third.returncode == 3, third.stderr
    last = third.stderr.splitlines()[-1]
    assert last.startswith("orchestrator: cannot ")
    assert f"; the file system of the state folder '{disk / 'state'}' is full (0 B free): run " \
           "logs (runs/) take 0 B, workdirs (work/) 0 B, the store " in last  # fmt: skip


def test_a_placeholder_in_doubled_braces_reaches_the_command_as_its_text(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a b.txt").write_text("x")
    out = tmp_path / "out"
    config = tmp_path / "c.toml"
    command = ["sh", "-c", 'printf "%s|" "$@" > "$0"', str(out), "{{name}}", "{name}", "{x}"]
    config.write_text(textwrap.dedent(f"""
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
        command = {json.dumps(command)}
        """))  # fmt: skip
    proc = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "{name}|a b.txt|{x}|"


def test_code_behind_a_wrapper_and_awk_programs_are_not_filled_in(tmp_path: Path) -> None:
    # Found by an acceptance tester (session 16): only a command's first word was looked at, so
    # `timeout 10 sh -c '… {name}'` (or flock … sh -c) and awk programs got the name filled
    # in, and a file name ran as code; check said nothing.
    (tmp_path / "in").mkdir()
    for name in ("$(touch PWNED).txt", '"; system("touch PWNED"); print "'):
        (tmp_path / "in" / name).write_text("x")
    config = tmp_path / "c.toml"
    config.write_text(textwrap.dedent(f"""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["wrapped", "awk", "zip"]
        settle = "0s"
        [[stages]]
        name = "zip"
        command = {json.dumps(["flock", str(tmp_path / "zip.lock"), "gzip", "-c", "{path}"])}
        [[stages]]
        name = "wrapped"
        command = {json.dumps(["timeout", "10", "sh", "-c", "echo {name} > /dev/null"])}
        [[stages]]
        name = "awk"
        command = {json.dumps(["awk", 'BEGIN {{ print "{name}" > "/dev/null" }}'])}
        """))  # fmt: skip

    check = orchestrator("check", "-c", str(config), cwd=tmp_path)
    proc = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.rglob("PWNED"))
    said = check.stdout + check.stderr
    assert "stages[1].command[4]: {name} is not substituted inside the code of 'sh'" in said
    assert "stages[2].command[1]: {name} is not substituted inside the code of 'awk'" in said
    # A wrapped command's own -c is no code: its {path} was filled in (the runs went well).
    assert "stages[0]" not in said
    assert json.loads(proc.stdout)["states"] == {"done": 2}


def test_items_whose_route_goes_on_to_a_removed_stage_wait_there_and_nothing_crashes(
    tmp_path: Path,
) -> None:
    # Found by an acceptance tester (session 16): an item finishing "s" whose route (fixed at
    # ingest) goes on to "gone", a stage the config no longer has, crashed the service and the
    # batch (KeyError), one item further at every restart; its source "old" is not in the
    # config either, and the file it leaves was not said.
    from orchestrator.store import NewItem

    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / f"f{i}").write_text("x")
    left_queued(tmp_path / "state", [
        NewItem(id=f"old:{i}", source="old", key=str(i), route=("s", "gone"),
                path=str(tmp_path / f"f{i}"))
        for i in range(3)
    ])  # fmt: skip
    config = _directory_batch_config(tmp_path, "in", "0s")

    proc = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)

    assert "Traceback" not in proc.stderr
    assert proc.returncode == 1, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["parked"] == {"count": 3, "stages": ["gone"]}
    assert summary["stages"]["s"]["runs"] == 3
    assert proc.stderr.count("which is not in the config, are left queued") == 1
    # A second batch finds them waiting there still, and runs nothing again.
    again = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    assert again.returncode == 1, again.stderr
    assert json.loads(again.stdout)["parked"]["count"] == 3
    shown = orchestrator("show", "old:0", "-c", str(config), "--json", cwd=tmp_path)
    assert [run["stage"] for run in json.loads(shown.stdout)["runs"]] == ["s"]


def test_every_run_of_a_record_gets_the_record_whatever_an_earlier_run_did_to_its_file(
    tmp_path: Path,
) -> None:
    # Found by an acceptance tester (session 16): a run that rewrote payload.json in place and
    # failed half-way left its retry, and the stages after it, a broken record.
    (tmp_path / "r.jsonl").write_text('{"id": "r1", "v": 1}\n')
    seen = tmp_path / "seen"
    enrich = (f'cat "$ORCH_PAYLOAD" >> {seen}; echo >> {seen}; '
              'if [ "$ORCH_ATTEMPT" = 1 ]; then printf \'{{"id": "r1", "v":\' > "$ORCH_PAYLOAD";'
              " exit 1; fi")  # fmt: skip
    config = tmp_path / "c.toml"
    config.write_text(textwrap.dedent(f"""
        [http]
        listen = false
        [[sources]]
        name = "r"
        type = "jsonl"
        path = "r.jsonl"
        id_field = "id"
        route = ["enrich", "load"]
        [[stages]]
        name = "enrich"
        command = {json.dumps(["sh", "-c", enrich])}
        retries = 1
        backoff = "10ms"
        [[stages]]
        name = "load"
        command = {json.dumps(["sh", "-c", f'cat "$ORCH_PAYLOAD" >> {seen}'])}
        """))  # fmt: skip
    proc = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert seen.read_text().splitlines() == ['{"id": "r1", "v": 1}'] * 3


@pytest.mark.parametrize(
    ("helper", "items"),
    [
        ("setsid -f sh -c 'exec >/dev/null 2>&1; sleep 30'\nsleep 0.1", 4),
        # Still starting (setsid, exec flock, fork sleep) as its run ends: found by an
        # acceptance tester (session 16), one look at the run's end missed it now and then.
        ("exec 9>&-\nsetsid flock {lock} sleep 30 </dev/null >/dev/null 2>&1 &\nexit 0", 30),
    ],
)
def test_a_helper_a_run_left_outside_its_group_never_overlaps_the_next_run_of_a_stage_of_1(
    tmp_path: Path, helper: str, items: int
) -> None:
    # Found by an acceptance tester (session 16): a stage of concurrency 1 whose tool leaves a
    # helper in a session of its own (output closed, so no pipe to notice it by), holding the
    # tool's lock: the next run started beside it, until the service's sweep a second or two
    # later. The lock is the OS's word on "one at a time".
    lock, fails = tmp_path / "lock", tmp_path / "fails"
    script = tmp_path / "excl.sh"
    script.write_text(
        f"#!/bin/sh\nexec 9>>{lock}\n"
        f'if ! flock -n 9; then echo "OVERLAP run=$ORCH_RUN" >> {fails}; exit 0; fi\n'
        f"{helper.format(lock=lock)}\n"
    )
    script.chmod(0o755)
    (tmp_path / "in").mkdir()
    for i in range(items):
        (tmp_path / "in" / f"{i}.txt").write_text("x")
    config = tmp_path / "c.toml"
    config.write_text(textwrap.dedent(f"""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["x"]
        settle = "0s"
        [[stages]]
        name = "x"
        command = ["{script}"]
        concurrency = 1
        """))  # fmt: skip
    proc = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["states"] == {"done": items}
    assert not fails.exists(), fails.read_text()
    assert processes_with_env(f"{STATE_MARKER}={tmp_path / 'state'}") == []


def _records_config(tmp_path: Path) -> Path:
    """A batch config: the jsonl source ``r.jsonl`` (ids in ``id``) through one ``true``."""
    config = tmp_path / "c.toml"
    config.write_text(textwrap.dedent("""
        [http]
        listen = false
        [[sources]]
        name = "r"
        type = "jsonl"
        path = "r.jsonl"
        id_field = "id"
        route = ["s"]
        [[stages]]
        name = "s"
        command = ["true"]
        """))  # fmt: skip
    return config


def test_a_record_whose_id_spells_a_rejected_lines_place_is_taken(tmp_path: Path) -> None:
    # Found by an acceptance tester (session 16): a line without a usable id is keyed by its
    # place ("<inode>:<byte>"); a later record whose id was that text was skipped as taken.
    records = tmp_path / "r.jsonl"
    records.write_text('{"no_id": 1}\n')
    records.write_text(
        records.read_text() + json.dumps({"id": f"{records.stat().st_ino}:0"}) + "\n"
    )
    config = _records_config(tmp_path)
    proc = orchestrator("batch", "-c", str(config), "--json", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr  # (the rejected line)
    assert json.loads(proc.stdout)["states"] == {"done": 1, "rejected": 1}


def test_a_record_skipped_for_a_repeated_id_is_named(tmp_path: Path) -> None:
    # Found by an acceptance tester (session 16): "skipped 1 record(s) whose id was taken
    # already" said neither which, so a correction sent under a known id vanished unexplained.
    (tmp_path / "r.jsonl").write_text('{"id": 1, "q": 5}\n{"id": "1", "q": 500}\n')
    config = _records_config(tmp_path)
    proc = orchestrator("batch", "-c", str(config), "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 record(s) whose id was taken already ('1')" in proc.stderr


def test_the_summary_shows_ids_as_items_does_and_show_takes_them_back(tmp_path: Path) -> None:
    # Found by an acceptance tester (session 17): the "dead and rejected items" table printed
    # ids raw -- a file name's escape sequence reached the terminal, a newline split the row,
    # and a rejected line's id wrote its NUL out, so the id shown was not one `show` took.
    # Given: a folder with a newline, an escape sequence and rich markup in its names, and
    # a JSONL source with a line that is rejected (NaN); a stage that always fails.
    (tmp_path / "in").mkdir()
    for name in ("a\nb.txt", "c\x1b[31mred.txt", "[bold]d.txt"):
        (tmp_path / "in" / name).write_text("x")
    (tmp_path / "r.jsonl").write_text('{"id": "r1", "v": NaN}\n')
    config = tmp_path / "c.toml"
    config.write_text(textwrap.dedent("""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["s"]
        settle = "0s"
        [[sources]]
        name = "r"
        type = "jsonl"
        path = "r.jsonl"
        id_field = "id"
        route = ["s"]
        [[stages]]
        name = "s"
        command = ["false"]
        retries = 0
        """))  # fmt: skip

    # When: the batch prints its summary for people.
    proc = orchestrator("batch", "-c", str(config), "--no-progress", cwd=tmp_path)

    # Then: no control character is written; each id is on one row, in the form `items`
    # prints, and `show` takes that form back.
    assert proc.returncode == 1, proc.stderr
    assert "\x1b" not in proc.stdout
    assert "\x00" not in proc.stdout
    rejected = f"'r:\\x00{(tmp_path / 'r.jsonl').stat().st_ino}:0'"
    for shown in ("'in:a\\nb.txt'", "'in:c\\x1b[31mred.txt'", "in:[bold]d.txt", rejected):
        assert shown in proc.stdout, shown
    assert proc.stdout.count("b.txt") == 1  # not also on a row of its own
    detail = orchestrator("show", rejected, "-c", str(config), cwd=tmp_path)
    assert detail.returncode == 0, detail.stderr
