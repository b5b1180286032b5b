"""Housekeeping: the service keeps its run logs within an age and a disk budget by itself, and
(``items_max_age``) purges old ended items as ``orchestrator purge`` does.

An edge device's disk is small and nobody cleans it by hand, yet every run with output leaves a
log (``state_dir/runs/<run id>.log``, up to a stage's ``output_limit``). Every
``housekeeping.interval`` -- and once at start -- a worker thread lists that folder and removes:

1. logs last written more than ``run_logs_max_age`` ago;
2. then, while the logs left take more disk space than ``run_logs_max_size`` (as ``du`` counts
   it: a 100-byte log takes a whole block), the oldest ones.

A service that starts on a full state disk (`orchestrator.space.disk_full`) first removes the
logs of ended runs, oldest first, until the store has room again (`free_space_at_start`).

Only regular files named ``<digits>.log`` are touched; anything else in the folder is left as it
is. The logs of runs going on when a pass starts, and of every run started since, are never
removed. A run whose log is gone keeps its record and output tail in the store; ``orchestrator
show`` says the log was removed.

Synopsis::

    report = prune_run_logs(runs_dir, max_age=7 * 86400, max_size=256 << 20, keep=lambda id: ...)
    report.removed, report.freed     # files and bytes of disk space
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import time
from typing import TYPE_CHECKING

import attrs
import trio
import trio_util
from loguru import logger

from orchestrator.durations import format_duration, format_size
from orchestrator.errors import StoreUnavailable

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from orchestrator.config import Config
    from orchestrator.workers import Engine

__all__ = ["PruneReport", "free_space_at_start", "prune_run_logs", "serve_housekeeping"]

_RUN_LOG_RE = re.compile(r"([0-9]{1,19})\.log")


@attrs.frozen(kw_only=True)
class PruneReport:
    """What one pass over the run logs did."""

    #: Logs removed for their age, and to bring the rest within the size budget.
    aged: int = 0
    over_budget: int = 0
    #: Logs removed to make room on a full disk (`free_space_at_start`).
    for_room: int = 0
    #: Disk space freed (bytes, as ``du`` counts them) and left in run logs afterwards.
    freed: int = 0
    left: int = 0
    #: The first failure to list the folder or remove a log (the pass goes on without it).
    error: str | None = None

    @property
    def removed(self) -> int:
        return self.aged + self.over_budget + self.for_room


def _disk_usage(st: os.stat_result) -> int:
    return st.st_blocks * 512


def highest_run_log_id(runs_dir: str) -> int:
    """The highest run id among the logs in ``runs_dir`` (0 for none; blocking: run it in a
    worker thread).

    Run ids are handed out before runs are recorded, so a service the store failed under can
    leave logs of runs it never recorded; the next start continues after them, not over them.
    """
    highest = 0
    try:
        with os.scandir(runs_dir) as entries:
            for entry in entries:
                match = _RUN_LOG_RE.fullmatch(entry.name)
                if match is not None:
                    highest = max(highest, int(match.group(1)))
    except FileNotFoundError:
        pass  # no run has had output yet
    return highest


def prune_run_logs(
    runs_dir: str, *, max_age: float | None, max_size: int | None,
    keep: Callable[[int], bool], now: float | None = None, to_free: int | None = None,
) -> PruneReport:  # fmt: skip
    """Remove run logs in ``runs_dir`` past ``max_age`` seconds, then the oldest beyond
    ``max_size`` bytes of disk space, then the oldest until ``to_free`` bytes are freed; never
    one whose run id ``keep`` says to keep (blocking: run it in a worker thread). ``None``
    switches a rule off."""
    now = time.time() if now is None else now
    logs: list[tuple[int, int, str]] = []  # (mtime_ns, disk usage, path) of removable logs
    kept_usage = 0
    error = None
    try:
        with os.scandir(runs_dir) as entries:
            for entry in entries:
                match = _RUN_LOG_RE.fullmatch(entry.name)
                if match is None:
                    continue
                try:
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue  # removed meanwhile
                if keep(int(match.group(1))):
                    kept_usage += _disk_usage(st)
                else:
                    logs.append((st.st_mtime_ns, _disk_usage(st), entry.path))
    except FileNotFoundError:
        return PruneReport()  # no run has had output yet
    except OSError as exc:
        error = f"cannot list {runs_dir!r}: {exc.strerror or exc}"
    logs.sort()  # oldest first
    aged = over_budget = freed = 0

    def remove(path: str) -> bool:
        nonlocal error
        try:
            os.unlink(path)
        except FileNotFoundError:
            return True
        except OSError as exc:
            error = error or f"cannot remove {path!r}: {exc.strerror or exc}"
            return False
        return True

    start = 0
    if max_age is not None:
        cutoff = int((now - max_age) * 1e9)
        while start < len(logs) and logs[start][0] < cutoff:
            _, usage, path = logs[start]
            if remove(path):
                aged += 1
                freed += usage
            else:
                kept_usage += usage
            start += 1
    rest = logs[start:]
    total = kept_usage + sum(usage for _, usage, _ in rest)
    if max_size is not None:
        for _, usage, path in rest:
            if total <= max_size:
                break
            if remove(path):
                over_budget += 1
                freed += usage
                total -= usage
    for_room = 0
    if to_free is not None:
        for _, usage, path in rest:
            if freed >= to_free:
                break
            if os.path.lexists(path) and remove(path):  # (not one the budget removed)
                for_room += 1
                freed += usage
                total -= usage
    return PruneReport(aged=aged, over_budget=over_budget, for_room=for_room, freed=freed,
                       left=total, error=error)  # fmt: skip


def free_space_at_start(config: Config) -> PruneReport | None:
    """On a full state disk (`orchestrator.space.disk_full`), remove the logs of ended runs,
    oldest first, until there is room for the store again; None when the disk is not full or
    the store cannot tell which runs ended (blocking: call it from a thread, before the store
    opens).

    Found by an acceptance tester (session 17): run logs filled a small state disk; the store
    failed (exit 3) at every restart, before the housekeeping that prunes logs ever ran. Kept:
    the logs of runs the store holds open (a dead instance's: their output is only there) and
    of runs it never recorded (their ids must not be handed out again), and every workdir (the
    items' own, or a dead item's, left to look into).
    """
    from orchestrator.space import free_bytes, room_missing

    state_dir = config.state_dir
    missing = room_missing(state_dir)
    if config.db_path is None or not missing:
        return None
    ended = _ended_runs(config.db_path)
    if ended is None:
        return None
    open_runs, last_recorded = ended
    free = free_bytes(state_dir) or 0
    report = prune_run_logs(
        str(state_dir / "runs"), max_age=None, max_size=None, to_free=missing,
        keep=lambda run: run in open_runs or run > last_recorded,
    )  # fmt: skip
    if report.removed:
        logger.warning(
            "the state folder's file system is full ({} free): removed {} log(s) of ended "
            "runs, oldest first, to make room for the store ({} freed)",
            format_size(free), report.removed, format_size(report.freed),
        )  # fmt: skip
    if report.error is not None:
        logger.warning("housekeeping: {}", report.error)
    return report


def _ended_runs(db_path: Path) -> tuple[frozenset[int], int] | None:
    """The runs the store holds open and its highest run id, read without writing anything
    (on a full disk, a store with an empty WAL is read as it is on disk); None if it cannot."""
    import sqlite3

    from orchestrator.store.sqlite import connect_readonly

    try:
        try:
            conn = connect_readonly(db_path)
        except StoreUnavailable:
            wal = os.stat(f"{db_path}-wal").st_size if os.path.exists(f"{db_path}-wal") else 0
            if wal:
                return None
            conn = connect_readonly(db_path, immutable=True)
        try:
            open_runs = frozenset(r[0] for r in conn.execute(
                "SELECT id FROM runs WHERE outcome IS NULL"))  # fmt: skip
            last = conn.execute("SELECT coalesce(max(id), 0) FROM runs").fetchone()[0]
        finally:
            conn.close()
    except (StoreUnavailable, sqlite3.Error, OSError):
        return None
    return open_runs, int(last)


async def serve_housekeeping(
    engine: Engine, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Prune the run logs, and purge old items (``items_max_age``), at start and every
    ``housekeeping.interval`` until cancelled."""
    config = engine.config.housekeeping
    runs_dir = str(engine.config.state_dir / "runs")
    task_status.started()
    prune_logs = config.run_logs_max_age is not None or config.run_logs_max_size is not None
    db_path, items_max_age = engine.config.db_path, config.items_max_age
    purge_items = items_max_age is not None and db_path is not None
    if not prune_logs and not purge_items:
        return
    prune = functools.partial(
        prune_run_logs, runs_dir, max_age=config.run_logs_max_age, max_size=config.run_logs_max_size
    )
    async with contextlib.aclosing(trio_util.periodic(config.interval)) as ticks:
        async for _ in ticks:
            if prune_logs:
                keep = _keeping(frozenset(engine.running), engine.store.last_run_id)
                report = await trio.to_thread.run_sync(functools.partial(prune, keep=keep))
                _log_report(report, config.run_logs_max_age, config.run_logs_max_size)
            if items_max_age is not None and db_path is not None:
                await _purge_items(engine, db_path, items_max_age)


async def _purge_items(engine: Engine, db_path: Path, max_age: float) -> None:
    """One `orchestrator.purge.purge` of the items unchanged for ``items_max_age``, in a worker
    thread on a connection of its own (as the command beside a running service)."""
    from orchestrator.purge import purge  # only where it is switched on

    now = time.time()
    if engine.admitted is not None:
        # A batch: never the items it ended itself -- its summary reads them at the end.
        now = min(now, engine.started_wall + max_age)
    try:
        report = await trio.to_thread.run_sync(
            functools.partial(purge, db_path, engine.config, older_than=max_age, now=now)
        )
    except StoreUnavailable as exc:
        logger.warning("housekeeping: cannot purge old items: {}", exc)
        return
    purged = sum(report.purged.values())
    if purged:
        states = ", ".join(f"{n} {state}" for state, n in sorted(report.purged.items()))
        logger.info(
            "housekeeping: purged {} item(s) unchanged for {} ({}) with {} run(s) and {} "
            "event(s); removed {} run log(s) and {} workdir(s)",
            purged, format_duration(max_age), states, report.runs, report.events, report.logs,
            report.workdirs,
        )  # fmt: skip


def _keeping(running: frozenset[int], newest: int) -> Callable[[int], bool]:
    """Runs going on now, and any started from now on (run ids only grow), keep their logs."""
    return lambda run_id: run_id in running or run_id > newest


def _log_report(report: PruneReport, max_age: float | None, max_size: int | None) -> None:
    if report.removed:
        why = []
        if report.aged:
            why.append(f"{report.aged} older than {format_duration(max_age)}")
        if report.over_budget:
            why.append(f"{report.over_budget} beyond the {format_size(max_size or 0)} budget")
        logger.info(
            "housekeeping: removed {} run log(s), {} ({}); {} left",
            report.removed, format_size(report.freed), ", ".join(why), format_size(report.left),
        )  # fmt: skip
    if report.error is not None:
        logger.warning("housekeeping: {}", report.error)
