"""The directory source: new files of a folder, taken once they have settled.

Scanning is blocking file system work and runs in a worker thread; deciding what is new and
settled is pure and runs on the loop. A file is taken once its size and mtime have held still
for ``settle`` -- at once if its mtime is already older than that -- and never twice: the store
keeps every key it ingested and refuses a duplicate. A file's key is its path relative to the
folder; with ``reingest_changed`` it is that path plus the file's size and mtime, so a file
rewritten later (or dropped again under the same name) is a new item.

In memory the source keeps the keys of the taken files that were in the folder at its last scan
(`DirectorySource.known`), so a scan of files already taken costs no ``stat`` and no question to
the store: a known name is recognised from the directory listing alone (10,000 known files: ~6
ms of CPU per pass). With ``reingest_changed`` every matching file is stat'ed, since only its
signature tells a new version from an old one. A key leaves that set once its file is gone
(moved or deleted by ``on_done``/``on_dead``, or by anyone else), so the set follows what the
folder holds, not the source's history: a service that moves or deletes every file runs for
months in the same memory. A file that shows up later under a taken name is stat'ed and offered
like a new one, and the store refuses it (`DirectorySource._taken_already`).

Once an item is done or dead its file is kept, deleted or moved (``on_done`` / ``on_dead``) by
`DirectorySource.on_terminal`, which the engine calls after the item's end is durable. A move
keeps the file's path relative to the source folder under the target folder, creates what is
missing and never overwrites (``name.1.ext``, ``name.2.ext``...). A failure to move or delete is
logged and changes nothing else. A moved file's new path is recorded in its item, so a dead
item that is requeued runs on it. A crash between an item's end and its file's move is made good
by the first scan after the next start, which asks the store about the files it found: a file
whose item ended, still at the item's path and not modified since the item ended, is that
item's file, and is moved or deleted then. A newer file under the name of an item whose file
was moved or deleted is not (a camera that starts its numbering again): it is left in place,
with a warning, and not taken (unless ``reingest_changed``).

A file that vanishes after a scan saw it still becomes an item, which the engine fails at once
with the reason ("vanished before its run"): what was seen is never dropped silently.
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import shutil
import time
from typing import TYPE_CHECKING, TypeVar

import attrs
import trio
from loguru import logger

from orchestrator.sources.ops import (
    op_items_by_key,
    op_keys_held,
    op_set_item_paths,
    op_source_has_items,
)
from orchestrator.store.records import TERMINAL_STATES, ItemState, NewItem
from orchestrator.store.sqlite import escaped_key

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from orchestrator.config import Disposition, SourceConfig
    from orchestrator.store.records import Item
    from orchestrator.workers import Engine

__all__ = ["DirectorySource", "Disposed", "FileSeen", "free_name", "move_no_clobber"]

#: Copy buffer when a move crosses file systems.
COPY_CHUNK = 1 << 20
#: New files are ingested (one durable transaction each) in chunks growing from this size...
INGEST_FIRST_CHUNK = 50
#: ...up to this one.
INGEST_MAX_CHUNK = 5000

T = TypeVar("T")


@attrs.frozen
class FileSeen:
    """One file a scan found."""

    rel: str  #: path relative to the source folder, "/"-separated
    path: str
    size: int
    mtime_ns: int


@attrs.frozen
class Disposed:
    """What `DirectorySource.dispose` did with an item's file."""

    message: str
    #: Where the file is now, when it was moved.
    moved_to: str | None = None


def _compile(patterns: Iterable[str]) -> re.Pattern[str] | None:
    """One regular expression matching any of the glob ``patterns`` (None when there are none)."""
    parts = [fnmatch.translate(p) for p in patterns]
    return re.compile("|".join(f"(?:{p})" for p in parts)) if parts else None


def signature_key(rel: str, size: int, mtime_ns: int) -> str:
    """The key of one version of a file (``reingest_changed``): path, size and mtime."""
    return f"{rel}@{size}:{mtime_ns}"


