"""Crash safety: kill -9 at random moments loses nothing, reaps orphans, never breaks a limit.

Everything here is observed from the OS: the stage programs take a non-blocking flock for their
whole run (an overlap is recorded by the program that could not get the lock), and /proc is
searched for processes carrying the state folder's marker.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from typing import TYPE_CHECKING

import pytest
from conftest import PROGRAMS, PY, open_db, processes_with_env

if TYPE_CHECKING:
    from pathlib import Path

STAGE = str(PROGRAMS / "locked_stage.py")
#: Kills in the suite's run; `ORCH_SOAK_KILLS=200 pytest tests/test_crash.py` for a longer soak.
KILLS = int(os.environ.get("ORCH_SOAK_KILLS", "20"))
ITEMS = int(os.environ.get("ORCH_SOAK_ITEMS", "100"))


def start(config: Path, log: Path, command: str = "run") -> subprocess.Popen[bytes]:
    with open(log, "ab") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "orchestrator", command, "-c", str(config)],
            cwd=config.parent, stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip


def states(db: Path) -> dict[str, int]:
    try:
        with open_db(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return dict(conn.execute("SELECT state, count(*) FROM items GROUP BY state").fetchall())
    except sqlite3.OperationalError:
        return {}


def write_pipeline(tmp_path: Path, items: int) -> Path:
    locks, inbox = tmp_path / "locks", tmp_path / "in"
    locks.mkdir()
    inbox.mkdir()
    for i in range(items):
        # Every 25th item's extract runs long enough to outlive a killed service.
        slow = i % 25 == 0
        (inbox / f"{'slow' if slow else 'item'} {i:03} $(x).dat").write_text(
            "3" if slow else "0.01"
        )
    record = tmp_path / "record.txt"

    def stage(name: str, limit: int, seconds: str) -> str:
        return textwrap.dedent(f"""
            [[stages]]
            name = "{name}"
            command = ["{PY}", "{STAGE}", "{locks}", "{limit}", "{record}", "{seconds}"]
            concurrency = {limit}
            grace_period = "2s"
            """)

    config = tmp_path / "crash.toml"
    config.write_text(
        textwrap.dedent("""
            shutdown_grace = "5s"
            # Random SIGKILLs by an operator are not an item's fault: with the default of 3, an
            # item that happens to be running at three kills would be dead as a poison item.
            # Poison detection has its own test below.
            max_interruptions = 1000
            [http]
            listen = false
            [status]
            interval = "500ms"
            [[sources]]
            name = "in"
            type = "directory"
            path = "in"
            route = ["prep", "extract", "store"]
            settle = "0s"
            poll_interval = "200ms"
            """)
        + stage("prep", 3, "0.01")
        + stage("extract", 1, "@path")
        + stage("store", 3, "0.01")
    )
    return config


@pytest.mark.timeout(150)
def test_kill_9_at_random_moments_loses_nothing_and_never_overlaps(tmp_path: Path) -> None:
    # Given: 100 items through prep(3) -> extract(1) -> store(3); extract sometimes runs 3 s.
    config = write_pipeline(tmp_path, ITEMS)
    db = tmp_path / "state" / "orchestrator.db"
    log = tmp_path / "service.log"
    rng = random.Random(os.environ.get("ORCH_SOAK_SEED", "2"))

    # When: the service is SIGKILLed at random moments, KILLS times, and restarted each time.
    status = tmp_path / "state" / "status.json"
    record = tmp_path / "record.txt"

    def slow_starts() -> int:
        text = record.read_text() if record.exists() else ""
        return sum(1 for ln in text.splitlines() if ln.startswith("start extract") and "slow" in ln)

    for cycle in range(KILLS):
        proc = start(config, log)
        # Once it is working (its status file names it) -- so that a loaded machine's slow
        # start-up cannot turn a kill into a no-op --, kill it at a random moment; every other
        # time, right after a slow extract started, so that its orphan is alive at the restart.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(status.read_text()).get("pid") == proc.pid:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
        if cycle % 2 == 0:
            seen = slow_starts()
            deadline = time.monotonic() + 1.5
            while slow_starts() == seen and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.1)
        else:
            time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    # Then it is left to finish, and stopped with SIGTERM.
    proc = start(config, log)
    deadline = time.monotonic() + 90
    while states(db) != {"done": ITEMS} and time.monotonic() < deadline:
        time.sleep(0.2)
        assert proc.poll() is None, log.read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]

    # Then: every item is done, and reached done exactly once.
    text = log.read_text()
    tail = text[-3000:]  # every assertion below shows it: a rare failure must explain itself
    assert states(db) == {"done": ITEMS}, tail
    with open_db(db) as conn:
        dones = conn.execute(
            "SELECT item_seq, count(*) FROM events WHERE state = 'done' GROUP BY item_seq"
        ).fetchall()
        interrupted = conn.execute(
            "SELECT count(*) FROM runs WHERE outcome = 'interrupted'"
        ).fetchone()[0]
    assert len(dones) == ITEMS, tail
    assert [seq for seq, n in dones if n != 1] == [], tail
    # The exclusive stages never overlapped, judged by the programs' own flock probes -- also
    # an orphan of a killed instance against a run of the next one.
    overlaps = [ln for ln in record.read_text().splitlines() if "OVERLAP" in ln]
    assert overlaps == [], tail
    # The scenario really happened: runs were interrupted, and leftovers were found and ended
    # at restarts.
    assert interrupted > 0, tail
    assert "left running by a dead instance" in text, tail
    # No process of any run survives.
    assert processes_with_env(f"ORCH_STATE={tmp_path / 'state'}") == [], tail


def test_poison_item_is_dead_after_max_interruptions(tmp_path: Path) -> None:
    # Given: a stage that kills the service every time it runs.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "poison").write_text("x")
    config = tmp_path / "p.toml"
    config.write_text(
        textwrap.dedent("""
        max_interruptions = 3
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
        command = ["sh", "-c", "kill -9 $PPID; sleep 5"]
        """)
    )
    log = tmp_path / "log"
    # When: the batch is started again and again.
    codes = []
    for _ in range(4):
        proc = start(config, log, "batch")
        codes.append(proc.wait(timeout=30))
    # Then: three deaths, then the item is dead as a poison item and the batch says so.
    assert codes == [-9, -9, -9, 1]
    with open_db(tmp_path / "state" / "orchestrator.db") as conn:
        state, reason, interruptions = conn.execute(
            "SELECT state, reason, interruptions FROM items"
        ).fetchone()
    assert (state, interruptions) == ("dead", 3)
    assert reason == "poison item: interrupted 3 times at stage 'boom'"
    assert processes_with_env(f"ORCH_STATE={tmp_path / 'state'}") == []


def test_a_run_that_ended_before_its_record_was_written_is_recorded_after_a_crash(
    tmp_path: Path,
) -> None:
    # Found by an acceptance tester (session 17): a run is recorded with the next group commit
    # after its spawn, and its result with a later one. A service killed before either, whose
    # run ended before the next start (most runs are short), left no trace of it: the stage
    # ran again with no word, `show` listed one run, and the run's id was handed out again.
    # Given: a stage of concurrency 1 that writes every run to a ledger of its own; item "a"
    # holds the slot until told to go, "b" waits behind it.
    (tmp_path / "in").mkdir()
    for name in ("a", "b"):
        (tmp_path / "in" / name).write_text("x")
    ledger, go = tmp_path / "ledger", tmp_path / "go"
    script = (
        f'echo "$ORCH_RUN $ORCH_ITEM" >> {ledger}; '
        f'case "$ORCH_ITEM" in *a) while [ ! -e {go} ]; do sleep 0.01; done;; esac'
    )
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
        command = ["sh", "-c", {json.dumps(script)}]
        """))  # fmt: skip
    db = tmp_path / "state" / "orchestrator.db"
    proc = start(config, tmp_path / "log")
    try:
        deadline = time.monotonic() + 20

        def recorded_runs() -> int:
            try:
                with open_db(f"file:{db}?mode=ro", uri=True) as conn:
                    return int(conn.execute("SELECT count(*) FROM runs").fetchone()[0])
            except sqlite3.OperationalError:
                return 0

        while recorded_runs() == 0:  # a's run is recorded
            assert proc.poll() is None
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # When: nothing more can be committed (another process holds the store's write lock);
        # a ends, b runs and ends -- neither is recorded -- and the service is killed.
        with open_db(db, timeout=5) as holder:
            holder.execute("BEGIN IMMEDIATE")
            go.touch()
            while len(ledger.read_text().splitlines()) < 2:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.2)  # b's result is known to the service
            proc.kill()
            proc.wait()
            holder.execute("ROLLBACK")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    before = ledger.read_text().splitlines()
    assert len(before) == 2
    # Then: the next start records both runs; each item runs again and is done. Every run
    # the ledger saw is in the store under its own id, and no id was handed out twice.
    again = start(config, tmp_path / "log", "batch")
    assert again.wait(timeout=60) == 0
    with open_db(db) as conn:
        stored = dict(conn.execute(
            "SELECT runs.id, items.id FROM runs JOIN items ON items.seq = runs.item_seq"
        ).fetchall())  # fmt: skip
        reasons = [r for (r,) in conn.execute("SELECT reason FROM runs WHERE reason IS NOT NULL")]
        interruptions = conn.execute("SELECT sum(interruptions) FROM items").fetchone()
    ran = [line.split(" ", 1) for line in ledger.read_text().splitlines()]
    assert len({int(run) for run, _ in ran}) == 4  # four runs, four ids
    assert {int(run): item for run, item in ran} == stored
    # After an unclean stop, ids go on well past those written down (a failed file system
    # may have lost the journal's last lines).
    assert sorted(stored)[2] > sorted(stored)[1] + 999
    # Both ended by themselves: neither counts toward a poison item.
    assert interruptions == (0,)
    assert len([r for r in reasons if r.startswith("ended by itself (ok, exit code 0,")]) == 2
    assert not (tmp_path / "state" / "journal").exists()  # a clean stop leaves none


