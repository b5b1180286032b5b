"""SIGHUP: reopen the logs and reload ``[log]`` and the limits, without a restart.

What an operator expects of a long-running service (``systemctl reload``, logrotate's
``postrotate``): the ``[log] file`` is closed and opened again at its path (a rotated file is let
go), and the config file is read again. Of the new config the limits are applied -- each
stage's ``concurrency`` and each pool's size -- since they change nothing but how many runs may go
on at once, and the ``[log]`` section (level, file, format, rotation); every other change is
listed as needing a restart, and a config that is no longer valid changes nothing (its errors
are logged with their paths, as ``check`` prints them).

A lower limit lets the runs going on finish: a new run starts only once fewer than the new limit
are going on. A higher one starts the runs waiting for it at once.

A SIGHUP that comes with the service's terminal gone (a closed terminal window or SSH session)
still drains and stops it, as it always did: `orchestrator.terminal.Terminal` tells the two
apart. Started under ``nohup`` (SIGHUP ignored), a hang-up is ignored.

The supervisor imports this module at the first SIGHUP (in a worker thread): a service that is
never reloaded -- every batch -- does not pay for it at start-up.
"""

from __future__ import annotations

import datetime
import time
from typing import TYPE_CHECKING, Any

import attrs
import trio
from loguru import logger

from orchestrator.config import load_config
from orchestrator.errors import ConfigError
from orchestrator.logs import reopen_logs

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from orchestrator.config import Config, LogConfig
    from orchestrator.systemd import Notifier
    from orchestrator.terminal import Terminal
    from orchestrator.workers import Engine

__all__ = ["LimitChanges", "Reloader", "compare_configs"]

#: Config fields that are not keys of the file.
_NOT_KEYS = frozenset({"base_dir"})


@attrs.frozen
class LimitChanges:
    """What a reloaded config changes, against the one the service runs with."""

    #: Stage name -> (old, new) ``concurrency``, for the stages whose limit changed.
    stages: dict[str, tuple[int, int]]
    #: Pool name -> (old, new) size, for the pools whose size changed.
    pools: dict[str, tuple[int, int]]
    #: Keys (as paths, like ``stages[extract].timeout``) that changed but take a restart.
    not_applied: tuple[str, ...]
    #: ``[log]`` keys that changed, as ``log.level INFO → DEBUG`` (applied at once).
    log: tuple[str, ...] = ()

    def applied(self) -> list[str]:
        """What changed and applies now, as ``stages[extract].concurrency 1 → 2``,
        ``pools.gpu 1 → 2`` and ``log.level INFO → DEBUG``."""
        return self._limits() + list(self.log)

    def _limits(self) -> list[str]:
        limits = [f"stages[{name}].concurrency {a} → {b}" for name, (a, b) in self.stages.items()]
        return limits + [f"pools.{name} {a} → {b}" for name, (a, b) in self.pools.items()]

    def describe(self) -> str:
        """One line for the log: what was applied and what was not."""
        limits = self._limits()
        text = "limits: " + (", ".join(limits) if limits else "unchanged")
        if self.log:
            text += "; " + ", ".join(self.log)
        if self.not_applied:
            text += "; changed but not applied until a restart: " + ", ".join(self.not_applied)
        return text


def compare_configs(old: Config, new: Config) -> LimitChanges:
    """The limits ``new`` changes, and the other keys it changes (which need a restart)."""
    not_applied: list[str] = []
    for field in attrs.fields(type(old)):
        if field.name in _NOT_KEYS or field.name in ("stages", "pools", "sources", "log"):
            continue  # (``[log]`` is applied by `orchestrator.logs.reopen_logs`)
        _diff(getattr(old, field.name), getattr(new, field.name), field.name, not_applied)

    # Stages and sources are named by name, as the limits applied are (found by an acceptance
    # tester, session 17: "stages[b].concurrency 2 → 3" beside "stages[1].timeout").
    old_stages = {s.name: s for s in old.stages}
    stages: dict[str, tuple[int, int]] = {}
    for stage in new.stages:
        path = f"stages[{stage.name}]"
        before = old_stages.get(stage.name)
        if before is None:
            not_applied.append(f"{path} (new stage)")
            continue
        if before.concurrency != stage.concurrency:
            stages[stage.name] = (before.concurrency, stage.concurrency)
        _diff(attrs.evolve(before, concurrency=stage.concurrency), stage, path, not_applied)
    new_names = {s.name for s in new.stages}
    not_applied += [f"stages[{name}] (removed)" for name in old_stages if name not in new_names]
    if [s.name for s in old.stages if s.name in new_names] != [
        s.name for s in new.stages if s.name in old_stages
    ]:
        not_applied.append("stages (order)")

    pools: dict[str, tuple[int, int]] = {}
    for name, size in new.pools.items():
        if name not in old.pools:
            not_applied.append(f"pools.{name} (new pool)")
        elif old.pools[name] != size:
            pools[name] = (old.pools[name], size)
    not_applied += [f"pools.{name} (removed)" for name in old.pools if name not in new.pools]

    old_sources = {s.name: s for s in old.sources}
    for source in new.sources:
        path = f"sources[{source.name}]"
        before_source = old_sources.pop(source.name, None)
        if before_source is None:
            not_applied.append(f"{path} (new source)")
        else:
            _diff(before_source, source, path, not_applied)
            route = f"{path}.route"
            if route in not_applied:  # an item's route is fixed when it is ingested
                not_applied[not_applied.index(route)] = f"{route} (for items ingested after it)"
    not_applied += [f"sources[{name}] (removed)" for name in old_sources]
    log = tuple(
        f"log.{field.name} {_shown(getattr(old.log, field.name))} →"
        f" {_shown(getattr(new.log, field.name))}"
        for field in attrs.fields(type(old.log))
        if getattr(old.log, field.name) != getattr(new.log, field.name)
    )
    return LimitChanges(stages=stages, pools=pools, not_applied=tuple(not_applied), log=log)


