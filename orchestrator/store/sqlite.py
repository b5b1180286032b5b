"""The embedded SQLite store: one file in ``state_dir``, WAL, ``synchronous=FULL`` by default.

One connection, driven only from worker threads, one statement at a time (a
``CapacityLimiter(1)``). Writers never talk to the connection directly: each operation is queued
and a committer task runs every operation queued so far in *one* transaction (each operation
inside its own SAVEPOINT, so one failing operation does not undo the others), then wakes the
callers. This is group commit: concurrent callers share one transaction and one thread hop, and
a lone caller pays no added latency.

Durability (``synchronous=FULL``, the default) is kept by a second task, the syncer, rather than
by SQLite: transactions are committed with SQLite's ``synchronous=NORMAL`` (WAL frames written to
the OS, no fsync; SQLite still syncs around checkpoints, so the file is never corrupted), and the
syncer ``fdatasync``s the WAL file for every caller that needs power-loss durability before that
caller is woken. One fsync covers every transaction committed before it started. This is the
same guarantee as SQLite's FULL (the caller continues only once its change is on the disk), but
the fsync happens beside the next transactions instead of in front of them.

An operation may be marked ``power_safe=False`` -- the claim of an item just before its run. It
returns as soon as it is committed: durable against a crash of this process at once, and against
a power cut with the next fsync. What a power cut can undo is only such a claim: no process of
the run survives a power cut, and the item runs that attempt again. Every ingest, outcome and
state change that matters is fsynced before its caller continues.

The same synchronous functions (``op_*``) serve the command-line readers (``status``, ``items``,
``show``), which open their own connection in their own process; WAL lets them read while the
service writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio
import trio_util
from loguru import logger

from orchestrator.errors import ItemNotFound, StoreUnavailable
from orchestrator.instance import LOOP_BLOCKED_BY, STORE_FAILED
from orchestrator.reaper import proc_start_time
from orchestrator.store.records import Item, ItemState, NewItem, RunRecord, Transition

if TYPE_CHECKING:
    from collections.abc import (
        AsyncIterator,
        Callable,
        Collection,
        Iterable,
        Mapping,
        Sequence,
        Set,
    )
    from pathlib import Path

    from orchestrator.journal import JournalRun
    from orchestrator.reaper import SeenRun
    from orchestrator.runner import RunResult

__all__ = ["SqliteStore", "connect", "open_sqlite_store"]

T = TypeVar("T")

#: How often the service copies its write-ahead log into the database file (when it changed).
CHECKPOINT_INTERVAL = 1.0
#: How often, while commits go on, the log's size is looked at between those checkpoints.
CHECKPOINT_TICK = 0.25
#: The size the write-ahead log is kept near (SQLite's own default: 1,000 pages of 4 KiB). A
#: log grown past it is checkpointed at once, the last of it with commits held off for that
#: moment, so that the next commit writes the log from its start again, and cuts its file back
#: to this size. Without that a service that is never idle for a whole checkpoint grows the log
#: by every page it ever writes (135 MB for 20,000 items), and a batch's last step, deleting the
#: log, took 15-20 ms for the 12-16 MB it had reached.
WAL_TARGET_BYTES = 4 * 1024 * 1024
#: Bytes in front of each page in the log (a frame).
WAL_FRAME_HEADER = 24
#: Bumped whenever the schema changes; a newer file than this code refuses to open, an older
#: one is migrated when opened for writing (see `_migrate`).
SCHEMA_VERSION = 3

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    seq           INTEGER PRIMARY KEY,
    id            TEXT NOT NULL UNIQUE,
    source        TEXT NOT NULL,
    key           TEXT NOT NULL,
    path          TEXT,
    payload       TEXT,
    route         TEXT NOT NULL,
    stage_index   INTEGER NOT NULL DEFAULT 0,
    state         TEXT NOT NULL,
    attempts      INTEGER NOT NULL DEFAULT 0,
    interruptions INTEGER NOT NULL DEFAULT 0,
    not_before    REAL,
    reason        TEXT,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    UNIQUE (source, key)
);
CREATE INDEX IF NOT EXISTS items_by_state ON items (state, stage_index);
CREATE INDEX IF NOT EXISTS items_by_update ON items (updated_at);
CREATE TABLE IF NOT EXISTS runs (
    id         INTEGER PRIMARY KEY,
    item_seq   INTEGER NOT NULL REFERENCES items (seq),
    stage      TEXT NOT NULL,
    attempt    INTEGER NOT NULL,
    instance   TEXT,
    started_at REAL NOT NULL,
    ended_at   REAL,
    outcome    TEXT,
    exit_code  INTEGER,
    signal     INTEGER,
    duration   REAL,
    slot_wait  REAL,
    pid        INTEGER,
    pgid       INTEGER,
    proc_start INTEGER,
    log_path   TEXT,
    tail       TEXT,
    reason     TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_item ON runs (item_seq);
CREATE INDEX IF NOT EXISTS runs_open ON runs (id) WHERE outcome IS NULL;
CREATE TABLE IF NOT EXISTS events (
    id       INTEGER PRIMARY KEY,
    item_seq INTEGER NOT NULL REFERENCES items (seq),
    at       REAL NOT NULL,
    event    TEXT NOT NULL,
    stage    TEXT,
    state    TEXT,
    detail   TEXT
);
CREATE INDEX IF NOT EXISTS events_by_item ON events (item_seq);
CREATE TABLE IF NOT EXISTS source_offsets (
    source     TEXT PRIMARY KEY,
    device     INTEGER,
    inode      INTEGER,
    offset     INTEGER NOT NULL,
    tail       BLOB,
    updated_at REAL NOT NULL,
    head       BLOB,
    seen       REAL
);
CREATE TABLE IF NOT EXISTS instances (
    id         TEXT PRIMARY KEY,
    pid        INTEGER NOT NULL,
    host       TEXT NOT NULL,
    started_at REAL NOT NULL,
    stopped_at REAL
);
"""

_ITEM_COLUMNS = (
    "seq, id, source, key, route, path, payload, stage_index, state, attempts, "
    "interruptions, not_before, reason, created_at, updated_at"
)
_RUN_COLUMNS = (
    "id, item_seq, stage, attempt, started_at, ended_at, outcome, exit_code, signal, "
    "duration, slot_wait, pid, pgid, log_path, tail, reason"
)


#: The oldest SQLite library the store's statements run on: ``RETURNING`` came in 3.35.0.
MIN_SQLITE_VERSION = (3, 35, 0)


def check_sqlite_library(version: tuple[int, int, int] = sqlite3.sqlite_version_info) -> None:
    """Raise `StoreUnavailable` when Python's SQLite library is too old for the store.

    Without this, an old library (a Python built against an old distribution's libsqlite3)
    would ingest items and only fail at their first claim, with a syntax error.
    """
    if version < MIN_SQLITE_VERSION:
        need = ".".join(map(str, MIN_SQLITE_VERSION))
        raise StoreUnavailable(
            f"this Python's SQLite library is version {'.'.join(map(str, version))}; the store "
            f"needs {need} or newer: use a Python linked against a newer libsqlite3"
        )