def test_second_instance_on_the_same_state_is_refused(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
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
        [[stages]]
        name = "s"
        command = ["true"]
        """)
    )
    first = start(config, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 20
        while not (tmp_path / "state" / "status.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        status = json.loads((tmp_path / "state" / "status.json").read_text())
        assert status["pid"] == first.pid
        second = subprocess.run(
            [sys.executable, "-m", "orchestrator", "run", "-c", str(config)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert second.returncode == 3
        assert "already running" in second.stderr
        assert f"pid {first.pid}" in second.stderr
        # The batch command is refused the same way.
        batch = subprocess.run(
            [sys.executable, "-m", "orchestrator", "batch", "-c", str(config), "--json"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert batch.returncode == 3
        # The operator's commands read the store while the service runs.
        (tmp_path / "in" / "one").write_text("1")
        deadline = time.monotonic() + 20
        items: list[dict[str, object]] = []
        while time.monotonic() < deadline:
            out = subprocess.run(
                [sys.executable, "-m", "orchestrator", "items", "-c", str(config), "--json"],
                capture_output=True, text=True, timeout=30, check=True,
            )  # fmt: skip
            items = json.loads(out.stdout)
            if items and items[0]["state"] == "done":
                break
            time.sleep(0.1)
        assert [(i["id"], i["state"]) for i in items] == [("in:one", "done")]
        for command in (["show", "in:one"], ["status"]):
            out = subprocess.run(
                [sys.executable, "-m", "orchestrator", *command, "-c", str(config), "--json"],
                capture_output=True, text=True, timeout=30, check=True,
            )  # fmt: skip
            assert json.loads(out.stdout)
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=20) == 0
