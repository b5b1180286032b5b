"""``orchestrator purge``: old terminal items go with their runs, events, logs and workdirs;
what is still in a source keeps its item, so a batch after a purge takes nothing again.

Real batches build the store (real runs, real files), then purge runs through ``main([...])``
or in a subprocess beside a running service.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import textwrap
import time
from typing import TYPE_CHECKING, Any

from conftest import open_db
from servicekit import PY, Service, service_config

from orchestrator.cli import EXIT_OK, EXIT_USAGE, main
from orchestrator.config import load_config
from orchestrator.purge import (
    KEPT_ELEMENT,
    KEPT_FILE,
    KEPT_NAME,
    KEPT_NEWEST,
    KEPT_NO_SOURCE,
    KEPT_UNREADABLE,
    purge,
)

if TYPE_CHECKING:
    from pathlib import Path

#: Prints (so each run has a log), writes into its workdir, and fails for inputs named *bad*.
STAGE = """["sh", "-c", "echo ran \\"$1\\"; echo x > \\"$2/w\\"; case \\"$1\\" in *bad*) exit 3;; esac", "sh", "{path}", "{workdir}"]"""


def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    return code, out.getvalue()


def batch(config: Path) -> dict[str, Any]:
    code, out = run_cli("batch", "-c", str(config), "--json", "--no-progress")
    summary: dict[str, Any] = json.loads(out)
    return {"code": code, **summary}


def ids(config: Path) -> list[str]:
    code, out = run_cli("items", "-c", str(config), "--json")
    assert code == EXIT_OK
    return sorted(item["id"] for item in json.loads(out))


def counts(db: Path) -> tuple[int, int, int]:
    with open_db(db) as conn:
        return tuple(  # type: ignore[return-value]
            conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("items", "runs", "events")
        )


def test_purge_keeps_what_is_still_in_a_folder_and_takes_the_rest_with_its_traces(
    tmp_path: Path,
) -> None:
    # Given: one source that moves its files away (one item dead), then one that keeps them
    config = tmp_path / "orchestrator.toml"
    config.write_text(textwrap.dedent(f"""
        state_dir = "state"
        [http]
        listen = false
        [[sources]]
        name = "move"
        type = "directory"
        path = "in_move"
        settle = "0s"
        route = ["s"]
        on_done = "move:done"
        on_dead = "move:failed"
        [[sources]]
        name = "keep"
        type = "directory"
        path = "in_keep"
        settle = "0s"
        route = ["s"]
        [[stages]]
        name = "s"
        command = {STAGE}
        """))  # fmt: skip
    for folder, names in (("in_keep", ["a", "b"]), ("in_move", ["c", "d", "bad e"])):
        (tmp_path / folder).mkdir()
        for name in names:
            (tmp_path / folder / name).write_text(name)
    first = batch(config)
    assert first["states"] == {"done": 4, "dead": 1}
    # the batch's order decides which of them is newest: one more kept file, taken by a second
    # batch, is the newest item and has the newest run, whatever that order was
    (tmp_path / "in_keep" / "z").write_text("z")
    second = batch(config)
    assert second["states"] == {"done": 1}
    state = tmp_path / "state"
    logs_before = sorted(p.name for p in (state / "runs").iterdir())
    assert len(logs_before) == 6
    workdirs = list((state / "work").iterdir())
    assert len(workdirs) == 1  # the dead item's; done items' are removed at once
    before = counts(state / "orchestrator.db")

    # When: a dry run, then the purge
    code, out = run_cli("purge", "-c", str(config), "--older-than", "0s", "--dry-run", "--json")
    assert code == EXIT_OK
    dry = json.loads(out)
    assert (dry["purged"], dry["kept"]) == ({"done": 2, "dead": 1}, {KEPT_FILE: 3})
    assert counts(state / "orchestrator.db") == before
    code, out = run_cli("purge", "-c", str(config), "--older-than", "0s")

    # Then: the moved items are gone with their runs, events, logs and workdir; the kept ones
    # stay whole
    assert code == EXIT_OK
    assert out.splitlines() == [
        "purged 3 items (1 dead, 2 done)",
        "  with 3 run(s), 9 event(s); removed 3 run log(s) and 1 workdir(s)",
        f"kept 3: {KEPT_FILE}",
    ]
    assert ids(config) == ["keep:a", "keep:b", "keep:z"]
    assert counts(state / "orchestrator.db") == (3, 3, before[2] - 9)
    assert len(list((state / "runs").iterdir())) == 3
    assert not workdirs[0].exists()
    assert sorted(os.listdir(tmp_path / "done")) == ["c", "d"]
    assert os.listdir(tmp_path / "failed") == ["bad e"]

    # Then: a batch after it takes nothing again
    again = batch(config)
    assert (again["code"], again["items"]) == (EXIT_OK, 0)
    assert ids(config) == ["keep:a", "keep:b", "keep:z"]


def test_purge_keeps_elements_still_in_the_json_array_and_everything_when_it_cannot_tell(
    tmp_path: Path,
) -> None:
    # Given: three elements taken from a JSON array
    config = tmp_path / "orchestrator.toml"
    config.write_text(textwrap.dedent("""
        state_dir = "state"
        [http]
        listen = false
        [[sources]]
        name = "arr"
        type = "json"
        path = "items.json"
        id_field = "id"
        route = ["s"]
        [[stages]]
        name = "s"
        command = ["true"]
        """))  # fmt: skip
    array = tmp_path / "items.json"
    array.write_text(json.dumps([{"id": 1}, {"id": 2}, {"id": "three"}]))
    assert batch(config)["states"] == {"done": 3}
    cfg = load_config(config)
    db = tmp_path / "state" / "orchestrator.db"

    # When: the file cannot be parsed (a writer mid-rewrite), a purge keeps them all
    array.write_text('[{"id": 1}, {"id"')
    report = purge(db, cfg, older_than=0)
    assert (report.purged, report.kept) == ({}, {KEPT_UNREADABLE: 3})

    # When: the writer keeps only the last element
    array.write_text(json.dumps([{"id": "three"}]))
    report = purge(db, cfg, older_than=0)

    # Then: the others go; a batch takes nothing again, as the file holds only what is kept
    assert (report.purged, report.kept) == ({"done": 2}, {KEPT_ELEMENT: 1})
    assert ids(config) == ["arr:three"]
    assert batch(config)["items"] == 0


def test_purge_goes_by_age_and_state_and_keeps_items_of_unknown_sources(tmp_path: Path) -> None:
    # Given: jsonl records done and one rejected (records before the read position are never
    # read again, so nothing keeps them)
    config = tmp_path / "orchestrator.toml"
    body = """
        state_dir = "state"
        [http]
        listen = false
        [[sources]]
        name = "rec"
        type = "jsonl"
        path = "records.jsonl"
        id_field = "id"
        route = ["s"]
        [[stages]]
        name = "s"
        command = ["true"]
        """
    config.write_text(textwrap.dedent(body))
    (tmp_path / "records.jsonl").write_text('not json\n{"id": 1}\n{"id": 2}\n')
    assert batch(config)["states"] == {"done": 2, "rejected": 1}
    cfg = load_config(config)
    db = tmp_path / "state" / "orchestrator.db"
    now = time.time()

    # Then: nothing is an hour old yet; an hour on, the rejected one goes alone with --state
    assert purge(db, cfg, older_than=3600, now=now).purged == {}
    assert purge(db, cfg, older_than=3600, now=now + 7200, states=["rejected"]).purged == {
        "rejected": 1
    }
    # A config without the source keeps its items: a renamed source would take them again.
    other = tmp_path / "other.toml"
    other.write_text(textwrap.dedent(body.replace('name = "rec"', 'name = "renamed"')))
    report = purge(db, load_config(other), older_than=0)
    assert (report.purged, report.kept) == ({}, {KEPT_NO_SOURCE: 2})
    # The newest item (it also has the newest run) is kept: its number must not be reused.
    report = purge(db, cfg, older_than=0)
    assert (report.purged, report.kept) == ({"done": 1}, {KEPT_NEWEST: 1})
    assert batch(config)["items"] == 0
    with open_db(db) as conn:
        newest_seq, newest_run = conn.execute(
            "SELECT (SELECT max(seq) FROM items), (SELECT max(id) FROM runs)"
        ).fetchone()
    # Then: a record appended later is numbered past every item and run there ever was.
    with open(tmp_path / "records.jsonl", "a") as f:
        f.write('{"id": 3}\n')
    assert batch(config)["states"] == {"done": 1}
    with open_db(db) as conn:
        seq, run = conn.execute(
            "SELECT seq, runs.id FROM items JOIN runs ON item_seq = seq WHERE items.id = 'rec:3'"
        ).fetchone()
    assert (seq, run) == (newest_seq + 1, newest_run + 1)


def test_purge_removes_the_log_of_a_run_that_has_no_recorded_log_path(tmp_path: Path) -> None:
    # A run a dead instance left open (closed "interrupted" at the next start) has a log file
    # but no recorded path; purge left such logs behind (acceptance, session 15).
    config = tmp_path / "orchestrator.toml"
    config.write_text(textwrap.dedent("""
        state_dir = "state"
        [http]
        listen = false
        [[sources]]
        name = "rec"
        type = "jsonl"
        path = "records.jsonl"
        id_field = "id"
        route = ["s"]
        [[stages]]
        name = "s"
        command = ["echo", "some output"]
        """))  # fmt: skip
    (tmp_path / "records.jsonl").write_text('{"id": 1}\n{"id": 2}\n')
    assert batch(config)["states"] == {"done": 2}
    db = tmp_path / "state" / "orchestrator.db"
    with open_db(db) as conn:
        [(first,)] = conn.execute("SELECT min(id) FROM runs").fetchall()
        conn.execute("UPDATE runs SET log_path = NULL WHERE id = ?", (first,))
    log = tmp_path / "state" / "runs" / f"{first}.log"
    assert log.exists()
    report = purge(db, load_config(config), older_than=0)
    assert report.purged == {"done": 1}  # the other is the newest, kept for its number
    assert not log.exists()


def test_purge_takes_a_name_with_a_backslash_and_keeps_one_that_is_not_utf8(
    tmp_path: Path,
) -> None:
    # Found by an acceptance tester (session 17): every name holding a backslash was kept for
    # good as "cannot be checked (not UTF-8)"; only escaped names (behind NUL) are.
    # Given: a file whose name holds a real backslash, done and moved away, and a file whose
    # name is not UTF-8 (rejected, still in the folder); then a newest item, kept for its number
    config = tmp_path / "orchestrator.toml"
    config.write_text(textwrap.dedent("""
        state_dir = "state"
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        settle = "0s"
        route = ["s"]
        on_done = "move:done"
        [[stages]]
        name = "s"
        command = ["true"]
        """))  # fmt: skip
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "back\\slash.txt").write_text("x")
    with open(os.path.join(os.fsencode(tmp_path / "in"), b"bad\xff.txt"), "wb") as f:
        f.write(b"x")
    assert batch(config)["states"] == {"done": 1, "rejected": 1}
    (tmp_path / "in" / "z").write_text("z")
    assert batch(config)["states"] == {"done": 1}

    # When: everything old enough is purged
    report = purge(tmp_path / "state" / "orchestrator.db", load_config(config), older_than=0)

    # Then: the backslash name goes (its file is in done/); the undecodable name stays
    assert report.purged == {"done": 1}
    assert report.kept == {KEPT_NAME: 1, KEPT_NEWEST: 1}
    assert ids(config) == ["in:\x00bad\\xff.txt", "in:z"]


def test_purge_command_line_errors(tmp_path: Path) -> None:
    config = tmp_path / "orchestrator.toml"
    config.write_text('[[stages]]\nname = "s"\ncommand = ["true"]\n')
    assert run_cli("purge", "-c", str(config))[0] == EXIT_USAGE  # --older-than is required
    assert run_cli("purge", "-c", str(config), "--older-than", "soon")[0] == EXIT_USAGE
    code = run_cli("purge", "-c", str(config), "--older-than", "1d", "--state", "queued")[0]
    assert code == EXIT_USAGE


def purge_in_a_process(config: Path) -> int:
    """``orchestrator purge --older-than 0s`` as another process; how many items it purged."""
    out = subprocess.run(
        [PY, "-m", "orchestrator", "purge", "-c", str(config), "--older-than", "0s", "--json"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    return sum(json.loads(out)["purged"].values())


def test_purge_beside_a_running_service_loses_and_repeats_nothing(tmp_path: Path) -> None:
    # Given: a service deleting each file once done; every run appends its input's name to a
    # ledger (the OS's record of what ran, which purge cannot touch)
    ledger = tmp_path / "ledger"
    config = service_config(f"""
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        settle = "0s"
        poll_interval = "0.05s"
        route = ["work"]
        on_done = "delete"
        [[stages]]
        name = "work"
        command = ["sh", "-c", "echo \\"$1\\" >> {ledger}", "sh", "{{name}}"]
        concurrency = 2
        """, listen="false")  # fmt: skip
    service = Service(tmp_path, config)
    names = [f"f{i:03}" for i in range(120)]
    try:
        deadline = time.monotonic() + 15
        while not (tmp_path / "state" / "status.json").exists():
            assert service.proc.poll() is None, service.log
            assert time.monotonic() < deadline, service.log
            time.sleep(0.05)
        # When: files arrive in bursts while purges of everything ended run beside it
        purged = 0
        for start in range(0, len(names), 30):
            for name in names[start : start + 30]:
                (tmp_path / "in" / name).write_text(name)
            purged += purge_in_a_process(service.config_path)
            time.sleep(0.1)
        deadline = time.monotonic() + 30
        while os.listdir(tmp_path / "in") and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # the last deletions' items reach the store
        purged += purge_in_a_process(service.config_path)

        # Then: each file ran exactly once, the service is healthy, and every item was purged
        # but the newest and the one with the newest run (numbers are never reused; at
        # concurrency 2 they may be two items)
        assert sorted(ledger.read_text().split()) == names
        assert service.proc.poll() is None, service.log
        with open_db(tmp_path / "state" / "orchestrator.db") as conn:
            left = {seq for (seq,) in conn.execute("SELECT seq FROM items")}
            newest = set(conn.execute(
                "SELECT (SELECT max(seq) FROM items),"
                " (SELECT item_seq FROM runs ORDER BY id DESC LIMIT 1)"
            ).fetchone())  # fmt: skip
        assert left == newest
        assert purged == len(names) - len(left)
        assert service.status()["state"] == "running"
    finally:
        code = service.stop()
    assert code == 0, service.log
