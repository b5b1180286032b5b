"""Source pollers: each source polled on `trio_util.periodic`, new items ingested and admitted.

File system work happens in worker threads; a poller that fails is restarted with backoff and
never takes the service down (a store failure does).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import trio
import trio_util
from loguru import logger

from orchestrator.errors import StoreError
from orchestrator.sources import DirectorySource
from orchestrator.store.sqlite import op_source_keys

if TYPE_CHECKING:
    from orchestrator.config import SourceConfig
    from orchestrator.workers import Engine

__all__ = ["serve_source"]

#: A crashed poller is restarted after this many seconds, doubling up to POLLER_BACKOFF_MAX.
POLLER_BACKOFF = 1.0
POLLER_BACKOFF_MAX = 60.0
#: In batch mode, how often files that are still being written are looked at again.
BATCH_SETTLE_POLL = 0.2


def _is_store_failure(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_store_failure(e) for e in exc.exceptions)
    return isinstance(exc, StoreError)


async def serve_source(
    engine: Engine, source: SourceConfig, *, once: bool = False,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:  # fmt: skip
    """Poll ``source`` and admit what it yields; restarted with backoff when it fails.

    With ``once``, return after everything the source holds now has been ingested
    (files still being written are waited for until they settle), counting the source in
    ``engine.sources_exhausted``.
    """
    known = await engine.store.read(lambda c: op_source_keys(c, source.name))
    poller = DirectorySource(source, known)
    log = logger.bind(source=source.name)
    task_status.started()
    backoff = POLLER_BACKOFF
    interval = min(source.poll_interval, BATCH_SETTLE_POLL) if once else source.poll_interval
    while True:
        try:
            async with contextlib.aclosing(trio_util.periodic(interval)) as ticks:
                async for _ in ticks:
                    await _poll(engine, poller)
                    backoff = POLLER_BACKOFF
                    if once and poller.unsettled == 0:
                        engine.sources_exhausted.value += 1
                        return
        except Exception as exc:  # a poller must not take the service down
            if _is_store_failure(exc):
                raise
            log.opt(exception=exc).error("source poller failed; restart in {:.0f}s", backoff)
            await trio.sleep(backoff)
            backoff = min(backoff * 2, POLLER_BACKOFF_MAX)


async def _poll(engine: Engine, poller: DirectorySource) -> None:
    files = await trio.to_thread.run_sync(poller.scan)
    new = poller.select(files)
    if not new:
        return
    added = await engine.store.ingest(new)
    poller.accepted(n.key for n in new)
    if added:
        logger.bind(source=poller.name).info("ingested {} item(s)", len(added))
    for item in added:
        engine.admit(item)
