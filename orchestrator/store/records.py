"""Value types the store reads and writes: items, runs, transitions."""

from __future__ import annotations

import enum

import attrs

__all__ = [
    "TERMINAL_STATES",
    "Item",
    "ItemState",
    "NewItem",
    "RunRecord",
    "Transition",
]


class ItemState(enum.StrEnum):
    """Where an item is in its lifecycle (DESIGN §3)."""

    QUEUED = "queued"
    RUNNING = "running"
    RETRY_WAIT = "retry_wait"
    DONE = "done"
    DEAD = "dead"
    REJECTED = "rejected"


#: States an item never leaves on its own (``requeue`` brings a dead item back).
TERMINAL_STATES = frozenset({ItemState.DONE, ItemState.DEAD, ItemState.REJECTED})


@attrs.frozen(kw_only=True)
class NewItem:
    """An item a source found, before the store gave it a sequence number."""

    id: str
    source: str
    #: Dedupe key within the source: a relative path, a record id or a file offset.
    key: str
    route: tuple[str, ...]
    path: str | None = None
    #: The record as JSON text, for record sources.
    payload: str | None = None
    state: ItemState = ItemState.QUEUED
    #: Why a source rejected it (state ``rejected`` only).
    reason: str | None = None


@attrs.frozen(kw_only=True)
class Item:
    """An item as the store holds it."""

    seq: int
    id: str
    source: str
    key: str
    route: tuple[str, ...]
    path: str | None
    payload: str | None
    stage_index: int
    state: ItemState
    #: Attempts made at the current stage (1-based once a run started).
    attempts: int
    interruptions: int
    #: Unix time before which a ``retry_wait`` item must not run again.
    not_before: float | None
    reason: str | None
    created_at: float
    updated_at: float

    @property
    def stage(self) -> str | None:
        """The stage the item is at, or None once it has passed its whole route."""
        return self.route[self.stage_index] if self.stage_index < len(self.route) else None

    def running(self, attempt: int) -> Item:
        """This item as its run of ``attempt`` leaves it (`attrs.evolve`, a few times faster:
        the engine makes two copies per run)."""
        return Item(
            seq=self.seq, id=self.id, source=self.source, key=self.key, route=self.route,
            path=self.path, payload=self.payload, stage_index=self.stage_index,
            state=ItemState.RUNNING, attempts=attempt, interruptions=self.interruptions,
            not_before=self.not_before, reason=self.reason, created_at=self.created_at,
            updated_at=self.updated_at,
        )  # fmt: skip

    def moved(self, transition: Transition) -> Item:
        """This item once ``transition`` is durable."""
        return Item(
            seq=self.seq, id=self.id, source=self.source, key=self.key, route=self.route,
            path=self.path, payload=self.payload, stage_index=transition.stage_index,
            state=transition.state, attempts=transition.attempts,
            interruptions=self.interruptions, not_before=transition.not_before,
            reason=transition.reason, created_at=self.created_at, updated_at=self.updated_at,
        )  # fmt: skip


@attrs.frozen(kw_only=True)
class Transition:
    """The state an item moves to when a run ends (decided by `orchestrator.pipeline.decide`)."""

    state: ItemState
    stage_index: int
    attempts: int
    not_before: float | None = None
    reason: str | None = None
    #: Attempts are not spent (a cancelled run is given back).
    interruption: bool = False


@attrs.frozen(kw_only=True)
class RunRecord:
    """One run as the store holds it."""

    id: int
    item_seq: int
    stage: str
    attempt: int
    started_at: float
    ended_at: float | None
    outcome: str | None
    exit_code: int | None
    signal: int | None
    duration: float | None
    slot_wait: float | None
    pid: int | None
    pgid: int | None
    log_path: str | None
    tail: str | None
    reason: str | None
