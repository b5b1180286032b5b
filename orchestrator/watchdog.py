"""The watchdog: a blocked event loop, a stalled pipeline and systemd's watchdog, all noticed.

Three layers watch the event loop, from the inside out:

1. **The heartbeat task** stamps ``time.monotonic()`` every `HEARTBEAT_INTERVAL` (or faster when
   the thresholds are small) and measures how late each tick was (the loop's lag). It is also
   what sends ``WATCHDOG=1`` to systemd, at half of ``WATCHDOG_USEC``: a blocked loop stops the
   pings and systemd restarts the service. For the layers below to act first, ``WatchdogSec``
   must be longer than `shortest_watchdog_sec` (twice their time); start-up warns when not.
2. **The loop-block thread**, outside the loop. When the heartbeat is older than
   ``watchdog.loop_stall_warn`` it logs which task holds the loop and where (the task whose
   coroutine frame is on the main thread's stack). Past ``watchdog.loop_stall_timeout`` it logs
   every thread's stack, SIGKILLs the process groups of the runs going on (the next start would
   reap them anyway) and ends the process with `EXIT_LOOP_STALLED` (70, ``EX_SOFTWARE``), so that
   systemd (``Restart=on-failure``) or ``orchestrator health --watch`` starts it again.
3. **faulthandler**, re-armed by the heartbeat, as a last resort when even that thread cannot run
   (the GIL held by a wedged C extension): some seconds after ``loop_stall_timeout`` it dumps
   every thread's stack to stderr and ends the process with exit status 1.

The pipeline is checked every `STALL_CHECK_INTERVAL` for three kinds of stall, each logged once
as a warning with the task tree, counted (``orchestrator_pipeline_stalls_total{kind}``) and shown
as a reason of a degraded ``/health`` until it clears:

- ``no_progress``: a stage has items waiting and every slot it needs has room, yet none of its
  runs started for ``watchdog.stall_after``;
- ``overdue_run``: a run is older than its stage's ``timeout`` plus ``grace_period`` (the runner
  should have killed it by then);
- ``slot_wait``: an item has waited for a slot longer than ``watchdog.slot_wait_warn`` -- a
  worker waiting for a pool, or the items queued at a stage whose own slots are all busy and
  none of whose runs started or ended for that long (a run that never ends, in a stage without
  ``timeout``).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any

import attrs
import trio
import trio_util
from loguru import logger

from orchestrator.instance import LOOP_BLOCKED_BY

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import FrameType

    from orchestrator.limits import Holder
    from orchestrator.runner import RunResult
    from orchestrator.store.records import Transition
    from orchestrator.systemd import Notifier
    from orchestrator.workers import Engine

__all__ = [
    "EXIT_LOOP_STALLED",
    "LAG_BUCKETS",
    "LoopBlock",
    "Stall",
    "Watchdog",
    "format_task_tree",
    "shortest_watchdog_sec",
]

#: The exit status when the event loop stayed blocked past ``loop_stall_timeout``
#: (``EX_SOFTWARE`` of sysexits.h: an internal software error).
EXIT_LOOP_STALLED = 70
#: The heartbeat's period; at most a quarter of ``loop_stall_warn`` (and of systemd's ping period).
HEARTBEAT_INTERVAL = 0.25
#: How often the loop-block thread looks at the heartbeat (at most a quarter of loop_stall_warn).
THREAD_CHECK_INTERVAL = 0.25
#: If the thread itself did not run for this long past its own period (or half of
#: loop_stall_warn, if less) and the process used almost no CPU meanwhile (under FROZEN_CPU_SHARE
#: of that time), the whole process was frozen (SIGSTOP, a paused VM): that gap is not the loop's
#: fault and does not count. (With CPU used, the loop held the GIL in C code: that counts.)
FROZEN_SLACK = 1.0
FROZEN_CPU_SHARE = 0.1
#: How often the pipeline is checked for stalls (and the systemd STATUS= line refreshed).
STALL_CHECK_INTERVAL = 1.0
#: A run is overdue only this long after timeout + grace: the runner's last SIGKILL sweep and the
#: recording of the result take a moment.
OVERDUE_SLACK = 1.0
#: How long a blocked loop keeps ``/health`` degraded after it ran again.
LOOP_BLOCK_HOLD = 60.0
#: faulthandler fires this long after loop_stall_timeout: only when the thread could not act.
FAULTHANDLER_MARGIN = 10.0
#: How often the heartbeat re-arms faulthandler (each arming starts a new C thread).
FAULTHANDLER_REARM = 1.0
#: How long the thread may spend logging before it ends the process anyway (a sink can hang).
EXIT_LOG_GRACE = 5.0
#: Upper bounds (seconds) of the loop lag histogram's buckets.
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Test-only: block the event loop this many seconds (``SECONDS`` or ``SECONDS@DELAY``) once,
#: DELAY (default 0.5) seconds after the watchdog started.
TEST_BLOCK_ENV = "ORCH_TEST_BLOCK_LOOP"

_TRIO_DIR = os.path.dirname(trio.__file__)


@attrs.frozen
class LoopBlock:
    """The event loop was held by one task step for ``seconds``."""

    at: float  #: wall-clock time it ended (or was noticed)
    seconds: float
    task: str | None


@attrs.frozen
class Stall:
    """A pipeline stall going on now."""

    kind: str  #: ``no_progress``, ``overdue_run`` or ``slot_wait``
    message: str
    since: float  #: wall-clock time it was noticed
    #: The message without the ages that grow while it lasts (systemd's ``STATUS=``).
    condition: str


class _Lag:
    """A cumulative histogram of the heartbeat's lateness (seconds), in `LAG_BUCKETS`."""

    def __init__(self) -> None:
        self.counts = [0] * (len(LAG_BUCKETS) + 1)
        self.total = 0.0
        self.last = 0.0

    def observe(self, value: float) -> None:
        self.last = value
        self.total += value
        for i, bound in enumerate(LAG_BUCKETS):
            if value <= bound:
                self.counts[i] += 1
                return
        self.counts[-1] += 1


