"""The status file: ``state_dir/status.json``, rewritten atomically every ``status.interval``.

It is what a person (or ``orchestrator status`` / ``health``) reads to know what the service is
doing without talking to it: per-stage counts, running runs with their age, who holds and who
waits for each slot, the last errors. It is written to a temporary file, fsynced and renamed
over the old one, so a reader always sees a complete JSON document -- never a half-written one.

Its ``state`` is ``starting`` from the moment the service holds its state folder until its
pipeline runs (``phase`` says what start-up is doing: recovering a dead instance's runs can take
minutes, rewritten every interval all the same), then ``running``, ``draining`` and, last,
``stopped`` -- or ``failed``, with the ``reason``, when its store failed (`write_failed_status`).
A file that cannot be written (a full disk, a read-only folder) is logged once and
makes the service degraded (`Engine.status_file_failure`, shown by ``/health``) until a write
succeeds again.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import socket
import time
from typing import TYPE_CHECKING, Any

import trio

from orchestrator import __version__
from orchestrator.files import read_without_waiting
from orchestrator.store.sqlite import op_counts_by_stage, op_recent_failures

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from orchestrator.config import Config
    from orchestrator.workers import Engine

__all__ = [
    "StartingStatus",
    "failure_entry",
    "op_recent_errors",
    "op_stage_counts",
    "open_starting_status",
    "serve_status_file",
    "snapshot",
    "starting_snapshot",
    "write_atomically",
    "write_failed_status",
]


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def op_stage_counts(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """Items per stage and state; done items count under the last stage of their route."""
    return op_counts_by_stage(conn, rejected_apart=False)[0]


def failure_entry(
    at: float | None, item: str, stage: str | None, attempt: int, outcome: str | None,
    reason: str | None, next_state: str | None,
) -> dict[str, object]:  # fmt: skip
    """One of the status file's ``recent_errors``."""
    return {"at": at, "item": item, "stage": stage, "attempt": attempt, "outcome": outcome,
            "reason": reason, "next": next_state}  # fmt: skip


def op_recent_errors(conn: sqlite3.Connection, limit: int) -> list[dict[str, object]]:
    """The last ``limit`` failed runs as the status file lists them, oldest first: what a
    restarted service shows until runs of its own fail (``next`` is not recorded: null)."""
    return [
        failure_entry(run.ended_at, item_id, run.stage, run.attempt, run.outcome, run.reason,
                      None)
        for item_id, run in reversed(op_recent_failures(conn, limit))
    ]  # fmt: skip


_COUNTED = ("queued", "running", "retry_wait", "done", "dead", "rejected")


