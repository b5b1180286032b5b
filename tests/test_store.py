"""The SQLite store against a real file: durability rules, group commit, never on the loop."""

from __future__ import annotations

import itertools
import os
import sqlite3
import stat
import threading
import time
from typing import TYPE_CHECKING

import attrs
import pytest
import trio

from orchestrator.errors import StoreUnavailable
from orchestrator.reaper import SeenRun, proc_start_time
from orchestrator.runner import Outcome, RunResult
from orchestrator.sources.ops import Position, op_source_position
from orchestrator.store import ItemState, NewItem, Transition, connect, open_sqlite_store
from orchestrator.store import sqlite as store_module
from orchestrator.store.sqlite import (
    SCHEMA_VERSION,
    Claim,
    Finish,
    SqliteStore,
    _Op,
    op_batch_rows,
    op_get_item,
    op_item_runs,
    op_items_by_seq,
    op_items_changed_since,
    op_pending_index,
    op_recover,
)

if TYPE_CHECKING:
    from pathlib import Path


def new(key: str, route: tuple[str, ...] = ("a", "b")) -> NewItem:
    return NewItem(id=f"src:{key}", source="src", key=key, route=route, path=f"/in/{key}")


def result(outcome: Outcome = Outcome.OK, code: int | None = 0) -> RunResult:
    return RunResult(outcome=outcome, exit_code=code, signal=None, pid=123, duration=0.5,
                     tail="last line", reason="exit 0")  # fmt: skip


async def test_store_work_never_blocks_the_event_loop(tmp_path: Path) -> None:
    # Given: a store whose every statement can be made to block its thread for 0.3 s.
    async with open_sqlite_store(tmp_path / "o.db") as store:
        await store.read(lambda c: c.create_function("slow", 1, lambda s: time.sleep(s) or s))
        threads: list[int] = []
        gaps: list[float] = []

        def slow_op(conn: sqlite3.Connection) -> None:
            threads.append(threading.get_ident())
            conn.execute("SELECT slow(0.3)").fetchone()

        async def heartbeat() -> None:
            last = trio.current_time()
            while True:
                await trio.sleep(0.01)
                now = trio.current_time()
                gaps.append(now - last)
                last = now

        # When: writes and reads go through the store while a heartbeat ticks every 10 ms.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(heartbeat)
            await store.call(slow_op)
            await store.read(slow_op)
            await store.ingest([new("x")])
            nursery.cancel_scope.cancel()

    # Then: the statements ran in other threads and the loop never stalled.
    assert threads
    assert threading.get_ident() not in threads
    assert len(gaps) > 30
    assert max(gaps) < 0.15


async def test_ingest_dedupes_by_source_and_key_durably(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "o.db") as store:
        first = await store.ingest([new("a"), new("b")])
        again = await store.ingest([new("b"), new("c")])
    assert [i.key for i in first] == ["a", "b"]
    assert [i.key for i in again] == ["c"]
    # A new process sees the same three items (the commit was durable and complete).
    conn = connect(tmp_path / "o.db", create=False)
    assert op_pending_index(conn) == [(1, "a"), (2, "a"), (3, "a")]
    assert [i.key for i in op_items_by_seq(conn, [1, 2, 3])] == ["a", "b", "c"]