def connect(
    path: Path, *, synchronous: str = "FULL", busy_timeout: float = 5.0, create: bool = True
) -> sqlite3.Connection:
    """Open the store file (creating it and its schema when ``create``), private to the user.

    Raises:
        StoreUnavailable: the file cannot be opened, is not an orchestrator store, was written
            by a newer version, or Python's SQLite library is too old for it.
    """
    check_sqlite_library()
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Create the file ourselves so it is 0600 whatever the umask; SQLite gives the WAL
            # and shm files the database file's mode.
            os.close(os.open(path, os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600))
        elif not path.exists():
            raise StoreUnavailable(f"no store at {str(path)!r}; has the service run yet?")
        conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
        )
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        conn.execute("PRAGMA foreign_keys=ON")
        if create:
            conn.executescript(SCHEMA)
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            _migrate(conn)
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot open store {str(path)!r}: {exc}") from exc
    if row is None or int(row[0]) > SCHEMA_VERSION:
        conn.close()
        found = "none" if row is None else row[0]
        raise StoreUnavailable(
            f"store {str(path)!r} has schema version {found}; this orchestrator understands "
            f"up to {SCHEMA_VERSION}: upgrade orchestrator or point state_dir elsewhere"
        )
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a store written by an older version up to SCHEMA_VERSION (idempotent)."""
    version = int(conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
    columns = {r[1] for r in conn.execute("PRAGMA table_info(source_offsets)")}
    if version < 2:  # 2: source_offsets.tail
        if "tail" not in columns:
            conn.execute("ALTER TABLE source_offsets ADD COLUMN tail BLOB")
        conn.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    if version < 3:  # 3: source_offsets.head and .seen
        if "head" not in columns:
            conn.execute("ALTER TABLE source_offsets ADD COLUMN head BLOB")
        if "seen" not in columns:
            conn.execute("ALTER TABLE source_offsets ADD COLUMN seen REAL")
            # The last commit is the latest time the source is known to have read its file.
            conn.execute("UPDATE source_offsets SET seen = updated_at")
        conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")


# --- operations: plain functions of a connection, run inside a transaction by the caller -----


def _item(row: Sequence[Any]) -> Item:
    return Item(
        seq=row[0], id=row[1], source=row[2], key=row[3], route=tuple(json.loads(row[4])),
        path=row[5], payload=row[6], stage_index=row[7], state=ItemState(row[8]),
        attempts=row[9], interruptions=row[10], not_before=row[11], reason=row[12],
        created_at=row[13], updated_at=row[14],
    )  # fmt: skip


def _run(row: Sequence[Any]) -> RunRecord:
    return RunRecord(
        id=row[0], item_seq=row[1], stage=row[2], attempt=row[3], started_at=row[4],
        ended_at=row[5], outcome=row[6], exit_code=row[7], signal=row[8], duration=row[9],
        slot_wait=row[10], pid=row[11], pgid=row[12], log_path=row[13], tail=row[14],
        reason=row[15],
    )  # fmt: skip


_EVENT_SQL = (
    "INSERT INTO events (item_seq, at, event, stage, state, detail) VALUES (?, ?, ?, ?, ?, ?)"
)
# A run's claim and result, and its item's move: written one at a time (`op_start_run`,
# `op_finish_run`) or for a whole group at once (`_group_at_once`).
_RUN_INSERT_SQL = (
    "INSERT INTO runs (id, item_seq, stage, attempt, instance, started_at, slot_wait, pid,"
    " pgid, proc_start) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_RUN_FINISH_SQL = (
    "UPDATE runs SET ended_at = ?, outcome = ?, exit_code = ?, signal = ?, duration = ?,"
    " pid = ?, pgid = ?, log_path = ?, tail = ?, reason = ? WHERE id = ?"
)
# A run claimed and ended in the same transaction: its row in one statement.
_RUN_WHOLE_SQL = (
    "INSERT INTO runs (id, item_seq, stage, attempt, instance, started_at, slot_wait, ended_at,"
    " outcome, exit_code, signal, duration, pid, pgid, log_path, tail, reason)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_ITEM_MOVE_SQL = (
    "UPDATE items SET state = ?, stage_index = ?, attempts = ?, not_before = ?, reason = ?,"
    " updated_at = ? WHERE seq = ?"
)
# Appended to an UPDATE of an item by seq: only if it is still where its claim found it
# (stage_index, attempts before the claim; then two more parameters) and waiting to run.
_STILL_CLAIMABLE = " AND stage_index = ? AND attempts = ? AND state IN ('queued', 'retry_wait')"


def _event(
    conn: sqlite3.Connection, seq: int, now: float, event: str, stage: str | None,
    state: str, detail: str | None = None,
) -> None:  # fmt: skip
    conn.execute(_EVENT_SQL, (seq, now, event, stage, state, detail))


_INGEST_SQL = (
    "INSERT OR IGNORE INTO items (id, source, key, path, payload, route, state, reason,"
    " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _ingest_row(new: NewItem, route: str, now: float) -> tuple[object, ...]:
    return (new.id, new.source, new.key, new.path, new.payload, route, new.state.value,
            new.reason, now, now)  # fmt: skip


def escaped_text(text: str) -> str:
    """``text`` as UTF-8 text the store can hold: a file name's undecodable bytes (which
    Python carries as lone surrogates) as ``\\xff``, other lone surrogates as ``\\udc80``."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode()
    return raw.decode("utf-8", "backslashreplace")


#: Starts a key that was escaped (`escaped_key`). No file name or path holds NUL, nor does a
#: record id a source takes, so an escaped name never equals a real one that is written with
#: backslashes (found by an acceptance tester, session 16: ``bad\\xff.txt``, literally, was
#: taken for the escaped name of a file called ``bad`` + byte 0xFF + ``.txt``, and skipped).
ESCAPED_MARK = "\x00"


def escaped_key(text: str) -> str:
    """``text`` as the store keeps it as a key: itself when it is valid UTF-8 (nearly always),
    else `ESCAPED_MARK` and its `escaped_text`."""
    escaped = escaped_text(text)
    return text if escaped == text else ESCAPED_MARK + escaped


def _not_text(new: NewItem) -> NewItem:
    """A found item with a name or id that is not valid UTF-8 (a file name in another encoding,
    a record's ``"\\ud800"``): rejected, its names escaped, the reason saying which."""
    key = escaped_key(new.key)
    shown = escaped_text(new.key)
    if new.path is not None:
        reason = f'the file name "{shown}" is not valid UTF-8; rename the file to have it taken'
    elif escaped_text(new.id) == new.id and key == new.key:  # the names are fine: the payload
        reason = "the record holds text that is not valid UTF-8; it cannot be stored"
    else:
        reason = f'the record\'s id "{shown}" is not valid UTF-8 text; it cannot be stored'
    # An id is its source's name and the key: the mark goes before the key's part.
    if new.key and new.id.endswith(new.key):
        item_id = new.id[: -len(new.key)] + key
    else:
        item_id = escaped_key(new.id)
    return attrs.evolve(
        new, id=item_id, key=key, path=None,
        payload=None if new.payload is None else escaped_text(new.payload),
        state=ItemState.REJECTED, reason=reason,
    )  # fmt: skip


def op_ingest(conn: sqlite3.Connection, items: Iterable[NewItem]) -> list[Item]:
    """Insert the items a source found; those whose (source, key) is known are skipped.

    Returns the items actually inserted.
    """
    now = time.time()
    added = []
    for new in items:
        route = json.dumps(list(new.route))
        try:
            cur = conn.execute(_INGEST_SQL, _ingest_row(new, route, now))
        except UnicodeEncodeError:  # not UTF-8: kept, rejected, under a name the store can hold
            new = _not_text(new)
            cur = conn.execute(_INGEST_SQL, _ingest_row(new, route, now))
        if cur.rowcount != 1:
            continue
        seq = cur.lastrowid
        assert seq is not None
        stage = new.route[0] if new.route and new.state is ItemState.QUEUED else None
        _event(conn, seq, now, "ingested", stage, new.state.value, new.reason)
        added.append(
            Item(
                seq=seq,
                id=new.id,
                source=new.source,
                key=new.key,
                route=new.route,
                path=new.path,
                payload=new.payload,
                stage_index=0,
                state=new.state,
                attempts=0,
                interruptions=0,
                not_before=None,
                reason=new.reason,
                created_at=now,
                updated_at=now,
            )
        )
    return added