def _shown(value: object) -> str:
    return "none" if value is None else str(value)


def _diff(old: Any, new: Any, path: str, out: list[str]) -> None:
    """Append the paths of the keys that differ between ``old`` and ``new`` to ``out``."""
    if old == new:
        return
    if attrs.has(type(old)) and type(old) is type(new):
        for field in attrs.fields(type(old)):
            _diff(getattr(old, field.name), getattr(new, field.name), f"{path}.{field.name}", out)
        return
    out.append(path)


@attrs.define
class Reloader:
    """Carries out a SIGHUP that is not a hang-up: the logs reopened, ``[log]`` and the limits
    reloaded from ``config_path`` (None: the logs only), systemd and the status file told."""

    config_path: Path | None
    notifier: Notifier | None
    terminal: Terminal

    async def reload(self, engine: Engine, staff: Callable[[], None]) -> None:
        """Reload ``engine``'s service; ``staff`` starts the workers a raised limit needs."""
        if self.notifier is not None:
            usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading")
        try:
            await self._reload(engine, staff)
        finally:
            engine.status_wanted.set()  # `orchestrator reload` waits for it
            if self.notifier is not None:
                self.notifier.notify("READY=1", "STATUS=running")

    async def _reload(self, engine: Engine, staff: Callable[[], None]) -> None:
        if self.config_path is None:
            await self._reopen_logs(engine.config.log)
            return
        record: dict[str, Any] = {
            "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "config": str(self.config_path), "ok": False, "applied": [], "not_applied": [],
            "errors": [],
        }  # fmt: skip
        engine.last_reload = record
        try:
            new = await trio.to_thread.run_sync(load_config, self.config_path)
            problem = await self._reopen_logs(new.log)
            if problem is not None:  # the new [log] file cannot be opened: nothing applies
                raise ConfigError([f"log.file: {problem}"])
        except ConfigError as exc:
            record["errors"] = exc.errors
            engine.reloads["failed"] += 1
            record["number"] = engine.reloads.total()
            await self._reopen_logs(engine.config.log)  # as they were, for logrotate
            logger.error(
                "SIGHUP: {} not reloaded, the limits stay as they are; {} error{}:\n  {}",
                self.config_path, len(exc.errors), "" if len(exc.errors) == 1 else "s",
                "\n  ".join(exc.errors),
            )  # fmt: skip
            return
        changes = compare_configs(engine.config, new)
        engine.config = attrs.evolve(engine.config, log=new.log)
        engine.set_limits(
            {name: size for name, (_, size) in changes.stages.items()},
            {name: size for name, (_, size) in changes.pools.items()},
        )
        staff()
        record.update(ok=True, applied=changes.applied(), not_applied=list(changes.not_applied))
        engine.reloads["ok"] += 1
        record["number"] = engine.reloads.total()
        log = logger.warning if changes.not_applied else logger.info
        log("SIGHUP: {} reloaded; {}", self.config_path, changes.describe())

    async def _reopen_logs(self, config: LogConfig) -> str | None:
        """Reopen the log file as ``config`` says; why it cannot be, or None."""
        try:
            reopened = await trio.to_thread.run_sync(reopen_logs, config)
        except (OSError, ValueError) as exc:
            logger.error("SIGHUP: cannot reopen the log file: {}", exc)
            return f"cannot open {str(config.file)!r}: {exc}"
        if reopened is not None:
            logger.info("SIGHUP: log file {} reopened", reopened)
        return None
