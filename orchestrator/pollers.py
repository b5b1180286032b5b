"""Source pollers: each source polled on `trio_util.periodic`, new items ingested and admitted.

File system work happens in worker threads (see `orchestrator.sources`); a poller that fails is
restarted with backoff and never takes the service down (a store failure does). A source that
takes nothing for a reason -- its folder cannot be listed (missing, a mount gone), its poller
failed -- is in ``engine.source_problems`` with that reason until a poll reads it well again:
``/health`` is degraded with it, and the status file shows it per source.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import TYPE_CHECKING, Protocol

import trio
import trio_util
from loguru import logger

from orchestrator.config import SourceType
from orchestrator.errors import StoreError
from orchestrator.sources.directory import DirectorySource

if TYPE_CHECKING:
    from pathlib import Path

    from orchestrator.config import SourceConfig
    from orchestrator.workers import Engine

__all__ = ["Source", "make_source", "serve_source"]

#: A crashed poller is restarted after this many seconds, doubling up to POLLER_BACKOFF_MAX.
POLLER_BACKOFF = 1.0
POLLER_BACKOFF_MAX = 60.0
#: In batch mode, how often a source that is not exhausted yet (files still being written,
#: a JSON file mid-rewrite) is looked at again.
BATCH_SETTLE_POLL = 0.2
#: In batch mode, a source whose poller failed this many times in a row is given up: the batch
#: ends (exit 1, the source and its error in the summary) instead of waiting for ever.
BATCH_GIVE_UP = 3


class Source(Protocol):
    """What a poller drives: one of `orchestrator.sources`."""

    name: str

    async def load(self, engine: Engine) -> None:
        """Learn what the store holds of this source (keys taken, stored position)."""

    async def poll(self, engine: Engine, *, once: bool) -> bool:
        """One pass: ingest and admit what is new; True once everything it holds now is in."""
        ...

    def close(self) -> None:
        """Let go of open files."""


def make_source(config: SourceConfig) -> Source:
    """The source object for a ``[[sources]]`` entry (the record sources' modules are imported
    only by configs that use them)."""
    if config.type is SourceType.JSONL:
        from orchestrator.sources.jsonl import JsonlSource

        return JsonlSource(config)
    if config.type is SourceType.JSON:
        from orchestrator.sources.jsonarray import JsonArraySource

        return JsonArraySource(config, set())
    return DirectorySource(config, set())


def _is_store_failure(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_store_failure(e) for e in exc.exceptions)
    return isinstance(exc, StoreError)


def _not_a_folder(path: Path) -> bool:
    """Whether ``path`` is something other than a folder (not: cannot be looked at)."""
    try:
        return not stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:  # a symbolic link loop, say: the poller's own errors say why
        return False


def _note_problem(engine: Engine, source: SourceConfig, poller: Source) -> None:
    """Record (or clear) why ``source`` took nothing at its last poll."""
    if isinstance(poller, DirectorySource) and poller.root_problem is not None:
        engine.source_problems[source.name] = (
            f"source {source.name!r}: cannot list {poller.root!r}: {poller.root_problem};"
            " nothing is taken until it can be"
        )
    elif (problem := getattr(poller, "parse_problem", None)) is not None:  # a json source
        engine.source_problems[source.name] = f"source {source.name!r}: {problem}"
    else:
        engine.source_problems.pop(source.name, None)


async def serve_source(
    engine: Engine, source: SourceConfig, *, once: bool = False,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:  # fmt: skip
    """Poll ``source`` and admit what it yields; restarted with backoff when it fails.

    With ``once``, return after everything the source holds now has been ingested (files still
    being written are waited for until they settle; a JSONL file is read to its end, an
    incomplete last line aside; a JSON file until it parses, or it failed to at several polls),
    counting the source in ``engine.sources_exhausted`` exactly once.
    """
    poller = make_source(source)
    if isinstance(poller, DirectorySource) and poller.disposes:
        # Before the first checkpoint: an item that ends from now on has its file moved.
        engine.on_terminal[source.name] = poller.on_terminal
    log = logger.bind(source=source.name)
    try:
        await poller.load(engine)
        task_status.started()
        if once and not await trio.to_thread.run_sync(os.path.lexists, source.path):
            # A service waits for it to appear; a batch would end with nothing, and no word.
            if isinstance(poller, DirectorySource):
                # A folder that is not there is a typo or a mount that dropped: not a success.
                why = f"{str(source.path)!r} does not exist"
                log.error("the batch gives this source up: {}", why)
                engine.failed_sources[source.name] = why
                engine.sources_exhausted.value += 1
                return
            # A record file may not be written yet: nothing to take today.
            log.warning("{} does not exist: this source has nothing to take", str(source.path))
        elif (
            once
            and isinstance(poller, DirectorySource)
            and await trio.to_thread.run_sync(_not_a_folder, source.path)
        ):
            # A file where the folder should be: nothing would be taken, and nothing said.
            why = f"{str(source.path)!r} is not a folder"
            log.error("the batch gives this source up: {}", why)
            engine.failed_sources[source.name] = why
            engine.sources_exhausted.value += 1
            return
        backoff = POLLER_BACKOFF
        failures = 0
        interval = min(source.poll_interval, BATCH_SETTLE_POLL) if once else source.poll_interval
        while True:
            try:
                async with contextlib.aclosing(trio_util.periodic(interval)) as ticks:
                    async for _ in ticks:
                        exhausted = await poller.poll(engine, once=once)
                        engine.last_poll[source.name] = trio.current_time()
                        _note_problem(engine, source, poller)
                        backoff, failures = POLLER_BACKOFF, 0
                        if once and exhausted:
                            engine.sources_exhausted.value += 1
                            return
            except Exception as exc:  # a poller must not take the service down
                if _is_store_failure(exc):
                    raise
                failures += 1
                if once and failures >= BATCH_GIVE_UP:
                    why = f"{type(exc).__name__}: {exc}"
                    log.opt(exception=None if isinstance(exc, OSError) else exc).error(
                        "source failed {} times in a row; the batch gives it up: {}",
                        failures, why,
                    )  # fmt: skip
                    engine.failed_sources[source.name] = why
                    engine.sources_exhausted.value += 1
                    return
                if isinstance(exc, OSError):  # the file system said no: the reason, no traceback
                    log.error("source poller failed: {}; restart in {:.0f}s", exc, backoff)
                else:  # a bug: where it happened
                    log.opt(exception=exc).error(
                        "source poller failed; restart in {:.0f}s", backoff
                    )
                engine.source_problems[source.name] = (
                    f"source {source.name!r}: its poller failed ({type(exc).__name__}: {exc});"
                    f" restarted in {backoff:.0f}s"
                )
                await trio.sleep(backoff)
                backoff = min(backoff * 2, POLLER_BACKOFF_MAX)
    finally:
        poller.close()
