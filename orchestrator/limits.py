"""Stage and pool limits: named ``trio.CapacityLimiter``s, acquired in one fixed order.

A run holds one token of its stage's limiter (size ``concurrency``) and one of every pool it
names, from before its process starts until its process tree is gone. Tokens are taken stage
first, then pools in name order -- the same order for every run -- so two runs can never each
hold what the other waits for. ``CapacityLimiter`` queues waiters FIFO.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import trio
from loguru import logger

from orchestrator.logs import debug_enabled

if TYPE_CHECKING:
    from orchestrator.config import Config

__all__ = ["Holder", "LimitStats", "Slots"]


@attrs.define(eq=False)
class Holder:
    """Who holds (or waits for) a slot: the borrower object handed to the limiters."""

    item: str
    stage: str
    #: The attempt the run will be, for the slot lines (None: not a run's).
    attempt: int | None = None
    since: float = attrs.field(factory=trio.current_time)
    #: The limit it waits for now, as (kind, name): ``("stage", stage)`` or ``("pool", pool)``;
    #: None while it waits for none (it holds its slots, or has not asked yet).
    waiting_for: tuple[str, str] | None = None
    #: The run's id, once it has one: it is handed out after the slots are taken, so only the
    #: line of their release carries it (found by an acceptance tester, session 17: none did).
    run: int | None = None

    def log(self, **extra: object) -> Any:
        """A logger bound to who this is."""
        if self.run is not None:
            extra["run"] = self.run
        return logger.bind(item=self.item, stage=self.stage, attempt=self.attempt, **extra)


@attrs.frozen
class LimitStats:
    """A snapshot of one limit."""

    kind: str  #: "stage" or "pool"
    name: str
    total: int
    busy: int
    waiting: int
    holders: tuple[str, ...]


class Slots:
    """Every stage's and pool's limiter, built once from the config."""

    def __init__(self, config: Config) -> None:
        self.stage_limiters = {s.name: trio.CapacityLimiter(s.concurrency) for s in config.stages}
        self.pool_limiters = {name: trio.CapacityLimiter(n) for name, n in config.pools.items()}
        self._order = {
            s.name: [("stage", s.name, self.stage_limiters[s.name])]
            + [("pool", p, self.pool_limiters[p]) for p in sorted(set(s.pools))]
            for s in config.stages
        }

    async def acquire(self, holder: Holder) -> float:
        """Take every slot ``holder.stage`` needs, in the fixed order; return the seconds waited.

        On cancellation, the slots taken so far are given back before `trio.Cancelled` propagates.
        """
        start = trio.current_time()
        taken: list[trio.CapacityLimiter] = []
        try:
            for kind, name, limiter in self._order[holder.stage]:
                try:
                    limiter.acquire_on_behalf_of_nowait(holder)
                except trio.WouldBlock:
                    log = holder.log(pool=name) if kind == "pool" else holder.log()
                    stats = limiter.statistics()
                    log.debug(
                        "waiting for slot ({} {}: {}/{} busy, {} waiting)", kind, name,
                        stats.borrowed_tokens, stats.total_tokens, stats.tasks_waiting,
                    )  # fmt: skip
                    holder.waiting_for = (kind, name)
                    try:
                        await limiter.acquire_on_behalf_of(holder)
                    finally:
                        holder.waiting_for = None
                taken.append(limiter)
        except BaseException:
            for limiter in reversed(taken):
                limiter.release_on_behalf_of(holder)
            raise
        holder.since = trio.current_time()
        waited = holder.since - start
        holder.log().debug("slot acquired after {:.3f}s", waited)
        return waited

    def try_acquire(self, holder: Holder) -> bool:
        """Take every slot ``holder.stage`` needs if all are free now (nobody waiting first);
        otherwise take none and return False (then `acquire` waits in line)."""
        taken: list[trio.CapacityLimiter] = []
        for _kind, _name, limiter in self._order[holder.stage]:
            try:
                limiter.acquire_on_behalf_of_nowait(holder)
            except trio.WouldBlock:
                for got in reversed(taken):
                    got.release_on_behalf_of(holder)
                return False
            taken.append(limiter)
        holder.since = trio.current_time()
        if debug_enabled():
            holder.log().debug("slot acquired after 0.000s")
        return True

    def release(self, holder: Holder) -> None:
        """Give back every slot ``holder`` took."""
        for _kind, _name, limiter in reversed(self._order[holder.stage]):
            limiter.release_on_behalf_of(holder)
        if debug_enabled():
            holder.log().debug("slot released after {:.3f}s", trio.current_time() - holder.since)

    def statistics(self) -> list[LimitStats]:
        """A snapshot of every limit: size, busy tokens, waiters and the items holding them."""
        out = []
        for kind, limiters in (("stage", self.stage_limiters), ("pool", self.pool_limiters)):
            for name, limiter in limiters.items():
                s = limiter.statistics()
                holders = tuple(getattr(b, "item", repr(b)) for b in s.borrowers)
                out.append(LimitStats(kind, name, int(s.total_tokens), s.borrowed_tokens,
                                      s.tasks_waiting, holders))  # fmt: skip
        return out