def op_start_run(
    conn: sqlite3.Connection, item: Item, stage: str, slot_wait: float, instance: str | None,
    *, run_id: int | None = None, pid: int | None = None,
) -> tuple[int, int] | None:  # fmt: skip
    """Atomically claim a queued (or retry-waiting) item for a run of ``stage``.

    Args:
        run_id: the run's id, when the caller chose it (`SqliteStore.new_run_id`).
        pid: the run's process (= group), when it is already started: recorded with its
            kernel start time in the same transaction.

    Returns ``(run_id, attempt)``, or None when the item is no longer claimable there.
    """
    now = time.time()
    cur = conn.execute(
        "UPDATE items SET state = 'running', attempts = attempts + 1, not_before = NULL,"
        " updated_at = ? WHERE seq = ? AND stage_index = ? AND state IN ('queued', 'retry_wait')"
        " RETURNING attempts",
        (now, item.seq, item.stage_index),
    )
    row = cur.fetchone()
    if row is None:
        return None
    attempt = int(row[0])
    proc_start = None if pid is None else proc_start_time(pid)
    cur = conn.execute(
        _RUN_INSERT_SQL,
        (run_id, item.seq, stage, attempt, instance, now, slot_wait, pid, pid, proc_start),
    )
    run_id = cur.lastrowid
    assert run_id is not None
    _event(conn, item.seq, now, "started", stage, "running", f"run {run_id} attempt {attempt}")
    return run_id, attempt


def op_finish_run(
    conn: sqlite3.Connection,
    *,
    run_id: int,
    item: Item,
    result: RunResult,
    transition: Transition,
    log_path: str | None,
) -> None:
    """Atomically close a run with its result and move its item as ``transition`` says.

    A run that was never claimed (`op_start_run` found the item moved) moves nothing.
    """
    now = time.time()
    cur = conn.execute(_RUN_FINISH_SQL, _run_end_row(now, run_id, result, log_path))
    if cur.rowcount == 0:
        return
    conn.execute(_ITEM_MOVE_SQL, _item_move_row(now, item, transition))
    conn.execute(_EVENT_SQL, _result_event_row(now, item, result, transition))


def _run_end_row(
    now: float, run_id: int, result: RunResult, log_path: str | None
) -> tuple[Any, ...]:
    return (now, result.outcome.value, result.exit_code, result.signal, result.duration,
            result.pid, result.pid, log_path, result.tail, result.reason, run_id)  # fmt: skip


def _item_move_row(now: float, item: Item, transition: Transition) -> tuple[Any, ...]:
    return (transition.state.value, transition.stage_index, transition.attempts,
            transition.not_before, transition.reason, now, item.seq)  # fmt: skip


def _result_event_row(
    now: float, item: Item, result: RunResult, transition: Transition
) -> tuple[Any, ...]:
    index = transition.stage_index
    stage = item.route[index] if index < len(item.route) else None
    return (item.seq, now, result.outcome.value, stage, transition.state.value,
            transition.reason)  # fmt: skip


@attrs.frozen
class Claim:
    """`op_start_run` as data, so that a group commit can run many of them at once."""

    item: Item
    stage: str
    slot_wait: float
    instance: str | None
    run_id: int
    #: The attempt this run is: one more than the item's attempts in the store.
    attempt: int
    pid: int | None

    def __call__(self, conn: sqlite3.Connection) -> tuple[int, int] | None:
        return op_start_run(
            conn, self.item, self.stage, self.slot_wait, self.instance, run_id=self.run_id,
            pid=self.pid,
        )  # fmt: skip


@attrs.frozen
class Finish:
    """`op_finish_run` as data, so that a group commit can run many of them at once."""

    run_id: int
    item: Item
    result: RunResult
    transition: Transition
    log_path: str | None

    def __call__(self, conn: sqlite3.Connection) -> None:
        op_finish_run(
            conn, run_id=self.run_id, item=self.item, result=self.result,
            transition=self.transition, log_path=self.log_path,
        )  # fmt: skip


class _NotAllAtOnce(Exception):
    """A claim or result of a group does not apply as expected: the group is done one by one."""


def _group_at_once(
    conn: sqlite3.Connection, claims: Sequence[Claim], finishes: Sequence[Finish]
) -> list[tuple[int, int]]:
    """Every claim, then every result, of a group in a few statements; the same rows as
    `op_start_run` and `op_finish_run` one after another.

    A run claimed and ended in the same group (the common case for short runs) is written once,
    already ended: its run row is inserted whole, its item moved once to where its result
    sends it, and its process's start time is not looked up (it only serves to recognise a
    run's process after a crash, and a run with a result is never looked for). Events are
    written as one at a time would: every ``started``, then every result, in queue order.

    Returns each claim's ``(run_id, attempt)``. Raises `_NotAllAtOnce` (the caller rolls
    back) unless every item is still claimable with the attempt count its claim expects and
    every result's run is recorded.
    """
    now = time.time()
    ending = {f.run_id: f for f in finishes}
    opened = [c for c in claims if c.run_id not in ending]
    closed = [(c, ending[c.run_id]) for c in claims if c.run_id in ending]
    if opened:
        cur = conn.executemany(
            "UPDATE items SET state = 'running', attempts = attempts + 1, not_before = NULL,"
            " updated_at = ? WHERE seq = ?" + _STILL_CLAIMABLE,
            [(now, c.item.seq, c.item.stage_index, c.attempt - 1) for c in opened],
        )
        if cur.rowcount != len(opened):
            raise _NotAllAtOnce
        conn.executemany(
            _RUN_INSERT_SQL,
            [
                (c.run_id, c.item.seq, c.stage, c.attempt, c.instance, now, c.slot_wait, c.pid,
                 c.pid, None if c.pid is None else proc_start_time(c.pid))
                for c in opened
            ],
        )  # fmt: skip
    if closed:
        cur = conn.executemany(
            _ITEM_MOVE_SQL + _STILL_CLAIMABLE,
            [
                (*_item_move_row(now, c.item, f.transition), c.item.stage_index, c.attempt - 1)
                for c, f in closed
            ],
        )
        if cur.rowcount != len(closed):
            raise _NotAllAtOnce
        conn.executemany(
            _RUN_WHOLE_SQL,
            [
                (c.run_id, c.item.seq, c.stage, c.attempt, c.instance, now, c.slot_wait,
                 *_run_end_row(now, c.run_id, f.result, f.log_path)[:-1])
                for c, f in closed
            ],
        )  # fmt: skip
    events = [
        (c.item.seq, now, "started", c.stage, "running", f"run {c.run_id} attempt {c.attempt}")
        for c in claims
    ]  # fmt: skip
    claimed = {c.run_id for c in claims}
    later = [f for f in finishes if f.run_id not in claimed]
    if later:
        cur = conn.executemany(
            _RUN_FINISH_SQL, [_run_end_row(now, f.run_id, f.result, f.log_path) for f in later]
        )
        if cur.rowcount != len(later):
            raise _NotAllAtOnce
        conn.executemany(_ITEM_MOVE_SQL, [_item_move_row(now, f.item, f.transition) for f in later])
    events += [_result_event_row(now, f.item, f.result, f.transition) for f in finishes]
    conn.executemany(_EVENT_SQL, events)
    return [(c.run_id, c.attempt) for c in claims]


def _run_together(conn: sqlite3.Connection, batch: Sequence[_Op]) -> list[Any]:
    """Run ``batch`` in order in the open transaction; return each operation's result.

    Claims and results (`Claim`, `Finish`) between two other operations go in a few
    statements for all of them (`_group_at_once`): claims first, then results. That keeps each
    run's claim before its result, and nothing else can come between: an item's next claim is
    only made once its last result is durable, that is, in a later transaction.
    """
    results: list[Any] = [None] * len(batch)
    claims: dict[int, Claim] = {}  # by position in the batch
    finishes: list[Finish] = []

    def flush() -> None:
        if claims or finishes:
            done = _group_at_once(conn, list(claims.values()), finishes)
            for i, result in zip(claims, done, strict=True):
                results[i] = result
            claims.clear()
            finishes.clear()

    for i, op in enumerate(batch):
        if isinstance(op.fn, Claim):
            claims[i] = op.fn
        elif isinstance(op.fn, Finish):
            finishes.append(op.fn)
        else:
            flush()
            results[i] = op.fn(conn)
    flush()
    return results