def snapshot(
    engine: Engine, counts: dict[str, dict[str, int]], *, state: str,
    health: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The status document (pure: everything comes from the engine and the arguments)."""
    now = trio.current_time()
    # Who waits for which limit: a run holding its stage's slot while it waits for a pool is
    # among the pool's waiters, not the stage's (whose `waiting` counts only its own line).
    waiters: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for holder, since in engine.slot_waiters.items():
        if holder.waiting_for is not None:
            waiters.setdefault(holder.waiting_for, []).append(
                {"item": holder.item, "stage": holder.stage, "waited": round(now - since, 3)}
            )
    wall = dt.datetime.now(dt.UTC).timestamp()
    limits = {(s.kind, s.name): s for s in engine.slots.statistics()}
    stages: dict[str, Any] = {}
    for stage in engine.config.stages:
        per = counts.get(stage.name, {})
        lim = limits["stage", stage.name]
        stages[stage.name] = {
            **{key: per.get(key, 0) for key in _COUNTED},
            "failed_runs": engine.failed_runs.get(stage.name, 0),
            "concurrency": lim.total,
            "busy": lim.busy,
            "waiting": lim.waiting,
            "holders": list(lim.holders),
            "waiters": waiters.get(("stage", stage.name), []),
            "in_config": True,
        }
    # Items still at a stage the config no longer has (renamed or removed: they wait for
    # `requeue --to`) are counted too, under that stage, which has no slots.
    for name in sorted(set(counts) - set(stages)):
        per = counts[name]
        stages[name] = {
            **{key: per.get(key, 0) for key in _COUNTED},
            "failed_runs": engine.failed_runs.get(name, 0), "concurrency": None, "busy": 0,
            "waiting": 0, "holders": [], "waiters": [], "in_config": False,
        }  # fmt: skip
    pools = {
        name: {
            "size": s.total, "busy": s.busy, "waiting": s.waiting, "holders": list(s.holders),
            "waiters": waiters.get(("pool", name), []),
        }
        for (kind, name), s in limits.items()
        if kind == "pool"
    }  # fmt: skip
    running = [
        {
            "run": r.run,
            "item": r.item,
            "stage": r.stage,
            "attempt": r.attempt,
            "pid": r.pid,
            "age": round(now - r.since, 3),
        }
        for r in engine.running.values()
    ]
    return {
        "version": __version__,
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "instance": engine.instance,
        "started": _iso(engine.started_wall),
        "updated": _iso(wall),
        "updated_unix": wall,
        "interval": engine.config.status.interval,
        "state": state,
        "stages": stages,
        "pools": pools,
        "running": running,
        "recent_errors": list(engine.recent_errors),
        "reload": engine.last_reload,
        "health": health,
        "sources": {
            source.name: {
                "type": source.type.value, "path": str(source.path),
                "problem": engine.source_problems.get(source.name),
            }
            for source in engine.config.sources
        },
    }  # fmt: skip


def starting_snapshot(
    config: Config, *, instance: str, started: float, phase: str
) -> dict[str, Any]:
    """The status document of a service still starting: who it is, since when, doing what.

    The sections a running service fills (stages, pools, runs...) are there, empty, so that a
    reader of the running document reads this one too.
    """
    wall = time.time()
    return {
        "version": __version__, "pid": os.getpid(), "host": socket.gethostname(),
        "instance": instance, "started": _iso(started), "updated": _iso(wall),
        "updated_unix": wall, "interval": config.status.interval, "state": "starting",
        "phase": phase, "stages": {}, "pools": {}, "running": [], "recent_errors": [],
        "reload": None, "health": None, "sources": {},
    }  # fmt: skip


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temp file, fsync, rename (blocking: call from a thread).

    The temp file's name is new each time and it is made with ``O_EXCL``: in a folder others
    can write (a ``[status] file`` in a shared place), a name planted there as a symlink to
    another file cannot make us write through it (found by an acceptance tester, session 16:
    the name was ``.status.json.<pid>.tmp``, opened with ``O_TRUNC``, following symlinks).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        # A half-written temp file on a full disk would hold the space the next try needs.
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _write_failure(path: Path, exc: OSError) -> str:
    """Why the status file at ``path`` cannot be written, the same at every failed try.

    ``str(exc)`` would name the file the error is about: the temp file, whose name is new at
    each try, so one failure would be logged at every tick and change ``/health`` and systemd's
    ``STATUS=`` as often (found by an acceptance tester, session 17: the folder replaced by a
    file, or ``chattr +i`` on the file). The file meant, and the error without its file names.
    """
    why = f"[Errno {exc.errno}] {exc.strerror}" if exc.errno and exc.strerror else str(exc)
    return f"status file {str(path)!r} cannot be written: {why}"


def write_failed_status(path: Path, *, instance: str, reason: str) -> bool:
    """Rewrite the status file ``instance`` wrote last as its final word: ``state = "failed"``
    and the ``reason``, its counts as they were last known (the store cannot be read any more).
    Blocking: call it from a thread.

    Found by an acceptance tester (session 17): a service whose store failed left its file
    saying ``running`` for good.

    Returns:
        False when the file is not there, cannot be read, or is another instance's.

    Raises:
        OSError: the file cannot be written (a full disk).
    """
    try:
        doc = json.loads(read_without_waiting(path))
    except (OSError, ValueError):
        return False
    if not isinstance(doc, dict) or doc.get("instance") != instance:
        return False
    wall = time.time()
    # Its runs were ended with it: none is going on any more.
    doc.update(state="failed", reason=reason, running=[], updated=_iso(wall), updated_unix=wall)
    write_atomically(path, json.dumps(doc, indent=1).encode())
    return True


async def write_status(
    engine: Engine, *, state: str, health: Callable[[], dict[str, Any]] | None = None
) -> None:
    """Write the status file once (store read and file write both in threads)."""
    counts = await engine.store.read(op_stage_counts)
    doc = snapshot(engine, counts, state=state, health=health() if health else None)
    data = json.dumps(doc, indent=1).encode()
    path = engine.config.status_path
    await trio.to_thread.run_sync(write_atomically, path, data)


async def serve_status_file(
    engine: Engine, *, health: Callable[[], dict[str, Any]] | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:  # fmt: skip
    """Rewrite the status file every ``status.interval`` until cancelled.

    A failed write (a full disk, a read-only folder) never stops the service: it is logged once,
    kept in ``engine.status_file_failure`` (``/health`` is degraded with it) and tried again at
    the next tick; the first write that succeeds again clears it and is followed at once by
    another, so that the file does not carry the failure it recovered from.
    """
    from loguru import logger

    task_status.started()
    interval = engine.config.status.interval
    deadline = trio.current_time()
    path = str(engine.config.status_path)
    while True:
        # Every interval, and at once when asked (`Engine.want_status`: a reload's result).
        with trio.move_on_at(deadline):
            await engine.status_wanted.wait()
        engine.status_wanted = trio.Event()
        if trio.current_time() >= deadline:
            deadline += interval
            if deadline < trio.current_time():  # (behind: a slow disk) no burst to catch up
                deadline = trio.current_time() + interval
        try:
            state = "draining" if engine.stopping else "running"
            await write_status(engine, state=state, health=health)
        except OSError as exc:
            failure = _write_failure(engine.config.status_path, exc)
            if failure != engine.status_file_failure:  # once, not at every tick
                logger.warning("{}; tried again every {:g}s", failure, interval)
            engine.status_file_failure = failure
        else:
            if engine.status_file_failure is not None:
                logger.info("status file {!r} written again", path)
                engine.status_file_failure = None
                engine.status_wanted.set()  # what was written still said it could not be


class StartingStatus:
    """The status file of a service that is starting, before its engine exists.

    Rewritten every ``status.interval`` with ``state = "starting"`` and the `phase`, so that
    ``orchestrator health`` sees a live service starting (not the dead pid the file named
    before) and a start-up whose event loop hangs goes stale like a running service would.

    Synopsis::

        async with open_starting_status(config, instance=instance, started=t0) as starting:
            starting.set_phase("recovering the runs a dead instance left open")
            ...
            await starting.stop()  # before the running service's own writer starts
    """

    def __init__(self, config: Config, *, instance: str, started: float, phase: str) -> None:
        self.config = config
        self.instance = instance
        self.started = started
        #: What start-up is doing now (the status file's ``phase``).
        self.phase = phase
        self._wanted = trio.Event()
        self._scope = trio.CancelScope()
        self._done = trio.Event()
        self._failure: str | None = None

    def set_phase(self, phase: str) -> None:
        """Say what start-up does now; the file is rewritten at once."""
        self.phase = phase
        self._wanted.set()

    async def stop(self) -> None:
        """Stop rewriting the file, and wait for a write going on to end."""
        self._scope.cancel()
        await self._done.wait()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write the file now and every interval until `stop` (the first write before started)."""
        from loguru import logger

        interval = self.config.status.interval
        path = self.config.status_path
        try:
            with self._scope:
                while True:
                    doc = starting_snapshot(self.config, instance=self.instance,
                                            started=self.started, phase=self.phase)  # fmt: skip
                    try:
                        await trio.to_thread.run_sync(
                            write_atomically, path, json.dumps(doc, indent=1).encode()
                        )
                    except OSError as exc:
                        failure = _write_failure(path, exc)
                        if failure != self._failure:
                            logger.warning("{}; tried again every {:g}s", failure, interval)
                        self._failure = failure
                    task_status.started()
                    task_status = trio.TASK_STATUS_IGNORED
                    with trio.move_on_after(interval):
                        await self._wanted.wait()
                    self._wanted = trio.Event()
        finally:
            self._done.set()


@contextlib.asynccontextmanager
async def open_starting_status(
    config: Config, *, instance: str, started: float, phase: str = "opening the store"
) -> AsyncIterator[StartingStatus]:
    """Write the ``starting`` status file now, and keep it fresh until `StartingStatus.stop`.

    Call it only once the state folder's lock is held: a second instance must never overwrite
    the status file of the one running.
    """
    starting = StartingStatus(config, instance=instance, started=started, phase=phase)
    async with trio.open_nursery() as nursery:
        await nursery.start(starting.serve, name="status:starting")
        try:
            yield starting
        finally:
            starting._scope.cancel()
