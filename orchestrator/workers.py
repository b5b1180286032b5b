"""The engine: per-stage queues, stage workers, source pollers feeding them, retry timers.

The store is the truth; the queues here are an index of it for this process. Each stage has
``concurrency`` worker tasks; a worker takes the next item of its stage (FIFO), acquires the
stage's and pools' slots, durably claims the item, runs the command, durably records what
happened, releases the slots and hands the item on.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import os
import shutil
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

import attrs
import trio
import trio_util
from loguru import logger

from orchestrator.limits import Holder, Slots
from orchestrator.pipeline import code_argument, decide, expand_argv, uses_placeholder
from orchestrator.reaper import STATE_MARKER
from orchestrator.runner import (
    TAIL_BYTES,
    TAIL_LINES,
    Command,
    Outcome,
    RunEnvironment,
    RunResult,
    StageEnvironment,
    find_program,
    run_command,
)
from orchestrator.status import failure_entry
from orchestrator.store.records import TERMINAL_STATES, Item, ItemState, Transition
from orchestrator.store.sqlite import (
    Claim,
    Finish,
    op_give_up,
    op_items_by_seq,
    op_items_changed_since,
)

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping

    from orchestrator.calls import StageRun
    from orchestrator.config import Config, StageConfig
    from orchestrator.journal import RunJournal
    from orchestrator.store.sqlite import SqliteStore, _Op

__all__ = ["Engine", "resolve_executables"]

#: How long an item whose source folder is gone as a whole waits before its file is checked
#: again (the folder may be a mount that comes back; `_prepare`).
FOLDER_WAIT = 1.0
#: `_prepare`'s word for that (an identity, not a reason shown anywhere).
_FOLDER_GONE = "\0folder gone"
#: How many failed dispositions an engine keeps the reasons of (`Engine.failed_dispositions`).
FAILED_DISPOSITIONS_KEPT = 100
#: How long a worker may spend recording a run after shutdown cancelled it.
RECORD_GRACE = 10.0
#: How many recent failures the status file shows.
RECENT_ERRORS = 20
#: How often the store is asked for items put back in a queue by someone else (``requeue``).
STORE_WATCH_INTERVAL = 1.0
#: The watch looks this far back in time, so a commit that lands late is not missed.
STORE_WATCH_OVERLAP = 10.0
#: Most items an engine holds in memory queued for a stage or running (items waiting for a
#: retry's delay come on top: they must not hold fresh ones back). Beyond it, items wait in the
#: store -- where they are durable anyway -- and are read back in order as room frees, so a
#: backlog of a million files costs a seq each, not an item each.
ADMIT_WINDOW = 5000
#: Most ended items handed to a source's terminal hook in one call (one worker thread hop).
ENDED_BATCH_MAX = 500
#: Items are prepared (their file checked, their workdir made) about this much work ahead of
#: their run -- and never more than one batch of `PREPARE_BATCH_MAX` runs per slot ahead.
PREPARE_AHEAD = 0.05
PREPARE_BATCH_MAX = 64
#: The environment variable of each placeholder's value.
_ENV_NAMES = {
    key: f"ORCH_{key.upper()}"
    for key in ("path", "name", "item", "stage", "attempt", "workdir", "payload")
}
#: What each run sets in its environment itself (the rest is its stage's, encoded once).
_PER_RUN_ENV = frozenset([*_ENV_NAMES.values(), "ORCH_RUN"])


@attrs.define(eq=False)
class _Lane:
    """One stage's items waiting to run.

    Items are queued as they come (FIFO), then prepared off the loop a few at a time just ahead
    of the workers -- is the input file still there, the workdir made -- so that a worker whose
    slot frees finds its next item ready, and the thread hop is paid once per batch.
    """

    concurrency: int
    queued: collections.deque[Item] = attrs.field(factory=collections.deque)
    ready: collections.deque[Item] = attrs.field(factory=collections.deque)
    #: Wakes the preparer: something was queued, or a worker took a ready item.
    wanted: trio.Event = attrs.field(factory=trio.Event)
    #: Wakes idle workers: items are ready (replaced by a fresh event each time it is set).
    has_ready: trio.Event = attrs.field(factory=trio.Event)
    #: Moving average of this stage's run durations (seconds): how far ahead to prepare.
    mean_run: float = PREPARE_AHEAD

    def depth(self) -> int:
        """How many prepared items to keep: one per slot, more when runs are short."""
        per_slot = int(PREPARE_AHEAD / max(self.mean_run, 1e-6))
        return self.concurrency * min(max(per_slot, 1), PREPARE_BATCH_MAX)

    def __len__(self) -> int:
        return len(self.queued) + len(self.ready)


@attrs.define(eq=False)
class RunningRun:
    """A run going on now."""

    run: int
    item: str
    stage: str
    attempt: int
    pid: int | None = None
    since: float = attrs.field(factory=trio.current_time)
    #: The worker task it runs in (the watchdog names the run that blocks the event loop).
    task: trio.lowlevel.Task | None = attrs.field(factory=trio.lowlevel.current_task)


@attrs.define
class Tally:
    """What this process has seen happen, for progress bars and summaries."""

    admitted: int = 0
    done: int = 0
    dead: int = 0
    rejected: int = 0
    runs: int = 0
    retries: int = 0

    @property
    def finished(self) -> int:
        return self.done + self.dead + self.rejected


class Engine:
    """Everything the stage workers and pollers share. Built and driven by the supervisor."""

    def __init__(
        self, config: Config, store: SqliteStore, *, instance: str,
        executables: Mapping[str, str] | None = None, batch: bool = True,
        calls: Mapping[str, Callable[[StageRun], Awaitable[object]]] | None = None,
        journal: RunJournal | None = None,
    ) -> None:  # fmt: skip
        self.config = config
        self.store = store
        self.instance = instance
        #: Where each run is written down before it starts (`orchestrator.journal`).
        self.journal = journal
        self.slots = Slots(config)
        self.stages = {s.name: s for s in config.stages}
        self._lanes = {s.name: _Lane(s.concurrency) for s in config.stages}
        #: Per stage, the numbers of its workers alive (`staff`).
        self._workers: dict[str, set[int]] = {s.name: set() for s in config.stages}
        self._runs_dir = str(config.state_dir / "runs")
        self._work_dir = config.state_dir / "work"
        #: Each stage's argument that is code (``sh -c SCRIPT``): passed as written.
        self._code_argument = {s.name: code_argument(s.command) for s in config.stages}
        #: Each directory source's folder: a file whose folder is gone as a whole waits.
        self._folders = {s.name: str(s.path) for s in config.sources if s.type == "directory"}
        self._source_names = frozenset(s.name for s in config.sources)
        self._gone_sources_said: set[str] = set()
        base = dict(os.environ)
        # What every run of a stage gets; each run adds its own ORCH_* values (`_command`).
        self._stage_env = {
            s.name: StageEnvironment(
                {
                    **base, **s.env, "ORCH_STAGE": s.name, "ORCH_INSTANCE": instance,
                    STATE_MARKER: str(config.state_dir),
                },
                per_run=_PER_RUN_ENV,
            )
            for s in config.stages
        }  # fmt: skip
        self._executables = dict(executables or {})
        #: Python stages' functions (`orchestrator.calls.resolve_calls`).
        self._calls = dict(calls or {})
        self._route_workdir: dict[tuple[str, ...], bool] = {}
        self.tally = Tally()
        #: Items not yet terminal that this process knows of.
        self.outstanding = trio_util.AsyncValue(0)
        #: Seqs of the items this process admitted, which a batch summarises. A service keeps
        #: none: the set would grow by every item for as long as it runs.
        self.admitted: set[int] | None = set() if batch else None
        self.batch = batch
        self.stopping = False
        self._interruptible_scopes: set[trio.CancelScope] = set()
        self._timers: trio.Nursery | None = None
        self.on_change: Callable[[Tally], None] = lambda tally: None
        #: Sources whose initial backlog is fully ingested (batch mode waits for all of them).
        self.sources_exhausted = trio_util.AsyncValue(0)
        #: Seqs of the items in flight here (not terminal); the store watch skips these.
        self.active: set[int] = set()
        #: Items taken in charge past ADMIT_WINDOW: seq -> stage, oldest first. They wait
        #: in the store and are read back by `serve_refill`; the store watch skips them too.
        self.deferred: dict[int, str | None] = {}
        self._deferred_stages: collections.Counter[str | None] = collections.Counter()
        self._room = trio.Event()
        #: Items of `active` sleeping out a retry's delay.
        self._sleeping = 0
        #: Runs going on now, by run id (status file, watchdog).
        self.running: dict[int, RunningRun] = {}
        #: The last failures, newest last (status file).
        self.recent_errors: collections.deque[dict[str, object]] = collections.deque(
            maxlen=RECENT_ERRORS
        )
        #: Runs that did not end ok, per stage, since start.
        self.failed_runs: collections.Counter[str] = collections.Counter()
        self.started_wall = time.time()
        #: Per source: called (in the background) with its items that became terminal, in
        #: batches, after their transitions are durable -- where a source moves or deletes
        #: their files. One call at a time per source; the items that end meanwhile wait.
        self.on_terminal: dict[str, Callable[[list[Item]], Awaitable[None]]] = {}
        self._ended: dict[str, list[Item]] = {}
        #: Workdirs of done items waiting to be removed (None: no removal going on).
        self._doomed_workdirs: list[str] | None = None
        #: Called after each run's result is durable: (stage, result, slot wait, transition).
        #: Observers (metrics) must be quick and must not raise.
        self.on_run_end: list[Callable[[str, RunResult, float, Transition], None]] = []
        #: trio.current_time() of the latest run start (watchdog: pipeline stall detection).
        self.last_run_started: float | None = None
        #: Who is waiting for slots now, and since when (trio time; watchdog: slot_wait_warn).
        self.slot_waiters: dict[Holder, float] = {}
        #: trio.current_time() of each source's latest completed poll (metrics, watchdog).
        self.last_poll: dict[str, float] = {}
        #: Items queued for a stage the config no longer has (left queued), and those stages.
        self.parked: set[int] = set()
        self.parked_stages: set[str] = set()
        #: The store failure that ends the service (the first; later ones add nothing).
        self._failure: BaseException | None = None
        #: Sources a batch gave up on (they kept failing), with the last error.
        self.failed_sources: dict[str, str] = {}
        #: Ended items' files that could not be moved or deleted (``on_done``/``on_dead``): how
        #: many, and the first `FAILED_DISPOSITIONS_KEPT` as ``(item id, why)`` (a batch's
        #: summary lists them and exits 1).
        self.failed_dispositions = 0
        self.failed_disposition_samples: list[tuple[str, str]] = []
        #: Runs `kill_runs_now` SIGKILLed ("stop now"): recorded cancelled, not failed.
        self.stopped_now: set[int] = set()
        #: Runs whose result is queued in the store but not yet durable (their items are not
        #: handed on until it is).
        self.unsettled = trio_util.AsyncValue(0)
        #: What the last SIGHUP reload did (status file: ``reload``), None before the first.
        self.last_reload: dict[str, Any] | None = None
        #: SIGHUP reloads since start, by result ("ok", "failed": the config was invalid).
        self.reloads: collections.Counter[str] = collections.Counter()
        #: Set to have the status file written now rather than at the next interval.
        self.status_wanted = trio.Event()
        #: Why the status file could not be written at the last try (None: it was written).
        self.status_file_failure: str | None = None
        #: Per source: why it takes nothing now (its folder is missing, its poller failed);
        #: a source that is read well is not in it (``/health``, the status file's ``sources``).
        self.source_problems: dict[str, str] = {}

    # --- admission and dispatch -----------------------------------------------------------

    def admit(self, item: Item) -> None:
        """Take charge of an item from the store (ingested now, or pending from before).

        Past ADMIT_WINDOW items in memory -- and after any item deferred before it, so items
        keep their order -- a live item is only noted, and read back from the store later.
        """
        if item.seq in self.active or item.seq in self.deferred:
            return
        self._count_admitted(item.seq)
        if item.state not in TERMINAL_STATES and (self.deferred or self._held() >= ADMIT_WINDOW):
            self._defer(item.seq, item.stage)
            return
        self._accept(item)

    def defer(self, pending: Iterable[tuple[int, str | None]]) -> None:
        """Take charge of live items the store holds, by ``(seq, stage)``, oldest first,
        without reading them whole now (a start's backlog): `serve_refill` reads them."""
        for seq, stage in pending:
            if seq not in self.active and seq not in self.deferred:
                self._count_admitted(seq)
                self._defer(seq, stage)

    def _held(self) -> int:
        """Items in memory that count against ADMIT_WINDOW."""
        return len(self.active) - self._sleeping

    def _make_room(self) -> None:
        """Wake `serve_refill` when deferred items wait and at most half the window is held."""
        if self.deferred and self._held() <= ADMIT_WINDOW // 2:
            self._room.set()

    def _count_admitted(self, seq: int) -> None:
        if self.admitted is None:
            self.tally.admitted += 1
        elif seq not in self.admitted:
            self.admitted.add(seq)
            self.tally.admitted += 1
        else:
            return
        self.on_change(self.tally)  # a progress bar's total, from the first item on

    def _defer(self, seq: int, stage: str | None) -> None:
        self.deferred[seq] = stage
        self._deferred_stages[stage] += 1
        self.outstanding.value += 1
        self._room.set()

    def _undefer(self, seq: int) -> None:
        self._deferred_stages[self.deferred.pop(seq)] -= 1

    def _accept(self, item: Item) -> None:
        """Hold ``item`` in memory and send it on its way (or count it, when it has ended)."""
        if item.state in TERMINAL_STATES:
            self._count_terminal(item.state)
            return
        if item.stage not in self.stages:
            self._park(item)
            return
        self.parked.discard(item.seq)  # moved to a stage we have (``requeue --to``)
        self.active.add(item.seq)
        self.outstanding.value += 1
        self._dispatch(item)

    def _park(self, item: Item) -> None:
        """``item`` is queued at a stage the config does not have (it changed since the item
        was ingested): it waits, queued, for a config that has its stage again (or for
        ``requeue --to``) rather than crash the service. Said once per stage: the store watch
        finds such items again at every look (found in session 6: a line per item per second,
        for ever)."""
        if item.seq in self.parked:
            return
        self.parked.add(item.seq)
        stage = item.stage or ""
        if stage not in self.parked_stages:
            self.parked_stages.add(stage)
            logger.bind(item=item.id).warning(
                "items queued for stage {!r}, which is not in the config, are left queued (a"
                " config with that stage again takes them, or `orchestrator requeue --stage"
                " {} --to STAGE` moves them)", stage, stage,
            )  # fmt: skip

    def _dispatch(self, item: Item) -> None:
        if item.state is ItemState.RETRY_WAIT and item.not_before is not None:
            delay = item.not_before - time.time()
            if delay > 0 and self._timers is not None:
                self._sleeping += 1
                self._make_room()
                self._timers.start_soon(self._retry_later, item, delay)
                return
        self._enqueue(item)

    def _enqueue(self, item: Item) -> None:
        lane = self._lanes[item.stage or ""]
        lane.queued.append(item)
        lane.wanted.set()

    async def _retry_later(self, item: Item, delay: float) -> None:
        await trio.sleep(delay)
        self._sleeping -= 1
        self._enqueue(item)

    def _count_terminal(self, state: ItemState) -> None:
        if state is ItemState.DONE:
            self.tally.done += 1
        elif state is ItemState.DEAD:
            self.tally.dead += 1
        else:
            self.tally.rejected += 1
        self.on_change(self.tally)

    def queue_depths(self) -> dict[str, int]:
        """Items waiting in each stage's queue, deferred ones included (not counting retry
        timers)."""
        depths = {name: len(lane) for name, lane in self._lanes.items()}
        for stage, n in self._deferred_stages.items():
            if n and stage in depths:
                depths[stage] += n
        return depths

    # --- shutdown --------------------------------------------------------------------------

    @contextlib.contextmanager
    def _interruptible(self) -> Iterator[trio.CancelScope]:
        """A scope that `stop_taking_work` cancels: waiting for an item or a slot."""
        with trio.CancelScope() as scope:
            if self.stopping:
                scope.cancel()
            self._interruptible_scopes.add(scope)
            try:
                yield scope
            finally:
                self._interruptible_scopes.discard(scope)

    def stop_taking_work(self) -> None:
        """Workers finish the run they are in and start no other."""
        self.stopping = True
        for scope in list(self._interruptible_scopes):
            scope.cancel()

    # --- workers ---------------------------------------------------------------------------

    async def serve_timers(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Own the retry timers and the stages' preparers until cancelled (pending retries stay
        ``retry_wait`` in the store)."""
        async with trio.open_nursery() as nursery:
            self._timers = nursery
            for name, lane in self._lanes.items():
                nursery.start_soon(self._serve_lane, lane, name=f"prepare:{name}")
            nursery.start_soon(self.serve_refill, name="refill")
            task_status.started()
            await trio.sleep_forever()

    async def serve_refill(self) -> None:
        """Read deferred items back from the store, oldest first, whenever at most half of
        ADMIT_WINDOW is in memory: up to the window at a time."""
        while True:
            room = ADMIT_WINDOW - self._held()
            if not self.deferred or room < ADMIT_WINDOW // 2:
                await self._room.wait()
                self._room = trio.Event()
                continue
            seqs = list(itertools.islice(self.deferred, room))
            items = await self.store.read(functools.partial(op_items_by_seq, seqs=seqs))
            for item in items:
                self._undefer(item.seq)
                self._accept(item)
            # Only now, so that the count never touches 0 on the way (a batch would end).
            self.outstanding.value -= len(items)
            for seq in seqs:  # not in the store (cannot happen): let go
                if seq in self.deferred:
                    self._undefer(seq)
                    self.outstanding.value -= 1

    async def _serve_lane(self, lane: _Lane) -> None:
        """Keep ``lane.depth()`` items prepared ahead of the stage's workers."""
        while True:
            depth = lane.depth()
            # Refill once half the prepared items are taken: batches, not a hop per item.
            if not lane.queued or len(lane.ready) > depth // 2:
                await lane.wanted.wait()
                lane.wanted = trio.Event()
                continue
            room = depth - len(lane.ready)
            batch = [lane.queued.popleft() for _ in range(min(room, len(lane.queued)))]
            jobs = [
                (item.seq, item.path, self._workdir(item), item.payload,
                 self._folders.get(item.source))
                for item in batch
                if item.path is not None or self._needs_workdir(item)
            ]  # fmt: skip
            problems = await trio.to_thread.run_sync(_prepare, jobs) if jobs else {}
            for item in batch:
                problem = problems.get(item.seq)
                if problem is None:
                    lane.ready.append(item)
                elif problem == _FOLDER_GONE and not self.batch and self._timers is not None:
                    # Its source's whole folder is gone (a mount that dropped): the file is not
                    # known to be gone. In a service it waits, as its source does, and is
                    # checked again; a batch, which ends, fails it with that reason.
                    self._sleeping += 1
                    self._make_room()
                    self._timers.start_soon(self._retry_later, item, FOLDER_WAIT)
                else:
                    why = "its source folder is gone" if problem == _FOLDER_GONE else problem
                    self._give_up(item, f"{item.stage}: {why}")
            lane.has_ready.set()
            lane.has_ready = trio.Event()

    def _give_up(self, item: Item, reason: str) -> None:
        """Its input is gone: dead without a run, once that is durable."""
        log = logger.bind(item=item.id, stage=item.stage)
        transition = Transition(
            state=ItemState.DEAD, stage_index=item.stage_index, attempts=item.attempts,
            reason=reason,
        )  # fmt: skip

        def given_up(op: _Op) -> None:
            self.unsettled.value -= 1
            if op.error is not None:
                self._fail(op.error)
            else:
                # No run failed, but it is a failure to show (found by an acceptance tester,
                # session 16: an item dead this way was in no list of failures).
                self.recent_errors.append(failure_entry(
                    time.time(), item.id, item.stage, item.attempts, "not run", reason,
                    ItemState.DEAD.value,
                ))  # fmt: skip
                self._settle(item, transition, log)

        self.unsettled.value += 1
        self.store.submit(lambda c: op_give_up(c, item, reason), power_safe=True, on_done=given_up)

    def _fail(self, error: BaseException) -> None:
        """The store cannot record what happened: the service cannot go on."""

        async def fail() -> None:
            raise error

        assert self._timers is not None
        if self._failure is not None:  # the first failure already ends the service
            return
        self._failure = error
        try:
            self._timers.start_soon(fail)
        except RuntimeError:  # the timers' nursery is closing already: the error must not be lost
            raise error from None

    def staff(self, nursery: trio.Nursery) -> None:
        """Start the workers each stage lacks: one per slot of its ``concurrency``.

        The limit is the stage's limiter, not the number of workers (a pool can hold them back).
        A worker never waits for the store: its run's claim and result are queued for the next
        group commit and the item is handed on once that is durable, while the worker takes its
        next prepared item. Called at start-up, and again after a reload raised a limit; a
        worker whose number is past a lowered limit ends once it is idle (`serve_worker`).
        """
        if self.stopping:
            return
        for stage in self.config.stages:
            live = self._workers[stage.name]
            for n in range(self._lanes[stage.name].concurrency):
                if n not in live:
                    live.add(n)
                    nursery.start_soon(self.serve_worker, stage, n, name=f"worker:{stage.name}:{n}")

    def set_limits(self, stages: Mapping[str, int], pools: Mapping[str, int]) -> None:
        """Resize stages' and pools' limits (a reload): new runs start only below the new limit;
        runs going on are let finish. Start the workers a raised limit needs with `staff`."""
        for name, size in stages.items():
            self.slots.stage_limiters[name].total_tokens = size
            self._lanes[name].concurrency = size
            self._lanes[name].has_ready.set()  # idle workers past the limit end
            self._lanes[name].has_ready = trio.Event()
        for name, size in pools.items():
            self.slots.pool_limiters[name].total_tokens = size
        config = self.config
        self.config = attrs.evolve(
            config,
            stages=tuple(attrs.evolve(s, concurrency=stages.get(s.name, s.concurrency))
                         for s in config.stages),
            pools={**config.pools, **pools},
        )  # fmt: skip
        self.stages = {s.name: s for s in self.config.stages}

    async def serve_worker(self, stage: StageConfig, number: int = 0) -> None:
        """Run items of ``stage`` one after another until told to stop, or until the stage's
        limit was lowered to ``number`` or below (`set_limits`)."""
        lane = self._lanes[stage.name]
        try:
            while not self.stopping and number < lane.concurrency:
                if not lane.ready:
                    with self._interruptible() as idle:
                        await lane.has_ready.wait()
                    if idle.cancelled_caught:
                        return
                    continue
                item = lane.ready.popleft()
                lane.wanted.set()
                await self._process_item(stage, lane, item)
        finally:
            self._workers[stage.name].discard(number)

    async def _process_item(self, stage: StageConfig, lane: _Lane, item: Item) -> None:
        # The attempt this run will be: every line about it, the slot lines included, carries
        # item, stage and attempt.
        holder = Holder(item.id, stage.name, item.attempts + 1)
        slot_wait = 0.0
        if not self.slots.try_acquire(holder):
            self.slot_waiters[holder] = trio.current_time()
            try:
                with self._interruptible() as idle:
                    slot_wait = await self.slots.acquire(holder)
            finally:
                del self.slot_waiters[holder]
            if idle.cancelled_caught:
                return  # still queued in the store; the next start picks it up
        workdir = self._workdir(item)
        attempt = item.attempts + 1
        run_id = holder.run = self.store.new_run_id()
        claimed = False
        log = logger.bind(item=item.id, stage=stage.name, attempt=attempt, run=run_id)

        def claim(pid: int | None) -> None:
            # Queued right after the spawn, before the run's first checkpoint: the claim, the
            # pid and the process's start time land in one transaction with the next group
            # (its environment marker finds the run's processes until then).
            nonlocal claimed
            claimed = True
            running.pid = pid
            name = stage.name

            def claimed_now(op: _Op) -> None:
                if op.error is not None:
                    self._fail(op.error)
                elif op.result is None:
                    log.warning("item no longer claimable; its run is not recorded")

            self.store.submit(
                Claim(item, name, slot_wait, self.instance, run_id, attempt, pid),
                on_done=claimed_now,
            )  # fmt: skip

        if self.journal is not None:
            self.journal.started(run_id, item.seq, attempt, stage.name)
        try:
            running = self.running[run_id] = RunningRun(run_id, item.id, stage.name, attempt)
            self.last_run_started = running.since
            item = item.running(attempt)
            log_path = f"{self._runs_dir}/{run_id}.log"  # not pathlib: once per run
            try:
                if stage.call is not None:
                    from orchestrator.calls import run_call  # (loaded by the supervisor then)

                    claim(None)  # no process: nothing to find if we die
                    log.debug("run started: {}", stage.call)
                    result = await run_call(
                        self._calls[stage.name], self._stage_run(stage, item, attempt, run_id,
                        workdir, log), timeout=stage.timeout,
                    )  # fmt: skip
                else:
                    command = self._command(stage, item, attempt, run_id, workdir, log_path)
                    log.debug("run started: {}", command.argv)
                    result = await run_command(command, on_spawn=claim)
            except BaseException as exc:
                if not _is_cancellation(exc):
                    raise
                if not claimed:
                    claim(None)
                with trio.move_on_after(RECORD_GRACE, shield=True):
                    # What it printed until then: its log's end (the runner's tail went with
                    # its cancellation), so that `show` has it and `purge` finds the log.
                    kept = None if stage.call is not None else log_path
                    tail = await trio.to_thread.run_sync(_log_tail, kept) if kept else None
                    result = RunResult(
                        outcome=Outcome.CANCELLED, exit_code=None, signal=None,
                        pid=running.pid, duration=trio.current_time() - running.since,
                        tail=tail or "",
                        reason="cancelled by shutdown" + ("; process group killed" if kept else ""),
                    )  # fmt: skip
                    transition = decide(item, stage, result, now=time.time())
                    await self.store.finish_run(
                        run_id=run_id, item=item, result=result, transition=transition,
                        log_path=kept if tail is not None else None,
                    )  # fmt: skip
                    if self.journal is not None:
                        self.journal.settled(run_id)
                log.warning("run cancelled by shutdown; item re-queued")
                raise
        finally:
            self.slots.release(holder)
            self.running.pop(run_id, None)
        if not claimed:  # it could not be started: its run is recorded all the same
            claim(None)
        lane.mean_run += (result.duration - lane.mean_run) * 0.2
        if run_id in self.stopped_now:  # our own SIGKILL ("stop now"): not the stage's failure
            result = attrs.evolve(
                result, outcome=Outcome.CANCELLED,
                reason="cancelled by a stop now (second SIGINT, SIGQUIT); process group killed",
            )  # fmt: skip

        transition = decide(item, stage, result, now=time.time())
        if result.outcome not in (Outcome.OK, Outcome.CANCELLED) and item.path is not None:
            # Files are checked in batches ahead of their runs: one removed after that check
            # may have gone before its run started or during it; the reason does not guess.
            # (With its whole source folder gone, it is not known to be gone: retried as usual.)
            folder = self._folders.get(item.source)
            with trio.CancelScope(shield=True):  # a stop meanwhile must not lose the result
                gone = await trio.to_thread.run_sync(_file_gone, item.path, folder)
            if gone == "file":
                transition = Transition(
                    state=ItemState.DEAD, stage_index=item.stage_index, attempts=attempt,
                    reason=f"{stage.name}: source file {item.path!r} was gone when its run ended "
                    f"({result.reason})",
                )  # fmt: skip
            elif gone == "folder" and not self.batch:
                # Its whole source folder went away (a mount that dropped) under a run that
                # was ready before anyone knew: the run does not count; it waits for the folder.
                transition = Transition(
                    state=ItemState.RETRY_WAIT, stage_index=item.stage_index,
                    attempts=max(attempt - 1, 0), not_before=time.time() + FOLDER_WAIT,
                    reason=f"{stage.name}: its source folder is gone; waiting for it "
                    f"({result.reason})",
                )  # fmt: skip
            elif gone == "folder":
                transition = Transition(
                    state=ItemState.DEAD, stage_index=item.stage_index, attempts=attempt,
                    reason=f"{stage.name}: its source folder is gone ({result.reason})",
                )  # fmt: skip
        logged_path = log_path if result.output_bytes else None

        def finished(op: _Op) -> None:
            self.unsettled.value -= 1
            if op.error is not None:
                self._fail(op.error)
                return
            if self.journal is not None:
                self.journal.settled(run_id)
            self._ran(stage, item, result, transition, slot_wait, log, workdir)

        # The item is handed on once its result is durable; the worker goes on meanwhile.
        if self.journal is not None:
            self.journal.ended(run_id, result)
        self.unsettled.value += 1
        self.store.submit(
            Finish(run_id, item, result, transition, logged_path),
            power_safe=True, on_done=finished,
        )  # fmt: skip

    def kill_runs_now(self) -> None:
        """SIGKILL the process group of every run going on ("stop now": no ``grace_period``;
        the cancelled runs' own TERM → grace → KILL then finds them gone). Safe from another
        thread (the watchdog's, on a blocked loop)."""
        for run in list(self.running.values()):
            if run.pid is not None:
                self.stopped_now.add(run.run)
                with contextlib.suppress(OSError):
                    os.killpg(run.pid, signal.SIGKILL)

    def _source_gone(self, item: Item) -> None:
        """A file's item ended, and its source is no longer in the config: no ``on_done`` or
        ``on_dead`` of it applies to the file, which stays where it is. Said once per source
        (found by an acceptance tester, session 16: it was silent)."""
        if item.source in self._gone_sources_said:
            return
        self._gone_sources_said.add(item.source)
        logger.bind(source=item.source, item=item.id).warning(
            "items of source {!r}, which is not in the config, ended: their files are left in"
            " place (no on_done or on_dead applies to them)", item.source,
        )  # fmt: skip

    def disposition_failed(self, item_id: str, why: str) -> None:
        """An ended item's file could not be moved or deleted (a source's terminal hook)."""
        self.failed_dispositions += 1
        if len(self.failed_disposition_samples) < FAILED_DISPOSITIONS_KEPT:
            self.failed_disposition_samples.append((item_id, why))

    def _ran(
        self, stage: StageConfig, item: Item, result: RunResult, transition: Transition,
        slot_wait: float, log: Any, workdir: str | None,
    ) -> None:  # fmt: skip
        """A run's result is durable: report it and hand its item on."""
        if workdir is not None and transition.state is ItemState.DONE and self._timers is not None:
            # Off the store's thread and off the workers' path: nobody waits for it.
            if self._doomed_workdirs is None:  # no removal going on: start one
                self._doomed_workdirs = []
                self._timers.start_soon(self._remove_workdirs)
            self._doomed_workdirs.append(workdir)
        self.tally.runs += 1
        if result.escaped:
            log.warning(
                "ended {} process(es) the run had left running in the background, outside its"
                " process group, before its slot went to the next run", result.escaped,
            )  # fmt: skip
        for observe in self.on_run_end:
            observe(stage.name, result, slot_wait, transition)
        if result.outcome is Outcome.OK:
            log.info("run ok in {:.3f}s", result.duration)
        else:
            self.failed_runs[stage.name] += 1
            self.recent_errors.append(failure_entry(
                time.time(), item.id, stage.name, item.attempts, result.outcome.value,
                result.reason, transition.state.value,
            ))  # fmt: skip
            tail = f"; output tail:\n{result.tail}" if result.tail else ""
            nxt = transition.state.value
            log.warning("run {} ({}) -> {}{}", result.outcome.value, result.reason, nxt, tail)
        self._settle(item, transition, log)

    def _settle(self, item: Item, transition: Transition, log: Any) -> None:
        """Bookkeeping once a transition is durable: hand the item on, or let it go."""
        moved = item.moved(transition)
        if transition.state in TERMINAL_STATES:
            self.active.discard(item.seq)
            self.outstanding.value -= 1
            self._count_terminal(transition.state)
            if transition.state is ItemState.DEAD:
                log.error("item dead: {}", transition.reason)
            if item.source not in self._source_names and item.path is not None:
                self._source_gone(item)
            if item.source in self.on_terminal and self._timers is not None:
                ended = self._ended.get(item.source)
                if ended is None:  # no call going on for this source: start one
                    ended = self._ended[item.source] = []
                    self._timers.start_soon(self._hand_over_ended, item.source)
                ended.append(moved)
            self._make_room()
        elif moved.stage not in self.stages:
            # Its route (fixed when it was ingested) goes on to a stage the config no longer
            # has. Found by an acceptance tester (session 16): it went to the missing stage's
            # queue, a KeyError that ended the service, at every restart one item further.
            self.active.discard(item.seq)
            self.outstanding.value -= 1
            self._park(moved)
            self._make_room()
            self.on_change(self.tally)
        else:
            if transition.state is ItemState.RETRY_WAIT:
                self.tally.retries += 1
            self._dispatch(moved)
            self.on_change(self.tally)

    async def _hand_over_ended(self, source: str) -> None:
        """Give ``source``'s hook the items that ended, in batches, until none is left.

        Shielded: at the end of a batch or at shutdown the last items' files are still moved
        (the nursery waits for this task)."""
        hook = self.on_terminal[source]
        with trio.CancelScope(shield=True):
            await trio.lowlevel.checkpoint()  # let the items ending in this step join
            while ended := self._ended[source]:
                self._ended[source] = []
                for start in range(0, len(ended), ENDED_BATCH_MAX):
                    try:
                        await hook(ended[start : start + ENDED_BATCH_MAX])
                    except Exception as exc:  # a hook must not take the engine down
                        logger.opt(exception=exc).bind(source=source).error("terminal hook failed")
            del self._ended[source]

    async def _remove_workdirs(self) -> None:
        """Remove done items' workdirs, all that wait at each go in one thread hop, until none
        is left. Shielded, as `_hand_over_ended`: the last ones go at shutdown too."""
        with trio.CancelScope(shield=True):
            await trio.lowlevel.checkpoint()  # let the items ending in this step join
            while doomed := self._doomed_workdirs:
                self._doomed_workdirs = []
                await trio.to_thread.run_sync(_remove_trees, doomed)
            self._doomed_workdirs = None

    def _workdir(self, item: Item) -> str | None:
        """The item's workdir, when its route (or its record) needs one."""
        return str(self._work_dir / str(item.seq)) if self._needs_workdir(item) else None

    def _needs_workdir(self, item: Item) -> bool:
        """Items of records (their payload file) and of routes with a stage that uses one: a
        Python stage, a command naming ``{workdir}`` or ``ORCH_WORKDIR`` (an inline script), or
        ``workdir = true``. Others get none: making and removing a folder per item costs a
        fifth of a trivial stage's rate (their ``ORCH_WORKDIR`` names a folder that does not
        exist, so a program that uses it anyway fails there, not in ``/``)."""
        if item.payload is not None:
            return True
        needs = self._route_workdir.get(item.route)
        if needs is None:
            needs = any(
                self.stages[name].call is not None
                or self.stages[name].workdir
                or uses_placeholder(self.stages[name].command, "workdir")
                or any("ORCH_WORKDIR" in arg for arg in self.stages[name].command)
                for name in item.route if name in self.stages
            )  # fmt: skip
            self._route_workdir[item.route] = needs
        return needs

    @staticmethod
    def _values(
        stage: StageConfig, item: Item, attempt: int, workdir: str | None
    ) -> dict[str, str]:
        """The placeholders' values for a run (a command's arguments and ``ORCH_*``)."""
        payload = (
            os.path.join(workdir, "payload.json") if item.payload is not None and workdir else ""
        )
        path = item.path if item.path is not None else payload
        return {
            "path": path,
            "name": os.path.basename(path) if item.path else item.id,
            "item": item.id,
            "stage": stage.name,
            "attempt": str(attempt),
            "workdir": workdir if workdir is not None else "",
            "payload": payload,
        }

    def _stage_run(
        self, stage: StageConfig, item: Item, attempt: int, run_id: int, workdir: str | None,
        log: Any,
    ) -> StageRun:  # fmt: skip
        from orchestrator.calls import StageRun

        values = self._values(stage, item, attempt, workdir)
        return StageRun(
            item=item.id, stage=stage.name, attempt=attempt, run=run_id, path=values["path"],
            name=values["name"], workdir=values["workdir"], payload=values["payload"], log=log,
        )  # fmt: skip

    def _command(
        self, stage: StageConfig, item: Item, attempt: int, run_id: int, workdir: str | None,
        log_path: str,
    ) -> Command:  # fmt: skip
        values = self._values(stage, item, attempt, workdir)
        own = {_ENV_NAMES[key]: value for key, value in values.items()}
        if workdir is None:  # the folder it would be: never an empty value that means "/"
            own["ORCH_WORKDIR"] = f"{self._work_dir}/{item.seq}"
        own["ORCH_RUN"] = str(run_id)
        env = RunEnvironment(self._stage_env[stage.name], own)
        argv = expand_argv(stage.command, values, verbatim=self._code_argument[stage.name])
        executable = self._executables.get(stage.name)
        faults = self.config.faults
        if faults.enabled and (not faults.stages or stage.name in faults.stages):
            # Fire drill: the fault wrapper draws a delay, failure or hang, else execs argv.
            argv = (
                sys.executable, "-m", "orchestrator.fakestage", "--wrap",
                "--fail-rate", str(faults.fail_rate), "--hang-rate", str(faults.hang_rate),
                "--delay-rate", str(faults.delay_rate), "--delay", str(faults.delay),
                "--", executable or argv[0], *argv[1:],
            )  # fmt: skip
            executable = sys.executable
        return Command(
            argv=argv, env=env, executable=executable,
            cwd=str(stage.cwd) if stage.cwd is not None else None,
            timeout=stage.timeout, stall_timeout=stage.stall_timeout,
            grace_period=stage.grace_period, log_path=log_path,
            output_limit=stage.output_limit,
            marker=(f"ORCH_RUN={run_id}", f"{STATE_MARKER}={self.config.state_dir}"),
            # One at a time (a stage of 1, a pool): its slot waits for helpers the run left.
            sweep_escaped=self._lanes[stage.name].concurrency == 1 or bool(stage.pools),
        )  # fmt: skip

    async def serve_store_watch(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Admit items another process put back in a queue (``orchestrator requeue``)."""
        since = time.time() - STORE_WATCH_OVERLAP
        task_status.started()
        async with contextlib.aclosing(trio_util.periodic(STORE_WATCH_INTERVAL)) as ticks:
            async for _ in ticks:
                now = time.time()
                known = frozenset(self.active).union(self.deferred)
                found = await self.store.read(
                    functools.partial(op_items_changed_since, since=since, known=known)
                )
                since = now - STORE_WATCH_OVERLAP
                for item in found:
                    if item.seq in self.active or item.seq in self.deferred:
                        continue
                    if item.seq in self.parked and item.stage not in self.stages:
                        continue  # still at a stage the config does not have (said once)
                    logger.bind(item=item.id).info("item re-queued from outside; taking it")
                    self.admit(item)


def resolve_executables(config: Config) -> dict[str, str]:
    """Each stage's program as a path, looked up once (blocking: call from a worker thread).

    A bare name is searched in the stage's PATH -- searching it for every run costs a failed
    exec per PATH entry -- and a relative path is taken relative to the config's folder.
    Programs not found now are left out and looked up at each run, so one installed later works.
    """
    found = {}
    for stage in config.stages:
        if stage.call is not None:
            continue
        program = stage.command[0]
        if "{" in program:
            continue
        where = find_program(program, stage.env, config.base_dir)
        if where is not None:
            found[stage.name] = where
    return found


def _is_cancellation(exc: BaseException) -> bool:
    # Nurseries wrap even a lone Cancelled in a group (strict exception groups).
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_cancellation(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


def _prepare(
    jobs: list[tuple[int, str | None, str | None, str | None, str | None]],
) -> dict[int, str]:
    """Ready items for their runs (in a worker thread): ``(seq, path, workdir, payload,
    source folder)`` each.

    Checks that the input file is still there and readable, makes the workdir and writes the
    record's payload file. Returns what is wrong, by seq, for items that cannot run:
    `_FOLDER_GONE` for a file whose source folder is gone as a whole (it is not known to be
    gone itself: the folder may come back).
    """
    problems = {}
    for seq, path, workdir, payload, folder in jobs:
        if path is not None:
            problem = _file_problem(path)
            if problem is not None:
                if problem == "vanished" and folder is not None and not os.path.isdir(folder):
                    problems[seq] = _FOLDER_GONE
                else:
                    problems[seq] = f"source file {path!r} {problem} before its run"
                continue
        if workdir is not None:
            try:
                _make_workdir(workdir, payload)
            except OSError as exc:  # a full disk: the item says why (requeue it later)
                problems[seq] = f"cannot prepare its workdir {workdir!r}: {exc.strerror or exc}"
    return problems


def _make_workdir(workdir: str, payload: str | None) -> None:
    """Make ``workdir`` (and ``state_dir/work`` the first time) unless it is there already (a
    retry, or a run after a restart), and write the record's payload file afresh.

    Afresh before every run: the file is the record, whatever an earlier run did to it (found
    by an acceptance tester, session 16: a run that rewrote it in place and failed half-way
    left its retry, and the stages after it, a broken record)."""
    try:
        os.mkdir(workdir, 0o700)
    except FileExistsError:
        # A link there (made by a stage program) is not followed: the payload would go
        # wherever it points, and the run work there.
        if os.path.islink(workdir) or not os.path.isdir(workdir):
            raise NotADirectoryError("it is a link or a file, not a folder") from None
    except FileNotFoundError:
        # makedirs gives its mode to the last folder only: state_dir/work is made first.
        os.makedirs(os.path.dirname(workdir), mode=0o700, exist_ok=True)
        os.makedirs(workdir, mode=0o700, exist_ok=True)
    if payload is None:
        return
    target = os.path.join(workdir, "payload.json")
    tmp = target + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with open(fd, "w", encoding="utf-8") as f:
            f.write(payload)
        os.replace(tmp, target)  # whole or not at all: never a half payload on a full disk
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _remove_trees(paths: list[str]) -> None:
    """Remove these folders and what they hold, as far as possible (in a worker thread).

    Most workdirs hold a few files and no folder: those go with a listing, an unlink each and
    an rmdir; `shutil.rmtree` (several times the work) takes the rest. A link is never
    followed: a workdir that is one goes as a link (`check_state_dir` sees that ``work``
    itself is a real folder of ours)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:  # gone meanwhile, or not a folder: a link or file goes, as itself
            with contextlib.suppress(OSError):
                os.unlink(path)
            continue
        try:
            with os.scandir(fd) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        raise IsADirectoryError(entry.name)
                    os.unlink(entry.name, dir_fd=fd)
            os.rmdir(path)
        except OSError:  # a folder inside, or gone meanwhile: the thorough way (quiet if gone)
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)


def _log_tail(path: str) -> str | None:
    """The last lines of a run's log, or None when it has none (blocking: a thread)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - TAIL_BYTES))
            data = f.read(TAIL_BYTES)
    except OSError:
        return None
    return "\n".join(data.decode(errors="replace").splitlines()[-TAIL_LINES:])


def _file_gone(path: str, folder: str | None) -> str | None:
    """``"file"`` when the file at ``path`` is gone while its source ``folder`` is there,
    ``"folder"`` when the folder is gone as a whole, None when the file is there (a thread)."""
    if os.path.exists(path):
        return None
    return "file" if folder is None or os.path.isdir(folder) else "folder"


def _file_problem(path: str) -> str | None:
    try:
        os.stat(path)
    except FileNotFoundError:
        return "vanished"
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not os.access(path, os.R_OK):
        return "cannot be read (permission denied)"
    return None