def op_last_run_id(conn: sqlite3.Connection) -> int:
    """The highest run id recorded (0 for none)."""
    return int(conn.execute("SELECT coalesce(max(id), 0) FROM runs").fetchone()[0])


def op_open_runs(conn: sqlite3.Connection) -> list[tuple[int, int | None]]:
    """``(pgid, leader start time)`` of runs a dead instance left open with a known process."""
    rows = conn.execute(
        "SELECT pgid, proc_start FROM runs WHERE outcome IS NULL AND pgid IS NOT NULL"
    )
    return [(r[0], r[1]) for r in rows]


def op_register_instance(conn: sqlite3.Connection, instance: str, pid: int, host: str) -> None:
    """Record that ``instance`` started (and close any instance left unstopped)."""
    now = time.time()
    conn.execute("UPDATE instances SET stopped_at = ? WHERE stopped_at IS NULL", (now,))
    conn.execute(
        "INSERT INTO instances (id, pid, host, started_at) VALUES (?, ?, ?, ?)",
        (instance, pid, host, now),
    )


def op_stop_instance(conn: sqlite3.Connection, instance: str) -> None:
    """Record a clean stop."""
    conn.execute("UPDATE instances SET stopped_at = ? WHERE id = ?", (time.time(), instance))


def op_items_changed_since(
    conn: sqlite3.Connection, since: float, known: Set[int] = frozenset()
) -> list[Item]:
    """Queued or retry-waiting items updated after ``since`` (unix time), but those in ``known``.

    Only their seqs are read first: a service working through a large backlog has most of its
    queued items in ``known``, and reading them whole every poll would cost more than the rest.
    """
    seqs = [
        seq
        for (seq,) in conn.execute(
            "SELECT seq FROM items WHERE updated_at > ? AND state IN ('queued', 'retry_wait')"
            " ORDER BY seq",
            (since,),
        )
        if seq not in known
    ]
    return op_items_by_seq(conn, seqs)


def op_give_up(conn: sqlite3.Connection, item: Item, reason: str) -> None:
    """Make a queued item ``dead`` without a run (its input is gone)."""
    now = time.time()
    conn.execute(
        "UPDATE items SET state = 'dead', reason = ?, updated_at = ? WHERE seq = ?",
        (reason, now, item.seq),
    )
    _event(conn, item.seq, now, "gave up", item.stage, "dead", reason)


def op_pending_index(conn: sqlite3.Connection) -> list[tuple[int, str | None]]:
    """``(seq, stage)`` of every item not yet in a terminal state, oldest first.

    What a start takes charge of without reading a large backlog whole: the engine reads
    the items themselves as it has room for them (`Engine.defer`).
    """
    routes: dict[str, list[str]] = {}
    index: list[tuple[int, str | None]] = []
    for seq, route, stage_index in conn.execute(
        "SELECT seq, route, stage_index FROM items"
        " WHERE state IN ('queued', 'running', 'retry_wait') ORDER BY seq"
    ):
        stages = routes.get(route)
        if stages is None:
            stages = routes[route] = json.loads(route)
        index.append((seq, stages[stage_index] if stage_index < len(stages) else None))
    return index


@attrs.frozen
class Recovery:
    """What start-up recovery found of a dead instance's work."""

    interrupted: int
    poisoned: int
    #: Seqs of the items found poisoned (now dead).
    poisoned_seqs: tuple[int, ...] = ()


def op_recover(
    conn: sqlite3.Connection, max_interruptions: int, seen: Iterable[SeenRun] = (),
    *, blamed: Collection[int] | None = None, journal: Mapping[int, JournalRun] | None = None,
) -> Recovery:  # fmt: skip
    """Close runs a dead instance left open as ``interrupted``; re-queue or kill their items.

    An item interrupted ``max_interruptions`` times is dead as a poison item. A re-queued item
    gets its attempt back, as a run cancelled by a shutdown does: the stage did not fail it, and
    interruptions have their own bound.

    Args:
        seen: runs whose leftover processes the reaper found, as their environment tells them.
            A run is recorded right after its spawn; one whose record the dead instance did
            not get to write is recorded now (so that it counts as an interruption).
        blamed: the runs whose interruption counts (None: all). The others' items are
            re-queued with nothing counted: the dead instance said it ended because its store
            failed (none blamed) or because one run blocked its event loop (that one).
        journal: the dead instance's run journal (`orchestrator.journal`): its runs the store
            has no record of are recorded now, as interrupted, even when they ended before this
            start; a run whose result it holds (but the store does not) is closed with that
            result and its item re-queued with nothing counted -- the run ended by itself.
    """
    now = time.time()
    journal = journal or {}
    for entry in journal.values():
        _record_unrecorded(conn, now, entry.run, "seq", entry.seq, entry.stage, entry.attempt,
                           entry.instance, entry.started)  # fmt: skip
    for run in seen:
        _record_unrecorded(conn, now, run.run, "id", run.item, run.stage, run.attempt,
                           run.instance, now)  # fmt: skip
    open_runs = conn.execute(
        "SELECT id, item_seq, stage FROM runs WHERE outcome IS NULL ORDER BY id"
    ).fetchall()
    poisoned: list[int] = []
    for run_id, seq, stage in open_runs:
        ended = journal.get(run_id)
        if ended is not None and ended.outcome is not None:
            # It ended by itself; only its result was not yet durable: its item did no wrong.
            blame = False
            code = "" if ended.exit_code is None else f", exit code {ended.exit_code}"
            why = (
                f"ended by itself ({ended.outcome}{code}, {ended.duration:.3f}s), but its result"
                f" was not recorded: {_interrupted_why(run_id, blamed)}; not counted as an"
                " interruption"
            )
            conn.execute(
                "UPDATE runs SET outcome = 'interrupted', ended_at = started_at + ?,"
                " duration = ?, exit_code = ?, signal = ?, reason = ? WHERE id = ?",
                (ended.duration, ended.duration, ended.exit_code, ended.signal, why, run_id),
            )
        else:
            blame = blamed is None or run_id in blamed
            why = _interrupted_why(run_id, blamed)
            conn.execute(
                "UPDATE runs SET outcome = 'interrupted', ended_at = ?,"
                " duration = ? - started_at, reason = ? WHERE id = ?",
                (now, now, why, run_id),
            )
        row = conn.execute(
            "UPDATE items SET interruptions = interruptions + ?, updated_at = ?"
            " WHERE seq = ? AND state = 'running' RETURNING interruptions",
            (int(blame), now, seq),
        ).fetchone()
        if row is None:
            continue
        if blame and row[0] >= max_interruptions:
            reason = f"poison item: interrupted {row[0]} times at stage {stage!r}"
            conn.execute("UPDATE items SET state = 'dead', reason = ? WHERE seq = ?", (reason, seq))
            _event(conn, seq, now, "interrupted", stage, "dead", reason)
            poisoned.append(seq)
        else:
            conn.execute(
                "UPDATE items SET state = 'queued', attempts = max(attempts - 1, 0) WHERE seq = ?",
                (seq,),
            )
            detail = f"run {run_id}" if blame else f"run {run_id}; {why}"
            _event(conn, seq, now, "interrupted", stage, "queued", detail)
    # An item left 'running' without an open run (cannot happen through these functions, but a
    # hand-edited store must not wedge an item forever) goes back to its queue.
    conn.execute("UPDATE items SET state = 'queued' WHERE state = 'running'")
    return Recovery(
        interrupted=len(open_runs), poisoned=len(poisoned), poisoned_seqs=tuple(poisoned)
    )


def _record_unrecorded(
    conn: sqlite3.Connection, now: float, run: int, by: str, item: object, stage: str,
    attempt: int, instance: str | None, started: float,
) -> None:  # fmt: skip
    """Record, open, a run the store has no row of (`op_recover` then closes it), its item
    (found by ``by``: ``"seq"`` or ``"id"``) back at ``running`` -- if it is still waiting at
    that stage."""
    if conn.execute("SELECT 1 FROM runs WHERE id = ?", (run,)).fetchone() is not None:
        return
    row = conn.execute(
        "UPDATE items SET state = 'running', attempts = max(attempts, ?), updated_at = ?"
        f" WHERE {by} = ? AND state IN ('queued', 'retry_wait', 'running')"
        " AND json_extract(route, '$[' || stage_index || ']') = ? RETURNING seq",
        (attempt, now, item, stage),
    ).fetchone()
    if row is not None:
        conn.execute(
            "INSERT INTO runs (id, item_seq, stage, attempt, instance, started_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (run, row[0], stage, attempt, instance, started),
        )