class DirectorySource:
    """New, settled files of one folder (optionally recursive) that match ``pattern``."""

    def __init__(self, config: SourceConfig, known: set[str] | None = None) -> None:
        self.config = config
        self.name = config.name
        #: Keys of taken files seen in the folder at the last scan, and of those taken since.
        #: The store holds every key; this set only spares asking it, and is never a reason
        #: to take a file (see the module's docstring).
        self.known: set[str] = set() if known is None else known
        #: Keys whose file a disposition took away during the current scan (worker threads
        #: append; the scan leaves them out of what it saw).
        self._gone: list[str] = []
        #: Whether the first complete scan must ask the store which of the files it found were
        #: taken before (the source has items from earlier runs).
        self._ask_store = False
        self.root = os.path.abspath(config.path)
        self._pattern = _compile(config.pattern)
        self._ignore = _compile(config.ignore)
        #: The on_done/on_dead folders are never scanned (they may lie inside the source folder).
        self._skip_dirs = {
            os.path.abspath(d.dir)
            for d in (config.on_done, config.on_dead)
            if d.action == "move" and d.dir is not None
        }
        #: rel -> (size, mtime_ns, monotonic time this signature was first seen)
        self._watch: dict[str, tuple[int, int, float]] = {}
        #: Files seen but not yet settled after the last `select` (batch mode waits for them).
        self.unsettled = 0
        self._log = logger.bind(source=self.name)
        #: Why the source's own folder could not be listed at the last scan (None: it could),
        #: and what was last said about it.
        self.root_problem: str | None = None
        #: In a batch: the files its first scan found, the only ones it takes.
        self._batch_names: set[str] | None = None
        self._root_problem_said: str | None = None
        #: Subfolders that could not be listed (warned about once).
        self._unlistable: set[str] = set()
        self._engine: Engine | None = None

    @property
    def disposes(self) -> bool:
        """Whether items' files are moved or deleted when they end."""
        return self.config.on_done.action != "keep" or self.config.on_dead.action != "keep"

    def key_of(self, f: FileSeen) -> str:
        """The dedupe key of a file: its relative path, plus its signature with reingest_changed."""
        return signature_key(f.rel, f.size, f.mtime_ns) if self.config.reingest_changed else f.rel

    # --- scanning (worker thread) -----------------------------------------------------------

    def scan(self) -> list[FileSeen]:
        """List candidate files: matching, not ignored, not taken yet (blocking: worker thread).

        A folder that does not exist yet yields nothing; files that vanish mid-scan are skipped.
        When every folder could be listed, `known` becomes the known keys this scan saw.
        """
        found: list[FileSeen] = []
        known = self.known
        seen: set[str] = set()
        self._gone = []
        complete = True
        by_signature = self.config.reingest_changed
        recursive = self.config.recursive
        ignore, pattern = self._ignore, self._pattern
        stack = [("", self.root)]
        root_problem: str | None = None
        while stack:
            prefix, folder = stack.pop()
            try:
                # One entry at a time: a DirEntry caches its stat, and a list of 50,000 of
                # them held ~50 MB until the folder was done.
                with os.scandir(folder) as listing:
                    for entry in listing:
                        name = entry.name
                        rel = prefix + name
                        try:
                            if recursive and entry.is_dir(follow_symlinks=False):
                                if (ignore is None or not ignore.match(name)) and (
                                    entry.path not in self._skip_dirs
                                ):
                                    stack.append((rel + "/", entry.path))
                                continue
                            if not by_signature and rel in known:
                                # Taken already: recognised without a stat (the cheap, common case).
                                seen.add(rel)
                                continue
                            if (ignore is not None and ignore.match(name)) or (
                                pattern is not None and not pattern.match(name)
                            ):
                                continue
                            if not entry.is_file():
                                continue
                            st = entry.stat()
                        except OSError:  # vanished or unreadable mid-scan: the next scan sees
                            continue
                        if by_signature:
                            key = signature_key(rel, st.st_size, st.st_mtime_ns)
                            if key in known:
                                seen.add(key)
                                continue
                        found.append(FileSeen(rel, entry.path, st.st_size, st.st_mtime_ns))
            except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
                if not prefix:
                    root_problem = exc.strerror or str(exc)
                # A subfolder gone mid-scan took its files along; one that cannot be read
                # may still hold known files.
                complete = complete and bool(prefix) and not isinstance(exc, PermissionError)
                continue
            except OSError as exc:
                if not prefix:  # the source's own folder: the poller says why, and retries
                    raise
                complete = False
                # A subfolder that cannot be listed (its path too long, a dead mount): the
                # rest of the tree is still taken.
                if folder not in self._unlistable:
                    self._unlistable.add(folder)
                    self._log.warning("cannot list {!r}, skipped: {}", folder,
                                      exc.strerror or exc)  # fmt: skip
                continue
        if complete:
            # Keys whose file is gone leave (the store still refuses them), also those a
            # disposition took away while this scan listed their folder.
            seen.difference_update(self._gone)
            self.known = seen
        self.root_problem = root_problem
        found.sort(key=lambda f: (f.mtime_ns, f.rel))
        return found

    # --- deciding (pure) --------------------------------------------------------------------

    def select(self, files: list[FileSeen], *, now: float | None = None,
               wall: float | None = None) -> list[NewItem]:  # fmt: skip
        """The files that have settled, as new items (pure: no I/O).

        Args:
            files: what the latest `scan` found.
            now: monotonic time (for how long a signature held still).
            wall: wall-clock time (for the files' mtimes).
        """
        return [self._item(f) for f in self.settled(files, now=now, wall=wall)]

    def settled(self, files: list[FileSeen], *, now: float | None = None,
                wall: float | None = None) -> list[FileSeen]:  # fmt: skip
        """The files that have settled (see `select`; the items are made chunk by chunk)."""
        now = time.monotonic() if now is None else now
        wall = time.time() if wall is None else wall
        settle = self.config.settle
        ready: list[FileSeen] = []
        watch: dict[str, tuple[int, int, float]] = {}
        for f in files:
            if self.key_of(f) in self.known:
                continue
            old = self._watch.get(f.rel)
            first = old[2] if old is not None and old[:2] == (f.size, f.mtime_ns) else now
            if wall - f.mtime_ns / 1e9 >= settle or now - first >= settle:
                ready.append(f)
            else:
                watch[f.rel] = (f.size, f.mtime_ns, first)
        self._watch = watch
        self.unsettled = len(watch)
        return ready

    def _item(self, f: FileSeen) -> NewItem:
        key = self.key_of(f)
        return NewItem(
            id=f"{self.name}:{key}", source=self.name, key=key, path=f.path,
            route=tuple(self.config.route),
        )  # fmt: skip

    def accepted(self, keys: Iterable[str]) -> None:
        """Remember keys the store now holds, so later scans skip them."""
        self.known.update(keys)

    # --- the poller's side (trio) -----------------------------------------------------------

    async def load(self, engine: Engine) -> None:
        """Learn whether this source took files before: if so, its first scan asks the store
        which of the files it finds those were (instead of loading every key ever taken)."""
        self._engine = engine
        self._ask_store = await engine.store.read(lambda c: op_source_has_items(c, self.name))

    async def poll(self, engine: Engine, *, once: bool) -> bool:
        """One pass: scan, take what settled, admit it; True once nothing is left unsettled."""
        files = await trio.to_thread.run_sync(self.scan)
        if once:
            # A batch takes what the folder holds when it starts (files still being written
            # included); what arrives later waits for the next batch, or a feed that never
            # stops would keep the batch from ever ending.
            if self._batch_names is None:
                self._batch_names = {f.rel for f in files}
            else:
                files = [f for f in files if f.rel in self._batch_names]
        if not once and self.root_problem != self._root_problem_said:  # (a batch: pollers.py)
            # A service waits for its folder (a mount that comes back), but says so once: a
            # typo in ``path`` looked like a healthy service that never took anything.
            if self.root_problem is not None:
                self._log.warning("cannot list {!r}: {}; nothing is taken until it can be",
                                  str(self.root), self.root_problem)  # fmt: skip
            else:
                self._log.info("{!r} can be listed again", str(self.root))
            self._root_problem_said = self.root_problem
        if self._ask_store and self.root_problem is None:
            # The first scan after a start: which of these were taken by an earlier run?
            self._ask_store = False
            files = await self._drop_taken(engine, files)
        ready = self.settled(files)
        total = 0
        # In growing chunks: the first items run while the rest is still being written; the
        # items of a large backlog are made a chunk at a time.
        for chunk in _chunks(ready, INGEST_FIRST_CHUNK, INGEST_MAX_CHUNK):
            new = [self._item(f) for f in chunk]
            added = await engine.store.ingest(new)
            self.accepted(n.key for n in new)
            total += len(added)
            for item in added:
                engine.admit(item)
            if len(added) < len(new):  # refused: names taken before, whose file was gone
                stored = {i.key for i in added}
                await self._taken_already(
                    engine, [f for f, n in zip(chunk, new, strict=True)
                             if escaped_key(n.key) not in stored],
                )  # fmt: skip
        if total:
            self._log.info("ingested {} item(s)", total)
        return self.unsettled == 0

    def close(self) -> None:
        """Nothing to let go of (folders are opened only while they are scanned)."""

    async def _drop_taken(self, engine: Engine, files: list[FileSeen]) -> list[FileSeen]:
        """``files`` without those the store has taken already (which go to `_taken_already`)."""
        if not files:
            return files
        stored = {escaped_key(self.key_of(f)): f for f in files}
        held = await engine.store.read(lambda c: op_keys_held(c, self.name, stored))
        if not held:
            return files
        await self._taken_already(engine, [stored[k] for k in held])
        return [f for k, f in stored.items() if k not in held]

    async def _taken_already(self, engine: Engine, files: list[FileSeen]) -> None:
        """Files under keys the store holds: known from now on, and perhaps disposed of.

        With a disposition configured, a file whose item has ended, still at that item's path
        and not modified since the item ended, is the item's own file, which a stop came
        before moving (a leftover): it is moved or deleted now. A newer file under such a name
        is a new file (names get reused); it is left where it is, with a warning, since its
        key was taken already.
        """
        keys = {self.key_of(f): f for f in files}
        self.known.update(keys)
        if not self.disposes:
            return
        items = await engine.store.read(lambda c: op_items_by_key(c, self.name, keys))
        stored = {escaped_key(k): f for k, f in keys.items()}
        leftovers = []
        back: list[tuple[Item, FileSeen]] = []
        for item in items:
            f = stored.get(item.key)
            disposition = self._disposition(item)
            if (
                f is None
                or item.seq in engine.active
                or item.state not in TERMINAL_STATES
                or (disposition is None or disposition.action == "keep")
            ):
                continue
            if item.path == f.path and f.mtime_ns <= item.updated_at * 1e9:
                leftovers.append(item)
            else:
                back.append((item, f))
        if back:
            # The scan listed the file before this service moved it away (an item that ended
            # meanwhile, its path now the moved one): not a file that came back. Only one
            # still there is (found in session 15 resuming an interrupted batch).
            back = await trio.to_thread.run_sync(_still_there, back)
        for _item, f in back:
            if self.config.reingest_changed:
                self._log.warning(
                    "{!r} is back, unchanged, after its item's file was moved or deleted; that "
                    "version was taken already, so it is ignored", f.rel,
                )  # fmt: skip
            else:
                self._log.warning(
                    "{!r} is back after its item's file was moved or deleted; a file of that "
                    "name was taken already, so it is ignored (set reingest_changed = true to "
                    "take it)", f.rel,
                )  # fmt: skip
        if leftovers:
            await self.on_terminal(leftovers)

    async def on_terminal(self, items: list[Item]) -> None:
        """Keep, move or delete ended items' files as configured; failures are only logged.

        The engine calls this in the background once the items' ends are durable, with the
        items that ended meanwhile: one worker thread does the lot. Shielded: at the end of a
        batch (or at shutdown) the files of the last items are still moved.
        """
        with trio.CancelScope(shield=True):
            results = await trio.to_thread.run_sync(self._dispose_each, items)
        moved = []
        for item, done in zip(items, results, strict=True):
            log = self._log.bind(item=item.id)
            if isinstance(done, Exception):
                why = f"cannot {self._disposition(item)} {item.path!r}: {done}"
                if isinstance(done, OSError):
                    log.warning("{}", why)
                else:  # a disposition must never take the engine down
                    log.opt(exception=done).error("{}", why)
                if self._engine is not None:
                    self._engine.disposition_failed(item.id, why)
            elif done is not None:
                log.info("{}", done.message)
                if done.moved_to is not None:
                    moved.append((item.seq, done.moved_to))
        if moved and self._engine is not None:
            # The items follow their files: `show` says where they are, and a dead item that
            # is requeued runs on the moved file.
            self._engine.store.submit(lambda c: op_set_item_paths(c, moved))

    def _dispose_each(self, items: list[Item]) -> list[Disposed | Exception | None]:
        """`dispose` of each item, or what it raised (blocking: worker thread)."""
        results: list[Disposed | Exception | None] = []
        for item in items:
            try:
                results.append(self.dispose(item))
            except Exception as exc:
                results.append(exc)
        return results

    def _disposition(self, item: Item) -> Disposition | None:
        if item.state is ItemState.DONE:
            return self.config.on_done
        if item.state is ItemState.DEAD:
            return self.config.on_dead
        return None

    def dispose(self, item: Item) -> Disposed | None:
        """Apply ``on_done``/``on_dead`` to ``item``'s file (blocking: worker thread).

        Returns what was done, or None when nothing was.

        Raises:
            OSError: the file could not be moved or deleted.
        """
        disposition = self._disposition(item)
        if disposition is None or disposition.action == "keep" or item.path is None:
            return None
        path = item.path
        # The path relative to the source folder, from the key: an item requeued after its
        # file was moved aside has a path elsewhere.
        rel = item.key.rpartition("@")[0] if self.config.reingest_changed else item.key
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None  # gone already (moved by an earlier pass, or by someone else)
        if (
            self.config.reingest_changed
            and signature_key(rel, st.st_size, st.st_mtime_ns) != item.key
        ):
            return Disposed(f"{rel!r} changed since its item was taken; left in place")
        if disposition.action == "delete":
            try:
                os.unlink(path)
            except FileNotFoundError:
                return None
            self._forget(item.key)
            return Disposed(f"deleted {rel!r}")
        assert disposition.dir is not None
        target = move_no_clobber(path, os.path.join(disposition.dir, rel))
        if target is None:
            return None
        self._forget(item.key)
        return Disposed(f"moved {rel!r} to {target!r}", moved_to=target)

    def _forget(self, key: str) -> None:
        """The file of ``key`` is gone from the folder: stop remembering it.

        Runs in worker threads beside a scan: each step is one atomic operation."""
        self.known.discard(key)
        self._gone.append(key)


