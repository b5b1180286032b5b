"""The ``orchestrator`` command line: check, run, batch; items, show, status, requeue; health.

Exit codes are named ``EXIT_*`` below; ``main`` returns them, so tests call ``main([...])``.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import json
import math
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from typer.core import TyperGroup

from orchestrator import __version__
from orchestrator.errors import (
    ConfigError,
    ItemNotFound,
    OrchestratorError,
    StoreError,
    StoreUnavailable,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from orchestrator.config import Config
    from orchestrator.supervisor import ServiceResult

__all__ = [
    "EXIT_CONFIG",
    "EXIT_CRITICAL",
    "EXIT_FAILED",
    "EXIT_FLUSH_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_LOOP_STALLED",
    "EXIT_OK",
    "EXIT_STORE",
    "EXIT_UNKNOWN",
    "EXIT_USAGE",
    "EXIT_WARNING",
    "entry",
    "main",
]

EXIT_OK = 0
#: A batch finished with dead or rejected items; ``show`` or ``requeue`` named an item it could
#: not find or not requeue.
EXIT_FAILED = 1
#: The config is invalid (every problem is printed).
EXIT_CONFIG = 2
#: The command line asks for something that cannot be (the same code as click's usage errors).
EXIT_USAGE = 2
#: The state store cannot be opened or written.
EXIT_STORE = 3
#: A batch was stopped by SIGINT/SIGTERM before it was done (128 + SIGINT, like a shell).
EXIT_INTERRUPTED = 130
#: ``run``/``batch``: the watchdog found the event loop blocked past ``loop_stall_timeout`` and
#: ended the process to be restarted (``orchestrator.watchdog.EXIT_LOOP_STALLED``; EX_SOFTWARE).
EXIT_LOOP_STALLED = 70
#: ``health``: the status file is getting old (older than 2 intervals), the service reports
#: problems, or it is still starting.
EXIT_WARNING = 1
#: ``health``: the service is not running, or its status file is older than 4 intervals.
EXIT_CRITICAL = 2
#: ``health``: its command line is wrong, so nothing was judged (monitoring plugins' UNKNOWN:
#: a usage error's usual 2 would read as critical).
EXIT_UNKNOWN = 3
#: stdout or stderr could not be flushed at exit, e.g. a closed pipe (what Python itself exits).
EXIT_FLUSH_FAILED = 120

#: The width tables are laid out for when the output is not a terminal: as wide as they need.
UNWRAPPED_WIDTH = 1000
#: Allocations between two collections of young objects while the engine runs (Python: 700).
GC_YOUNG_THRESHOLD = 10_000

_APP_SETTINGS: dict[str, Any] = {
    "add_completion": False,
    "no_args_is_help": True,
    "pretty_exceptions_enable": False,
    "help": "Run files and records through limited, supervised stages with durable state.",
}
app = typer.Typer(**_APP_SETTINGS)

ConfigOption = Annotated[
    Path,
    typer.Option(
        "-c", "--config", envvar="ORCHESTRATOR_CONFIG", show_default=True,
        help="Config file (TOML).",
    ),
]  # fmt: skip
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for programs.")]


def _err(text: str) -> None:
    print(text, file=sys.stderr)


def _load(
    path: Path, *, failure: int = EXIT_CONFIG, import_calls: bool = False, stream_ok: bool = False
) -> Config:
    """The config at ``path``; else every problem printed and exit ``failure``."""
    from orchestrator.config import load_config

    try:
        return load_config(path, import_calls=import_calls, stream_ok=stream_ok)
    except ConfigError as exc:
        _report(path, exc.errors)
        raise typer.Exit(failure) from None


def _load_for_reading(path: Path, *, failure: int = EXIT_CONFIG) -> Config:
    """`_load` for the commands that only read the state: a config with errors elsewhere is a
    warning, not the end, as long as it says where the state is (`load_for_reading`)."""
    from orchestrator.config import load_for_reading

    try:
        cfg, errors = load_for_reading(path)
    except ConfigError as exc:
        _report(path, exc.errors)
        raise typer.Exit(failure) from None
    if errors:
        _err(
            f"{path}: warning: {len(errors)} error{'s' if len(errors) != 1 else ''} (see "
            f"`orchestrator check -c {path}`); reading the state at {cfg.state_dir} anyway"
        )
    return cfg


def _report(path: Path, errors: list[str]) -> None:
    _err(f"{path}: {len(errors)} error{'s' if len(errors) != 1 else ''}:")
    for error in errors:
        _err(f"  {error}")


def _load_runnable(path: Path) -> Config:
    """`_load`, and the Python stages' functions imported: a function that cannot be is one
    more problem, printed with the others (exit 2)."""
    return _load(path, import_calls=True)


@app.command()
def check(config: ConfigOption = Path("orchestrator.toml"), as_json: JsonOption = False) -> None:
    """Validate the config and print the plan: sources → routes → stages, limits, timeouts."""
    from orchestrator.config import load_config
    from orchestrator.plan import plan_dict, print_plan

    if as_json:  # a program reads the errors too, with their paths, on stdout
        try:
            cfg = load_config(config, import_calls=True, stream_ok=True)
        except ConfigError as exc:
            print(json.dumps({"ok": False, "config": str(config), "errors": exc.errors}, indent=2))
            raise typer.Exit(EXIT_CONFIG) from None
        print(json.dumps({"ok": True, **plan_dict(cfg)}, indent=2))
        return
    # (`check` also reads a config from a pipe: `envsubst < t.toml | orchestrator check -c
    # /dev/stdin`, as before the other commands refused one; found in session 16.)
    cfg = _load(config, import_calls=True, stream_ok=True)
    # Into a pipe, unwrapped like the other commands' output (found by an acceptance tester,
    # session 17: a long path was cut at 80 columns, and grep missed it).
    print_plan(cfg, config, _console())


@app.command()
def run(config: ConfigOption = Path("orchestrator.toml")) -> None:
    """Run the service until SIGTERM or SIGINT, then drain and exit 0."""
    from orchestrator.launcher import EDGES

    _start_up_without_gc()
    configure_logging = _logging_setup()
    # From here on a SIGHUP asks for the config to be read again, once the service runs.
    hangups = EDGES.config_read()
    cfg = _load_runnable(config)
    configure_logging(cfg.log)
    _warn_about(cfg)
    from loguru import logger

    logger.info(
        "orchestrator {} starting: pid {}, config {}, state {}",
        __version__, os.getpid(), str(config), str(cfg.state_dir),
    )  # fmt: skip
    if hangups:
        logger.warning("SIGHUP before the config was read: nothing to reload")
    result = _serve(cfg, batch=False, config_path=config)
    t = result.tally
    logger.info(
        "orchestrator stopped: {} run(s), {} item(s) done, {} dead, {} rejected since the start",
        t.runs, t.done, t.dead, t.rejected,
    )  # fmt: skip


@app.command()
def batch(
    config: ConfigOption = Path("orchestrator.toml"),
    as_json: JsonOption = False,
    progress: Annotated[
        bool | None,
        typer.Option("--progress/--no-progress", help="Progress bar (default: on a terminal)."),
    ] = None,
) -> None:
    """Ingest what the sources hold now, process it all, print a summary.

    Exit 0 when every item is done, 1 when not (the summary says why).
    """
    _start_up_without_gc()
    configure_logging = _logging_setup()
    cfg = _load_runnable(config)
    show = sys.stderr.isatty() if progress is None else progress
    configure_logging(cfg.log, console_level="WARNING" if show or as_json else None)
    _warn_about(cfg)
    # The service's modules are imported before the clock starts: the summary's elapsed time
    # and rate are the work's, not Python's start-up.
    import orchestrator.supervisor  # noqa: F401

    t0 = time.monotonic()
    result = _serve(cfg, batch=True, progress=show, config_path=config)
    elapsed = time.monotonic() - t0
    summary = _batch_summary(cfg, result, elapsed)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    if result.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    raise typer.Exit(EXIT_OK if summary["ok"] else EXIT_FAILED)


def _warn_about(cfg: Config) -> None:
    """Log what ``check`` would warn about (valid, but most likely a mistake)."""
    from orchestrator.plan import config_warnings

    warnings = config_warnings(cfg)
    if warnings:
        from loguru import logger

        for warning in warnings:
            logger.warning("config: {}", warning)


def _start_up_without_gc() -> None:
    """Keep the garbage collector off until the service starts (`_serve` switches it on).

    Start-up (importing trio and loguru, attrs and cattrs building classes and code) makes
    about a hundred thousand objects and no garbage; the young collections it triggers are
    about 3 % of a batch's start-up. `main` puts the collector back as it found it.
    """
    gc.disable()


def _logging_setup() -> Callable[..., None]:
    """`orchestrator.logs.configure_logging`, with loguru imported without its default sink.

    ``configure_logging`` replaces that sink at once, and building it is about a twentieth of
    a batch's start-up (loguru lists the interpreter's library folders for its tracebacks).
    ``LOGURU_AUTOINIT`` is loguru's own switch for it; it is set only for the import, so the
    stages never see it, and one the user set is left as it is.
    """
    if "loguru" in sys.modules or "LOGURU_AUTOINIT" in os.environ:
        from orchestrator.logs import configure_logging
    else:
        os.environ["LOGURU_AUTOINIT"] = "0"
        try:
            from orchestrator.logs import configure_logging
        finally:
            del os.environ["LOGURU_AUTOINIT"]

    def configure(config: Any, **kwargs: Any) -> None:
        try:
            configure_logging(config, **kwargs)
        except OSError as exc:  # the log file cannot be opened: a config problem, exit 2
            where = exc.filename if exc.filename is not None else config.file
            _err(f"log.file: cannot open {str(where)!r}: {exc.strerror or exc}")
            raise typer.Exit(EXIT_CONFIG) from None

    return configure


def _serve(
    cfg: Config, *, batch: bool, progress: bool = False, config_path: Path | None = None
) -> ServiceResult:
    import trio

    from orchestrator.launcher import EDGES
    from orchestrator.supervisor import SIGNALS_HANDLED, serve

    early = EDGES.stopped_early()  # (`run` only) while Python imported: nothing started yet
    if early is not None:
        from loguru import logger

        logger.warning("{} before the service started: stopping", signal.Signals(early).name)
        raise typer.Exit(EXIT_OK)

    def service(on_start: Callable[[Any], None] | None = None) -> ServiceResult:
        """`serve` in ``trio.run``, its signals held by `EDGES` before it takes them and after."""

        def started(engine: Any) -> None:
            EDGES.started()
            if on_start is not None:
                on_start(engine)

        async def serving() -> ServiceResult:
            EDGES.take()
            try:
                return await serve(cfg, batch=batch, on_start=started, config_path=config_path)
            finally:
                EDGES.leave()

        return trio.run(serving)

    EDGES.note(SIGNALS_HANDLED)  # before trio.run, which has a SIGINT handler of its own
    # Every run allocates many short-lived objects: collect young garbage every 10,000
    # allocations rather than 700 (about 10 % of a trivial stage's cost), and leave what
    # start-up built out of every collection. (`main` kept the collector off until here.)
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, 10, 10)
    gc.enable()
    try:
        if not progress:
            return service()
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        with Progress(
            "[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), transient=True,
        ) as bar:  # fmt: skip
            task = bar.add_task("items", total=None)

            def on_start(engine: Any) -> None:
                def update(tally: Any) -> None:
                    bar.update(task, total=tally.admitted, completed=tally.finished)

                engine.on_change = update

            return service(on_start)
    except* StoreError as group:
        # Each once, with its notes (what fills a full disk: `supervisor._say_store_failed`).
        shown = ("; ".join([str(exc), *getattr(exc, "__notes__", ())]) for exc in _leaves(group))
        for message in dict.fromkeys(shown):
            _err(f"orchestrator: {message}")
        raise typer.Exit(EXIT_STORE) from None
    except* OrchestratorError as failures:  # cannot start: HTTP cannot listen, leftover processes
        for failure in _leaves(failures):
            _err(f"orchestrator: {failure}")
        raise typer.Exit(EXIT_FAILED) from None
    finally:
        _log_late(EDGES.take_late())


def _log_late(signals: list[int]) -> None:
    """Log the signals that came once the service had let them go (`EdgeSignals.late`)."""
    if signals:
        from loguru import logger

        for signum in signals:
            logger.warning("{}: already stopping", signal.Signals(signum).name)


#: The longest ``--interval`` of the watching commands (a day).
MAX_INTERVAL = 86_400.0


def _a_number(value: float | None) -> float | None:
    """Reject ``nan`` (which every range check lets through) as a usage error."""
    if value is not None and math.isnan(value):
        raise typer.BadParameter("must be a number of seconds, not nan")
    return value


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return out


def _batch_summary(cfg: Config, result: ServiceResult, elapsed: float) -> dict[str, Any]:
    # The batch's items and runs, read by the service through its own connection before it
    # closed the store (`ServiceResult.batch_rows`).
    assert result.batch_rows is not None
    counts = result.batch_rows
    failed = []
    for item_id, state, route, index, reason in counts.failed:
        names = json.loads(route)
        # A rejected item never reached a stage: its source could not make it.
        at = names[index] if index < len(names) and state != "rejected" else None
        failed.append({"id": item_id, "state": state, "stage": at, "reason": reason})
    stages: dict[str, dict[str, Any]] = {}
    for stage in [s.name for s in cfg.stages]:
        groups = {outcome: got for (name, outcome), got in counts.runs.items() if name == stage}
        runs = sum(got[0] for got in groups.values())
        timed = sum(got[1] for got in groups.values())
        longest = [got[3] for got in groups.values() if got[3] is not None]
        stages[stage] = {
            "runs": runs,
            "outcomes": {outcome: got[0] for outcome, got in groups.items()},
            "mean_duration": sum(got[2] for got in groups.values()) / timed if timed else None,
            "max_duration": max(longest) if longest else None,
            "mean_slot_wait": sum(got[4] for got in groups.values()) / runs if runs else None,
        }
    states = counts.states
    total = sum(states.values())
    done = states.get("done", 0)
    ended = sum(states.get(s, 0) for s in ("done", "dead", "rejected"))
    ok = done == total and not (
        failed or result.interrupted or result.failed_sources or result.failed_dispositions
    )
    return {
        "ok": ok,
        "interrupted": result.interrupted,
        "items": total,
        "states": states,
        "elapsed_seconds": round(elapsed, 3),
        # Items that reached their end: an interrupted batch's queued items were not processed.
        "items_per_second": round(ended / elapsed, 1) if elapsed > 0 and ended else None,
        "stages": stages,
        "failed_items": failed,
        "failed_sources": result.failed_sources,
        "parked": {"count": result.parked, "stages": list(result.parked_stages)},
        "failed_dispositions": {
            "count": result.failed_dispositions,
            "first": [{"id": i, "reason": why} for i, why in result.failed_disposition_samples],
        },
    }


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.table import Table
    from rich.text import Text

    from orchestrator.operator import clean, show_id

    console = _console(highlight=True)
    table = Table(title="stages", title_justify="left")
    for col in ("stage", "runs", "outcomes", "mean s", "max s", "mean wait s"):
        table.add_column(col, justify="left" if col in ("stage", "outcomes") else "right")

    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    for name, s in summary["stages"].items():
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(s["outcomes"].items())) or "-"
        table.add_row(name, str(s["runs"]), outcomes, num(s["mean_duration"]),
                      num(s["max_duration"]), num(s["mean_slot_wait"]))  # fmt: skip
    console.print(table)
    states = ", ".join(f"{k} {v}" for k, v in sorted(summary["states"].items())) or "no items"
    console.print(
        f"{summary['items']} item(s): {states} in {summary['elapsed_seconds']:.2f}s"
        + (f" ({summary['items_per_second']}/s)" if summary["items_per_second"] else "")
    )
    if summary["failed_items"]:
        failed = Table(title="dead and rejected items", title_justify="left")
        for col in ("item", "state", "stage", "reason"):
            # An id is folded, never cut short: it is what `show` and `requeue` take.
            failed.add_column(col, overflow="fold" if col in ("item", "reason") else "ellipsis")
        for f in summary["failed_items"][:50]:
            # Ids and reasons as `items` shows them (found by an acceptance tester, session 17:
            # a file name's escape sequence reached the terminal, a newline split the row, and
            # a rejected line's NUL was written out, so the id shown was not the one `show`
            # takes). Text, not markup: a "[" in a file name is a "[".
            failed.add_row(Text(show_id(f["id"])), f["state"], f["stage"] or "-",
                           Text(clean(f["reason"] or "")))  # fmt: skip
        console.print(failed)
        if len(summary["failed_items"]) > 50:
            console.print(f"... and {len(summary['failed_items']) - 50} more")
    for name, why in summary["failed_sources"].items():
        console.print(f"source {name!r} given up: {clean(why)}", style="red", markup=False)
    parked = summary["parked"]
    if parked["count"]:
        stages = ", ".join(repr(s) for s in parked["stages"])
        console.print(
            f"{parked['count']} item(s) left queued at stage(s) {stages}, which the config does "
            "not have: a config with the stage takes them, or move them with `orchestrator "
            "requeue --stage OLD --to NEW`", style="red", markup=False,
        )  # fmt: skip
    moves = summary["failed_dispositions"]
    if moves["count"]:
        console.print(
            f"{moves['count']} ended item(s) whose file could not be moved or deleted "
            "(on_done/on_dead); they stay where they were:", style="red", markup=False,
        )  # fmt: skip
        for f in moves["first"][:10]:
            console.print(f"  {show_id(f['id'])}: {clean(f['reason'])}", markup=False)
        if moves["count"] > 10:
            console.print(f"  ... and {moves['count'] - 10} more (see the log)", markup=False)
    if summary["interrupted"]:
        console.print("[yellow]interrupted: the rest stays queued; run again to continue[/]")


# --- operator commands: read (and requeue) the store beside a running service -----------------


def _db_path(cfg: Config) -> Path:
    if cfg.db_path is None:
        _err("this command reads the SQLite store only; the state is in PostgreSQL")
        raise typer.Exit(EXIT_STORE)
    return cfg.db_path


@contextlib.contextmanager
def _store_errors() -> Iterator[None]:
    try:
        yield
    except StoreUnavailable as exc:
        _err(str(exc))
        raise typer.Exit(EXIT_STORE) from None
    except sqlite3.Error as exc:
        _err(f"cannot read the store: {exc}")
        raise typer.Exit(EXIT_STORE) from None


@contextlib.contextmanager
def _reader(cfg: Config) -> Iterator[sqlite3.Connection]:
    from orchestrator.store.sqlite import connect_readonly

    path = _db_path(cfg)
    with _store_errors():
        try:
            conn = connect_readonly(path, busy_timeout=cfg.store.busy_timeout)
        except StoreUnavailable as exc:
            conn = _read_on_a_full_disk(cfg, path, exc)
        try:
            yield conn
        finally:
            conn.close()


def _read_on_a_full_disk(cfg: Config, path: Path, failure: StoreUnavailable) -> sqlite3.Connection:
    """The store read as it is on disk when the state folder's file system is full, else
    ``failure`` raised, naming the full disk when it is one.

    Found by an acceptance tester (session 17): with no WAL left (the service stopped), a
    read-only connection must make the WAL's files, cannot on a full disk, and every reading
    command failed with "disk I/O error" -- when a full disk was the very thing to look into.
    """
    from orchestrator.space import full_disk_note
    from orchestrator.store.sqlite import connect_readonly

    note = full_disk_note(cfg.state_dir)
    if note is None:
        raise failure
    try:
        wal = os.stat(f"{path}-wal").st_size
    except FileNotFoundError:
        wal = 0
    except OSError as exc:
        raise StoreUnavailable(f"{failure}; {note}") from exc
    if wal:  # (transactions there, which the file alone does not hold: not read without them)
        raise StoreUnavailable(f"{failure}; {note}")
    _err(f"warning: {note}; the store is read as it is on disk (its WAL is empty)")
    return connect_readonly(path, busy_timeout=cfg.store.busy_timeout, immutable=True)


def _console(**kw: Any) -> Any:
    """A rich console; into a pipe or a file, lines are not wrapped unless $COLUMNS says a
    width (an id cut in two is neither found by grep nor pasted back whole)."""
    from rich.console import Console

    console = Console(**{"highlight": False, **kw})
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = UNWRAPPED_WIDTH
    return console


@app.command()
def items(
    config: ConfigOption = Path("orchestrator.toml"),
    state: Annotated[
        str | None,
        typer.Option("--state", help="Only items in this state: queued, running, retry_wait, "
                                     "done, dead or rejected."),
    ] = None,
    stage: Annotated[
        str | None, typer.Option("--stage", help="Only items now at this stage.")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, max=2**62, help="At most this many items.")
    ] = None,
    as_json: JsonOption = False,
) -> None:  # fmt: skip
    """List items, oldest first: id, source, state, stage, attempts, updated, reason.

    Exit 2 for an unknown --state or --stage, 3 when there is no store.
    """
    from orchestrator.operator import ITEM_STATES, items_data, render_items

    if state is not None and state not in ITEM_STATES:
        _err(f"unknown state {state!r}; valid states: {', '.join(ITEM_STATES)}")
        raise typer.Exit(EXIT_USAGE)
    cfg = _load_for_reading(config)
    names = [s.name for s in cfg.stages]
    with _reader(cfg) as conn:
        rows = items_data(conn, state=state, stage=stage, limit=limit)
        # A stage the config no longer has is fine while items are still at it (to find them).
        unknown = stage is not None and stage not in names and not rows
        if unknown and state is not None:  # none in that state there; any at all?
            unknown = not items_data(conn, stage=stage, limit=1)
    if unknown:
        _err(f"unknown stage {stage!r}; stages: {', '.join(names)}")
        raise typer.Exit(EXIT_USAGE)
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        _console().print(render_items(rows))


@app.command()
def show(
    item: Annotated[str, typer.Argument(help="The item's id, as 'items' lists it.")],
    config: ConfigOption = Path("orchestrator.toml"),
    as_json: JsonOption = False,
) -> None:
    """Show one item's whole history: its fields, every run with its output tail, its events.

    Exit 1 when the store holds no such item, 3 when there is no store.
    """
    from orchestrator.operator import render_show, show_data

    cfg = _load_for_reading(config)
    with _reader(cfg) as conn:
        try:
            data = show_data(conn, item)
        except ItemNotFound as exc:
            _err(str(exc))
            raise typer.Exit(EXIT_FAILED) from None
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        _console().print(render_show(data))


@app.command()
def requeue(
    item_ids: Annotated[
        list[str] | None,
        typer.Argument(metavar="[ITEM]...", help="Dead items to requeue.", show_default=False),
    ] = None,
    dead: Annotated[bool, typer.Option("--dead", help="Requeue every dead item.")] = False,
    stage: Annotated[
        str | None,
        typer.Option("--stage", help="With --dead: only items that died here. With --to: every "
                                     "item dead here, or waiting at it when the config no "
                                     "longer has it."),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option("--to", metavar="STAGE",
                     help="Queue them at this stage of their source's route instead (the route "
                          "in this config)."),
    ] = None,
    config: ConfigOption = Path("orchestrator.toml"),
    as_json: JsonOption = False,
) -> None:  # fmt: skip
    """Put dead items back in the queue of the stage where they died, with fresh attempts.

    With --to STAGE they go to that stage of their source's route, as this config has it.
    That redoes an earlier stage, or moves items waiting at a stage the config no longer has.
    --stage OLD --to NEW moves all of them.

    One transaction; a running service picks them up by itself. Rejected and done items stay.

    Exit 0 when every named item was requeued, 1 when one was not (not found, not dead).
    Exit 2 for a wrong command line, 3 when the store cannot be written.
    """
    from orchestrator import operator

    if not item_ids and not dead and not (stage is not None and to is not None):
        _err("name the items to requeue, give --dead for every dead item, or --stage with --to")
        raise typer.Exit(EXIT_USAGE)
    if item_ids and dead:
        _err("give either item ids or --dead, not both")
        raise typer.Exit(EXIT_USAGE)
    if stage is not None and item_ids:
        _err("--stage goes with --dead or --to, not with item ids")
        raise typer.Exit(EXIT_USAGE)
    cfg = _load(config)
    names = [s.name for s in cfg.stages]
    # With --to, --stage may name a stage the config no longer has: that is what it is for.
    for option, name in (("--to", to), ("--stage", None if to is not None else stage)):
        if name is not None and name not in names:
            _err(f"unknown stage {name!r} for {option}; stages: {', '.join(names)}")
            raise typer.Exit(EXIT_USAGE)
    path = _db_path(cfg)
    with _store_errors():
        report = operator.requeue(path, item_ids or None, dead=dead, stage=stage, config=cfg, to=to)
    if as_json:
        print(json.dumps({
            "requeued": list(report.requeued),
            "skipped": [{"id": i, "reason": why} for i, why in report.skipped],
        }, indent=2))  # fmt: skip
    else:
        for _item_id, why in report.skipped:
            _err(operator.clean(why))
        n = len(report.requeued)
        print(f"{n} item{'' if n == 1 else 's'} requeued")
    raise typer.Exit(EXIT_FAILED if report.skipped else EXIT_OK)


@app.command()
def purge(
    older_than: Annotated[
        str,
        typer.Option("--older-than", metavar="DURATION", show_default=False,
                     help='Items unchanged for this long, e.g. "30d", "12h".'),
    ],
    state: Annotated[
        list[str] | None,
        typer.Option("--state", help="Only items in this state (done, dead, rejected); "
                                     "repeatable. Default: all three.", show_default=False),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would go; change nothing.")
    ] = False,
    config: ConfigOption = Path("orchestrator.toml"),
    as_json: JsonOption = False,
) -> None:  # fmt: skip
    """Remove ended items older than a duration, with their runs, events, logs and workdirs.

    An item whose input is still in its source is kept, whatever its age, so nothing is taken again.

    Works while the service runs. Exit 0, 2 for a wrong command line, 3 when the store fails.
    """
    import attrs

    from orchestrator.durations import parse_duration
    from orchestrator.purge import purge as purge_items

    try:
        age = parse_duration(older_than)
    except ValueError as exc:
        _err(f"--older-than: {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    cfg = _load(config)
    path = _db_path(cfg)
    with _store_errors():
        try:
            report = purge_items(path, cfg, older_than=age, states=state, dry_run=dry_run)
        except ValueError as exc:
            _err(f"--state: {exc}")
            raise typer.Exit(EXIT_USAGE) from None
    if as_json:
        print(json.dumps(attrs.asdict(report), indent=2))
        raise typer.Exit(EXIT_OK)
    n = sum(report.purged.values())
    states = ", ".join(f"{v} {k}" for k, v in sorted(report.purged.items()))
    verb = "would purge" if dry_run else "purged"
    print(f"{verb} {n} item{'' if n == 1 else 's'}" + (f" ({states})" if states else ""))
    if not dry_run and n:
        print(f"  with {report.runs} run(s), {report.events} event(s); removed "
              f"{report.logs} run log(s) and {report.workdirs} workdir(s)")  # fmt: skip
    for why, count in sorted(report.kept.items()):
        print(f"kept {count}: {why}")
    raise typer.Exit(EXIT_OK)


@app.command()
def status(
    config: ConfigOption = Path("orchestrator.toml"),
    as_json: JsonOption = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="Keep refreshing until Ctrl+C (with --json: one "
                                           "JSON document per line).")
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.05, max=MAX_INTERVAL, callback=_a_number,
                            help="Seconds between refreshes.")
    ] = 1.0,
) -> None:  # fmt: skip
    """Show queue depths per stage, slots, running runs and recent failures.

    Counts come from the store; slots and waiters from the service's status file.

    Exit 0 (also when Ctrl+C ends --watch), 3 when there is no store.
    """
    from orchestrator.operator import render_status, status_data

    cfg = _load_for_reading(config)
    with _reader(cfg) as conn:
        data = status_data(conn, cfg, time.time())
        if not watch:
            if as_json:
                print(json.dumps(data, indent=2))
            else:
                _console().print(render_status(data))
            return
        try:
            if as_json:
                while True:
                    print(json.dumps(data), flush=True)
                    time.sleep(interval)
                    data = status_data(conn, cfg, time.time())
            else:
                _watch(conn, cfg, interval, render_status(data))
        except KeyboardInterrupt:
            pass
    raise typer.Exit(EXIT_OK)


def _watch(conn: sqlite3.Connection, cfg: Config, interval: float, first: Any) -> None:
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    from orchestrator.operator import render_status, status_data

    def frame(body: Any) -> Any:
        head = Text(f"{time.strftime('%H:%M:%S')}  every {interval:g}s  Ctrl+C to quit",
                    style="dim")  # fmt: skip
        return Group(head, body)

    def next_body() -> Any:
        time.sleep(interval)
        try:
            return render_status(status_data(conn, cfg, time.time()))
        except sqlite3.Error as exc:
            # A busy or briefly unreadable store must not end the watch: show it and retry.
            return Text(f"cannot read the store: {exc}", style="red")

    console = _console()
    if not console.is_terminal:  # into a pipe or a file: one frame after the other
        body = first
        while True:
            console.print(frame(body))
            console.file.flush()
            body = next_body()
    with Live(frame(first), console=console, auto_refresh=False) as live:
        while True:
            live.update(frame(next_body()), refresh=True)


@app.command()
def reload(
    config: ConfigOption = Path("orchestrator.toml"),
    as_json: JsonOption = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, max=MAX_INTERVAL, callback=_a_number,
                            help="Seconds to wait for the service's answer.")
    ] = 10.0,
) -> None:  # fmt: skip
    """Tell the running service to reload (SIGHUP), then show what it did.

    The config is checked first: one with errors is not sent (exit 2).

    The service is found by its status file, on this host, its pid checked against its start.

    Exit 0 reloaded, 1 refused by the service, 3 no running service here or no answer in time.
    """
    from orchestrator.operator import reload_service

    cfg = _load(config)
    from orchestrator.health import starting_limit

    code, answer = reload_service(
        cfg.status_path, interval=cfg.status.interval, timeout=timeout,
        starting_limit=starting_limit(cfg),
    )  # fmt: skip
    if as_json:
        print(json.dumps(answer, indent=2))
    elif code == EXIT_OK:
        applied = ", ".join(answer["applied"]) or "limits unchanged"
        print(f"reloaded: {applied}")
        if answer["not_applied"]:
            print(f"changed but not applied until a restart: {', '.join(answer['not_applied'])}")
    elif code == EXIT_FAILED:
        _report(Path(answer["config"]), list(answer["errors"]))
        _err("orchestrator reload: the service kept its config as it was")
    else:
        _err(f"orchestrator reload: {answer['error']}")
    raise typer.Exit(code)


@app.command()
def health(
    config: ConfigOption = Path("orchestrator.toml"),
    as_json: JsonOption = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="Judge again every --interval until Ctrl+C (with "
                                           "--json: one JSON document per line).")
    ] = False,
    restart_cmd: Annotated[
        str | None,
        typer.Option("--restart-cmd", metavar="CMD",
                     help="With --watch: run CMD (split like a shell would, but never run by "
                          "one) when the service is critical, with backoff between restarts."),
    ] = None,
    interval: Annotated[
        float | None,
        typer.Option("--interval", min=0.1, max=MAX_INTERVAL, callback=_a_number,
                     help="With --watch: seconds between judgements (default: status.interval)."),
    ] = None,
    backoff: Annotated[
        float, typer.Option("--backoff", min=0.0, help="Seconds after a restart before the "
                                                       "next one; doubles while still critical.")
    ] = 10.0,
    backoff_max: Annotated[
        float, typer.Option("--backoff-max", min=0.0, help="The longest pause between restarts.")
    ] = 300.0,
) -> None:  # fmt: skip
    """Judge the service's health from its status file: age, process, its own problems.

    ok: updated within 2 status intervals, and its process alive.
    warning: older than 2 intervals, the service reports problems, or it is still starting.
    critical: older than 4, its process gone, the service stopped, starting for 15 minutes, or
    no status file.

    Exit 0 ok, 1 warning, 2 critical, 3 unknown (a command line it cannot take).
    With --watch: 0 when Ctrl+C ends it.
    """
    import shlex

    from orchestrator import health as checks

    if restart_cmd is not None and not watch:
        _err("--restart-cmd only goes with --watch")
        raise typer.Exit(EXIT_UNKNOWN)
    try:
        argv = shlex.split(restart_cmd) if restart_cmd is not None else None
    except ValueError as exc:  # an unclosed quote
        _err(f"--restart-cmd {restart_cmd!r}: {exc}")
        raise typer.Exit(EXIT_UNKNOWN) from None
    if restart_cmd is not None and not argv:
        _err("--restart-cmd is empty")
        raise typer.Exit(EXIT_UNKNOWN)
    cfg = _load_for_reading(config, failure=EXIT_UNKNOWN)

    def verdict() -> checks.Verdict:
        return checks.judge(
            cfg.status_path, interval=cfg.status.interval,
            starting_limit=checks.starting_limit(cfg),
        )  # fmt: skip

    shown: list[str] = []

    def report(v: checks.Verdict, action: str | None) -> None:
        if as_json:
            doc = v.to_json()
            if watch:
                doc["at"] = time.time()
                doc["action"] = action
            print(json.dumps(doc) if watch else json.dumps(doc, indent=2), flush=True)
            return
        line = v.describe()
        if watch:
            if shown and shown[-1] == v.status and not action:
                return  # people see changes; programs (--json) see every verdict
            shown.append(v.status)
            line = f"{time.strftime('%H:%M:%S')} {line}"
        print(line, flush=True)
        if action:
            print(f"{time.strftime('%H:%M:%S')} {action}", flush=True)

    if not watch:
        v = verdict()
        report(v, None)
        raise typer.Exit(v.level)
    with contextlib.suppress(KeyboardInterrupt):
        checks.watch(verdict, argv, interval=interval or cfg.status.interval, backoff=backoff,
                    backoff_max=backoff_max, report=report)  # fmt: skip
    raise typer.Exit(EXIT_OK)


@app.command()
def stress(
    config: Annotated[
        Path | None,
        typer.Option("-c", "--config", help="The pipeline to drive (default: a synthetic one)."),
    ] = None,
    n_items: Annotated[int, typer.Option("--items", help="Inputs to generate.")] = 200,
    duration: Annotated[str, typer.Option(help='Longest run, e.g. "60s", "10m".')] = "60s",
    faults: Annotated[
        str, typer.Option(help='Fault rates of the synthetic stages, e.g. "fail=0.1,hang=0.02".')
    ] = "",
    kill_every: Annotated[
        str | None, typer.Option(help='SIGKILL and restart the service this often, e.g. "5s".')
    ] = None,
    freeze_every: Annotated[
        str | None, typer.Option(help="SIGSTOP the service this often (then SIGCONT).")
    ] = None,
    freeze_for: Annotated[str, typer.Option(help="How long each freeze lasts.")] = "1s",
    reload_every: Annotated[
        str | None,
        typer.Option(
            help="SIGHUP (reload) the service this often; the synthetic pipeline's "
            "limits are drawn anew each time."
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Load and faults against a pipeline, then every invariant checked from the OS.

    Exit 0 only when every invariant held.
    """
    from orchestrator.durations import parse_duration
    from orchestrator.stress import DEFAULT_FAULTS, StressOptions, run_stress

    try:
        options = StressOptions(
            config=config, items=n_items, duration=parse_duration(duration),
            faults=faults or DEFAULT_FAULTS,
            kill_every=parse_duration(kill_every) if kill_every else None,
            freeze_every=parse_duration(freeze_every) if freeze_every else None,
            freeze_for=parse_duration(freeze_for),
            reload_every=parse_duration(reload_every) if reload_every else None,
        )  # fmt: skip
        from orchestrator.fakestage import parse_faults

        parse_faults(options.faults)
    except ValueError as exc:
        _err(f"orchestrator stress: {exc}")
        raise typer.Exit(EXIT_USAGE) from None
    if config is not None and _load(config).db_path is None:  # every config problem: exit 2
        _err("orchestrator stress: it needs the SQLite store; the PostgreSQL store is not "
             "available in this version")  # fmt: skip
        raise typer.Exit(EXIT_USAGE)
    try:
        from orchestrator.stress import check_freeze

        check_freeze(options)
    except ValueError as exc:
        _err(f"orchestrator stress: {exc}")
        raise typer.Exit(EXIT_USAGE) from None

    def interrupted(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # SIGTERM as Ctrl+C: either way the service started is stopped before the tool exits.
    signal.signal(signal.SIGTERM, interrupted)
    try:
        report = run_stress(
            options, log=None if as_json else (lambda line: _err(f"stress: {line}"))
        )
    except KeyboardInterrupt:
        _err("orchestrator stress: interrupted; the service it started was stopped")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_stress(report)
    raise typer.Exit(EXIT_OK if report["ok"] else EXIT_FAILED)


def _print_stress(report: dict[str, Any]) -> None:
    from rich.markup import escape
    from rich.table import Table

    console = _console()
    table = Table(title="invariants", title_justify="left")
    for col in ("invariant", "held", "evidence"):
        table.add_column(col)
    for name, inv in report["invariants"].items():
        # Evidence names items and paths: a "[red]" in a file name is text, not markup.
        held = "[green]yes[/]" if inv["held"] else "[red]NO[/]"
        table.add_row(name, held, escape(inv["evidence"]))
    console.print(table)
    console.print(
        f"items {report['items']}; runs {report['runs']}; retries {report['retries']}; "
        f"kills {report['kills']}, restarts {report['restarts']}, freezes {report['freezes']}, "
        f"reloads {report['reloads']}"
    )
    console.print(f"faults drawn: {report['faults']}")
    console.print(f"throughput {report['throughput']} items/s over {report['elapsed_seconds']} s")
    for stage, pct in report["latency"].items():
        console.print(f"  {stage}: run time {pct}")
    if report.get("user_config"):
        console.print(f"{escape(report['user_config'])} ran as a copy, {escape(report['config'])}:"
                      " no file of its sources, state or log was touched")  # fmt: skip
    if report.get("workdir"):
        kept = "service log and audit" if report["ok"] else "evidence kept"
        console.print(f"{kept} in {escape(report['workdir'])}")
    console.print("[green]ok: every invariant held[/]" if report["ok"]
                  else "[red]FAILED: an invariant did not hold[/]")  # fmt: skip


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    if version:
        print(f"orchestrator {__version__}")
        raise typer.Exit(EXIT_OK)


class _MonitoringGroup(TyperGroup):
    """``health`` answers in monitoring plugins' exit codes: a usage error is 3, unknown."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            # click's usage errors (bad option, bad value): exit code 2, shown by typer.
            if getattr(exc, "exit_code", None) == EXIT_USAGE and hasattr(exc, "show"):
                exc.exit_code = EXIT_UNKNOWN  # type: ignore[attr-defined]
            raise


def _app_for(args: list[str]) -> typer.Typer:
    """The command line with only the command ``args`` starts with, when it names one.

    typer builds the options of every registered command on each start (about 10 ms, most
    of what is left of start-up once the imports are done); the one command it is asked for
    behaves, helps and fails exactly as in the whole app.
    """
    if args:
        for info in app.registered_commands:
            name = info.name or (info.callback.__name__ if info.callback else "")
            if name.replace("_", "-") == args[0]:
                group = _MonitoringGroup if args[0] == "health" else TyperGroup
                one = typer.Typer(cls=group, **_APP_SETTINGS)
                one.registered_callback = app.registered_callback
                one.registered_commands = [info]
                return one
    return app


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    collecting = gc.isenabled()  # `run` and `batch` switch it off for their start-up
    args = sys.argv[1:] if argv is None else argv
    try:
        _app_for(args)(args=args, prog_name="orchestrator")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_FAILED)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        if collecting:
            gc.enable()
        from orchestrator.launcher import EDGES

        EDGES.give_back()  # (not when `launch` runs the process: they stay until it exits)
    return EXIT_OK


def entry() -> NoReturn:
    """The ``orchestrator`` command (after `orchestrator.launcher.launch`): `main`, then a quick
    exit.

    Once `main` is back, everything the process had to do is done, and what the interpreter
    would do next is tear down every module and object one by one: 10-15 ms after a batch of
    2,000 items, more after bigger ones. This exits as it would, without that: threads that
    are not daemons are waited for, exit handlers run (loguru closes its sinks), stdout and
    stderr are flushed, and a flush that fails (a closed pipe) exits 120 as Python does.
    """
    code = main()
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or EXIT_FLUSH_FAILED
    os._exit(code)
