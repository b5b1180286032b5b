"""The service: the task tree, its start-up order and its shutdown.

::

    trio.run(serve, config)
    └─ serve                      takes the state folder's lock, then
       ├─ status:starting         status.json says "starting" (and what start-up does), until
       │                          the status task below takes over
       │                          opens the store (its committer task), recovers, then:
       ├─ signals                 SIGTERM/SIGINT → drain; a second SIGINT → stop now;
       │                          SIGHUP → reopen the logs, reload [log] and the limits
       ├─ timers                  items in retry_wait come back to their stage's queue
       ├─ http                    /health /metrics /status / (hypercorn, trio worker); [http] listen
       ├─ watchdog                heartbeat (+ WATCHDOG=1 to systemd), stall checks, STATUS=
       │                          (+ the loop-block thread, outside the loop)
       ├─ status                  status.json rewritten every status.interval
       ├─ store-watch             admits items re-queued from outside (`orchestrator requeue`)
       ├─ housekeeping            run logs pruned by age and disk budget (thread), every interval
       ├─ escape-sweeps           processes ended runs left outside their groups, ended (thread)
       ├─ batch-end               (batch only) drains once sources are exhausted and nothing is left
       └─ workers                 per stage: `concurrency` tasks: item → slots → claim → run → record
          └─ sources              per source: a poller: scan (thread) → settle → ingest → admit

Start-up order: lock → a ``starting`` status file (at once: a watcher that restarts the service
must not take the dead pid the file named before for this start-up) → store → recovery of a dead
instance's runs → timers → http → watchdog → status (the ``starting`` writer stops first) →
pending items admitted → store-watch → housekeeping → workers → sources → ``READY=1`` to
systemd. HTTP comes before the workers so that the service can be looked at from its first run
on, and the watchdog before anything that could block the loop. Sources start last so that nothing is ingested before there
is someone to run it, and workers start before sources so that recovered items run first (FIFO).
Readiness is told once the store and HTTP are up and the pipeline is running.

Shutdown (drain): ``STOPPING=1`` to systemd → stop the sources → workers finish the run they are
in and take no other → at ``shutdown_grace`` the runs still going are cancelled (their process
trees killed TERM → grace → KILL, runs recorded ``cancelled``, items re-queued without spending
an attempt) → http, watchdog and the rest cancelled → final status → store closed. HTTP answers
until the runs are over (``/health`` says 503 ``draining``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import os
import signal
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING

import attrs
import trio
import trio_util
from loguru import logger

from orchestrator.errors import LeftoverProcesses, StoreUnavailable
from orchestrator.housekeeping import (
    free_space_at_start,
    highest_run_log_id,
    serve_housekeeping,
)
from orchestrator.instance import STORE_FAILED, InstanceLock, acquire_instance_lock
from orchestrator.journal import JOURNAL_NAME, RUN_ID_GAP, RunJournal, read_journal
from orchestrator.pollers import serve_source
from orchestrator.reaper import Leftover, ReapReport, reap
from orchestrator.runner import become_subreaper, reap_orphans
from orchestrator.space import full_disk_note
from orchestrator.status import (
    StartingStatus,
    op_recent_errors,
    open_starting_status,
    serve_status_file,
    write_failed_status,
    write_status,
)
from orchestrator.store.sqlite import (
    BatchCounts,
    Recovery,
    op_batch_rows,
    op_items_by_seq,
    op_open_runs,
    op_pending_index,
    op_recover,
    op_register_instance,
    op_stop_instance,
    open_sqlite_store,
)
from orchestrator.systemd import Notifier
from orchestrator.terminal import Terminal
from orchestrator.watchdog import Watchdog
from orchestrator.workers import RECENT_ERRORS, RECORD_GRACE, Engine, Tally, resolve_executables

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from orchestrator.config import Config
    from orchestrator.reload import Reloader
    from orchestrator.store.sqlite import SqliteStore

__all__ = ["ServiceResult", "serve"]


#: How long the final status write at shutdown may take.
FINAL_STATUS_GRACE = 5.0


#: Signals the service handles: SIGTERM and SIGINT drain and stop (a second SIGINT stops at
#: once), SIGQUIT stops at once; SIGHUP reopens the logs and reloads [log] and the limits (`orchestrator.reload.Reloader`),
#: or drains and stops when it comes from a closed terminal; SIGUSR1 and SIGUSR2 are ignored.
#: Left at their default, each of the last four ended the process on the spot, its runs orphaned.
SIGNALS_HANDLED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
SIGNALS_IGNORED = (signal.SIGUSR1, signal.SIGUSR2)
#: How often the lock file and the store are checked to still be the ones on disk.
STATE_CHECK_INTERVAL = 2.0


@attrs.frozen
class ServiceResult:
    """How a service or batch run ended."""

    tally: Tally
    #: A signal ended it before the work was done.
    interrupted: bool
    recovery: Recovery
    #: Seqs of every item a batch took charge of (a service keeps none: `Engine.admitted`).
    admitted: frozenset[int]
    #: Sources a batch gave up on, with why (see `serve_source`).
    failed_sources: dict[str, str] = attrs.field(factory=dict)
    #: A batch's items and runs counted for its summary (`op_batch_rows`), read before the
    #: store closed.
    batch_rows: BatchCounts | None = None
    #: How many ended items' files could not be moved or deleted, and the first of them as
    #: ``(item id, why)`` (`Engine.failed_dispositions`).
    failed_dispositions: int = 0
    failed_disposition_samples: tuple[tuple[str, str], ...] = ()
    #: Items left queued at stages the config does not have (`Engine.parked`), and the stages.
    parked: int = 0
    parked_stages: tuple[str, ...] = ()


async def serve(
    config: Config,
    *,
    batch: bool = False,
    on_start: Callable[[Engine], None] | None = None,
    config_path: Path | None = None,
) -> ServiceResult:
    """Run the pipeline: as a service until SIGTERM/SIGINT, or (``batch``) until all is done.

    Args:
        config: the loaded config.
        batch: ingest what the sources hold now, process it all, then return.
        on_start: called with the engine once it is built (progress bars, tests).
        config_path: the file ``config`` was loaded from, read again at SIGHUP for new limits
            and ``[log]`` (None: SIGHUP only reopens the logs).

    Raises:
        StoreUnavailable: the store cannot be opened or written (the service cannot go on).
        HttpUnavailable: ``[http] listen`` cannot be bound (the port is taken).
    """
    instance = uuid.uuid4().hex
    started = time.time()
    if config.db_path is None:
        raise StoreUnavailable(
            f"the PostgreSQL store ({config.state!r}) is not available in this version;"
            ' use state = "sqlite"'
        )
    lock = await trio.to_thread.run_sync(acquire_instance_lock, config.state_dir)
    terminal = await trio.to_thread.run_sync(Terminal)
    notifier = Notifier.from_environ(os.environ)
    become_subreaper()  # what runs leave behind outside their groups is ours to see and reap
    try:
        # Signals are taken from here on, before the status file names this service (a SIGHUP
        # sent then -- `orchestrator reload` -- must not end it by the default action): one
        # that arrives while the store opens or recovery ends a dead instance's leftovers waits
        # for it (it used to end us there, the leftovers alive), then drains (or reloads) the
        # service as soon as it starts.
        with trio.open_signal_receiver(*SIGNALS_HANDLED) as signals:
            # A state disk the logs of ended runs filled: room for the store first.
            await trio.to_thread.run_sync(free_space_at_start, config)
            # The starting status only now that the folder is ours: a second instance must
            # not overwrite the file of the one running.
            async with (
                open_starting_status(config, instance=instance, started=started) as starting,
                open_sqlite_store(
                    config.db_path, synchronous=config.store.synchronous,
                    busy_timeout=config.store.busy_timeout,
                ) as store,
            ):  # fmt: skip
                db_file = await trio.to_thread.run_sync(_identity, config.db_path)
                async with trio.open_nursery() as guard:
                    guard.start_soon(_watch_state_files, lock, config.db_path, db_file)
                    early = _EarlySignals()
                    await guard.start(early.serve, signals)
                    recovery = await _recover(
                        config, store, instance, starting, blamed=lock.previous_blamed,
                        hurry=early.hurry,
                    )  # fmt: skip
                    await early.stop()
                    journal = await trio.to_thread.run_sync(
                        RunJournal.create, config.state_dir / JOURNAL_NAME, instance
                    )
                    try:
                        result = await _serve(
                            config, store, instance, recovery, batch, on_start, notifier,
                            signals, config_path, terminal, starting, early.received,
                            lock.note_end, journal,
                        )  # fmt: skip
                    finally:
                        journal.close()  # (removed once every run in it is recorded)
                    await _sweep_escaped(config)
                    guard.cancel_scope.cancel()
                if batch:
                    seqs = sorted(result.admitted)
                    rows = await store.read(lambda c: op_batch_rows(c, seqs, started - 1))
                    result = attrs.evolve(result, batch_rows=rows)
                await store.call(lambda c: op_stop_instance(c, instance))
                return result
    except BaseException as exc:
        if _store_failed(exc):
            # For the next start: the runs this leaves open were ended by the store's failure
            # (a full disk), not by their items; they must not count toward poison items.
            await trio.to_thread.run_sync(lock.note_end, STORE_FAILED)
            await _say_store_failed(config, instance, exc)
        raise
    finally:
        await _let_orphans_go()
        lock.release()
        if notifier is not None:
            notifier.close()


async def _let_orphans_go() -> None:
    """Reap what runs left behind and has exited (the stop's sweep has just killed the rest:
    they go within moments), then stop being their subreaper: a process that embeds the
    service (tests) must not collect zombies of ours."""
    with trio.CancelScope(shield=True):
        for _ in range(int(ORPHANS_WAIT / 0.01)):  # (a child's exit is no trio event)
            if not reap_orphans():
                break
            await trio.sleep(0.01)
    become_subreaper(False)


#: How long a stopping service waits for the processes its last sweep killed to exit.
ORPHANS_WAIT = 1.0


def _grace_of(config: Config) -> Callable[[Leftover], float]:
    """Each leftover's ``grace_period``: its stage's, by its environment (the longest of all
    when it does not say, or names a stage the config no longer has)."""
    graces = {s.name: s.grace_period for s in config.stages}
    longest = max(graces.values())

    def grace(leftover: Leftover) -> float:
        run = leftover.run
        return graces.get(run.stage, longest) if run is not None else longest

    return grace


def _store_failed(exc: BaseException) -> bool:
    """Whether ``exc`` (or one in its group) says the store failed."""
    return any(isinstance(e, StoreUnavailable) for e in _leaves(exc))


async def _say_store_failed(config: Config, instance: str, exc: BaseException) -> None:
    """Log why the store failed (the service stops: exit 3) and leave the status file saying
    so. Found by an acceptance tester (session 17): the reason went to stderr only, never to
    the ``[log]`` file, and status.json kept saying "running"."""
    failures = [e for e in _leaves(exc) if isinstance(e, StoreUnavailable)]
    why = "; ".join(dict.fromkeys(str(e) for e in failures))
    full = await trio.to_thread.run_sync(full_disk_note, config.state_dir)
    if full is not None:  # what fills the disk, for the command line's message too
        why = f"{why}; {full}"
        for failure in failures:
            if full not in getattr(failure, "__notes__", ()):  # (one can be there twice)
                failure.add_note(full)
    logger.critical("{}: the service stops (exit 3)", why)
    try:
        await trio.to_thread.run_sync(
            functools.partial(write_failed_status, config.status_path, instance=instance,
                              reason=f"{STORE_FAILED}: {why}")
        )  # fmt: skip
    except OSError as err:
        logger.warning("cannot write the final status file: {}", err)


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for e in exc.exceptions for leaf in _leaves(e)]
    return [exc]


@attrs.define
class _EarlySignals:
    """The signals that come during start-up recovery, which may wait a dead instance's
    leftovers' ``grace_period``: each is said at once and acted on once the service runs; a
    second SIGINT (or SIGQUIT) also has the leftovers killed now rather than at their grace."""

    received: list[int] = attrs.Factory(list)
    hurry: threading.Event = attrs.Factory(threading.Event)
    _scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    _done: trio.Event = attrs.Factory(trio.Event)

    async def serve(
        self,
        signals: AsyncIterator[int],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            with self._scope:
                task_status.started()
                async for signum in signals:
                    self.received.append(signum)
                    name = signal.Signals(signum).name
                    now = signum == signal.SIGQUIT or (
                        signum == signal.SIGINT and self.received.count(signal.SIGINT) > 1
                    )
                    if now:
                        self.hurry.set()
                        logger.warning(
                            "{}: start-up kills the dead instance's leftovers now (SIGKILL), "
                            "then the service stops", name,
                        )  # fmt: skip
                    elif signum not in SIGNALS_IGNORED:
                        logger.warning(
                            "{}: start-up is still ending a dead instance's leftovers; acted on "
                            "as soon as that is done (a second SIGINT: at once)", name,
                        )  # fmt: skip
        finally:
            self._done.set()

    async def stop(self) -> None:
        """Stop taking signals here (the service's own handler takes them from now on)."""
        self._scope.cancel()
        await self._done.wait()


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _state_files_problem(
    lock: InstanceLock, db_path: Path, db_file: tuple[int, int] | None
) -> str | None:
    """Why the state folder on disk is no longer the one this service holds, or None."""
    lost = lock.lost()
    if lost is not None:
        return lost
    now = _identity(db_path)
    if now is None:
        return f"the store {str(db_path)!r} was deleted"
    if now != db_file:
        return f"the store {str(db_path)!r} was replaced"
    return None


async def _watch_state_files(
    lock: InstanceLock, db_path: Path, db_file: tuple[int, int] | None
) -> None:
    """Stop the service (exit 3) once its lock file or store is deleted or replaced on disk.

    Both stay open here, so nothing fails by itself, but a second instance could then take a
    new lock and a new store on the same folder, run the same items again and reap our live
    runs as a dead instance's leftovers (found in session 6 by deleting the state folder).
    """
    async with contextlib.aclosing(trio_util.periodic(STATE_CHECK_INTERVAL)) as ticks:
        async for _ in ticks:
            problem = await trio.to_thread.run_sync(_state_files_problem, lock, db_path, db_file)
            if problem is not None:
                raise StoreUnavailable(
                    f"{problem} while this service ran; stopping, since another instance could "
                    "now start on the same state folder (start this one again to go on from "
                    "what the folder holds now)"
                )


async def _recover(
    config: Config, store: SqliteStore, instance: str, starting: StartingStatus, *,
    blamed: frozenset[int] | None, hurry: threading.Event | None = None,
) -> Recovery:  # fmt: skip
    """End a dead instance's leftover processes, then close its runs and re-queue their items.

    ``blamed``: the runs whose interruption counts toward a poison item, as the dead instance
    said how it ended (none when its store failed, the one that blocked its loop), or None for
    all of them (it was killed). ``hurry``: once set, the leftovers get SIGKILL without waiting
    out their grace (a second SIGINT).
    """
    starting.set_phase("ending the processes a dead instance left running")
    recorded = await store.read(op_open_runs)
    report = await trio.to_thread.run_sync(
        functools.partial(reap, str(config.state_dir), recorded, _grace_of(config), hurry=hurry)
    )
    if report.found:
        logger.warning(
            "ended {} process(es) left running by a dead instance ({} needed SIGKILL)",
            report.found, report.killed,
        )  # fmt: skip
    if report.survivors:
        raise LeftoverProcesses(report.survivors)
    starting.set_phase("recovering the runs a dead instance left open")
    host = socket.gethostname()
    await store.call(lambda c: op_register_instance(c, instance, os.getpid(), host))
    journal_path = config.state_dir / JOURNAL_NAME
    found = await trio.to_thread.run_sync(read_journal, journal_path)
    journal = found or {}
    recovery = await store.call(
        lambda c: op_recover(
            c, config.max_interruptions, report.runs, blamed=blamed, journal=journal
        )
    )
    logged = await trio.to_thread.run_sync(highest_run_log_id, str(config.state_dir / "runs"))
    # Run ids go on after every one handed out before: recorded, with a log, or written down
    # -- and well past them after an unclean stop (a journal left), whose last lines a failed
    # file system may have lost.
    gap = 0 if found is None else RUN_ID_GAP
    await store.reload_run_ids(max([logged, *journal]), gap=gap)
    if recovery.interrupted:
        logger.warning(
            "recovered {} run(s) left open by a dead instance; {} poison item(s) now dead",
            recovery.interrupted, recovery.poisoned,
        )  # fmt: skip
    return recovery


async def _sweep_escaped(config: Config) -> None:
    """End what runs left behind outside their process groups, now that every run is over.

    A stage's process that started a session of its own and let go of the output pipe (a
    ``setsid`` helper writing to a file) is not in the group a run's end sweeps; its
    environment marker still names this state folder, so it is found in /proc like a dead
    instance's leftover. Without this it would outlive the service.
    """
    report = await trio.to_thread.run_sync(reap, str(config.state_dir), (), _grace_of(config))
    if report.found:
        logger.warning(
            "ended {} process(es) that runs had left running in the background, outside "
            "their process groups ({} needed SIGKILL)", report.found, report.killed,
        )  # fmt: skip


#: How often, at most, a service looks for processes its ended runs left running (and never
#: more than `ESCAPE_SWEEP_SHARE` of a core: a look reads every process's environment).
ESCAPE_SWEEP_INTERVAL = 2.0
ESCAPE_SWEEP_SHARE = 0.01


async def serve_escape_sweeps(
    engine: Engine, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """End the processes ended runs left running outside their process groups, while the
    service runs (not only at its stop): a ``setsid`` helper that let go of the run's output,
    from a run that ended well (one killed is swept at its end already, see `run_command`).

    A look comes only after runs have ended since the last one, so an idle service does not
    read /proc. A run's processes are told by its environment marker (``ORCH_RUN``); a run is
    ended when its id was handed out and it is no longer running, both read in the loop at
    once, so a run being spawned is never taken for an ended one.
    """
    config = engine.config
    state_dir = str(config.state_dir)
    grace = _grace_of(config)
    swept_at = engine.tally.runs  # start-up recovery has just reaped whatever was there
    task_status.started()
    while True:
        reap_orphans()  # what runs left behind and has exited since (we are its subreaper)
        runs = engine.tally.runs
        if runs == swept_at:
            await trio.sleep(ESCAPE_SWEEP_INTERVAL)
            continue
        swept_at = runs
        newest = engine.store.last_run_id
        live = frozenset(engine.running)

        def look(newest: int = newest, live: frozenset[int] = live) -> tuple[ReapReport, float]:
            cpu = time.thread_time()
            report = reap(state_dir, (), grace, lambda run: run <= newest and run not in live)
            return report, time.thread_time() - cpu

        report, cpu = await trio.to_thread.run_sync(look)
        if report.found:
            runs_named = ", ".join(
                f"run {r.run} ({r.stage!r}, item {r.item!r})" for r in report.runs
            )
            logger.warning(
                "ended {} process(es) that ended runs had left running in the background, "
                "outside their process groups: {} ({} needed SIGKILL)",
                report.found, runs_named or "unknown runs", report.killed,
            )  # fmt: skip
        await trio.sleep(max(ESCAPE_SWEEP_INTERVAL, cpu / ESCAPE_SWEEP_SHARE))


async def _serve(
    config: Config, store: SqliteStore, instance: str, recovery: Recovery, batch: bool,
    on_start: Callable[[Engine], None] | None, notifier: Notifier | None,
    signals: AsyncIterator[int], config_path: Path | None, terminal: Terminal,
    starting: StartingStatus, early_signals: list[int], note_end: Callable[[str], object],
    journal: RunJournal,
) -> ServiceResult:  # fmt: skip
    interrupted = False
    starting.set_phase("starting the pipeline")
    # Seqs and stages only: the items are read as the engine has room for them.
    pending = await store.read(op_pending_index)
    # Items recovery found poisoned died in this run: a batch reports them.
    poisoned = await store.read(lambda c: op_items_by_seq(c, recovery.poisoned_seqs))
    executables = await trio.to_thread.run_sync(resolve_executables, config)
    # Python stages' modules (already imported by the command line, which checked them; a
    # module's import reads files, so not on the loop).
    calls = {}
    if any(stage.call is not None for stage in config.stages):
        from orchestrator.calls import resolve_calls

        calls = await trio.to_thread.run_sync(resolve_calls, config)
    engine = Engine(
        config, store, instance=instance, executables=executables, batch=batch, calls=calls,
        journal=journal,
    )  # fmt: skip
    engine.started_wall = starting.started  # (the status file said so while it started)
    if not batch:  # the last failures shown survive a restart: the store has them
        engine.recent_errors.extend(
            await store.read(functools.partial(op_recent_errors, limit=RECENT_ERRORS))
        )
    if on_start is not None:
        on_start(engine)
    watchdog = Watchdog(engine, notifier=notifier)
    watchdog.note_end = note_end
    async with trio.open_nursery() as root:
        await root.start(engine.serve_timers)
        # A batch job serves no HTTP: it would contend with a service for the port.
        if config.http.listen is not None and not batch:
            from orchestrator.web import serve_http  # hypercorn + prometheus: only when used

            urls = await root.start(
                functools.partial(serve_http, engine, watchdog, listen=config.http.listen),
                name="http",
            )
            logger.info("http: listening on {}", ", ".join(urls))
        await root.start(watchdog.serve, name="watchdog")
        await starting.stop()  # one writer at a time: they share the temp file
        await root.start(functools.partial(serve_status_file, engine, health=watchdog.health))
        # Before the store watch's first look: it would take them for items re-queued from
        # outside (found in session 13: the line, when the look came first).
        engine.defer(pending)
        for item in poisoned:
            engine.admit(item)
        await root.start(engine.serve_store_watch)
        await root.start(serve_housekeeping, engine)
        await root.start(serve_escape_sweeps, engine, name="escape-sweeps")
        sources_scope = trio.CancelScope()

        async with trio.open_nursery() as workers:

            def drain(grace: float) -> None:
                if notifier is not None and not engine.stopping:
                    notifier.notify("STOPPING=1", "STATUS=draining")
                sources_scope.cancel()
                engine.stop_taking_work()
                workers.cancel_scope.deadline = min(
                    workers.cancel_scope.deadline, trio.current_time() + grace
                )

            reloader: Reloader | None = None  # (made at the first SIGHUP)

            async def handle(signum: int) -> None:
                nonlocal interrupted, reloader
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    if not await trio.to_thread.run_sync(terminal.gone):
                        if reloader is None:
                            reloading = await trio.to_thread.run_sync(
                                importlib.import_module, "orchestrator.reload"
                            )
                            reloader = reloading.Reloader(config_path, notifier, terminal)
                        await reloader.reload(engine, functools.partial(engine.staff, workers))
                        return
                    name = "SIGHUP (the terminal closed)"
                    if terminal.nohup:
                        logger.warning("{}: ignored, as nohup asked", name)
                        return
                if signum in SIGNALS_IGNORED:
                    logger.warning("{}: ignored (SIGTERM or SIGINT drain and stop)", name)
                    return
                if signum == signal.SIGQUIT:
                    interrupted = True
                    logger.warning("{}: stopping now; running stages are killed", name)
                    drain(0)
                    engine.kill_runs_now()
                    return
                if not interrupted:
                    interrupted = True
                    logger.warning(
                        "{}: draining; running stages get {:g}s to finish",
                        name, config.shutdown_grace,
                    )  # fmt: skip
                    drain(config.shutdown_grace)
                elif signum == signal.SIGINT:
                    logger.warning("second SIGINT: stopping now")
                    drain(0)
                    engine.kill_runs_now()
                else:  # a second SIGTERM (GNU timeout sends two): it was taken without a word
                    logger.warning("{}: already stopping (a second SIGINT stops at once)", name)

            async def watch_signals() -> None:
                for signum in early_signals:  # those that came during start-up recovery
                    await handle(signum)
                async for signum in signals:
                    await handle(signum)

            async def end_of_batch() -> None:
                await engine.sources_exhausted.wait_value(len(config.sources))
                await engine.outstanding.wait_value(0)
                drain(0)

            root.start_soon(watch_signals, name="signals")
            if batch:
                root.start_soon(end_of_batch, name="batch-end")
            engine.staff(workers)
            with sources_scope:
                async with trio.open_nursery() as sources:
                    for source in config.sources:
                        await sources.start(
                            functools.partial(serve_source, engine, source, once=batch),
                            name=f"source:{source.name}",
                        )
                    if notifier is not None:
                        notifier.notify("READY=1", "STATUS=running")
                if not batch:
                    await trio.sleep_forever()
        # Results of the last runs may still be on their way to the disk: let them land
        # and their items be handed on (terminal hooks) before the timers go.
        with trio.move_on_after(RECORD_GRACE, shield=True):
            await engine.unsettled.wait_value(0)
        root.cancel_scope.cancel()
    with trio.move_on_after(FINAL_STATUS_GRACE, shield=True):
        try:
            await write_status(engine, state="stopped", health=watchdog.health)
        except OSError as exc:
            logger.warning("cannot write the final status file: {}", exc)
    return ServiceResult(
        tally=engine.tally, interrupted=interrupted, recovery=recovery,
        admitted=frozenset(engine.admitted or ()), failed_sources=dict(engine.failed_sources),
        failed_dispositions=engine.failed_dispositions,
        parked=len(engine.parked), parked_stages=tuple(sorted(engine.parked_stages)),
        failed_disposition_samples=tuple(engine.failed_disposition_samples),
    )  # fmt: skip
