"""Sources turn files into items. The directory source: new files that have settled.

Scanning is blocking file system work and runs in a worker thread; deciding what is new and
settled is pure and runs on the loop. A file is taken once its size and mtime have held still
for ``settle`` -- at once if its mtime is already older than that -- and never twice: the store
keeps every (source, relative path) it ingested and refuses a duplicate, and the poller keeps the
same set in memory so it does not even ask.
"""

from __future__ import annotations

import fnmatch
import os
import time
from typing import TYPE_CHECKING

import attrs

from orchestrator.store.records import NewItem

if TYPE_CHECKING:
    from collections.abc import Iterable

    from orchestrator.config import SourceConfig

__all__ = ["DirectorySource", "FileSeen"]


@attrs.frozen
class FileSeen:
    """One file a scan found."""

    key: str  #: path relative to the source folder, "/"-separated
    path: str
    size: int
    mtime_ns: int


def _matches(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


class DirectorySource:
    """New, settled files of one folder (optionally recursive) that match ``pattern``."""

    def __init__(self, config: SourceConfig, known: set[str]) -> None:
        self.config = config
        self.name = config.name
        self.known = known
        #: key -> (size, mtime_ns, monotonic time this signature was first seen)
        self._watch: dict[str, tuple[int, int, float]] = {}
        #: Files seen but not yet settled after the last `select` (batch mode waits for them).
        self.unsettled = 0

    def scan(self) -> list[FileSeen]:
        """List candidate files (blocking: call it from a worker thread).

        A folder that does not exist yet yields nothing; files that vanish mid-scan are skipped.
        """
        root = str(self.config.path)
        found: list[FileSeen] = []
        stack = [("", root)]
        while stack:
            prefix, folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except (FileNotFoundError, NotADirectoryError, PermissionError):
                continue
            for entry in entries:
                name = entry.name
                if _matches(name, self.config.ignore):
                    continue
                key = prefix + name
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if self.config.recursive:
                            stack.append((key + "/", entry.path))
                        continue
                    if key in self.known or not _matches(name, self.config.pattern):
                        continue
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                if not entry.is_file():
                    continue
                found.append(FileSeen(key, entry.path, st.st_size, st.st_mtime_ns))
        found.sort(key=lambda f: (f.mtime_ns, f.key))
        return found

    def select(self, files: list[FileSeen], *, now: float | None = None,
               wall: float | None = None) -> list[NewItem]:  # fmt: skip
        """The files that have settled, as new items (pure: no I/O).

        Args:
            files: what the latest `scan` found.
            now: monotonic time (for how long a signature held still).
            wall: wall-clock time (for the files' mtimes).
        """
        now = time.monotonic() if now is None else now
        wall = time.time() if wall is None else wall
        settle = self.config.settle
        ready: list[NewItem] = []
        watch: dict[str, tuple[int, int, float]] = {}
        for f in files:
            if f.key in self.known:
                continue
            old = self._watch.get(f.key)
            first = old[2] if old is not None and old[:2] == (f.size, f.mtime_ns) else now
            if wall - f.mtime_ns / 1e9 >= settle or now - first >= settle:
                ready.append(self._item(f))
            else:
                watch[f.key] = (f.size, f.mtime_ns, first)
        self._watch = watch
        self.unsettled = len(watch)
        return ready

    def _item(self, f: FileSeen) -> NewItem:
        return NewItem(
            id=f"{self.name}:{f.key}", source=self.name, key=f.key, path=f.path,
            route=tuple(self.config.route),
        )  # fmt: skip

    def accepted(self, keys: Iterable[str]) -> None:
        """Remember keys the store now holds, so later scans skip them."""
        self.known.update(keys)
