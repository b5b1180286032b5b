"""The operator commands (items, show, requeue, status) against a real SQLite file.

The store is built with the same ``op_*`` functions the service uses; the commands run in-process
through ``main([...])``, and in a subprocess where another process or a signal is the point.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import sqlite3
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest
from conftest import fill

from orchestrator.cli import (
    EXIT_CONFIG,
    EXIT_CRITICAL,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_STORE,
    EXIT_UNKNOWN,
    EXIT_USAGE,
    main,
)
from orchestrator.instance import acquire_instance_lock
from orchestrator.runner import Outcome, RunResult
from orchestrator.store import ItemState, NewItem, Transition, connect
from orchestrator.store.sqlite import (
    op_finish_run,
    op_get_item,
    op_ingest,
    op_item_events,
    op_start_run,
)

if TYPE_CHECKING:
    from pathlib import Path

ROUTE = ("extract", "convert")
#: An id that is a newline, a command substitution and rich markup at once: shown, never obeyed.
WEIRD = "in:we ird\n$(touch x) [red]y[/]"
#: Output a stage might print: an escape sequence that must not reach the terminal raw.
TAIL = "starting\nboom: \x1b[31mred\x1b[0m\n"

CONFIG = """
    state_dir = "state"
    [pools]
    gpu = 1
    [http]
    listen = false
    [[sources]]
    name = "in"
    type = "directory"
    path = "in"
    route = ["extract", "convert"]
    [[stages]]
    name = "extract"
    command = ["true"]
    [[stages]]
    name = "convert"
    command = ["true"]
    concurrency = 2
    pools = ["gpu"]
"""


def new(key: str, item_id: str | None = None, **kw: Any) -> NewItem:
    return NewItem(id=item_id or f"in:{key}", source="in", key=key, route=ROUTE,
                   path=f"/inbox/{key}", **kw)  # fmt: skip


def ok() -> RunResult:
    return RunResult(outcome=Outcome.OK, exit_code=0, signal=None, pid=101, duration=0.25,
                     tail="fine\n", reason="exit 0")  # fmt: skip


def failed(code: int) -> RunResult:
    return RunResult(outcome=Outcome.FAILED, exit_code=code, signal=None, pid=102, duration=1.5,
                     tail=TAIL, reason=f"exit {code}")  # fmt: skip


def run_once(
    conn: sqlite3.Connection, item_id: str, stage: str, result: RunResult | None,
    transition: Transition | None = None,
) -> None:  # fmt: skip
    item = op_get_item(conn, item_id)
    claim = op_start_run(conn, item, stage, 0.5, "inst")
    assert claim is not None
    if result is not None and transition is not None:
        op_finish_run(conn, run_id=claim[0], item=item, result=result, transition=transition,
                      log_path=f"/state/runs/{claim[0]}.log")  # fmt: skip


def build_store(db: Path) -> None:
    """in:a.txt done; in:b.txt dead at extract; in:c.txt queued; WEIRD dead at convert;
    in:d.txt running at extract (its run open); in:bad.json rejected."""
    conn = connect(db)
    try:
        op_ingest(conn, [new("a.txt"), new("b.txt"), new("c.txt"), new("w", WEIRD), new("d.txt")])
        op_ingest(conn, [new("bad.json", state=ItemState.REJECTED, reason="not JSON")])
        run_once(conn, "in:a.txt", "extract", ok(),
                 Transition(state=ItemState.QUEUED, stage_index=1, attempts=0))  # fmt: skip
        run_once(conn, "in:a.txt", "convert", ok(),
                 Transition(state=ItemState.DONE, stage_index=2, attempts=0))  # fmt: skip
        run_once(conn, "in:b.txt", "extract", failed(3),
                 Transition(state=ItemState.DEAD, stage_index=0, attempts=1, reason="exit 3"))  # fmt: skip
        run_once(conn, WEIRD, "extract", ok(),
                 Transition(state=ItemState.QUEUED, stage_index=1, attempts=0))  # fmt: skip
        run_once(conn, WEIRD, "convert", failed(1),
                 Transition(state=ItemState.DEAD, stage_index=1, attempts=1, reason="exit 1"))  # fmt: skip
        run_once(conn, "in:d.txt", "extract", None)
    finally:
        conn.close()


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A config whose state folder holds the store `build_store` describes."""
    monkeypatch.setenv("COLUMNS", "200")  # rich tables unwrapped, so lines can be matched
    path = tmp_path / "orchestrator.toml"
    path.write_text(textwrap.dedent(CONFIG))
    build_store(tmp_path / "state" / "orchestrator.db")
    return path


