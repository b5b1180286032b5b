"""Durable state: items, runs, events. SQLite (embedded) is the default backend."""

from __future__ import annotations

from orchestrator.store.records import (
    TERMINAL_STATES,
    Item,
    ItemState,
    NewItem,
    RunRecord,
    Transition,
)
from orchestrator.store.sqlite import SqliteStore, connect, open_sqlite_store

__all__ = [
    "TERMINAL_STATES",
    "Item",
    "ItemState",
    "NewItem",
    "RunRecord",
    "SqliteStore",
    "Transition",
    "connect",
    "open_sqlite_store",
]