class Watchdog:
    """Heartbeat, loop-block thread and stall checks for one engine; see the module docstring.

    Synopsis::

        watchdog = Watchdog(engine, notifier=Notifier.from_environ(os.environ))
        await nursery.start(watchdog.serve)
        watchdog.health_reasons()    # [] when all is well
    """

    def __init__(
        self, engine: Engine, *, notifier: Notifier | None = None,
        exit_process: Callable[[int], object] = os._exit,
    ) -> None:  # fmt: skip
        """Watch ``engine``; ping and tell ``notifier`` (systemd), if any.

        Args:
            engine: the engine whose loop and pipeline are watched.
            notifier: where ``WATCHDOG=1`` and ``STATUS=`` go, or None.
            exit_process: how the loop-block thread ends the process (`os._exit`: no cleanup
                can run on a blocked loop).
        """
        self.engine = engine
        self.config = engine.config.watchdog
        self.notifier = notifier
        self._exit = exit_process
        #: time.monotonic() of the latest heartbeat (read by the loop-block thread).
        self.beat = time.monotonic()
        self.lag = _Lag()
        #: How many times the loop-block thread found the loop blocked past loop_stall_warn.
        self.loop_stalls = 0
        #: The loop is blocked now (set by the thread; cleared by the heartbeat).
        self.loop_blocked_by: str | None = None
        self._blocking_task_object: trio.lowlevel.Task | None = None
        #: Told how the process ends when the thread ends it (the instance lock's `note_end`).
        self.note_end: Callable[[str], object] | None = None
        self.loop_blocked = False
        self._blocked_beat = 0.0
        self.last_loop_block: LoopBlock | None = None
        #: Pipeline stalls noticed since start, by kind.
        self.stall_counts: dict[str, int] = {"no_progress": 0, "overdue_run": 0, "slot_wait": 0}
        #: Pipeline stalls going on now, by what they are about.
        self.stalls: dict[tuple[str, object], Stall] = {}
        self._period = min(
            HEARTBEAT_INTERVAL, self.config.loop_stall_warn / 4,
            (notifier.watchdog_interval or HEARTBEAT_INTERVAL) if notifier else HEARTBEAT_INTERVAL,
        )  # fmt: skip
        self._root: trio.lowlevel.Task | None = None
        self._main_thread = 0
        self._stop = threading.Event()
        #: Per stage: trio time a run of it last started (or ended: a run shorter than a check).
        self._last_start: dict[str, float] = {}
        #: Per stage: trio time its items started waiting with slots free.
        self._idle_since: dict[str, float] = {}
        #: Per stage: trio time its items started waiting with its own slots all busy.
        self._full_since: dict[str, float] = {}
        engine.on_run_end.append(self._run_ended)

    # --- what others read ------------------------------------------------------------------

    def health_reasons(self, *, ages: bool = True) -> list[str]:
        """Why the service is not healthy now; empty when it is (``/health``, ``STATUS=``).

        Args:
            ages: say how long each condition has lasted, or how long ago it was ("has waited
                29s", "14s ago"): ``/health`` does. Without them (``STATUS=``) a condition's
                text stays the same while it lasts.
        """
        reasons = []
        if self.engine.stopping:
            reasons.append("draining: shutting down")
        failure = self.engine.store.last_failure
        if failure is not None:
            reasons.append(f"store: {failure}")
        if self.engine.status_file_failure is not None:
            # `orchestrator health` reads that file: it sees it go stale, so this says why.
            reasons.append(self.engine.status_file_failure)
        problems = self.engine.source_problems
        reasons.extend(problems[s.name] for s in self.engine.config.sources if s.name in problems)
        block = self.last_loop_block
        if self.loop_blocked:
            reasons.append(f"event loop blocked now by task {self.loop_blocked_by!r}")
        elif block is not None and time.time() - block.at < LOOP_BLOCK_HOLD:
            ago = time.time() - block.at
            when = f"{ago:.0f}s ago" if ages else f"in the last {LOOP_BLOCK_HOLD:g}s"
            reasons.append(
                f"event loop was blocked for {block.seconds:.1f}s by task {block.task!r} {when}"
            )
        reasons.extend(s.message if ages else s.condition for s in self.stalls.values())
        return reasons

    def health(self) -> dict[str, Any]:
        """``{"status": "ok" | "degraded" | "draining", "reasons": [...]}`` (``/health``)."""
        reasons = self.health_reasons()
        if not reasons:
            status = "ok"
        elif self.engine.stopping:
            status = "draining"
        else:
            status = "degraded"
        return {"status": status, "reasons": reasons}

    # --- the task tree ---------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the heartbeat, the stall checks and the loop-block thread until cancelled."""
        self._root = trio.lowlevel.current_root_task()
        self._main_thread = threading.get_ident()  # the thread trio runs in
        usec = self.notifier.watchdog_usec if self.notifier is not None else None
        shortest = shortest_watchdog_sec(self.config.loop_stall_timeout)
        if usec is not None and usec / 1e6 <= shortest:
            logger.warning(
                "systemd's watchdog (WatchdogSec={:g}s) can end a blocked event loop before this"
                " service's own does ([watchdog] loop_stall_timeout {:g}s, then faulthandler {:g}s"
                " later), without the stuck task's stack: pinged every WatchdogSec/2, a loop"
                " blocked late in a period has only {:g}s; set WatchdogSec to more than {:g}s",
                usec / 1e6, self.config.loop_stall_timeout, FAULTHANDLER_MARGIN, usec / 2e6,
                shortest,
            )  # fmt: skip
        self.beat = time.monotonic()
        thread = threading.Thread(target=self._watch_loop, name="orchestrator-loop-watchdog",
                                  daemon=True)  # fmt: skip
        self._stop.clear()
        thread.start()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._heartbeat, name="watchdog:heartbeat")
                nursery.start_soon(self._check_stalls, name="watchdog:stalls")
                hook = os.environ.get(TEST_BLOCK_ENV)
                if hook:
                    nursery.start_soon(_block_loop_for_tests, hook, name="test-hook:block-loop")
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._stop.set()
            with contextlib.suppress(RuntimeError, ValueError):
                faulthandler.cancel_dump_traceback_later()

    async def _heartbeat(self) -> None:
        notifier = self.notifier
        ping = notifier.watchdog_interval if notifier is not None else None
        next_ping = 0.0
        next_arm = 0.0
        stderr = _stderr_for_faulthandler()
        async with contextlib.aclosing(trio_util.periodic(self._period)) as ticks:
            async for _ in ticks:
                now = time.monotonic()
                gap = now - self.beat
                self.beat = now
                self.lag.observe(max(0.0, gap - self._period))
                if self.loop_blocked:
                    # Only the thread judges: it can tell a blocked loop from a frozen process.
                    # The block ran from the beat the thread judged to the beat after it.
                    previous = now - gap
                    ended = previous if previous > self._blocked_beat else now
                    seconds = ended - self._blocked_beat
                    block = LoopBlock(at=time.time(), seconds=seconds, task=self.loop_blocked_by)
                    self.last_loop_block = block
                    self.loop_blocked = False
                    logger.warning(
                        "event loop ran again after being blocked for {:.2f}s by task {!r}",
                        seconds, block.task,
                    )  # fmt: skip
                if ping is not None and notifier is not None and now >= next_ping:
                    notifier.notify("WATCHDOG=1")
                    next_ping = now + ping
                if stderr is not None and now >= next_arm:
                    faulthandler.dump_traceback_later(
                        self.config.loop_stall_timeout + FAULTHANDLER_MARGIN, exit=True,
                        file=stderr,
                    )  # fmt: skip
                    next_arm = now + FAULTHANDLER_REARM

    # --- pipeline stalls -------------------------------------------------------------------

    def _run_ended(self, stage: str, result: RunResult, slot_wait: float, _t: Transition) -> None:
        self._last_start[stage] = max(self._last_start.get(stage, -1e18), trio.current_time())

    async def _check_stalls(self) -> None:
        interval = min(
            STALL_CHECK_INTERVAL, self.config.stall_after / 4, self.config.slot_wait_warn / 4
        )
        async with contextlib.aclosing(trio_util.periodic(interval)) as ticks:
            async for _ in ticks:
                self.check_stalls()
                self._notify_status()

    def check_stalls(self) -> None:
        """Look for the three kinds of pipeline stall now; log and count new ones, clear gone ones."""
        engine = self.engine
        now = trio.current_time()
        # Per stall: its message, and its condition (the message without the growing ages).
        found: dict[tuple[str, object], tuple[str, str]] = {}
        for run in engine.running.values():
            last = self._last_start.get(run.stage)
            if last is None or run.since > last:
                self._last_start[run.stage] = run.since
        queued = engine.queue_depths()
        waiting: dict[str, int] = dict(queued)
        for holder, since in engine.slot_waiters.items():
            waiting[holder.stage] = waiting.get(holder.stage, 0) + 1
            waited = now - since
            if waited > self.config.slot_wait_warn:
                what = f"for a slot of stage {holder.stage!r}"
                found["slot_wait", holder] = (
                    f"item {holder.item!r} has waited {_secs(waited)} {what}"
                    f" ({self._full_limits(holder)})",
                    f"item {holder.item!r} has waited over {self.config.slot_wait_warn:g}s {what}"
                    f" ({self._full_limits(holder, holders=False)})",
                )
        for stage in engine.config.stages:
            found.update(self._queued_behind_full_stage(stage.name, queued.get(stage.name, 0), now))
            n = waiting.get(stage.name, 0)
            if n == 0 or engine.stopping or not self._has_room(stage.name):
                self._idle_since.pop(stage.name, None)
                continue
            idle_since = self._idle_since.setdefault(stage.name, now)
            quiet_since = max(idle_since, self._last_start.get(stage.name, idle_since))
            if now - quiet_since > self.config.stall_after:
                what = f"stage {stage.name!r}: {n} item(s) waiting and slots free, but no run"
                found["no_progress", stage.name] = (
                    f"{what} started for {_secs(now - quiet_since)}",
                    f"{what} started for over {self.config.stall_after:g}s",
                )
        for run in engine.running.values():
            cfg = engine.stages.get(run.stage)
            if cfg is None or cfg.timeout is None:
                continue
            age = now - run.since
            if age > cfg.timeout + cfg.grace_period + OVERDUE_SLACK:
                which = f"run {run.run} of stage {run.stage!r} on item {run.item!r} (pid {run.pid})"
                past = f"past its timeout {cfg.timeout:g}s + grace {cfg.grace_period:g}s"
                found["overdue_run", run.run] = (f"{which} is {_secs(age)} old, {past}",
                                                 f"{which} is {past}")  # fmt: skip
        self._update_stalls(found)

    def _queued_behind_full_stage(
        self, stage: str, queued: int, now: float
    ) -> dict[tuple[str, object], tuple[str, str]]:
        """A ``slot_wait`` stall for items queued at ``stage`` while its own slots are all busy
        and no run of it started or ended for ``slot_wait_warn``: its message, and its
        condition (without the ages, the counts and the runs, which change).

        Found by an acceptance tester (session 17): a stage has one worker per slot, so items
        queued behind its own full limit are not slot waiters (a pool's are); a run that never
        ended in a stage without ``timeout`` held the pipeline for good with /health ok.
        """
        limiter = self.engine.slots.stage_limiters.get(stage)
        if (
            queued == 0 or self.engine.stopping or limiter is None
            or limiter.borrowed_tokens < limiter.total_tokens
        ):  # fmt: skip
            self._full_since.pop(stage, None)
            return {}
        full_since = self._full_since.setdefault(stage, now)
        quiet_since = max(full_since, self._last_start.get(stage, full_since))
        if now - quiet_since <= self.config.slot_wait_warn:
            return {}
        runs = sorted((r for r in self.engine.running.values() if r.stage == stage),
                      key=lambda r: r.since)  # fmt: skip
        held = ", ".join(
            f"run {r.run} on {r.item!r} for {_secs(now - r.since)}"
            + ("" if r.pid is None else f" (pid {r.pid})")
            for r in runs[:3]
        ) + (", ..." if len(runs) > 3 else "")
        busy = f"stage {stage!r}: item(s) queued, all {int(limiter.total_tokens)} of its slots busy"
        return {
            ("slot_wait", stage): (
                f"stage {stage!r}: {queued} item(s) queued, all {int(limiter.total_tokens)} of its"
                f" slots busy and no run of it started or ended for {_secs(now - quiet_since)}"
                f" ({held or 'held by runs ending now'})",
                f"{busy} and no run of it started or ended for over"
                f" {self.config.slot_wait_warn:g}s",
            )
        }

    def _has_room(self, stage: str) -> bool:
        slots = self.engine.slots
        limiters = [slots.stage_limiters[stage]] + [
            slots.pool_limiters[p] for p in self.engine.stages[stage].pools
        ]
        return all(lim.borrowed_tokens < lim.total_tokens for lim in limiters)

    def _full_limits(self, waiter: Holder, *, holders: bool = True) -> str:
        """The limits ``waiter`` waits for (full, and not yet its own) and who holds them."""
        slots = self.engine.slots
        parts = []
        named = [("stage", waiter.stage, slots.stage_limiters[waiter.stage])] + [
            ("pool", p, slots.pool_limiters[p])
            for p in sorted(self.engine.stages[waiter.stage].pools)
        ]
        for kind, name, lim in named:
            borrowers = lim.statistics().borrowers
            if lim.borrowed_tokens >= lim.total_tokens and waiter not in borrowers:
                held = ", ".join(repr(getattr(b, "item", b)) for b in borrowers)
                parts.append(f"{kind} {name!r} full, held by {held}" if holders
                             else f"{kind} {name!r} full")  # fmt: skip
        return "; ".join(parts) or "slots free now"

    def _update_stalls(self, found: dict[tuple[str, object], tuple[str, str]]) -> None:
        for key in [k for k in self.stalls if k not in found]:
            stall = self.stalls.pop(key)
            logger.info("stall cleared: {}", stall.message)
        new = [(key, message) for key, (message, _) in found.items() if key not in self.stalls]
        for key, (message, condition) in found.items():
            old = self.stalls.get(key)
            since = old.since if old is not None else time.time()
            self.stalls[key] = Stall(kind=key[0], message=message, since=since,
                                     condition=condition)  # fmt: skip
        if not new:
            return
        tree = format_task_tree()
        for (kind, _), message in new:
            self.stall_counts[kind] += 1
            logger.warning("pipeline stall ({}): {}\ntask tree:\n{}", kind, message, tree)

    def _notify_status(self) -> None:
        if self.notifier is None:
            return
        engine = self.engine
        queued = sum(engine.queue_depths().values()) + len(engine.slot_waiters)
        tally = engine.tally
        state = "draining" if engine.stopping else "running"
        line = (
            f"{state}: {queued} queued, {len(engine.running)} running, {tally.done} done,"
            f" {tally.dead} dead, {tally.retries} retries"
        )
        # Without the ages: with them the line would change, and be sent, every second for as
        # long as one condition lasts (found by an acceptance tester, session 17).
        reasons = [r for r in self.health_reasons(ages=False) if not r.startswith("draining")]
        if reasons:
            line += f"; degraded: {reasons[0]}"
        line = line.replace("\n", " ")
        # Against what systemd shows now, not what this sent last: READY=1 (at start, after a
        # reload) says STATUS=running too, and the counts must follow it (found by an
        # acceptance tester, session 17: an idle service showed "running" until an item came).
        if line != self.notifier.status:
            self.notifier.notify(f"STATUS={line}")

    # --- the loop-block thread -------------------------------------------------------------

    def _watch_loop(self) -> None:
        warn, timeout = self.config.loop_stall_warn, self.config.loop_stall_timeout
        interval = min(THREAD_CHECK_INTERVAL, warn / 4)
        frozen_after = interval + min(FROZEN_SLACK, warn / 2)
        last_check, last_cpu = time.monotonic(), time.process_time()
        frozen_until = 0.0
        warned_for = -1.0
        while not self._stop.wait(interval):
            now, cpu = time.monotonic(), time.process_time()
            gap = now - last_check
            if gap > frozen_after and cpu - last_cpu < FROZEN_CPU_SHARE * gap:
                frozen_until = now  # the whole process was stopped: start counting afresh
            last_check, last_cpu = now, cpu
            beat = self.beat
            age = now - max(beat, frozen_until)
            if age <= warn:
                continue
            if warned_for != beat:
                warned_for = beat
                self.loop_stalls += 1
                name, stack, task = self._blocking_task()
                self.loop_blocked_by = name
                self._blocking_task_object = task
                self._blocked_beat = beat
                self.loop_blocked = True
                # From another thread: if the blocked loop holds a log sink's lock (a write to a
                # full pipe), this one must still go on to the timeout.
                threading.Thread(
                    target=logger.warning, name="orchestrator-stall-report", daemon=True,
                    args=("event loop blocked for {:.1f}s by task {!r}; its stack:\n{}",
                          age, name, stack),
                ).start()  # fmt: skip
            if age > timeout:
                self._die(age)
                return

    def _blocking_task(self) -> tuple[str | None, str, trio.lowlevel.Task | None]:
        frame = sys._current_frames().get(self._main_thread)
        if frame is None:
            return None, "(the main thread is gone)", None
        chain = list(_outward(frame))
        where = {id(f): i for i, f in enumerate(chain)}
        for _attempt in range(3):
            try:
                for task in _walk(self._root):
                    task_frame = task.coro.cr_frame
                    if task_frame is not None and id(task_frame) in where:
                        mine = chain[: where[id(task_frame)] + 1]
                        return task.name, _format_frames(mine), task
                break
            except RuntimeError:  # the tree changed while we walked it; try again
                continue
        return None, _format_frames(chain), None

    def _die(self, age: float) -> None:
        def report() -> None:
            names = {t.ident: t.name for t in threading.enumerate()}
            stacks = "\n".join(
                f"thread {names.get(ident, ident)!r}:\n{_format_frames(list(_outward(frame)))}"
                for ident, frame in sys._current_frames().items()
            )
            logger.critical(
                "event loop blocked for {:.1f}s (loop_stall_timeout {:g}s) by task {!r}: exiting"
                " with status {} to be restarted; every thread's stack:\n{}",
                age, self.config.loop_stall_timeout, self.loop_blocked_by, EXIT_LOOP_STALLED,
                stacks,
            )  # fmt: skip
            logger.complete()

        # The blocked loop may hold a log sink's lock (a full pipe): log from another thread and
        # exit when it is done or after EXIT_LOG_GRACE, whichever comes first.
        reporter = threading.Thread(target=report, name="orchestrator-exit-report", daemon=True)
        reporter.start()
        reporter.join(EXIT_LOG_GRACE)
        culprit = [r.run for r in list(self.engine.running.values())
                   if r.task is not None and r.task is self._blocking_task_object]  # fmt: skip
        if self.note_end is not None:
            # For the next start: the runs this leaves open were ended by the one that blocked
            # the loop; only that one counts toward a poison item.
            self.note_end(
                f"{LOOP_BLOCKED_BY} {culprit[0]}" if culprit else "its event loop was blocked"
            )
        self.engine.kill_runs_now()
        self._exit(EXIT_LOOP_STALLED)