def cli_json(capsys: pytest.CaptureFixture[str], *args: str, code: int = EXIT_OK) -> Any:
    capsys.readouterr()
    assert main(list(args)) == code
    return json.loads(capsys.readouterr().out)


def orchestrator(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, check=False)  # fmt: skip


# --- items -----------------------------------------------------------------------------------


def test_reading_commands_work_while_the_config_on_disk_has_errors(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Found by an acceptance tester (session 15): with the config half edited (the running
    # service keeps the one it started with), items, show, status and health exited 2 or 3 --
    # exactly when an operator wants to look.
    config.write_text(config.read_text().replace('name = "extract"',
                                                 'name = "extract"\nconcurrency = "many"'))  # fmt: skip
    assert main(["check", "-c", str(config)]) == EXIT_CONFIG
    capsys.readouterr()
    listed = cli_json(capsys, "items", "-c", str(config), "--json")
    assert WEIRD in [item["id"] for item in listed]
    assert cli_json(capsys, "show", WEIRD, "-c", str(config), "--json")["item"]["id"] == WEIRD
    status = cli_json(capsys, "status", "-c", str(config), "--json")
    assert "extract" in status["stages"]
    main(["items", "-c", str(config)])
    err = capsys.readouterr().err
    assert "warning: 1 error (see `orchestrator check" in err
    assert "reading the state at" in err
    # health judges the status file (none here: critical, not "unknown")
    assert main(["health", "-c", str(config)]) == EXIT_CRITICAL
    # An unfinished line (not TOML yet) below the state's keys: read what is above it.
    good = config.read_text()
    config.write_text(good + '[[stages]]\nname = "new"\ncommand = ["./x",\n')
    assert main(["items", "-c", str(config)]) == EXIT_OK
    assert "warning: 1 error" in capsys.readouterr().err
    # ... but not when a key that says where the state is comes after it: not guessed.
    config.write_text(good.replace('state_dir = "state"', "") + 'x = [\nstate_dir = "state"\n')
    assert main(["items", "-c", str(config)]) == EXIT_CONFIG
    capsys.readouterr()
    # A config whose state keys themselves are wrong still stops them, with its errors.
    config.write_text(good.replace('state_dir = "state"', "state_dir = 5"))
    assert main(["items", "-c", str(config)]) == EXIT_CONFIG
    assert "state_dir" in capsys.readouterr().err


def test_items_json_lists_every_item_with_its_current_stage(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = cli_json(capsys, "items", "-c", str(config), "--json")
    by_id = {r["id"]: r for r in rows}
    assert list(by_id) == ["in:a.txt", "in:b.txt", "in:c.txt", WEIRD, "in:d.txt", "in:bad.json"]
    assert {
        k: by_id["in:b.txt"][k] for k in ("source", "state", "stage", "attempts", "reason")
    } == {"source": "in", "state": "dead", "stage": "extract", "attempts": 1, "reason": "exit 3"}
    assert (by_id[WEIRD]["state"], by_id[WEIRD]["stage"]) == ("dead", "convert")
    assert (by_id["in:a.txt"]["state"], by_id["in:a.txt"]["stage"]) == ("done", None)
    assert (by_id["in:bad.json"]["state"], by_id["in:bad.json"]["stage"]) == ("rejected", None)
    assert by_id["in:d.txt"]["state"] == "running"
    for key in ("seq", "key", "path", "interruptions", "created_at", "updated_at", "not_before"):
        assert key in by_id["in:c.txt"]


def test_items_filters_by_state_stage_and_limit(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = str(config)
    assert [r["id"] for r in cli_json(capsys, "items", "-c", c, "--json", "--state", "dead")] \
        == ["in:b.txt", WEIRD]  # fmt: skip
    assert [r["id"] for r in cli_json(capsys, "items", "-c", c, "--json", "--state", "dead",
                                      "--stage", "convert")] == [WEIRD]  # fmt: skip
    assert [r["id"] for r in cli_json(capsys, "items", "-c", c, "--json", "--stage", "extract")] \
        == ["in:b.txt", "in:c.txt", "in:d.txt"]  # fmt: skip
    assert len(cli_json(capsys, "items", "-c", c, "--json", "--limit", "2")) == 2


def test_items_unknown_state_or_stage_exits_2_with_the_valid_ones(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["items", "-c", str(config), "--state", "finished"]) == EXIT_USAGE
    assert "unknown state 'finished'; valid states: queued, running, retry_wait, done, dead, " \
           "rejected" in capsys.readouterr().err  # fmt: skip
    assert main(["items", "-c", str(config), "--stage", "ocr"]) == EXIT_USAGE
    assert "unknown stage 'ocr'; stages: extract, convert" in capsys.readouterr().err


def test_items_table_shows_an_id_with_a_newline_escaped(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["items", "-c", str(config)]) == EXIT_OK
    out = capsys.readouterr().out
    # The id is one cell on one line, as its repr; rich markup in it is not interpreted.
    [line] = [line for line in out.splitlines() if "we ird" in line]
    assert repr(WEIRD) in line
    assert "convert" in line
    assert "exit 1" in line
    assert "6 item(s)" in out


def test_the_quoted_id_items_prints_can_be_pasted_into_show_and_requeue(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given: the id as `items` prints it (its repr: the id has a newline).
    shown = repr(WEIRD)
    # When / Then: show finds the item by it, and requeue takes it.
    assert main(["show", shown, "-c", str(config), "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["item"]["id"] == WEIRD
    assert main(["requeue", shown, "-c", str(config), "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["requeued"] == [WEIRD]
    # A quoted text that names no item is still "no such item", as itself.
    assert main(["show", "'in:nothing\\n'", "-c", str(config)]) == EXIT_FAILED


def test_items_piped_keeps_each_row_on_one_line_however_long(
    config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Into a pipe with no $COLUMNS, an 80-column layout cut ids in two: grep missed them
    monkeypatch.delenv("COLUMNS")
    long_id = "in:" + "a-rather-long-file-name-" * 5 + ".txt"
    conn = connect(config.parent / "state" / "orchestrator.db")
    try:
        op_ingest(conn, [new(long_id.removeprefix("in:"))])
    finally:
        conn.close()
    assert main(["items", "-c", str(config)]) == EXIT_OK
    [line] = [line for line in capsys.readouterr().out.splitlines() if long_id in line]
    assert "queued" in line


def test_commands_without_a_store_exit_3_and_create_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "orchestrator.toml"
    config.write_text(textwrap.dedent(CONFIG))
    for args in (["items"], ["show", "in:a.txt"], ["status"], ["requeue", "--dead"]):
        assert main([*args, "-c", str(config)]) == EXIT_STORE, args
        err = capsys.readouterr().err
        assert f"no store at '{tmp_path / 'state' / 'orchestrator.db'}'; has the service run " \
               "yet?" in err  # fmt: skip
    assert not (tmp_path / "state").exists()


def test_reading_commands_read_a_store_on_a_full_disk_and_say_the_disk_is_full(
    disk: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Found by an acceptance tester (session 17): once the service had stopped (no WAL left), a
    # full state disk made items, show and status fail with "disk I/O error" (a read-only
    # connection must make the WAL's files), naming a broken disk rather than a full one.
    # Given: a store whose WAL is gone, on a disk then filled up
    config = tmp_path / "orchestrator.toml"
    config.write_text(textwrap.dedent(CONFIG).replace('"state"', f'"{disk / "state"}"'))
    build_store(disk / "state" / "orchestrator.db")
    assert not (disk / "state" / "orchestrator.db-wal").exists()
    fill(disk)

    # When: each reading command reads it
    rows = cli_json(capsys, "items", "-c", str(config), "--json")
    shown = cli_json(capsys, "show", "-c", str(config), "in:a.txt", "--json")
    counts = cli_json(capsys, "status", "-c", str(config), "--json")

    # Then: each works, and says why it reads the store so, and what holds the disk
    assert len(rows) == 6
    assert shown["item"]["state"] == "done"
    assert counts["stages"]["extract"]["dead"] == 1
    assert main(["items", "-c", str(config)]) == EXIT_OK
    err = capsys.readouterr().err
    assert err.startswith(f"warning: the file system of the state folder '{disk / 'state'}' is "
                          "full (0 B free): run logs (runs/) take 0 B")  # fmt: skip
    assert err.rstrip().endswith("the store is read as it is on disk (its WAL is empty)")


@pytest.mark.parametrize("command", ["batch", "run"])
def test_a_state_dir_that_cannot_be_a_folder_is_a_clear_error_exit_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    # Found in session 6: a traceback and exit 1 instead.
    (tmp_path / "in").mkdir()
    (tmp_path / "blocker").write_text("a file where the state folder should go")
    config = tmp_path / "c.toml"
    config.write_text(
        textwrap.dedent("""
        state_dir = "blocker/state"
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["s"]
        [[stages]]
        name = "s"
        command = ["true"]
        """)
    )
    assert main([command, "-c", str(config)]) == EXIT_STORE
    err = capsys.readouterr().err
    assert f"cannot use the state folder '{tmp_path / 'blocker' / 'state'}'" in err
    assert "is a file" in err
    assert "Traceback" not in err


# --- show ------------------------------------------------------------------------------------


def test_show_json_has_the_item_its_runs_and_events(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = cli_json(capsys, "show", WEIRD, "-c", str(config), "--json")
    assert data["item"]["id"] == WEIRD
    assert (data["item"]["state"], data["item"]["stage"], data["item"]["route"]) \
        == ("dead", "convert", ["extract", "convert"])  # fmt: skip
    assert [(r["stage"], r["outcome"], r["exit_code"]) for r in data["runs"]] \
        == [("extract", "ok", 0), ("convert", "failed", 1)]  # fmt: skip
    last = data["runs"][-1]
    assert (last["tail"], last["slot_wait"], last["duration"], last["pid"]) == (TAIL, 0.5, 1.5, 102)
    assert last["log_path"] == f"/state/runs/{last['id']}.log"
    assert [(e["event"], e["stage"], e["state"]) for e in data["events"]] == [
        ("ingested", "extract", "queued"),
        ("started", "extract", "running"),
        ("ok", "convert", "queued"),
        ("started", "convert", "running"),
        ("failed", "convert", "dead"),
    ]


def test_show_for_people_indents_the_tail_and_escapes_control_characters(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["show", "in:b.txt", "-c", str(config)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "\x1b" not in out  # the program's escape sequence is shown, not sent
    assert "      boom: \\x1b[31mred\\x1b[0m" in out
    assert "      starting" in out
    assert "failed" in out
    assert "exit 3" in out
    assert "slot wait 0.50s" in out
    assert "log: /state/runs/3.log" in out
    assert "events (3)" in out
    assert "ingested" in out
    assert "started" in out


def test_show_unknown_item_exits_1(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "in:nope", "-c", str(config)]) == EXIT_FAILED
    assert "no item 'in:nope' in the store" in capsys.readouterr().err


# --- requeue ---------------------------------------------------------------------------------


def test_requeue_puts_a_dead_item_back_at_its_stage_with_fresh_attempts(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["requeue", WEIRD, "-c", str(config)]) == EXIT_OK
    assert "1 item requeued" in capsys.readouterr().out
    conn = connect(config.parent / "state" / "orchestrator.db", create=False)
    item = op_get_item(conn, WEIRD)
    assert (item.state, item.stage, item.attempts, item.interruptions, item.reason,
            item.not_before) == (ItemState.QUEUED, "convert", 0, 0, None, None)  # fmt: skip
    last = op_item_events(conn, item.seq)[-1]
    assert (last.event, last.stage, last.state, last.detail) \
        == ("requeued", "convert", "queued", "exit 1")  # fmt: skip
    # The other dead item was not touched.
    assert op_get_item(conn, "in:b.txt").state is ItemState.DEAD


def test_requeue_dead_takes_every_dead_item_or_those_of_one_stage(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = str(config)
    assert cli_json(capsys, "requeue", "--dead", "--stage", "extract", "-c", c, "--json") \
        == {"requeued": ["in:b.txt"], "skipped": []}  # fmt: skip
    assert cli_json(capsys, "requeue", "--dead", "-c", c, "--json") \
        == {"requeued": [WEIRD], "skipped": []}  # fmt: skip
    assert cli_json(capsys, "items", "-c", c, "--json", "--state", "dead") == []
    queued = cli_json(capsys, "items", "-c", c, "--json", "--state", "queued")
    assert {(r["id"], r["stage"], r["attempts"]) for r in queued} \
        == {("in:b.txt", "extract", 0), ("in:c.txt", "extract", 0), (WEIRD, "convert", 0)}  # fmt: skip


def test_requeue_skips_what_is_not_dead_and_exits_1(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = str(config)
    report = cli_json(capsys, "requeue", "in:a.txt", "in:b.txt", "in:bad.json", "in:nope",
                      "in:b.txt", "-c", c, "--json", code=EXIT_FAILED)  # fmt: skip
    assert report["requeued"] == ["in:b.txt"]
    assert [s["id"] for s in report["skipped"]] == ["in:a.txt", "in:bad.json", "in:nope"]
    assert report["skipped"][0]["reason"] == "'in:a.txt' is done, not dead; not requeued"
    assert "rejected" in report["skipped"][1]["reason"]
    assert "no item 'in:nope'" in report["skipped"][2]["reason"]
    # For people: every refusal on stderr, the count on stdout.
    assert main(["requeue", "in:c.txt", "-c", c]) == EXIT_FAILED
    out, err = capsys.readouterr()
    assert "'in:c.txt' is queued, not dead; not requeued" in err
    assert "0 items requeued" in out


def test_requeue_needs_items_or_dead(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["requeue", "-c", str(config)]) == EXIT_USAGE
    assert "--dead" in capsys.readouterr().err
    assert main(["requeue", "in:b.txt", "--dead", "-c", str(config)]) == EXIT_USAGE
    assert main(["requeue", "in:b.txt", "--stage", "extract", "-c", str(config)]) == EXIT_USAGE


def test_requeue_skips_an_item_whose_stage_left_the_config(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given: the config no longer has the stage WEIRD died at (no worker could take it).
    smaller = config.parent / "smaller.toml"
    smaller.write_text('state_dir = "state"\n[[stages]]\nname = "extract"\ncommand = ["true"]\n')
    report = cli_json(capsys, "requeue", "--dead", "-c", str(smaller), "--json", code=EXIT_FAILED)
    assert report["requeued"] == ["in:b.txt"]
    assert report["skipped"] == [{"id": WEIRD, "reason": f"{WEIRD!r} died at stage 'convert', "
                                  "which is not in the config; not requeued (--to puts it at a "
                                  "stage of its source's route)"}]  # fmt: skip


def test_requeue_to_an_earlier_stage_redoes_it(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # When: the item that died at convert is sent back to extract (its input was at fault).
    assert cli_json(capsys, "requeue", WEIRD, "--to", "extract", "-c", str(config), "--json") \
        == {"requeued": [WEIRD], "skipped": []}  # fmt: skip
    conn = connect(config.parent / "state" / "orchestrator.db", create=False)
    item = op_get_item(conn, WEIRD)
    # Then: it waits at extract with fresh attempts, and its history says where it came from.
    assert (item.state, item.stage, item.route, item.attempts, item.reason) \
        == (ItemState.QUEUED, "extract", ROUTE, 0, None)  # fmt: skip
    last = op_item_events(conn, item.seq)[-1]
    assert (last.event, last.stage, last.state, last.detail) \
        == ("requeued", "extract", "queued", "from stage 'convert': exit 1")  # fmt: skip


RENAMED = CONFIG.replace('"convert"', '"convert2"')


def test_items_at_a_renamed_stage_are_listed_and_moved_with_stage_and_to(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given: in:c.txt waits at convert (extract done), WEIRD died there; then the config
    # renames convert to convert2. Those items are at a stage no worker of it can take.
    db = config.parent / "state" / "orchestrator.db"
    conn = connect(db, create=False)
    run_once(conn, "in:c.txt", "extract", ok(),
             Transition(state=ItemState.QUEUED, stage_index=1, attempts=0))  # fmt: skip
    conn.close()
    renamed = config.parent / "renamed.toml"
    renamed.write_text(textwrap.dedent(RENAMED))
    c = str(renamed)
    # Then: they can still be found by the old stage's name ...
    at_old = cli_json(capsys, "items", "-c", c, "--json", "--stage", "convert")
    assert [(r["id"], r["state"]) for r in at_old] == [("in:c.txt", "queued"), (WEIRD, "dead")]
    # (none of them retry-waiting there: an empty list, not "unknown stage")
    assert cli_json(capsys, "items", "-c", c, "--json", "--stage", "convert", "--state",
                    "retry_wait") == []  # fmt: skip
    # ... and moved, dead or waiting, to the new one, on the source's route as it is now.
    assert cli_json(capsys, "requeue", "--stage", "convert", "--to", "convert2", "-c", c,
                    "--json") == {"requeued": ["in:c.txt", WEIRD], "skipped": []}  # fmt: skip
    conn = connect(db, create=False)
    for item_id in ("in:c.txt", WEIRD):
        item = op_get_item(conn, item_id)
        assert (item.state, item.route, item.stage, item.attempts) \
            == (ItemState.QUEUED, ("extract", "convert2"), "convert2", 0)  # fmt: skip
    assert op_get_item(conn, "in:b.txt").state is ItemState.DEAD  # dead elsewhere: untouched
    # Nothing is left at the old name, which is now unknown again.
    assert main(["items", "-c", c, "--stage", "convert"]) == EXIT_USAGE
    assert "unknown stage 'convert'; stages: extract, convert2" in capsys.readouterr().err


def test_requeue_to_refuses_what_it_cannot_move_and_says_why(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = str(config)
    report = cli_json(capsys, "requeue", "in:a.txt", "in:c.txt", "in:d.txt", "in:bad.json",
                      "in:b.txt", "--to", "convert", "-c", c, "--json", code=EXIT_FAILED)  # fmt: skip
    assert report["requeued"] == ["in:b.txt"]
    assert {s["id"]: s["reason"] for s in report["skipped"]} == {
        "in:a.txt": "'in:a.txt' is done, not dead; not requeued",
        "in:c.txt": "'in:c.txt' is queued at stage 'extract', which is in the config: it runs "
                    "there; not requeued",
        "in:d.txt": "'in:d.txt' is running, not dead; not requeued",
        "in:bad.json": "'in:bad.json' is rejected, not dead; rejected items are kept as evidence "
                       "and never requeued",
    }  # fmt: skip
    # A source the config no longer has, or a stage not on its source's route: left alone.
    other = config.parent / "other.toml"
    other.write_text(textwrap.dedent(CONFIG.replace('name = "in"', 'name = "elsewhere"')))
    report = cli_json(capsys, "requeue", WEIRD, "--to", "extract", "-c", str(other), "--json",
                      code=EXIT_FAILED)  # fmt: skip
    assert report["skipped"] == [{"id": WEIRD, "reason": f"{WEIRD!r} comes from source 'in', "
                                  "which is not in the config; not requeued"}]  # fmt: skip
    shorter = config.parent / "shorter.toml"
    shorter.write_text(textwrap.dedent(CONFIG.replace('route = ["extract", "convert"]',
                                                      'route = ["convert"]')))  # fmt: skip
    report = cli_json(capsys, "requeue", WEIRD, "--to", "extract", "-c", str(shorter), "--json",
                      code=EXIT_FAILED)  # fmt: skip
    assert report["skipped"] == [{"id": WEIRD, "reason": f"stage 'extract' is not on the route "
                                  f"of {WEIRD!r}'s source 'in' (convert); not requeued"}]  # fmt: skip
    assert op_get_item(connect(config.parent / "state" / "orchestrator.db", create=False),
                       WEIRD).state is ItemState.DEAD  # fmt: skip
    # Wrong command lines: an unknown --to, --stage with ids, --stage alone.
    assert main(["requeue", WEIRD, "--to", "ocr", "-c", c]) == EXIT_USAGE
    assert "unknown stage 'ocr' for --to; stages: extract, convert" in capsys.readouterr().err
    assert main(["requeue", WEIRD, "--stage", "convert", "--to", "extract", "-c", c]) == EXIT_USAGE
    assert main(["requeue", "--stage", "convert", "-c", c]) == EXIT_USAGE


def test_requeue_waits_for_the_writer_of_the_moment(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given: a service holds the instance lock, and its connection the write lock for 0.5 s.
    lock = acquire_instance_lock(config.parent / "state")
    db = config.parent / "state" / "orchestrator.db"
    writer = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    writer.execute("BEGIN IMMEDIATE")
    threading.Timer(0.5, lambda: writer.execute("COMMIT")).start()
    # When: requeue runs meanwhile. Then: it waited (busy timeout) and committed after it.
    t0 = time.monotonic()
    try:
        assert main(["requeue", "in:b.txt", "-c", str(config)]) == EXIT_OK
    finally:
        lock.release()
    assert time.monotonic() - t0 >= 0.4
    writer.close()
    assert op_get_item(connect(db, create=False), "in:b.txt").state is ItemState.QUEUED


# --- status ----------------------------------------------------------------------------------


def test_status_json_counts_per_stage_running_runs_and_failures(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = cli_json(capsys, "status", "-c", str(config), "--json")
    assert list(data["stages"]) == ["extract", "convert"]
    assert data["stages"]["extract"] \
        == {"queued": 1, "running": 1, "retry_wait": 0, "done": 0, "dead": 1}  # fmt: skip
    assert data["stages"]["convert"] \
        == {"queued": 0, "running": 0, "retry_wait": 0, "done": 1, "dead": 1}  # fmt: skip
    assert data["rejected"] == 1
    [running] = data["running"]
    assert (running["item"], running["stage"], running["attempt"]) == ("in:d.txt", "extract", 1)
    assert 0 <= running["age"] < 60
    assert [(f["item"], f["stage"], f["outcome"], f["reason"]) for f in data["recent_failures"]] \
        == [(WEIRD, "convert", "failed", "exit 1"), ("in:b.txt", "extract", "failed", "exit 3")]  # fmt: skip
    assert data["service"] is None


def test_status_without_a_status_file_says_the_service_is_not_running(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status", "-c", str(config)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "service: not running (no status file)" in out
    assert "rejected items: 1" in out
    assert "in:d.txt" in out
    assert repr(WEIRD) in out


def test_status_shows_slots_holders_and_waiters_from_the_status_file(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given: a status file as the service writes it, naming this (live) process, 3 s old.
    now = time.time()
    doc = {
        "version": "0.1.0", "pid": os.getpid(), "host": os.uname().nodename,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(now - 3)),
        "interval": 10.0, "state": "running",
        "stages": {"extract": {"concurrency": 1, "busy": 1, "waiting": 2, "holders": ["in:d.txt"]},
                   "convert": {"concurrency": 2, "busy": 0, "waiting": 0}},
        "pools": {"gpu": {"size": 1, "busy": 1, "waiting": 3, "holders": [WEIRD]}},
    }  # fmt: skip
    (config.parent / "state" / "status.json").write_text(json.dumps(doc))
    # Then: JSON carries it with the pid's liveness and the file's age ...
    service = cli_json(capsys, "status", "-c", str(config), "--json")["service"]
    assert (service["pid"], service["alive"], service["state"], service["stale"]) \
        == (os.getpid(), True, "running", False)  # fmt: skip
    assert 2 <= service["age"] < 30
    assert service["pools"]["gpu"]["waiting"] == 3
    # ... and people see busy/total, waiters and holders per stage and pool.
    assert main(["status", "-c", str(config)]) == EXIT_OK
    out = capsys.readouterr().out
    assert f"pid {os.getpid()}" in out
    assert "(alive)" in out
    [extract] = [line for line in out.splitlines() if line.lstrip("│ ").startswith("extract")]
    assert "1/1" in extract
    assert " 2 " in extract
    assert "in:d.txt" in extract
    [gpu] = [line for line in out.splitlines() if line.lstrip("│ ").startswith("gpu")]
    assert "1/1" in gpu
    assert " 3 " in gpu
    assert repr(WEIRD) in gpu
    # A service still starting says what its start-up is doing.
    doc.update(state="starting", phase="ending the processes a dead instance left running")
    (config.parent / "state" / "status.json").write_text(json.dumps(doc))
    service = cli_json(capsys, "status", "-c", str(config), "--json")["service"]
    assert service["phase"] == "ending the processes a dead instance left running"
    assert main(["status", "-c", str(config)]) == EXIT_OK
    assert "starting (ending the processes a dead instance left running)" in capsys.readouterr().out


def test_status_reports_a_dead_service_and_an_unreadable_file(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status_file = config.parent / "state" / "status.json"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    status_file.write_text(json.dumps({"pid": int(gone.stdout), "updated_unix": time.time() - 100,
                                       "interval": 10}))  # fmt: skip
    service = cli_json(capsys, "status", "-c", str(config), "--json")["service"]
    assert (service["alive"], service["stale"]) == (False, True)
    status_file.write_text('{"pid": 1, "upd')  # a torn file (the service never writes one)
    service = cli_json(capsys, "status", "-c", str(config), "--json")["service"]
    assert "not valid JSON" in service["error"]


# --- beside a running service ----------------------------------------------------------------


def test_readers_work_while_a_writer_holds_the_store_and_see_only_commits(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given: a service holding the instance lock, in the middle of a transaction adding an item.
    lock = acquire_instance_lock(config.parent / "state")
    db = config.parent / "state" / "orchestrator.db"
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")
    writer.execute(
        "INSERT INTO items (id, source, key, route, state, created_at, updated_at)"
        " VALUES ('in:uncommitted', 'in', 'u', '[\"extract\"]', 'queued', 0, 0)"
    )
    try:
        # When: another process lists items, shows one and reads the status.
        items = orchestrator("items", "-c", str(config), "--json", cwd=config.parent)
        show = orchestrator("show", "in:c.txt", "-c", str(config), "--json", cwd=config.parent)
        status = orchestrator("status", "-c", str(config), "--json", cwd=config.parent)
        # Then: all answer at once, without the uncommitted row.
        assert items.returncode == 0, items.stderr
        assert "in:uncommitted" not in [r["id"] for r in json.loads(items.stdout)]
        assert show.returncode == 0, show.stderr
        assert json.loads(show.stdout)["item"]["state"] == "queued"
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["stages"]["extract"]["queued"] == 1
    finally:
        writer.execute("COMMIT")
        writer.close()
        lock.release()
    assert "in:uncommitted" in [r["id"] for r in cli_json(capsys, "items", "-c", str(config),
                                                          "--json")]  # fmt: skip


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
    return seen


def test_status_watch_refreshes_on_a_terminal_and_exits_0_on_sigint(config: Path) -> None:
    # Given: status --watch on a (pseudo) terminal, so rich draws the live view.
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "status", "-c", str(config), "--watch",
         "--interval", "0.2"],
        stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, cwd=config.parent,
    )  # fmt: skip
    os.close(slave)
    try:
        # When: it has drawn a few frames and gets SIGINT (Ctrl+C).
        seen = _read_until(master, b"Ctrl+C to quit", timeout=15)
        assert b"stages" in seen, seen
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        # Then: it leaves quietly with exit 0.
        assert proc.wait(timeout=10) == EXIT_OK
        assert b"Traceback" not in seen + _read_until(master, b"\0", timeout=0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def test_status_watch_into_a_pipe_prints_frame_after_frame(config: Path) -> None:
    # Into a pipe (status --watch | tee) rich's live view drew one frame and then nothing
    # (acceptance, session 15): frames now follow each other.
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "status", "-c", str(config), "--watch",
         "--interval", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=config.parent, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.5)  # start-up, then about ten frames
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    assert proc.returncode == EXIT_OK
    assert out.count("Ctrl+C to quit") >= 3, out


def test_status_watch_json_prints_one_document_per_line_until_sigint(config: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "status", "-c", str(config), "--watch",
         "--json", "--interval", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=config.parent,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = json.loads(proc.stdout.readline())
        second = json.loads(proc.stdout.readline())
        assert first["stages"] == second["stages"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == EXIT_OK
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--watch", "--interval", "nan"],
        ["status", "--watch", "--interval", "inf"],
        ["health", "--watch", "--interval", "nan"],
        ["health", "--watch", "--interval", "1e308"],
        ["items", "--limit", "99999999999999999999999"],
    ],
)
def test_absurd_numbers_on_the_command_line_are_usage_errors(
    config: Path, capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    # Found in session 6: each was a traceback and exit 1 (for `health`, 1 means "warning").
    # `health` says "unknown" (3) for a command line it cannot take, as monitoring plugins do.
    expected = EXIT_UNKNOWN if args[0] == "health" else EXIT_USAGE
    assert main([*args, "-c", str(config)]) == expected
    err = capsys.readouterr().err
    assert "Invalid value for" in err
    assert "Traceback" not in err


def test_a_done_item_shows_no_attempt_count_at_a_stage_it_is_not_at(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Found in session 15: done items showed "0" attempts (attempts count at the current stage,
    # and a done item has none) next to dead ones showing theirs.
    assert main(["items", "-c", str(config)]) == EXIT_OK
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("in:")}  # fmt: skip
    assert rows["in:a.txt"][2:5] == ["done", "-", "-"]
    assert rows["in:b.txt"][2:5] == ["dead", "extract", "1"]
    assert main(["show", "in:a.txt", "-c", str(config)]) == EXIT_OK
    assert re.search(r"attempts\s+-  interruptions 0", capsys.readouterr().out)
    # --json keeps the store's figure.
    assert (
        cli_json(capsys, "show", "in:a.txt", "-c", str(config), "--json")["item"]["attempts"] == 0
    )