async def test_an_item_whose_name_is_not_utf8_is_kept_rejected_and_the_rest_ingested(
    tmp_path: Path,
) -> None:
    # A file name in another encoding (Python carries its bytes as lone surrogates) and a
    # record's id with a lone surrogate cannot be stored as text: found in session 6, either
    # failed every ingest of its source (and so of every file beside it) for ever.
    latin1 = NewItem(id="src:caf\udce9", source="src", key="caf\udce9", route=("a",),
                     path="/in/caf\udce9")  # fmt: skip
    record = NewItem(id="rec:\ud800", source="rec", key="\ud800", route=("a",),
                     payload='{"id": "\\ud800"}')  # fmt: skip
    async with open_sqlite_store(tmp_path / "o.db") as store:
        first = await store.ingest([new("a"), latin1, record, new("b")])
        again = await store.ingest([latin1, record])
    # (Escaped keys start with NUL, which no real name holds: never one written with "\\".)
    assert [(i.key, i.state) for i in first] == [
        ("a", ItemState.QUEUED), ("\x00caf\\xe9", ItemState.REJECTED),
        ("\x00\\ud800", ItemState.REJECTED), ("b", ItemState.QUEUED),
    ]  # fmt: skip
    assert (
        first[1].reason
        == 'the file name "caf\\xe9" is not valid UTF-8; rename the file to have it taken'
    )
    assert first[1].path is None
    assert "record's id" in (first[2].reason or "")
    assert again == []  # known by their escaped keys: never twice
    # Names written with backslashes, as the escaped ones read, are other names.
    async with open_sqlite_store(tmp_path / "o.db") as store:
        literal = await store.ingest([new("caf\\xe9"), new("\\ud800")])
    assert [(i.key, i.state) for i in literal] == [
        ("caf\\xe9", ItemState.QUEUED), ("\\ud800", ItemState.QUEUED),
    ]  # fmt: skip
    conn = connect(tmp_path / "o.db", create=False)
    rows = conn.execute("SELECT id, state FROM items ORDER BY seq").fetchall()
    assert rows[:4] == [("src:a", "queued"), ("src:\x00caf\\xe9", "rejected"),
                        ("rec:\x00\\ud800", "rejected"), ("src:b", "queued")]  # fmt: skip


async def test_a_record_whose_payload_is_not_utf8_is_rejected_saying_so(tmp_path: Path) -> None:
    bad = NewItem(id="rec:fine", source="rec", key="fine", route=("a",), payload='"\udc80"')
    async with open_sqlite_store(tmp_path / "o.db") as store:
        [item] = await store.ingest([bad])
    assert (item.key, item.state) == ("fine", ItemState.REJECTED)
    assert item.reason == "the record holds text that is not valid UTF-8; it cannot be stored"


async def test_claim_run_and_transition_are_recorded(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "o.db") as store:
        [item] = await store.ingest([new("a")])
        claim = await store.start_run(item, "a", 0.25, "inst")
        assert claim is not None
        run_id, attempt = claim
        assert attempt == 1
        # A second claim of the same item (already running) is refused.
        assert await store.start_run(item, "a", 0.0, "inst") is None
        await store.finish_run(
            run_id=run_id, item=item, result=result(),
            transition=Transition(state=ItemState.QUEUED, stage_index=1, attempts=0),
            log_path=None,
        )  # fmt: skip
        moved = await store.read(lambda c: op_get_item(c, "src:a"))
        runs = await store.read(lambda c: op_item_runs(c, item.seq))
    assert (moved.state, moved.stage, moved.attempts) == (ItemState.QUEUED, "b", 0)
    [run] = runs
    assert (run.outcome, run.exit_code, run.slot_wait, run.tail) == ("ok", 0, 0.25, "last line")