def _interrupted_why(run_id: int, blamed: Collection[int] | None) -> str:
    """The reason an interrupted run is closed with, as its instance said how it ended."""
    if blamed is None:
        return "the instance running it died"
    if run_id in blamed:
        return "the instance running it stopped: this run blocked its event loop"
    if not blamed:
        return f"the instance running it stopped: {STORE_FAILED}"
    return f"the instance running it stopped: {LOOP_BLOCKED_BY} {min(blamed)}"


def op_items_by_seq(conn: sqlite3.Connection, seqs: Iterable[int]) -> list[Item]:
    """The items with these seqs."""
    out = []
    for seq in seqs:
        row = conn.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE seq = ?", (seq,)).fetchone()
        if row is not None:
            out.append(_item(row))
    return out


#: Items looked up per query by `op_batch_rows` (SQLite's limit on parameters is 32,766).
BATCH_ROWS_CHUNK = 500


@attrs.frozen
class BatchCounts:
    """What a batch's summary needs from the store (`op_batch_rows`), counted by SQLite."""

    #: The batch's items by state.
    states: dict[str, int]
    #: ``(id, state, route, stage_index, reason)`` of those that ended dead or rejected.
    failed: list[tuple[Any, ...]]
    #: Their ended runs by ``(stage, outcome)``: ``[runs, runs with a duration, total duration,
    #: longest duration, total slot wait]``.
    runs: dict[tuple[str, str], list[Any]]


def op_batch_rows(conn: sqlite3.Connection, seqs: Sequence[int], since: float) -> BatchCounts:
    """Count the items ``seqs`` and their ended runs started at ``since`` or later.

    Looked up by key (a state folder that has served many batches holds far more than one
    batch) and counted by SQLite: a batch of 100,000 items is not read into Python row by row.
    """
    counts = BatchCounts(states={}, failed=[], runs={})
    for start in range(0, len(seqs), BATCH_ROWS_CHUNK):
        chunk = list(seqs[start : start + BATCH_ROWS_CHUNK])
        marks = ", ".join("?" * len(chunk))
        for state, n in conn.execute(
            f"SELECT state, count(*) FROM items WHERE seq IN ({marks}) GROUP BY state", chunk
        ):
            counts.states[state] = counts.states.get(state, 0) + n
        counts.failed.extend(conn.execute(
            "SELECT id, state, route, stage_index, reason FROM items"
            f" WHERE seq IN ({marks}) AND state IN ('dead', 'rejected') ORDER BY seq", chunk,
        ))  # fmt: skip
        for stage, outcome, n, timed, total, longest, wait in conn.execute(
            "SELECT stage, outcome, count(*), count(duration), coalesce(sum(duration), 0),"
            " max(duration), coalesce(sum(slot_wait), 0) FROM runs"
            f" WHERE item_seq IN ({marks}) AND started_at >= ? AND outcome IS NOT NULL"
            " GROUP BY stage, outcome", [*chunk, since],
        ):  # fmt: skip
            got = counts.runs.setdefault((stage, outcome), [0, 0, 0.0, None, 0.0])
            got[0] += n
            got[1] += timed
            got[2] += total
            if longest is not None and (got[3] is None or longest > got[3]):
                got[3] = longest
            got[4] += wait
    return counts


def op_get_item(conn: sqlite3.Connection, item_id: str) -> Item:
    """The item with this id.

    Raises:
        ItemNotFound: no such item.
    """
    row = conn.execute(f"SELECT {_ITEM_COLUMNS} FROM items WHERE id = ?", (item_id,)).fetchone()
    if row is None:
        raise ItemNotFound(item_id)
    return _item(row)


def op_item_runs(conn: sqlite3.Connection, seq: int) -> list[RunRecord]:
    """Every run of an item, oldest first."""
    rows = conn.execute(f"SELECT {_RUN_COLUMNS} FROM runs WHERE item_seq = ? ORDER BY id", (seq,))
    return [_run(r) for r in rows]


# --- the async store -------------------------------------------------------------------------


@attrs.define(eq=False)
class _Op:
    fn: Callable[[sqlite3.Connection], Any]
    power_safe: bool = True
    #: Nobody waits for it: log its error.
    report: bool = False
    #: Called in the loop once the operation is through (durable, or failed: see ``error``).
    on_done: Callable[[_Op], None] | None = None
    #: Set once through, for a caller that waits (`SqliteStore.call`); None for `submit`.
    done: trio.Event | None = None
    result: Any = None
    error: BaseException | None = None