def _still_there(found: list[tuple[Item, FileSeen]]) -> list[tuple[Item, FileSeen]]:
    """Those of ``found`` whose file is still at the path the scan saw (blocking: a thread)."""
    return [(item, f) for item, f in found if os.path.lexists(f.path)]


def free_name(path: str, n: int) -> str:
    """The ``n``-th alternative to ``path``: ``a.pdf`` -> ``a.1.pdf``; ``README`` -> ``README.1``."""
    folder, name = os.path.split(path)
    stem, dot, ext = name.rpartition(".")
    if not stem:  # no extension, or a dotfile
        return os.path.join(folder, f"{name}.{n}")
    return os.path.join(folder, f"{stem}.{n}{dot}{ext}")


def move_no_clobber(src: str, dest: str) -> str | None:
    """Move ``src`` to ``dest`` (or ``dest`` with a number added), never overwriting a file.

    Creates the missing folders. Returns where the file went, or None when ``src`` is gone.

    Raises:
        OSError: the move failed; ``src`` is left where it was.
    """
    if os.path.abspath(src) == os.path.abspath(dest):
        # Already there (a dead item requeued from its failed folder, dead again): a move onto
        # itself would only add a number to its name.
        return src if os.path.lexists(src) else None
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    candidate, n = dest, 0
    while True:
        try:
            # link + unlink: unlike rename, link refuses to replace an existing file.
            os.link(src, candidate, follow_symlinks=False)
        except FileExistsError:
            n += 1
            candidate = free_name(dest, n)
            continue
        except FileNotFoundError:
            if not os.path.lexists(src):
                return None
            raise
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EMLINK):
                raise
            return _copy_no_clobber(src, dest)
        try:
            os.unlink(src)
        except FileNotFoundError:
            pass
        return candidate


def _copy_no_clobber(src: str, dest: str) -> str | None:
    """The move across file systems (or where hard links are not supported): copy, then unlink."""
    candidate, n = dest, 0
    while True:
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            n += 1
            candidate = free_name(dest, n)
            continue
        break
    try:
        with open(fd, "wb") as fout, open(src, "rb") as fin:
            shutil.copyfileobj(fin, fout, COPY_CHUNK)
            fout.flush()
            os.fsync(fout.fileno())
        shutil.copystat(src, candidate)
    except FileNotFoundError:
        os.unlink(candidate)
        return None
    except BaseException:
        os.unlink(candidate)
        raise
    os.unlink(src)
    return candidate


def _chunks(items: list[T], first: int, most: int) -> Iterator[list[T]]:
    """``items`` in consecutive chunks of ``first``, then four times more each, up to ``most``."""
    size, start = first, 0
    while start < len(items):
        yield items[start : start + size]
        start += size
        size = min(size * 4, most)
