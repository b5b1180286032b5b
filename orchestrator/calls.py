"""Python stages: ``call = "module:function"`` runs an ``async def`` in the service's event loop.

A stage is usually an external command; a small step -- renaming a result, posting to an HTTP
API with an async client, a check -- can be a Python function instead, without a process to
start. It is given the same values a command gets as placeholders, as a `StageRun`::

    # mystages.py, beside the config (its folder is searched first)
    import trio

    async def publish(run: StageRun) -> None:
        await trio.Path(run.workdir, "published").write_text(run.item)
        run.log.info("published")

    # orchestrator.toml
    [[stages]]
    name = "publish"
    call = "mystages:publish"
    concurrency = 4
    timeout = "30s"

Returning is ``ok``; raising an exception is ``failed`` (retried as ``retries`` says; the
exception is the reason and its traceback the output tail; `Fatal` is not retried: the item is
dead at once, as a command's ``fatal_exit_codes``); running past ``timeout`` cancels it
(``timeout``); a shutdown cancels it too (``cancelled``, the item re-queued). Limits and pools
hold as for commands: a run holds its slots until the function has returned.

The function runs in the event loop: it must not block it (file and network I/O through trio,
or ``trio.to_thread.run_sync``). The watchdog reports a function that does, with its stack.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from typing import TYPE_CHECKING, Any

import attrs
import trio

from orchestrator.errors import ConfigError
from orchestrator.runner import TAIL_LINES, Outcome, RunResult

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    from orchestrator.config import Config

__all__ = ["Fatal", "StageRun", "import_call", "resolve_calls", "run_call"]


class Fatal(Exception):
    """Raised by a Python stage for an input no retry can fix: the item is dead at once."""


@attrs.frozen(kw_only=True)
class StageRun:
    """What a Python stage is called with: one run of one item, the values of a command's
    placeholders (``""`` where a command would get an empty argument)."""

    item: str  #: the item's id, e.g. ``"uploads:a.pdf"``
    stage: str
    attempt: int  #: 1 for the first run of this item at this stage
    run: int  #: the run's id in the store (``orchestrator show`` lists it)
    path: str  #: the item's file (a record's payload file for records)
    name: str  #: the file's name (the item's id for records)
    workdir: str  #: the item's folder, kept across its stages
    payload: str  #: the record as a JSON file (``""`` for files)
    log: Any  #: a loguru logger bound to item, stage, attempt and run


def import_call(call: str, base_dir: Path) -> Callable[[StageRun], Awaitable[object]]:
    """Import the ``async def`` a stage's ``call`` (``"module:function"``) names; the folder
    ``base_dir`` (the config's) is searched first.

    Raises:
        ValueError: the module cannot be imported (or its code failed), it has no such name, or
            the name is not an ``async def``; the message says which.
    """
    import inspect  # (not at start-up when no stage needs it)

    if str(base_dir) not in sys.path:
        sys.path.insert(0, str(base_dir))
    module_name, _, attribute = call.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from None
    except AttributeError:
        raise ValueError(f"{module_name!r} has no {attribute!r}") from None
    except SystemExit as exc:  # a script's sys.exit() or argparse at import: not ours to obey
        raise ValueError(
            f"importing {module_name!r} failed: it called sys.exit({exc.code!r}) at import"
            ' (code that runs as a script belongs under `if __name__ == "__main__":`)'
        ) from None
    except Exception as exc:  # the module's own code failed at import
        raise ValueError(f"importing {module_name!r} failed: {_one_line(exc)}") from None
    if not inspect.iscoroutinefunction(target):
        raise ValueError(f"{call!r} is not an async function (async def)")
    function: Callable[[StageRun], Awaitable[object]] = target
    return function


def resolve_calls(config: Config) -> dict[str, Callable[[StageRun], Awaitable[object]]]:
    """Import each Python stage's function (`import_call`); the config's folder is searched first.

    Raises:
        ConfigError: a module cannot be imported, or the name is not an ``async def`` (every
            problem, with its path, like the config's own errors).
    """
    found: dict[str, Callable[[StageRun], Awaitable[object]]] = {}
    errors = []
    for index, stage in enumerate(config.stages):
        if stage.call is None:
            continue
        try:
            found[stage.name] = import_call(stage.call, config.base_dir)
        except ValueError as exc:
            errors.append(f"stages[{index}].call: {exc}")
    if errors:
        raise ConfigError(errors)
    return found


async def run_call(
    function: Callable[[StageRun], Awaitable[object]], run: StageRun, *, timeout: float | None
) -> RunResult:
    """Call ``function(run)`` within ``timeout`` seconds; what happened, as a command's result.

    `trio.Cancelled` from outside (a shutdown) propagates, as from `run_command`.
    """
    start = trio.current_time()
    timed_out = f"timed out after {timeout:g}s; cancelled" if timeout is not None else ""
    scope = trio.move_on_after(timeout if timeout is not None else float("inf"))
    try:
        # The scope inside the try: what the function raised on its way out of a timeout
        # (a nursery's group holding our Cancelled and its own error) is caught with the
        # Cancelled taken out, not lost.
        with scope:
            await function(run)
    except (Exception, SystemExit, KeyboardInterrupt) as exc:
        # SystemExit too: code turned from a script into a stage (argparse among it) exits;
        # that is this run's failure, not the service's end.
        lines = "".join(traceback.format_exception(exc)).splitlines()
        late = scope.cancelled_caught
        return RunResult(
            outcome=Outcome.TIMEOUT if late else Outcome.FAILED, exit_code=None, signal=None,
            pid=None, duration=trio.current_time() - start,
            tail="\n".join(lines[-TAIL_LINES:]),
            reason=f"{timed_out}, then raised {_one_line(exc)}" if late else
            f"raised {_one_line(exc)}", fatal=isinstance(exc, Fatal) and not late,
        )  # fmt: skip
    duration = trio.current_time() - start
    if scope.cancelled_caught:
        return RunResult(
            outcome=Outcome.TIMEOUT, exit_code=None, signal=None, pid=None, duration=duration,
            tail="", reason=timed_out,
        )  # fmt: skip
    if timeout is not None and duration > timeout:
        # It returned, but past its time: the cancellation could not reach it (a thread from
        # trio.to_thread.run_sync, or a call that blocked the event loop). Still a timeout.
        return RunResult(
            outcome=Outcome.TIMEOUT, exit_code=None, signal=None, pid=None, duration=duration,
            tail="", reason=f"returned after {duration:.3g}s, past its timeout of {timeout:g}s "
            "(a thread or a blocking call cannot be cancelled; its slots were held until it "
            "returned: work that must stop at its timeout belongs in a command stage, whose "
            "process is killed)",
        )  # fmt: skip
    return RunResult(
        outcome=Outcome.OK, exit_code=0, signal=None, pid=None, duration=duration, tail="",
        reason="returned",
    )  # fmt: skip


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