class SqliteStore:
    """Async face of the SQLite store; every call is durable when it returns.

    Built by `open_sqlite_store`, which owns the committer task.
    """

    def __init__(
        self, conn: sqlite3.Connection, path: Path, synchronous: str = "FULL", *,
        last_run_id: int = 0,
    ) -> None:  # fmt: skip
        self.path = path
        self._conn = conn
        #: Fsync the WAL for power-safe operations (``synchronous=FULL``).
        self._full = synchronous == "FULL"
        self._pending: list[_Op] = []
        self._wakeup = trio.Event()
        self._unsynced: list[_Op] = []
        self._sync_wakeup = trio.Event()
        self._limiter = trio.CapacityLimiter(1)
        self._wal_fd: int | None = None
        self._closed = False
        #: Why the last transaction or fsync failed; None once one succeeds again (health).
        self.last_failure: str | None = None
        #: Transactions committed, operations carried and WAL fsyncs, for benchmarks and metrics.
        self.commits = 0
        self.operations = 0
        self.syncs = 0
        self._last_run_id = last_run_id

    @property
    def last_run_id(self) -> int:
        """The highest run id handed out so far (`new_run_id` only goes up)."""
        return self._last_run_id

    def new_run_id(self) -> int:
        """A run id nobody has used: the one writer of this store (the instance lock) picks them,
        so a run's id -- and its environment marker -- exists before its record is written."""
        self._last_run_id += 1
        return self._last_run_id

    async def reload_run_ids(self, at_least: int = 0, *, gap: int = 0) -> None:
        """Continue run ids after the highest recorded (recovery records runs of the dead) and
        after ``at_least`` (the highest id with a run log or in the run journal: runs the store
        never recorded), ``gap`` further on."""
        last = await self.read(op_last_run_id)
        self._last_run_id = max(self._last_run_id, last, at_least) + gap

    async def call(self, fn: Callable[[sqlite3.Connection], T], *, power_safe: bool = True) -> T:
        """Run ``fn(conn)`` in its own savepoint of the next group commit; return its result.

        Args:
            fn: the operation; it runs in the store's thread inside a transaction.
            power_safe: False returns once committed, without waiting for the fsync (see the
                module docstring); it is durable against a crash of this process either way.

        Raises:
            StoreUnavailable: the store is closed or the transaction could not be committed.
        """
        if self._closed:
            raise StoreUnavailable("the store is closed")
        done = trio.Event()
        op = _Op(fn, power_safe, done=done)
        self._pending.append(op)
        self._wakeup.set()
        await done.wait()
        if op.error is not None:
            raise op.error
        return op.result  # type: ignore[no-any-return]

    def submit(
        self, fn: Callable[[sqlite3.Connection], object], *, power_safe: bool = False,
        on_done: Callable[[_Op], None] | None = None,
    ) -> None:  # fmt: skip
        """Queue ``fn(conn)`` for the next group commit without waiting for it.

        Operations commit in the order they were queued, so a later `call` returning means this
        one is committed too. ``on_done(op)`` is called in the loop once the operation is
        through -- committed (and fsynced when ``power_safe`` and the store is FULL) or failed
        (``op.error``); without it, a failure is logged.
        """
        if self._closed:
            if on_done is not None:
                op = _Op(fn, power_safe, error=StoreUnavailable("the store is closed"))
                on_done(op)
            return
        self._pending.append(_Op(fn, power_safe, report=on_done is None, on_done=on_done))
        self._wakeup.set()

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only ``fn(conn)`` in the store's thread, outside any batch."""
        return await trio.to_thread.run_sync(fn, self._conn, limiter=self._limiter)

    @contextlib.asynccontextmanager
    async def commits_held(self) -> AsyncIterator[None]:
        """No transaction of this store's starts while the block runs (a checkpoint's end)."""
        async with self._limiter:
            yield

    async def serve_committer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Commit queued operations in groups until cancelled."""
        task_status.started()
        while True:
            await self._wakeup.wait()
            # One scheduling round before taking the batch: a task woken by the same event
            # (the worker that gets a slot a finishing run just released) adds its operation
            # to this transaction instead of waiting for the next.
            await trio.lowlevel.cancel_shielded_checkpoint()
            self._wakeup = trio.Event()
            batch, self._pending = self._pending, []
            try:
                await trio.to_thread.run_sync(self._commit, batch, limiter=self._limiter)
            except BaseException:
                self._wake(batch)
                raise
            if self._full:
                waiting = [op for op in batch if op.power_safe and op.error is None]
                if waiting:
                    self._unsynced.extend(waiting)
                    self._sync_wakeup.set()
                    batch = [op for op in batch if not op.power_safe or op.error is not None]
            self._wake(batch)

    async def serve_syncer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Fsync the WAL for committed power-safe operations, then wake them; until cancelled.

        Its thread hop does not take the connection's limiter: the fsync runs beside the next
        transaction.
        """
        task_status.started()
        while True:
            await self._sync_wakeup.wait()
            self._sync_wakeup = trio.Event()
            batch, self._unsynced = self._unsynced, []
            try:
                await trio.to_thread.run_sync(self._sync, batch)
            finally:
                self._wake(batch)

    @staticmethod
    def _wake(batch: list[_Op]) -> None:
        for op in batch:
            if op.done is not None:
                op.done.set()
            if op.on_done is not None:
                op.on_done(op)
            elif op.report and op.error is not None:
                logger.opt(exception=op.error).error("store operation failed")

    def _sync(self, batch: list[_Op]) -> None:
        try:
            if self._wal_fd is None:
                self._wal_fd = os.open(f"{self.path}-wal", os.O_RDONLY | os.O_CLOEXEC)
            os.fdatasync(self._wal_fd)
        except FileNotFoundError:
            pass  # no WAL: everything committed is checkpointed into the (synced) database
        except OSError as exc:
            error = StoreUnavailable(f"cannot sync the store {str(self.path)!r}: {exc}")
            self.last_failure = str(error)
            for op in batch:
                op.error = error
            return
        self.syncs += 1

    def _commit_together(self, batch: list[_Op]) -> bool:
        """The common case, cheaply: every operation succeeds, no savepoint each. False (rolled
        back, nothing recorded) when any fails -- then `_commit` isolates each in a savepoint."""
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            results = _run_together(conn, batch)
            conn.execute("COMMIT")
        except Exception:
            _rollback_quietly(conn)
            return False
        for op, result in zip(batch, results, strict=True):
            op.result = result
        self.last_failure = None
        self.commits += 1
        self.operations += len(batch)
        return True

    def _commit(self, batch: list[_Op]) -> None:
        if len(batch) > 1 and self._commit_together(batch):
            return
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in batch:
                conn.execute("SAVEPOINT op")
                try:
                    op.result = op.fn(conn)
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    op.error = exc
                    if isinstance(exc, sqlite3.OperationalError) and _is_disk_error(exc):
                        self.last_failure = f"cannot write the store {str(self.path)!r}: {exc}"
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            _rollback_quietly(conn)
            error = StoreUnavailable(f"cannot write the store {str(self.path)!r}: {exc}")
            self.last_failure = str(error)
            for op in batch:
                op.error = error
            return
        if not any(op.error is not None for op in batch):
            self.last_failure = None
        self.commits += 1
        self.operations += len(batch)

    # Typed conveniences over `call` for the engine.

    async def ingest(self, items: Sequence[NewItem]) -> list[Item]:
        """Durably add new items; known (source, key) pairs are skipped. Returns those added."""
        return await self.call(lambda c: op_ingest(c, items))

    async def start_run(
        self, item: Item, stage: str, slot_wait: float, instance: str | None
    ) -> tuple[int, int] | None:
        """Claim ``item`` for a run; see `op_start_run` (not fsynced on its own: `call`)."""
        return await self.call(
            lambda c: op_start_run(c, item, stage, slot_wait, instance), power_safe=False
        )

    async def finish_run(
        self, *, run_id: int, item: Item, result: RunResult, transition: Transition,
        log_path: str | None,
    ) -> None:  # fmt: skip
        """Durably close a run and move its item; see `op_finish_run`."""
        await self.call(
            lambda c: op_finish_run(
                c,
                run_id=run_id,
                item=item,
                result=result,
                transition=transition,
                log_path=log_path,
            )
        )

    async def close(self) -> None:
        self._closed = True
        error = StoreUnavailable("the store is closed")
        for op in self._pending + self._unsynced:
            op.error = error
            if op.done is not None:
                op.done.set()
            if op.on_done is not None:
                op.on_done(op)
        self._pending.clear()
        self._unsynced.clear()
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None
        await trio.to_thread.run_sync(self._conn.close, limiter=self._limiter)


def _rollback_quietly(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def _is_disk_error(exc: sqlite3.Error) -> bool:
    text = str(exc).lower()
    return "disk" in text or "i/o" in text or "readonly" in text or "read-only" in text


@asynccontextmanager
async def open_sqlite_store(
    path: Path, *, synchronous: str = "FULL", busy_timeout: float = 5.0
) -> AsyncIterator[SqliteStore]:
    """Open (creating if needed) the store at ``path`` and run its committer for the block.

    Synopsis::

        async with open_sqlite_store(state_dir / "orchestrator.db") as store:
            added = await store.ingest(new_items)
    """

    # With FULL, SQLite itself runs at NORMAL and the store's syncer does the fsyncs.
    def open_both() -> tuple[sqlite3.Connection, sqlite3.Connection, int]:
        conn = connect(path, synchronous="NORMAL", busy_timeout=busy_timeout)
        # Checkpoints (copying the WAL into the database, with two fsyncs) are taken off the
        # commit path: a second connection runs them from its own thread.
        conn.execute("PRAGMA wal_autocheckpoint=0")
        conn.execute(f"PRAGMA journal_size_limit={WAL_TARGET_BYTES}")
        checkpointer = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
        )
        checkpointer.execute("PRAGMA synchronous=NORMAL")
        return conn, checkpointer, op_last_run_id(conn)

    conn, checkpointer, last_run_id = await trio.to_thread.run_sync(open_both)
    store = SqliteStore(conn, path, synchronous, last_run_id=last_run_id)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.serve_committer)
            await nursery.start(store.serve_syncer)
            nursery.start_soon(_serve_checkpoints, store, checkpointer)
            try:
                yield store
            finally:
                # Let operations already queued commit before the committer goes away: batches
                # run in order, so once this no-op is through, everything before it is too.
                with trio.move_on_after(10, shield=True):
                    await store.call(lambda c: None)
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            await store.close()
            await trio.to_thread.run_sync(checkpointer.close)