# --- helpers -------------------------------------------------------------------------------


def shortest_watchdog_sec(loop_stall_timeout: float) -> float:
    """systemd's ``WatchdogSec`` must be longer than this for the service's own watchdog to act
    first on a blocked loop (with the stuck task's stack in the log, exit 70).

    ``WATCHDOG=1`` goes every half period, as sd_watchdog_enabled(3) advises: a loop blocked
    just before a ping was due is ended by systemd only half a period after it blocked, while
    the loop-block thread takes ``loop_stall_timeout`` and faulthandler, the last resort,
    `FAULTHANDLER_MARGIN` more. Hence twice their sum (found by an acceptance tester, session
    17: the unit's 90 s let systemd's SIGABRT come first for a loop blocked 30 s into a period).
    """
    return 2 * (loop_stall_timeout + FAULTHANDLER_MARGIN)


def _secs(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"


def _stderr_for_faulthandler() -> Any:
    stream = sys.__stderr__
    try:
        if stream is not None:
            stream.fileno()
            return stream
    except (OSError, ValueError, AttributeError):
        pass
    return None


def _outward(frame: FrameType | None) -> Iterator[FrameType]:
    """Frames from ``frame`` out to the thread's first."""
    while frame is not None:
        yield frame
        frame = frame.f_back


def _format_frames(inner_first: list[FrameType]) -> str:
    summary = traceback.StackSummary.extract((f, f.f_lineno) for f in reversed(inner_first))
    return "".join(summary.format()).rstrip("\n")


def _walk(root: trio.lowlevel.Task | None) -> Iterator[trio.lowlevel.Task]:
    stack = [root] if root is not None else []
    while stack:
        task = stack.pop()
        yield task
        for nursery in list(task.child_nurseries):
            stack.extend(nursery.child_tasks)


def _where(task: trio.lowlevel.Task) -> str:
    found = "(trio internals)"
    for frame, lineno in task.iter_await_frames():
        filename = frame.f_code.co_filename
        if not filename.startswith(_TRIO_DIR) and "/trio_util/" not in filename:
            found = f"{frame.f_code.co_name} ({os.path.basename(filename)}:{lineno})"
    return found


def format_task_tree(root: trio.lowlevel.Task | None = None) -> str:
    """The tree of trio tasks with where each one waits; siblings alike are folded (×N).

    Call it from inside trio (the default root is the run's root task).
    """
    lines: list[str] = []

    def visit(task: trio.lowlevel.Task, depth: int) -> None:
        children = [c for n in task.child_nurseries for c in n.child_tasks]
        children.sort(key=lambda t: t.name)
        lines.append(f"{'  ' * depth}- {task.name} @ {_where(task)}")
        folded: dict[tuple[str, str], list[trio.lowlevel.Task]] = {}
        for child in children:
            if child.child_nurseries:
                visit(child, depth + 1)
                continue
            key = (child.name.rstrip("0123456789"), _where(child))
            folded.setdefault(key, []).append(child)
        for (_prefix, where), tasks in folded.items():
            count = f" (×{len(tasks)})" if len(tasks) > 1 else ""
            lines.append(f"{'  ' * (depth + 1)}- {tasks[0].name}{count} @ {where}")

    start = root or trio.lowlevel.current_root_task()
    if start is not None:
        visit(start, 0)
    return "\n".join(lines)


async def _block_loop_for_tests(spec: str) -> None:
    seconds, _, delay = spec.partition("@")
    await trio.sleep(float(delay or 0.5))
    logger.warning("{}: blocking the event loop for {}s", TEST_BLOCK_ENV, seconds)
    time.sleep(float(seconds))  # the point: a blocking call inside the loop
