"""Store operations of the sources: plain functions of a connection, like the store's ``op_*``.

Each runs inside the transaction `SqliteStore.call` opens (or through `SqliteStore.read`), so
what one operation writes is committed together or not at all -- a record source's items and
the position just past them are one transaction, which is what lets a restart neither skip nor
repeat a record.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import attrs

from orchestrator.store.sqlite import escaped_key, op_ingest, op_items_by_seq

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Iterable, Iterator, Sequence

    from orchestrator.store.records import Item, NewItem

__all__ = [
    "Position",
    "op_ingest_records",
    "op_items_by_key",
    "op_keys_held",
    "op_set_item_paths",
    "op_source_has_items",
    "op_source_position",
]

#: Keys looked up per statement (SQLite's default limit of host parameters is 999 or more).
KEYS_PER_QUERY = 500


@attrs.frozen
class Position:
    """Where a record source has read up to: a file (device, inode) and a byte offset in it."""

    device: int
    inode: int
    offset: int
    #: The last bytes before ``offset`` (up to 64): after a restart they tell whether the file
    #: at (device, inode) is still the one read -- a file recreated with a reused inode is not.
    tail: bytes = attrs.field(default=b"", eq=False)
    #: The file's first bytes (up to 256, and not past ``offset``): a file truncated and
    #: written again from its start holds other ones, even when its bytes before ``offset``
    #: happen to be the same.
    head: bytes = attrs.field(default=b"", eq=False)
    #: When (``time.time()``) the source last saw the file it follows at its path (None: never).
    #: A file rotated away from the path after that, and not read yet, was modified since.
    seen: float | None = attrs.field(default=None, eq=False)


def op_source_position(conn: sqlite3.Connection, source: str) -> Position | None:
    """The stored position of ``source``, or None when it has none yet."""
    row = conn.execute(
        "SELECT device, inode, offset, tail, head, seen FROM source_offsets WHERE source = ?",
        (source,),
    ).fetchone()
    if row is None or row[0] is None or row[1] is None:
        return None
    return Position(
        int(row[0]), int(row[1]), int(row[2]), bytes(row[3] or b""), bytes(row[4] or b""),
        None if row[5] is None else float(row[5]),
    )  # fmt: skip


def op_ingest_records(
    conn: sqlite3.Connection, source: str, records: Sequence[tuple[NewItem, bool]],
    position: Position | None = None, *, again: bool = False,
) -> list[Item]:  # fmt: skip
    """Insert a source's new items and, in the same transaction, store its new position.

    Args:
        records: ``(item, positional)`` in the order found. A positional item is keyed by where
            it was found (inode and offset); since the stored position guarantees no record is
            read twice, a positional key already taken can only be an older record at the same
            place (the file was truncated, or its inode reused), so the new one gets a ``~N``
            suffix instead of being dropped. Other items are keyed by their content's id and a
            known key is skipped.
        position: stored as the source's position when given.
        again: the records were read from the start of a file the source may have read before
            (one rotated away before the source got to it, which a restart can come upon once
            more): a positional key held by a record with the same payload (or, rejected, none)
            is that record, and it is skipped rather than taken twice.

    Returns:
        The items actually inserted.
    """
    claimed: set[str] = set()  # keys given in this call (not inserted yet)
    items: list[NewItem] = []
    for new, positional in records:
        item = _unique(conn, source, new, claimed, again=again) if positional else new
        if item is not None:
            items.append(item)
    added = op_ingest(conn, items)
    if position is not None:
        conn.execute(
            "INSERT INTO source_offsets (source, device, inode, offset, tail, head, seen,"
            " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (source) DO UPDATE SET"
            " device = excluded.device, inode = excluded.inode, offset = excluded.offset,"
            " tail = excluded.tail, head = excluded.head, seen = excluded.seen,"
            " updated_at = excluded.updated_at",
            (source, position.device, position.inode, position.offset, position.tail,
             position.head, position.seen, time.time()),
        )  # fmt: skip
    return added


def _unique(
    conn: sqlite3.Connection, source: str, new: NewItem, claimed: set[str], *, again: bool
) -> NewItem | None:
    n = 1
    key, item_id = new.key, new.id
    while True:
        if key not in claimed:
            held = _holder(conn, source, key, item_id)
            if held is None:
                break
            if again and held[0] == new.payload:
                return None
        n += 1
        key, item_id = f"{new.key}~{n}", f"{new.id}~{n}"
    claimed.add(key)
    return new if n == 1 else attrs.evolve(new, key=key, id=item_id)


def _holder(
    conn: sqlite3.Connection, source: str, key: str, item_id: str
) -> tuple[str | None] | None:
    """The payload of the item that holds ``key`` (or ``item_id``), in a 1-tuple; None: free."""
    row = conn.execute(
        "SELECT payload FROM items WHERE (source = ? AND key = ?) OR id = ? LIMIT 1",
        (source, key, item_id),
    ).fetchone()
    return None if row is None else (row[0],)


def _key_chunks(keys: Iterable[str]) -> Iterator[list[str]]:
    """``keys`` as the store holds them (see `escaped_key`), KEYS_PER_QUERY at a time."""
    wanted = [escaped_key(k) for k in keys]
    for start in range(0, len(wanted), KEYS_PER_QUERY):
        yield wanted[start : start + KEYS_PER_QUERY]


def op_items_by_key(conn: sqlite3.Connection, source: str, keys: Iterable[str]) -> list[Item]:
    """The items of ``source`` with these keys (those the store holds), in ingest order.

    A key that is not valid UTF-8 (a file name in another encoding) is looked up as the store
    keeps it, escaped; the item then carries the escaped key.
    """
    seqs: list[int] = []
    for chunk in _key_chunks(keys):
        marks = ", ".join("?" * len(chunk))
        seqs += [
            r[0]
            for r in conn.execute(
                f"SELECT seq FROM items WHERE source = ? AND key IN ({marks})", (source, *chunk)
            )
        ]
    return op_items_by_seq(conn, sorted(seqs))


def op_keys_held(conn: sqlite3.Connection, source: str, keys: Iterable[str]) -> set[str]:
    """Which of ``keys`` the store holds for ``source`` (as the store keeps them, escaped)."""
    held: set[str] = set()
    for chunk in _key_chunks(keys):
        marks = ", ".join("?" * len(chunk))
        held.update(
            r[0]
            for r in conn.execute(
                f"SELECT key FROM items WHERE source = ? AND key IN ({marks})", (source, *chunk)
            )
        )
    return held


def op_source_has_items(conn: sqlite3.Connection, source: str) -> bool:
    """Whether ``source`` has ingested anything yet."""
    row = conn.execute("SELECT 1 FROM items WHERE source = ? LIMIT 1", (source,)).fetchone()
    return row is not None


def op_set_item_paths(conn: sqlite3.Connection, moved: Iterable[tuple[int, str]]) -> None:
    """Record that items' files are elsewhere now (their source moved them): ``(seq, path)``."""
    conn.executemany("UPDATE items SET path = ? WHERE seq = ?", [(p, seq) for seq, p in moved])