async def _serve_checkpoints(store: SqliteStore, conn: sqlite3.Connection) -> None:
    """Checkpoint the WAL while there are commits: every CHECKPOINT_INTERVAL, and as soon as
    the log grows past WAL_TARGET_BYTES.

    PASSIVE: it never waits for the writer and copies what readers allow. Commits that go on
    beside it keep the log from restarting, so a log over its target size is then checkpointed
    once more with commits held off (the store's connection limiter; the few frames written
    meanwhile, about a millisecond): the next commit restarts it and cuts its file back.
    """
    done = store.commits
    last = trio.current_time()
    wal = f"{store.path}-wal"
    async with contextlib.aclosing(trio_util.periodic(CHECKPOINT_TICK)) as ticks:
        async for _ in ticks:
            if store.commits == done:
                continue
            before = store.commits
            due = trio.current_time() - last >= CHECKPOINT_INTERVAL
            try:
                log = await trio.to_thread.run_sync(_checkpoint, conn, wal, due)
                if log is None:
                    continue
                done, last = before, trio.current_time()
                if log > WAL_TARGET_BYTES and store.commits != before:
                    async with store.commits_held():
                        await trio.to_thread.run_sync(_checkpoint, conn, wal, True)
            except sqlite3.Error as exc:
                logger.warning("store checkpoint failed (will retry): {}", exc)


def _checkpoint(conn: sqlite3.Connection, wal: str, due: bool) -> int | None:
    """A PASSIVE checkpoint when ``due`` or the log file at ``wal`` is over its target size;
    the bytes the log held, or None when it was not checkpointed."""
    if not due:
        try:
            if os.stat(wal).st_size <= WAL_TARGET_BYTES:
                return None
        except FileNotFoundError:
            return None
    _busy, frames, _copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int(frames) * (int(page_size) + WAL_FRAME_HEADER)


# --- operator commands -----------------------------------------------------------------------
# Reads and the one write (`op_requeue`) behind `orchestrator items`, `show`, `status` and
# `requeue`: they run in the operator's process, on their own connection, beside a running service.


def connect_readonly(
    path: Path, *, busy_timeout: float = 5.0, immutable: bool = False
) -> sqlite3.Connection:
    """Open an existing store read-only (never creating it, never writing it).

    WAL lets it read while the service writes; it sees committed transactions only.
    ``immutable``: read the database file as it is, without the WAL or its shared-memory file,
    which a read-only connection must make when the WAL is gone (and cannot on a full disk):
    only for a store whose WAL is empty, that nothing writes.

    Raises:
        StoreUnavailable: there is no store at ``path``, it cannot be read, or it is not an
            orchestrator store this version understands.
    """
    if not path.exists():
        raise StoreUnavailable(f"no store at {str(path)!r}; has the service run yet?")
    try:
        # as_uri() percent-encodes the path: a '?' or '#' in a folder name stays part of it.
        conn = sqlite3.connect(
            f"{path.absolute().as_uri()}?mode=ro{'&immutable=1' if immutable else ''}", uri=True,
            isolation_level=None,
            timeout=busy_timeout,
        )  # fmt: skip
        try:
            conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except BaseException:
            conn.close()
            raise
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot read store {str(path)!r}: {exc}") from exc
    if row is None or int(row[0]) > SCHEMA_VERSION:
        conn.close()
        found = "none" if row is None else row[0]
        raise StoreUnavailable(
            f"store {str(path)!r} has schema version {found}; this orchestrator understands "
            f"up to {SCHEMA_VERSION}: upgrade orchestrator"
        )
    return conn


@attrs.frozen(kw_only=True)
class EventRecord:
    """One row of an item's history."""

    at: float
    event: str
    stage: str | None
    state: str | None
    detail: str | None


@attrs.frozen(kw_only=True)
class RequeueReport:
    """What `op_requeue` did: the ids put back, and ``(id, why not)`` for the others."""

    requeued: tuple[str, ...]
    skipped: tuple[tuple[str, str], ...]


_RUN_COLUMNS_R = ", ".join(f"r.{c.strip()}" for c in _RUN_COLUMNS.split(","))
# The item's current stage in SQL (NULL once past its route), as `Item.stage` computes it.
_CURRENT_STAGE = "json_extract(route, '$[' || stage_index || ']')"


def op_find_items(
    conn: sqlite3.Connection, *, state: str | None = None, stage: str | None = None,
    limit: int | None = None,
) -> list[Item]:  # fmt: skip
    """Items, oldest first, optionally only those in ``state`` and at current stage ``stage``.

    Done and rejected items are at no stage.
    """
    sql = f"SELECT {_ITEM_COLUMNS} FROM items WHERE 1"
    args: list[Any] = []
    if state is not None:
        sql += " AND state = ?"
        args.append(state)
    if stage is not None:
        sql += f" AND state != 'rejected' AND {_CURRENT_STAGE} = ?"
        args.append(stage)
    sql += " ORDER BY seq LIMIT ?"
    args.append(-1 if limit is None else limit)
    return [_item(r) for r in conn.execute(sql, args)]


def op_item_events(conn: sqlite3.Connection, seq: int) -> list[EventRecord]:
    """Every event of an item, in the order they happened."""
    rows = conn.execute(
        "SELECT at, event, stage, state, detail FROM events WHERE item_seq = ? ORDER BY id", (seq,)
    )
    return [EventRecord(at=r[0], event=r[1], stage=r[2], state=r[3], detail=r[4]) for r in rows]


def op_counts_by_stage(
    conn: sqlite3.Connection, *, rejected_apart: bool = True
) -> tuple[dict[str, dict[str, int]], int]:
    """Items per current stage and state, and the number of rejected items.

    A done item counts under the last stage of its route; rejected items count under no stage
    (with ``rejected_apart``), else under the stage they were rejected at, like the others.
    """
    counts: dict[str, dict[str, int]] = {}
    rejected = 0
    rows = conn.execute(
        "SELECT route, stage_index, state, count(*) FROM items GROUP BY route, stage_index, state"
    )
    for route, index, state, n in rows:
        names = json.loads(route)
        if state == ItemState.REJECTED:
            rejected += n
        if not names or (rejected_apart and state == ItemState.REJECTED):
            continue
        per = counts.setdefault(names[min(index, len(names) - 1)], {})
        per[state] = per.get(state, 0) + n
    return counts, rejected


def op_running_runs(conn: sqlite3.Connection) -> list[tuple[str, RunRecord]]:
    """``(item id, run)`` of every run not yet ended, oldest first."""
    rows = conn.execute(
        f"SELECT i.id, {_RUN_COLUMNS_R} FROM runs r JOIN items i ON i.seq = r.item_seq"
        " WHERE r.outcome IS NULL ORDER BY r.id"
    )
    return [(r[0], _run(r[1:])) for r in rows]


def op_recent_failures(conn: sqlite3.Connection, limit: int = 10) -> list[tuple[str, RunRecord]]:
    """``(item id, run)`` of the last ``limit`` runs that ended other than ``ok``, newest first."""
    rows = conn.execute(
        f"SELECT i.id, {_RUN_COLUMNS_R} FROM runs r JOIN items i ON i.seq = r.item_seq"
        " WHERE r.outcome IS NOT NULL AND r.outcome != 'ok' ORDER BY r.id DESC LIMIT ?",
        (limit,),
    )
    return [(r[0], _run(r[1:])) for r in rows]