async def test_a_batch_is_counted_by_state_and_by_stage_and_outcome(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two items per lookup: the counts of several lookups add up.
    monkeypatch.setattr(store_module, "BATCH_ROWS_CHUNK", 2)
    done = Transition(state=ItemState.DONE, stage_index=1, attempts=0)
    dead = Transition(state=ItemState.DEAD, stage_index=0, attempts=1, reason="boom")
    plan = [  # (key, slot wait, outcome, duration, transition)
        ("a", 0.1, Outcome.OK, 1.0, done),
        ("b", 0.2, Outcome.OK, 3.0, done),
        ("c", 0.3, Outcome.FAILED, 0.5, dead),
        ("d", 0.4, Outcome.OK, 2.0, done),
        ("e", 0.0, Outcome.TIMEOUT, 4.0, dead),
    ]
    async with open_sqlite_store(tmp_path / "o.db") as store:
        items = await store.ingest([new(key, route=("a",)) for key, *_ in plan])
        await store.ingest([new("other", route=("a",))])  # not in the batch
        for item, (_key, wait, outcome, duration, transition) in zip(items, plan, strict=True):
            claim = await store.start_run(item, "a", wait, "inst")
            assert claim is not None
            await store.finish_run(
                run_id=claim[0], item=item, log_path=None, transition=transition,
                result=attrs.evolve(result(outcome, 0 if outcome is Outcome.OK else 1),
                                    duration=duration),
            )  # fmt: skip
        seqs = [item.seq for item in items]
        counts = await store.read(lambda c: op_batch_rows(c, seqs, 0.0))
    assert counts.states == {"done": 3, "dead": 2}
    assert [(f[0], f[1], f[4]) for f in counts.failed] == [
        ("src:c", "dead", "boom"), ("src:e", "dead", "boom"),
    ]  # fmt: skip
    assert counts.runs[("a", "ok")] == [3, 3, pytest.approx(6.0), 3.0, pytest.approx(0.7)]
    assert counts.runs[("a", "failed")] == [1, 1, 0.5, 0.5, pytest.approx(0.3)]
    assert counts.runs[("a", "timeout")] == [1, 1, 4.0, 4.0, 0.0]


def _history(db: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row a run leaves, without the clock's columns."""
    conn = connect(db, create=False)
    return {
        "items": conn.execute(
            "SELECT seq, state, stage_index, attempts, not_before, reason FROM items ORDER BY seq"
        ).fetchall(),
        "runs": conn.execute(
            "SELECT id, item_seq, stage, attempt, instance, outcome, exit_code, signal, duration,"
            " slot_wait, pid, pgid, proc_start, log_path, tail, reason FROM runs ORDER BY id"
        ).fetchall(),
        "events": conn.execute(
            "SELECT item_seq, event, stage, state, detail FROM events ORDER BY id"
        ).fetchall(),
    }


async def _claims_and_results(store: SqliteStore, *, together: bool) -> list[object]:
    """Three claims and two results, queued at once (one group commit) or one at a time."""
    a, b, c = await store.ingest([new("a"), new("b"), new("c")])
    me = os.getpid()
    work = [
        Claim(a, "a", 0.25, "inst", 1, 1, None),
        Claim(b, "a", 0.0, "inst", 2, 1, None),
        Claim(c, "a", 0.0, "inst", 3, 1, me),  # still running: its start time is recorded
        Finish(1, a, result(), Transition(state=ItemState.QUEUED, stage_index=1, attempts=0),
               "/logs/1.log"),
        Finish(2, b, result(Outcome.FAILED, 3),
               Transition(state=ItemState.RETRY_WAIT, stage_index=0, attempts=1,
                          not_before=1e9, reason="exit 3"), None),
    ]  # fmt: skip
    if not together:
        return [await store.call(op) for op in work]
    ops: list[_Op] = []
    commits = store.commits
    for op in work:
        store.submit(op, power_safe=isinstance(op, Finish), on_done=ops.append)
    with trio.fail_after(10):
        while len(ops) < len(work):
            await trio.sleep(0.01)
    assert store.commits == commits + 1  # one transaction for all five
    assert [op.error for op in ops] == [None] * len(ops)
    return [op.result for op in ops]


async def test_claims_and_results_queued_together_leave_the_rows_one_at_a_time_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    # Given: the same claims and results, once queued together, once one after another.
    def one_at_a_time(*args: object, **kwargs: object) -> None:
        raise AssertionError("a group of claims and results was done one at a time")

    with monkeypatch.context() as patch:
        patch.setattr(store_module, "op_start_run", one_at_a_time)
        patch.setattr(store_module, "op_finish_run", one_at_a_time)
        async with open_sqlite_store(tmp_path / "together.db") as store:
            grouped = await _claims_and_results(store, together=True)
    async with open_sqlite_store(tmp_path / "alone.db") as store:
        alone = await _claims_and_results(store, together=False)
    # Then: the same results and the same rows, down to the events and the claimer's start time.
    assert grouped == alone == [(1, 1), (2, 1), (3, 1), None, None]
    history = _history(tmp_path / "together.db")
    assert history == _history(tmp_path / "alone.db")
    assert history["runs"][2][12] == proc_start_time(os.getpid())  # the claimer's, read then
    assert [row[1] for row in history["items"]] == ["queued", "retry_wait", "running"]
    assert [row[1] for row in history["events"]][-5:] == [
        "started", "started", "started", "ok", "failed",
    ]  # fmt: skip


async def test_a_claim_that_no_longer_applies_does_not_spoil_its_group(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "o.db") as store:
        a, b = await store.ingest([new("a"), new("b")])
        assert await store.start_run(a, "a", 0.0, "other") is not None  # someone got there first
        ops: list[_Op] = []
        # When: a group holds a claim of the taken item, a good claim and a result of a run
        # nobody recorded.
        store.submit(Claim(a, "a", 0.0, "inst", 10, 1, None), on_done=ops.append)
        store.submit(Claim(b, "a", 0.0, "inst", 11, 1, None), on_done=ops.append)
        store.submit(
            Finish(99, b, result(), Transition(state=ItemState.DONE, stage_index=2, attempts=1),
                   None),
            on_done=ops.append,
        )  # fmt: skip
        with trio.fail_after(10):
            while len(ops) < 3:
                await trio.sleep(0.01)
        b2 = await store.read(lambda c: op_get_item(c, "src:b"))
        runs_a = await store.read(lambda c: op_item_runs(c, a.seq))
    # Then: each operation did what it does alone: the taken item is refused, the other
    # claimed, and the stray result moved nothing.
    assert [op.error for op in ops] == [None, None, None]
    assert [op.result for op in ops] == [None, (11, 1), None]
    assert (b2.state, b2.attempts) == (ItemState.RUNNING, 1)
    assert [r.id for r in runs_a] == [1]  # only the first claim's run


async def test_an_error_in_a_group_of_claims_fails_only_the_claim_that_caused_it(
    tmp_path: Path,
) -> None:
    async with open_sqlite_store(tmp_path / "o.db") as store:
        a, b = await store.ingest([new("a"), new("b")])
        # Given: the store refuses run 2's row (as a full disk or a constraint would).
        await store.call(lambda c: c.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON runs WHEN NEW.id = 2"
            " BEGIN SELECT RAISE(ABORT, 'refused for the test'); END"
        ))  # fmt: skip
        ops: list[_Op] = []
        # When: both claims are queued together (the grouped statements fail as a whole).
        store.submit(Claim(a, "a", 0.0, "inst", 1, 1, None), on_done=ops.append)
        store.submit(Claim(b, "a", 0.0, "inst", 2, 1, None), on_done=ops.append)
        with trio.fail_after(10):
            while len(ops) < 2:
                await trio.sleep(0.01)
        a2 = await store.read(lambda c: op_get_item(c, "src:a"))
        b2 = await store.read(lambda c: op_get_item(c, "src:b"))
    # Then: one by one, the first claim is recorded and the second fails alone, leaving its
    # item as it was.
    assert ops[0].error is None
    assert ops[0].result == (1, 1)
    assert isinstance(ops[1].error, sqlite3.IntegrityError)
    assert "refused for the test" in str(ops[1].error)
    assert (a2.state, a2.attempts) == (ItemState.RUNNING, 1)
    assert (b2.state, b2.attempts) == (ItemState.QUEUED, 0)


async def test_the_store_watch_reads_only_queued_items_it_does_not_know(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "o.db") as store:
        before = time.time() - 1
        a, b, _, d = await store.ingest([new("a"), new("b"), new("c"), new("d")])
        assert await store.start_run(d, "a", 0.0, "inst") is not None  # running: not queued
        found = await store.read(lambda conn: op_items_changed_since(conn, before, {a.seq}))
        later = await store.read(lambda conn: op_items_changed_since(conn, time.time() + 1))
    assert [i.key for i in found] == ["b", "c"]
    assert found[0] == b
    assert later == []


async def test_group_commit_shares_transactions_and_isolates_a_failing_op(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "o.db") as store:
        outcomes: list[object] = []

        async def one(i: int) -> None:
            try:
                if i == 7:
                    await store.call(lambda c: c.execute("INSERT INTO nowhere VALUES (1)"))
                else:
                    await store.ingest([new(f"k{i}")])
                outcomes.append(i)
            except sqlite3.OperationalError as exc:
                outcomes.append(exc)

        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(one, i)
        commits = store.commits
    assert len([o for o in outcomes if isinstance(o, int)]) == 49
    assert commits < 50  # concurrent callers shared commits
    conn = connect(tmp_path / "o.db", create=False)
    assert len(op_pending_index(conn)) == 49  # the failing op rolled back only itself


async def test_recovery_requeues_interrupted_and_kills_poison_items(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "o.db") as store:
        a, b = await store.ingest([new("a"), new("b")])
        await store.call(lambda c: c.execute("UPDATE items SET interruptions = 2 WHERE seq = ?",
                                             (b.seq,)))  # fmt: skip
        await store.start_run(a, "a", 0.0, "dead-instance")
        await store.start_run(b, "a", 0.0, "dead-instance")
        # The instance dies here; the next start recovers.
        rec = await store.call(lambda c: op_recover(c, 3))
        a2 = await store.read(lambda c: op_get_item(c, "src:a"))
        b2 = await store.read(lambda c: op_get_item(c, "src:b"))
        runs = await store.read(lambda c: op_item_runs(c, a.seq))
        again = await store.start_run(a2, "a", 0.0, "next-instance")
    assert (rec.interrupted, rec.poisoned) == (2, 1)
    assert (a2.state, a2.attempts, a2.interruptions) == (ItemState.QUEUED, 0, 1)  # given back
    assert again is not None
    assert again[1] == 1  # the next run is attempt 1 again: the interruption used no retry
    assert b2.state is ItemState.DEAD
    assert b2.reason == "poison item: interrupted 3 times at stage 'a'"
    assert runs[0].outcome == "interrupted"


async def test_recovery_records_runs_known_only_from_their_leftovers(tmp_path: Path) -> None:
    # Given: a run's claim never reached the store (its instance died right after the spawn),
    # but its leftover process told the reaper who it was; plus a run that was recorded.
    async with open_sqlite_store(tmp_path / "o.db") as store:
        a, b, c = await store.ingest([new("a"), new("b"), new("c")])
        claim = await store.start_run(b, "a", 0.0, "dead")
        assert claim is not None
        seen = [
            SeenRun(run=41, item=a.id, stage="a", attempt=1, instance="dead"),
            SeenRun(run=claim[0], item=b.id, stage="a", attempt=1, instance="dead"),  # recorded
            SeenRun(run=43, item=c.id, stage="b", attempt=1, instance="dead"),  # not its stage
        ]
        # When: the next start recovers.
        rec = await store.call(lambda conn: op_recover(conn, 3, seen))
        await store.reload_run_ids()
        next_id = store.new_run_id()
        a2, b2, c2 = [
            await store.read(lambda conn, k=k: op_get_item(conn, f"src:{k}")) for k in "abc"
        ]
        runs_a = await store.read(lambda conn: op_item_runs(conn, a.seq))
        runs_c = await store.read(lambda conn: op_item_runs(conn, c.seq))
    # Then: the unrecorded run is recorded as interrupted and counts; nothing twice; a run
    # that does not match the item's stage is not invented; ids continue after the highest.
    assert rec.interrupted == 2
    assert (a2.state, a2.attempts, a2.interruptions) == (ItemState.QUEUED, 0, 1)
    assert [(r.id, r.outcome) for r in runs_a] == [(41, "interrupted")]
    assert (b2.state, b2.interruptions) == (ItemState.QUEUED, 1)
    assert (c2.state, c2.interruptions, runs_c) == (ItemState.QUEUED, 0, [])
    assert next_id == 42


async def test_store_files_are_private(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "state" / "o.db") as store:
        await store.ingest([new("a")])
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    for name in ("o.db", "o.db-wal"):
        path = tmp_path / "state" / name
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, name


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    connect(tmp_path / "o.db").execute(
        "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
    )
    with pytest.raises(StoreUnavailable, match="schema version"):
        connect(tmp_path / "o.db")


def test_an_sqlite_library_too_old_for_the_store_is_a_clear_error(tmp_path: Path) -> None:
    # RETURNING, which claims use, came in SQLite 3.35: an older library must be refused when
    # the store opens, not at the first claim after items were ingested.
    store_module.check_sqlite_library((3, 35, 0))
    with pytest.raises(StoreUnavailable) as caught:
        store_module.check_sqlite_library((3, 31, 1))
    assert str(caught.value) == (
        "this Python's SQLite library is version 3.31.1; the store needs 3.35.0 or newer: use a "
        "Python linked against a newer libsqlite3"
    )


def test_a_batch_on_an_sqlite_library_too_old_exits_3_before_taking_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator.cli import EXIT_STORE, main

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("x")
    config = tmp_path / "o.toml"
    config.write_text(
        'state_dir = "state"\n[http]\nlisten = false\n[[sources]]\nname = "in"\n'
        'type = "directory"\npath = "in"\nroute = ["s"]\nsettle = "0s"\n'
        '[[stages]]\nname = "s"\ncommand = ["true"]\n'
    )
    # Given: a library one version short of what the store needs (here: a raised minimum).
    monkeypatch.setattr(store_module, "MIN_SQLITE_VERSION", (*sqlite3.sqlite_version_info[:2], 99))
    assert main(["batch", "-c", str(config), "--no-progress"]) == EXIT_STORE
    assert "the store needs" in capsys.readouterr().err
    # Then: no store was made, so nothing was taken in and a newer Python starts afresh.
    assert not (tmp_path / "state" / "orchestrator.db").exists()


def test_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "o.db").write_text("this is not sqlite" * 100)
    with pytest.raises(StoreUnavailable, match="cannot open store"):
        connect(tmp_path / "o.db")


