"""The service in-process: retries, shutdown, hostile names -- real processes, real time."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import time
from typing import TYPE_CHECKING, Any

import attrs
import trio
from conftest import PY, left_queued, open_db, pids_alive, processes_with_env
from servicekit import captured_logs, wait_logged

from orchestrator import workers
from orchestrator.store import NewItem
from orchestrator.supervisor import serve
from orchestrator.workers import Engine

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    import pytest

    from orchestrator.config import Config
    from orchestrator.store.records import Item
    from orchestrator.supervisor import ServiceResult

HOSTILE = [
    "with space.txt",
    "quote\"d'.txt",
    "semi;colon.txt",
    "amp&ersand.txt",
    "$(touch PWNED).txt",
    "new\nline.txt",
    "`touch PWNED2`.txt",
]


@attrs.define
class Served:
    """An in-process service started by `serving`: its engine once built, its result once back."""

    engines: list[Engine] = attrs.Factory(list)
    result: ServiceResult | None = None


@contextlib.asynccontextmanager
async def serving(config: Config) -> AsyncIterator[Served]:
    """Run `serve(config)` as a service for the block; the block ends it (a signal) and the
    exit waits for it to return."""
    served = Served()

    async def run_service() -> None:
        served.result = await serve(config, on_start=served.engines.append)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_service)
        yield served


def runs_of(state_dir: Path) -> list[tuple[str, int, float, str]]:
    with open_db(state_dir / "orchestrator.db") as db:
        return db.execute(
            "SELECT i.id, r.attempt, r.started_at, r.outcome FROM runs r"
            " JOIN items i ON i.seq = r.item_seq ORDER BY r.id"
        ).fetchall()


async def test_hostile_file_names_reach_the_stage_as_one_argument_each(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    # Given: files whose names a shell would split, expand or execute.
    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    out.mkdir()
    for name in HOSTILE:
        (inbox / name).write_text(name)
    dump = (
        "import json, os, sys; "
        f"open(os.path.join({str(out)!r}, str(os.getpid())), 'w').write(json.dumps(sys.argv[1:]))"
    )
    config = write_config(
        f"""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["dump"]
        settle = "0s"
        [[stages]]
        name = "dump"
        command = ["{PY}", "-c", "{dump}", "{{path}}", "{{name}}", "--item={{item}}"]
        cwd = "."
        concurrency = 3
        """.replace("{dump}", dump.replace('"', '\\"'))
    )

    # When
    result = await serve(config, batch=True)

    # Then: each stage saw exactly [path, name, --item=id], and nothing was executed.
    assert result.tally.done == len(HOSTILE)
    seen = sorted(json.loads(p.read_text()) for p in out.iterdir())
    expected = sorted([str(inbox / name), name, f"--item=in:{name}"] for name in HOSTILE)
    assert seen == expected
    assert not list(tmp_path.rglob("PWNED*"))


async def test_retries_with_growing_backoff_then_dead(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    # Given: a stage that always fails, three retries, backoff 0.2 s doubling (cap 0.2, 0.4, 0.8).
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a").write_text("a")
    config = write_config(f"""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["flaky"]
        settle = "0s"
        [[stages]]
        name = "flaky"
        command = ["{PY}", "-c", "import sys; print('nope'); sys.exit(2)"]
        retries = 3
        backoff = "200ms"
        backoff_max = "10s"
        """)

    # When
    result = await serve(config, batch=True)

    # Then: four attempts, each gap within its jitter cap, then dead with reason and tail.
    assert result.tally.dead == 1
    assert result.tally.retries == 3
    runs = runs_of(config.state_dir)
    assert [(r[1], r[3]) for r in runs] == [(1, "failed"), (2, "failed"), (3, "failed"),
                                            (4, "failed")]  # fmt: skip
    gaps = [b[2] - a[2] for a, b in itertools.pairwise(runs)]
    for gap, cap in zip(gaps, (0.2, 0.4, 0.8), strict=True):
        assert 0 <= gap <= cap + 0.25, (gaps, cap)
    with open_db(config.state_dir / "orchestrator.db") as db:
        state, reason = db.execute("SELECT state, reason FROM items").fetchone()
    assert state == "dead"
    assert reason == "flaky: exit 2 (after 4 attempts)"


async def test_fatal_exit_code_is_not_retried(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a").write_text("a")
    config = write_config("""
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
        command = ["sh", "-c", "exit 9"]
        retries = 5
        fatal_exit_codes = [9]
        """)
    result = await serve(config, batch=True)
    assert result.tally.dead == 1
    assert len(runs_of(config.state_dir)) == 1


async def test_sigterm_drains_then_cancels_and_requeues_without_spending_an_attempt(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    # Given: a service whose only stage runs far longer than the shutdown grace, and starts a
    # grandchild that ignores SIGTERM.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "slow").write_text("x")
    pidfile = tmp_path / "pids"
    script = (f"(trap '' TERM; sleep 300) & echo $! >> {pidfile}; echo $$ >> {pidfile};"
              " echo working on it; sleep 300")  # fmt: skip
    config = write_config(f"""
        shutdown_grace = "300ms"
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["slow"]
        settle = "0s"
        poll_interval = "50ms"
        [[stages]]
        name = "slow"
        command = ["sh", "-c", "{script}"]
        grace_period = "300ms"
        """)
    # When: SIGTERM arrives while the run is going.
    with trio.fail_after(20):
        async with serving(config) as served:
            while not (pidfile.exists() and len(pidfile.read_text().split()) == 2):
                await trio.sleep(0.02)
            os.kill(os.getpid(), signal.SIGTERM)

    # Then: the service returned, the whole tree is gone, the run is cancelled and the item is
    # queued again with its attempt given back.
    result = served.result
    assert result is not None
    assert result.interrupted
    pids = [int(p) for p in pidfile.read_text().split()]
    assert pids_alive(pids) == []
    assert processes_with_env(f"ORCH_INSTANCE={served.engines[0].instance}") == []
    assert [r[3] for r in runs_of(config.state_dir)] == ["cancelled"]
    with open_db(config.state_dir / "orchestrator.db") as db:
        assert db.execute("SELECT state, attempts FROM items").fetchone() == ("queued", 0)
        # The run keeps how long it ran, its log and its output's end (it had 0 s, no log and
        # no tail, and purge then left its log behind: acceptance, session 15).
        duration, log_path, tail = db.execute(
            "SELECT duration, log_path, tail FROM runs"
        ).fetchone()
    assert duration >= 0.3
    assert log_path is not None
    assert tail == "working on it"


async def test_a_batchs_progress_knows_its_total_before_the_first_item_ends(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    # The progress bar showed "0/?" until the first item had gone through its whole route
    # (acceptance, session 15): with a minutes-long first stage, for minutes.
    (tmp_path / "in").mkdir()
    for i in range(5):
        (tmp_path / "in" / f"f{i}").write_text("x")
    config = write_config(f"""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["slow"]
        settle = "0s"
        [[stages]]
        name = "slow"
        command = ["{PY}", "-c", "import time; time.sleep(0.3)"]
        """)
    seen: list[tuple[int, int]] = []

    def on_start(engine: Engine) -> None:
        engine.on_change = lambda tally: seen.append((tally.admitted, tally.finished))

    result = await serve(config, batch=True, on_start=on_start)
    assert result.tally.done == 5
    assert (5, 0) in seen  # the total was known while nothing had finished
    assert seen[-1] == (5, 5)


async def test_a_file_that_vanishes_fails_its_item_with_a_clear_reason(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    # Given: one item whose file disappears between two stages, one whose file disappears
    # during a run that then fails (and would otherwise be retried).
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "gone-before").write_text("x")
    (tmp_path / "in" / "gone-during").write_text("x")
    config = write_config("""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["first", "second"]
        settle = "0s"
        [[stages]]
        name = "first"
        command = ["sh", "-c", "case $1 in *before) rm -- \\"$1\\";; *) rm -- \\"$1\\"; exit 1;; esac", "sh", "{path}"]
        retries = 5
        [[stages]]
        name = "second"
        command = ["true"]
        """)

    # When
    engines: list[Any] = []
    result = await serve(config, batch=True, on_start=engines.append)

    # Then: both are dead, not retried, each with what happened to its file.
    assert result.tally.dead == 2
    # Both are among the last failures (the status file's), the one that never ran too.
    [engine] = engines
    failures = {e["item"]: e for e in engine.recent_errors}
    assert (failures["in:gone-before"]["outcome"], failures["in:gone-before"]["stage"]) == (
        "not run", "second",
    )  # fmt: skip
    assert failures["in:gone-during"]["outcome"] == "failed"
    with open_db(config.state_dir / "orchestrator.db") as db:
        reasons = dict(db.execute("SELECT id, reason FROM items").fetchall())
        runs = db.execute("SELECT count(*) FROM runs").fetchone()[0]
    before = str(tmp_path / "in" / "gone-before")
    during = str(tmp_path / "in" / "gone-during")
    assert reasons["in:gone-before"] == f"second: source file {before!r} vanished before its run"
    assert reasons["in:gone-during"] == (
        f"first: source file {during!r} was gone when its run ended (exit 1)"
    )
    assert runs == 2


async def test_a_second_sigint_stops_at_once_and_still_kills_the_tree(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    # Given: a service with a long drain grace, running a stage that ignores SIGTERM.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "slow").write_text("x")
    pidfile = tmp_path / "pid"
    config = write_config(f"""
        shutdown_grace = "60s"
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["slow"]
        settle = "0s"
        poll_interval = "50ms"
        [[stages]]
        name = "slow"
        command = ["sh", "-c", "trap '' TERM; echo $$ > {pidfile}; sleep 300"]
        grace_period = "30s"
        """)
    # When: SIGINT twice.
    with trio.fail_after(20):
        async with serving(config) as served:
            while not (pidfile.exists() and pidfile.read_text().strip()):
                await trio.sleep(0.02)
            t0 = trio.current_time()
            os.kill(os.getpid(), signal.SIGINT)
            await trio.sleep(0.2)
            os.kill(os.getpid(), signal.SIGINT)
    elapsed = trio.current_time() - t0
    result = served.result

    # Then: it waited neither the 60 s drain nor the run's 30 s grace_period: "stop now" kills
    # the runs at once (it waited their grace: acceptance, session 15).
    assert elapsed < 5
    assert result is not None
    assert result.interrupted
    assert pids_alive([int(pidfile.read_text())]) == []
    # Recorded as cancelled, whichever came first -- the cancellation or the leader's death by
    # our SIGKILL (CI once saw the run left unrecorded) -- and the attempt given back.
    assert [r[3] for r in runs_of(config.state_dir)] == ["cancelled"]
    with open_db(config.state_dir / "orchestrator.db") as db:
        assert db.execute("SELECT state, attempts FROM items").fetchone() == ("queued", 0)


async def test_a_service_keeps_no_record_per_item_it_took(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    # A batch remembers the seqs it took, for its summary; a service running for months must
    # not: the set grew by every item (about 60 bytes each, for as long as it ran).
    (tmp_path / "in").mkdir()
    for i in range(5):
        (tmp_path / "in" / f"f{i}").write_text(str(i))
    config = write_config("""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["s"]
        settle = "0s"
        poll_interval = "50ms"
        [[stages]]
        name = "s"
        command = ["true"]
        """)
    with trio.fail_after(20):
        async with serving(config) as served:
            while not served.engines or served.engines[0].tally.done < 5:
                await trio.sleep(0.02)
            os.kill(os.getpid(), signal.SIGTERM)
    assert served.result is not None
    [engine] = served.engines
    assert (engine.tally.admitted, engine.tally.done) == (5, 5)
    assert engine.admitted is None
    assert served.result.admitted == frozenset()


async def test_a_backlog_past_the_admission_window_waits_in_the_store_in_order(
    tmp_path: Path, write_config: Callable[[str], Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A backlog larger than what the engine holds in memory: the rest waits in the store, as
    # seqs, and is read back oldest first as room frees -- both a start's pending items and a
    # source's new ones. The stage (one at a time) writes down the order it ran them in.
    monkeypatch.setattr(workers, "ADMIT_WINDOW", 10)
    held: list[int] = []
    accept = Engine._accept

    def counting_accept(self: Engine, item: Item) -> None:
        accept(self, item)
        held.append(len(self.active))
        assert self.queue_depths()["s"] >= len(self.deferred)

    monkeypatch.setattr(Engine, "_accept", counting_accept)
    left_queued(tmp_path / "state", [NewItem(id=f"old:{i:02d}", source="old", key=str(i),
                                             route=("s",), payload="{}") for i in range(30)])  # fmt: skip
    (tmp_path / "in").mkdir()
    for i in range(60):
        (tmp_path / "in" / f"{i:02d}").write_text("x")
        os.utime(tmp_path / "in" / f"{i:02d}", (1000 + i, 1000 + i))
    config = write_config("""
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
        command = ["sh", "-c", 'echo "$1" >> order.txt', "sh", "{item}"]
        cwd = "."
        concurrency = 1
        """)
    engines: list[Engine] = []
    with trio.fail_after(60):
        result = await serve(config, batch=True, on_start=engines.append)

    assert (result.tally.admitted, result.tally.done) == (90, 90)
    expected = [f"old:{i:02d}" for i in range(30)] + [f"in:{i:02d}" for i in range(60)]
    assert (tmp_path / "order.txt").read_text().split() == expected
    assert len(held) == 90
    assert max(held) <= 10
    assert engines[0].deferred == {}


async def test_items_waiting_out_a_retry_delay_do_not_hold_fresh_ones_back(
    tmp_path: Path, write_config: Callable[[str], Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Three items wait for their retry's delay (2 s) and fill a window of 3: the new files
    # must still run at once, not after the delay.
    monkeypatch.setattr(workers, "ADMIT_WINDOW", 3)
    left_queued(tmp_path / "state", [NewItem(id=f"old:{i}", source="old", key=str(i),
                                             route=("s",), payload="{}") for i in range(3)])  # fmt: skip
    wake = time.time() + 2
    with open_db(tmp_path / "state" / "orchestrator.db") as db:
        db.execute("UPDATE items SET state = 'retry_wait', attempts = 1, not_before = ?", (wake,))
    (tmp_path / "in").mkdir()
    for i in range(5):
        (tmp_path / "in" / f"{i}").write_text("x")
    config = write_config("""
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
        command = ["true"]
        concurrency = 1
        """)
    with trio.fail_after(30):
        result = await serve(config, batch=True)

    assert result.tally.done == 8
    started = {item: at for item, _, at, _ in runs_of(config.state_dir)}
    assert all(started[f"in:{i}"] < wake for i in range(5)), (started, wake)
    assert all(started[f"old:{i}"] >= wake for i in range(3)), (started, wake)


async def test_a_second_sigterm_while_draining_is_logged_and_the_drain_goes_on(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    # Found by an acceptance tester (session 16): a second SIGTERM (GNU timeout sends two)
    # was taken without a word.
    # Given: a service running a stage that takes a moment, with time to finish it.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a").write_text("x")
    started = tmp_path / "started"
    config = write_config(f"""
        shutdown_grace = "30s"
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["slow"]
        settle = "0s"
        poll_interval = "50ms"
        [[stages]]
        name = "slow"
        command = ["sh", "-c", "touch {started}; sleep 0.5"]
        """)
    # When: SIGTERM twice while the run goes on.
    with captured_logs("WARNING") as lines, trio.fail_after(20):
        async with serving(config) as served:
            while not started.exists():
                await trio.sleep(0.02)
            os.kill(os.getpid(), signal.SIGTERM)
            await wait_logged(lines, "SIGTERM: draining")
            os.kill(os.getpid(), signal.SIGTERM)
            await wait_logged(lines, "SIGTERM: already stopping", timeout=5)

    # Then: the second is said, and changes nothing: the run finished, not stopped at once.
    assert served.result is not None
    assert served.result.interrupted
    assert [r[3] for r in runs_of(config.state_dir)] == ["ok"]
    # (The bound context after the message depends on what ran before in this process.)
    said = [line for line in lines if "already stopping" in line]
    assert [line.partition(" {")[0] for line in said] == [
        "WARNING SIGTERM: already stopping (a second SIGINT stops at once)"
    ]