def op_requeue(
    conn: sqlite3.Connection, ids: Sequence[str] | None, *, dead: bool, stage: str | None,
    known_stages: Iterable[str] | None = None, to: str | None = None,
    routes: Mapping[str, Sequence[str]] | None = None,
) -> RequeueReport:  # fmt: skip
    """Put dead items back to ``queued`` at the stage where they died, with a fresh start; or,
    with ``to``, dead items and items left waiting at a stage the config no longer has
    ("parked") at stage ``to`` of their source's route in the config.

    Attempts and interruptions go back to 0, ``not_before`` and ``reason`` are cleared (the old
    reason is kept in the ``requeued`` event's detail). Run it inside one write transaction
    (``BEGIN IMMEDIATE``): then either every listed item moves or none does.

    Args:
        ids: the items to requeue, in order; duplicates count once. None with ``dead``, or
            with ``stage`` and ``to``.
        dead: requeue every dead item instead (only those at ``stage`` when given).
        stage: with ``dead``, only items that died at this stage (ignored with ``ids``); with
            ``to`` and not ``dead``: every item dead or parked at this stage.
        known_stages: the stages of the current config; an item whose stage is not among them
            is skipped (no worker could take it) unless ``to`` moves it, and it is what tells
            a parked item. None skips the check (and then no waiting item counts as parked).
        to: the stage to queue the items at instead; the item's route becomes its source's
            route in ``routes``, which must hold ``to``.
        routes: with ``to``, the route of each source of the current config.

    Returns:
        The ids requeued and, for each named id not requeued, why. Rejected items are never
        requeued (they are kept as the evidence of what a source could not use), nor done ones
        (an item reaches its one terminal state once).

    Raises:
        ValueError: not exactly one of ``ids``, ``dead``, ``stage`` with ``to`` was given, or
            ``to`` without ``routes``.
    """
    if ids is not None and dead:
        raise ValueError("give either item ids or dead=True")
    if ids is None and not dead and (stage is None or to is None):
        raise ValueError("give item ids, dead=True, or a stage with to")
    if to is not None and routes is None:
        raise ValueError("to needs the config's routes")
    known = None if known_stages is None else set(known_stages)
    if ids is None:
        found = op_find_items(conn, state=ItemState.DEAD, stage=stage)
        if not dead and known is not None and stage not in known:  # and those parked there
            found += op_find_items(conn, state=ItemState.QUEUED, stage=stage)
            found += op_find_items(conn, state=ItemState.RETRY_WAIT, stage=stage)
            found.sort(key=lambda item: item.seq)
        targets: list[tuple[str, Item | None]] = [(item.id, item) for item in found]
    else:
        targets = []
        for item_id in dict.fromkeys(ids):
            row = conn.execute(
                f"SELECT {_ITEM_COLUMNS} FROM items WHERE id = ?", (item_id,)
            ).fetchone()
            targets.append((item_id, None if row is None else _item(row)))
    now = time.time()
    requeued: list[str] = []
    skipped: list[tuple[str, str]] = []
    for item_id, item in targets:
        if item is None:
            skipped.append((item_id, f"no item {item_id!r} in the store"))
            continue
        why = _not_requeued(item, known, to, routes)
        if why is not None:
            skipped.append((item_id, why))
            continue
        route, index, detail = item.route, item.stage_index, item.reason
        if to is not None:
            assert routes is not None
            route = tuple(routes[item.source])
            index = route.index(to)
            detail = f"from stage {item.stage!r}" + (f": {item.reason}" if item.reason else "")
        conn.execute(
            "UPDATE items SET state = 'queued', route = ?, stage_index = ?, attempts = 0,"
            " interruptions = 0, not_before = NULL, reason = NULL, updated_at = ? WHERE seq = ?",
            (json.dumps(list(route)), index, now, item.seq),
        )
        _event(conn, item.seq, now, "requeued", route[index], ItemState.QUEUED.value, detail)
        requeued.append(item_id)
    return RequeueReport(requeued=tuple(requeued), skipped=tuple(skipped))


@attrs.frozen(kw_only=True)
class PurgeCandidate:
    """A terminal item `op_purge_candidates` found: what purge needs to judge it."""

    seq: int
    id: str
    source: str
    key: str
    path: str | None
    state: str


def op_purge_candidates(
    conn: sqlite3.Connection, *, before: float, states: Sequence[str], after_seq: int,
    limit: int,
) -> list[PurgeCandidate]:  # fmt: skip
    """Up to ``limit`` items in ``states`` (terminal ones) last changed before ``before``, with
    a seq above ``after_seq``, in seq order (purge pages through them)."""
    marks = ", ".join("?" * len(states))
    rows = conn.execute(
        f"SELECT seq, id, source, key, path, state FROM items WHERE seq > ? AND state IN ({marks})"
        " AND updated_at < ? ORDER BY seq LIMIT ?",
        (after_seq, *states, before, limit),
    ).fetchall()
    return [
        PurgeCandidate(seq=seq, id=id_, source=source, key=key, path=path, state=state)
        for seq, id_, source, key, path, state in rows
    ]


def op_newest(conn: sqlite3.Connection) -> frozenset[int]:
    """The seqs of the newest item and of the item with the newest run, which purge keeps.

    SQLite numbers a new row one past the highest there is: were those rows deleted, the next
    item would get a purged item's seq (and, after a restart, a run a purged run's id) -- and
    with it a workdir or a run log the purge is still removing, or left behind by a crash.
    Kept, the numbers only ever grow.
    """
    row = conn.execute(
        "SELECT (SELECT max(seq) FROM items),"
        " (SELECT item_seq FROM runs WHERE id = (SELECT max(id) FROM runs))"
    ).fetchone()
    return frozenset(seq for seq in row if seq is not None)


def op_purge_items(
    conn: sqlite3.Connection, seqs: Sequence[int], *, before: float, states: Sequence[str],
    runs_dir: str | None = None,
) -> tuple[list[int], int, int, list[str]]:  # fmt: skip
    """Delete the items ``seqs`` with their runs and events -- those still in ``states`` and
    unchanged since ``before`` (a requeue in between keeps one), and never the `op_newest`
    ones. Run it inside one write transaction.

    Returns:
        The seqs deleted, the numbers of runs and events deleted, and the run log paths of the
        deleted runs (the caller removes those files once the transaction is committed): the
        recorded ones, and with ``runs_dir`` where the others' logs would be (a run a dead
        instance left open has a log but no recorded path).
    """
    marks = ", ".join("?" * len(states))
    gone: list[int] = []
    runs = events = 0
    logs: list[str] = []
    newest = op_newest(conn)
    for seq in seqs:
        if seq in newest:
            continue
        still = conn.execute(
            f"SELECT 1 FROM items WHERE seq = ? AND state IN ({marks}) AND updated_at < ?",
            (seq, *states, before),
        ).fetchone()
        if still is None:
            continue
        for run_id, log_path in conn.execute(
            "SELECT id, log_path FROM runs WHERE item_seq = ?", (seq,)
        ):
            if log_path is not None:
                logs.append(log_path)
            elif runs_dir is not None:
                logs.append(f"{runs_dir}/{run_id}.log")
        runs += conn.execute("DELETE FROM runs WHERE item_seq = ?", (seq,)).rowcount
        events += conn.execute("DELETE FROM events WHERE item_seq = ?", (seq,)).rowcount
        conn.execute("DELETE FROM items WHERE seq = ?", (seq,))
        gone.append(seq)
    return gone, runs, events, logs


def _not_requeued(
    item: Item, known: Set[str] | None, to: str | None,
    routes: Mapping[str, Sequence[str]] | None,
) -> str | None:  # fmt: skip
    """Why `op_requeue` leaves ``item`` as it is, or None to requeue it."""
    name = repr(item.id)
    waiting = item.state in (ItemState.QUEUED, ItemState.RETRY_WAIT)
    parked = to is not None and known is not None and waiting and item.stage not in known
    if item.state is ItemState.REJECTED:
        return (f"{name} is rejected, not dead; rejected items are kept as evidence and never "
                "requeued")  # fmt: skip
    if item.state is not ItemState.DEAD and not parked:
        if to is not None and waiting:
            return (f"{name} is {item.state.value} at stage {item.stage!r}, which is in the "
                    "config: it runs there; not requeued")  # fmt: skip
        return f"{name} is {item.state.value}, not dead; not requeued"
    if to is None:
        if item.stage is None or (known is not None and item.stage not in known):
            return (f"{name} died at stage {item.stage!r}, which is not in the config; not "
                    "requeued (--to puts it at a stage of its source's route)")  # fmt: skip
        return None
    route = None if routes is None else routes.get(item.source)
    if route is None:
        return (f"{name} comes from source {item.source!r}, which is not in the config; "
                "not requeued")  # fmt: skip
    if to not in route:
        return (f"stage {to!r} is not on the route of {name}'s source {item.source!r} "
                f"({' -> '.join(route)}); not requeued")  # fmt: skip
    return None