async def test_full_durability_fsyncs_the_wal_before_durable_callers_return(
    tmp_path: Path,
) -> None:
    synced: list[int] = []
    real = os.fdatasync

    def spy(fd: int) -> None:
        real(fd)
        synced.append(fd)

    os.fdatasync = spy  # type: ignore[assignment]
    try:
        async with open_sqlite_store(tmp_path / "o.db") as store:
            mode = await store.read(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
            [item] = await store.ingest([new("a")])
            # The ingest returned only after an fsync of the WAL file.
            assert len(synced) == 1
            assert os.readlink(f"/proc/self/fd/{synced[0]}") == str(tmp_path / "o.db-wal")
            # A claim returns without waiting for an fsync.
            assert await store.start_run(item, "a", 0.0, "i") is not None
            assert len(synced) == 1
            await store.finish_run(
                run_id=1, item=item, result=result(),
                transition=Transition(state=ItemState.DONE, stage_index=2, attempts=0),
                log_path=None,
            )  # fmt: skip
            assert len(synced) == 2
    finally:
        os.fdatasync = real  # type: ignore[assignment]
    assert mode == "wal"


async def test_normal_durability_never_fsyncs_on_commit(tmp_path: Path) -> None:
    async with open_sqlite_store(tmp_path / "o.db", synchronous="NORMAL") as store:
        await store.ingest([new("a")])
        assert store.syncs == 0
        assert store.commits >= 1


async def test_checkpoints_run_off_the_commit_path(tmp_path: Path) -> None:
    # The writer never checkpoints by itself (wal_autocheckpoint=0); a background task on its
    # own connection copies the WAL into the database file once there were commits.
    db = tmp_path / "o.db"
    async with open_sqlite_store(db) as store:
        auto = await store.read(lambda c: c.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
        before = db.stat().st_size
        await store.ingest([new(f"k{i} " + "x" * 200) for i in range(500)])
        assert db.stat().st_size == before  # committed into the WAL only
        with trio.fail_after(10):
            while db.stat().st_size == before:
                await trio.sleep(0.1)
    assert auto == 0


async def test_the_wal_stays_bounded_while_commits_never_stop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A checkpoint beside commits never finishes, and an unfinished one never lets the log
    # restart: a service that was never idle for a whole interval grew its WAL by every page it
    # wrote (135 MB for 20,000 items). The log must restart, so its file stays near its target
    # size however much is written.
    target = 512 * 1024
    monkeypatch.setattr(store_module, "CHECKPOINT_INTERVAL", 0.2)
    monkeypatch.setattr(store_module, "CHECKPOINT_TICK", 0.02)
    monkeypatch.setattr(store_module, "WAL_TARGET_BYTES", target)
    db = tmp_path / "o.db"
    wal = tmp_path / "o.db-wal"
    sizes = []
    n = 0
    with trio.fail_after(60):
        async with open_sqlite_store(db, synchronous="NORMAL") as store:
            for _ in range(900):  # back to back: never idle for a checkpoint interval
                await store.ingest([new(f"k{n}-{j} " + "x" * 300) for j in range(4)])
                n += 1
                sizes.append(wal.stat().st_size)
            pages = await store.read(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    # Without restarts the file ends at every page written (about 60 MB here). With them it
    # is cut back to its target again and again, and stays within some times that: what
    # commits write (here about 30 MB/s) while a checkpoint catches up -- a checkpoint thread
    # starved by a loaded machine (three test suites at once) let it reach 29 times once.
    cuts = sum(1 for a, b in itertools.pairwise(sizes) if b < a)
    assert cuts >= 2, sizes
    assert max(sizes[100:]) < 40 * target, (max(sizes), sizes[-1], pages)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert conn.execute("SELECT count(*) FROM items").fetchone() == (4 * n,)
    conn.close()


def test_a_version_1_store_is_migrated(tmp_path: Path) -> None:
    # Given: a store as version 1 wrote it (source_offsets without its tail column).
    db = sqlite3.connect(tmp_path / "o.db")
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('schema_version', '1');"
        "CREATE TABLE source_offsets (source TEXT PRIMARY KEY, device INTEGER, inode INTEGER,"
        " offset INTEGER NOT NULL, updated_at REAL NOT NULL);"
        "INSERT INTO source_offsets VALUES ('log', 1, 2, 30, 0);"
    )
    db.commit()
    db.close()
    # When: this version opens it.
    conn = connect(tmp_path / "o.db")
    # Then: the columns exist, the row is kept, and the version is this one's.
    row = conn.execute("SELECT offset, tail, head, seen FROM source_offsets").fetchone()
    assert row == (30, None, None, 0)
    version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    assert version == (str(SCHEMA_VERSION),)


def test_a_version_2_store_is_migrated_and_its_positions_seen_when_last_stored(
    tmp_path: Path,
) -> None:
    # Given: a store as version 2 wrote it (source_offsets without head and seen).
    db = sqlite3.connect(tmp_path / "o.db")
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('schema_version', '2');"
        "CREATE TABLE source_offsets (source TEXT PRIMARY KEY, device INTEGER, inode INTEGER,"
        " offset INTEGER NOT NULL, tail BLOB, updated_at REAL NOT NULL);"
        "INSERT INTO source_offsets VALUES ('log', 1, 2, 30, x'0a', 1700000000.5);"
    )
    db.commit()
    db.close()
    # When: this version opens it.
    conn = connect(tmp_path / "o.db")
    # Then: the position is read with no head, seen when it was last stored (the latest time
    # the source is known to have read its file).
    position = op_source_position(conn, "log")
    assert position == Position(1, 2, 30)
    assert position is not None
    assert (position.tail, position.head, position.seen) == (b"\n", b"", 1700000000.5)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("3",)
