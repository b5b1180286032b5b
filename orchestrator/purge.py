"""``orchestrator purge``: old terminal items leave the store, with their runs, events, run logs
and workdirs -- but never in a way that makes a source take something again.

An item's row is also what stops its source from taking its input twice (the store refuses a
key it holds). So an item whose input is still in its source is kept, whatever its age:

- directory: a file still at the item's name in the source folder, or the item's file still
  somewhere under that folder (``on_done = "keep"`` keeps every such item for as long as its
  file stays; a name the store holds escaped -- not UTF-8 -- cannot be checked, so it is kept);
- json: an element with the item's key still in the array (if the file cannot be read, every
  item of that source is kept);
- items of a source the config does not have (a renamed source would take its files again);
- the newest item, and the item with the newest run: SQLite would give their numbers to the next
  item or run, whose workdir or run log could then meet the purged one's (`op_newest`).

JSONL items are purged: records before the stored read position are never read again. What
purge forgets can come back as a new item: a file dropped again under a purged name, an element
added back to an array, a JSONL record appended later with a purged id.

It runs in the operator's own process beside a running service, like ``requeue``: a write
transaction per `PURGE_BATCH` items (the service's commits wait for at most one of them), each
deleting only items still terminal and unchanged since the cutoff. Run logs and workdirs are
removed after the transaction that deleted their item; a crash in between leaves files that the
service's housekeeping removes by age, and workdirs under ``state_dir/work`` that nothing uses.

Synopsis::

    report = purge(config.db_path, config, older_than=30 * 86400)
    report.purged      # {"done": 1200, "dead": 3}
    report.kept        # {"its file is still in the source folder": 40}
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import time
from typing import TYPE_CHECKING

import attrs

from orchestrator.config import SourceType
from orchestrator.errors import StoreUnavailable
from orchestrator.instance import check_state_dir
from orchestrator.store.records import TERMINAL_STATES, ItemState
from orchestrator.store.sqlite import (
    ESCAPED_MARK,
    connect,
    op_newest,
    op_purge_candidates,
    op_purge_items,
)

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

    from orchestrator.config import Config, SourceConfig
    from orchestrator.store.sqlite import PurgeCandidate

__all__ = ["PURGE_BATCH", "PurgeReport", "purge"]

#: Items judged and deleted per write transaction.
PURGE_BATCH = 500

KEPT_FILE = "its file is still in the source folder"
KEPT_NAME = "its file name cannot be checked (not UTF-8)"
KEPT_ELEMENT = "its element is still in the JSON array"
KEPT_UNREADABLE = "its JSON file cannot be read now"
KEPT_NO_SOURCE = "its source is not in this config"
KEPT_NEWEST = "it is the newest item, or has the newest run (numbers are never reused)"


@attrs.frozen(kw_only=True)
class PurgeReport:
    """What `purge` did (or, with ``dry_run``, would do)."""

    #: Items deleted, per state.
    purged: dict[str, int]
    runs: int
    events: int
    #: Run logs and workdirs removed from the disk.
    logs: int
    workdirs: int
    #: Items old enough but kept, per reason.
    kept: dict[str, int]
    dry_run: bool


def purge(
    path: Path, config: Config, *, older_than: float, states: Sequence[str] | None = None,
    dry_run: bool = False, now: float | None = None,
) -> PurgeReport:  # fmt: skip
    """Delete the items in ``states`` (default: every terminal state) unchanged for
    ``older_than`` seconds, except those whose input is still in their source (module doc).

    Raises:
        ValueError: a state in ``states`` is not terminal.
        StoreUnavailable: no store at ``path``, or it could not be written, or (not a
            ``dry_run``) the state folder is not safe to remove files in (`check_state_dir`).
    """
    terminal = [s.value for s in ItemState if s in TERMINAL_STATES]
    chosen = sorted(terminal if states is None else set(states))
    wrong = [s for s in chosen if s not in terminal]
    if wrong:
        raise ValueError(f"not a terminal state: {', '.join(wrong)} (use {', '.join(terminal)})")
    if not dry_run:
        # It removes run logs and workdirs: not through another user's links (the service
        # checks the folder at start; this runs beside it, maybe as another user).
        with contextlib.suppress(FileNotFoundError):  # no folder: `connect` says there is no store
            check_state_dir(config.state_dir)
    before = (time.time() if now is None else now) - older_than
    purged: dict[str, int] = {}
    runs = events = logs = workdirs = 0
    conn = connect(
        path, synchronous=config.store.synchronous, busy_timeout=config.store.busy_timeout,
        create=False,
    )  # fmt: skip
    try:
        # The newest rows only ever get newer: those of now are kept to the end.
        judge = _Judge(config, newest=op_newest(conn))
        after = 0
        while True:
            found = op_purge_candidates(
                conn, before=before, states=chosen, after_seq=after, limit=PURGE_BATCH
            )
            if not found:
                break
            after = found[-1].seq
            going = [c for c in found if judge.keeps(c) is None]
            if dry_run or not going:
                for c in going:
                    purged[c.state] = purged.get(c.state, 0) + 1
                continue
            conn.execute("BEGIN IMMEDIATE")
            try:
                gone, n_runs, n_events, log_paths = op_purge_items(
                    conn, [c.seq for c in going], before=before, states=chosen,
                    runs_dir=str(config.state_dir / "runs"),
                )  # fmt: skip
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            gone_seqs = set(gone)
            for c in going:
                if c.seq in gone_seqs:
                    purged[c.state] = purged.get(c.state, 0) + 1
            runs += n_runs
            events += n_events
            logs += sum(_remove_file(p) for p in log_paths)
            workdirs += sum(_remove_tree(config.state_dir / "work" / str(s)) for s in gone)
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot write the store {str(path)!r}: {exc}") from exc
    finally:
        conn.close()
    return PurgeReport(
        purged=purged, runs=runs, events=events, logs=logs, workdirs=workdirs,
        kept=dict(judge.kept), dry_run=dry_run,
    )  # fmt: skip


class _Judge:
    """Whether an item's input is still in its source, which keeps the item."""

    def __init__(self, config: Config, *, newest: frozenset[int]) -> None:
        self.sources = {s.name: s for s in config.sources}
        self.newest = newest
        self.kept: dict[str, int] = {}
        #: Per json source: the keys its file holds now (None: it cannot be read).
        self._arrays: dict[str, set[str] | None] = {}

    def keeps(self, item: PurgeCandidate) -> str | None:
        """Why ``item`` stays, or None when it may go."""
        why = self._why(item)
        if why is not None:
            self.kept[why] = self.kept.get(why, 0) + 1
        return why

    def _why(self, item: PurgeCandidate) -> str | None:
        why = self._source_keeps(item)
        if why is None and item.seq in self.newest:
            return KEPT_NEWEST
        return why

    def _source_keeps(self, item: PurgeCandidate) -> str | None:
        source = self.sources.get(item.source)
        if source is None:
            return KEPT_NO_SOURCE
        if source.type is SourceType.DIRECTORY:
            return _file_kept(source, item)
        if source.type is SourceType.JSON:
            keys = self._array_keys(source)
            if keys is None:
                return KEPT_UNREADABLE
            return KEPT_ELEMENT if item.key in keys else None
        return None  # jsonl: read past for good

    def _array_keys(self, source: SourceConfig) -> set[str] | None:
        if source.name not in self._arrays:
            from orchestrator.sources.jsonarray import JsonArraySource

            try:
                found = JsonArraySource(source, known=set()).read()
            except OSError:
                found = None
            if found is None or found.outcome not in ("parsed", "missing"):
                self._arrays[source.name] = None
            else:
                self._arrays[source.name] = found.keys
        return self._arrays[source.name]


def _file_kept(source: SourceConfig, item: PurgeCandidate) -> str | None:
    rel = item.key.rpartition("@")[0] if source.reingest_changed else item.key
    # The store holds undecodable names escaped, behind a mark: no path to look at. A real
    # backslash is a name like any other (found by an acceptance tester, session 17: any name
    # holding one, ``back\\slash.txt``, was kept for good as "not UTF-8").
    if rel.startswith(ESCAPED_MARK):
        return KEPT_NAME
    folder = os.path.abspath(source.path)
    if os.path.lexists(os.path.join(folder, rel)):
        return KEPT_FILE
    if item.path is not None:
        where = os.path.abspath(item.path)
        if where.startswith(folder + os.sep) and os.path.lexists(where):
            return KEPT_FILE
    return None


def _remove_file(path: str) -> bool:
    with contextlib.suppress(OSError):  # gone already, or not ours to remove: left as it is
        os.unlink(path)
        return True
    return False


def _remove_tree(path: Path) -> bool:
    if os.path.islink(path):  # never followed: the link goes, not what it points to
        return _remove_file(str(path))
    if not os.path.isdir(path):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True
