"""The ``orchestrator`` command line: check, run, batch.

Exit codes are named ``EXIT_*`` below; ``main`` returns them, so tests call ``main([...])``.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from orchestrator import __version__
from orchestrator.errors import ConfigError, StoreError

if TYPE_CHECKING:
    from orchestrator.config import Config
    from orchestrator.supervisor import ServiceResult

__all__ = ["EXIT_CONFIG", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_STORE", "main"]

EXIT_OK = 0
#: A batch finished with dead or rejected items.
EXIT_FAILED = 1
#: The config is invalid (every problem is printed).
EXIT_CONFIG = 2
#: The state store cannot be opened or written.
EXIT_STORE = 3
#: A batch was stopped by SIGINT/SIGTERM before it was done (128 + SIGINT, like a shell).
EXIT_INTERRUPTED = 130

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Run files and records through limited, supervised stages with durable state.",
)

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


def _load(path: Path) -> Config:
    from orchestrator.config import load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        _err(f"{path}: {len(exc.errors)} error{'s' if len(exc.errors) != 1 else ''}:")
        for error in exc.errors:
            _err(f"  {error}")
        raise typer.Exit(EXIT_CONFIG) from None


@app.command()
def check(
    config: ConfigOption = Path("orchestrator.toml"), as_json: JsonOption = False
) -> None:
    """Validate the config and print the plan: sources → routes → stages, limits, timeouts."""
    from orchestrator.plan import plan_dict, print_plan

    cfg = _load(config)
    if as_json:
        print(json.dumps(plan_dict(cfg), indent=2))
    else:
        print_plan(cfg, config)


@app.command()
def run(config: ConfigOption = Path("orchestrator.toml")) -> None:
    """Run the service until SIGTERM or SIGINT, then drain and exit 0."""
    from orchestrator.logs import configure_logging

    cfg = _load(config)
    configure_logging(cfg.log)
    _serve(cfg, batch=False)


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

    Exit 0 when every item is done, 1 when any is dead or rejected.
    """
    from orchestrator.logs import configure_logging

    cfg = _load(config)
    show = sys.stderr.isatty() if progress is None else progress
    configure_logging(cfg.log, console_level="WARNING" if show or as_json else None)
    started_wall = time.time()
    t0 = time.monotonic()
    result = _serve(cfg, batch=True, progress=show)
    elapsed = time.monotonic() - t0
    summary = _batch_summary(cfg, result, started_wall, elapsed)
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    if result.interrupted:
        raise typer.Exit(EXIT_INTERRUPTED)
    raise typer.Exit(EXIT_OK if summary["ok"] else EXIT_FAILED)


def _serve(cfg: Config, *, batch: bool, progress: bool = False) -> ServiceResult:
    import trio

    from orchestrator.supervisor import serve

    try:
        if not progress:
            return trio.run(lambda: serve(cfg, batch=batch))
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

            return trio.run(lambda: serve(cfg, batch=batch, on_start=on_start))
    except* StoreError as group:
        for exc in group.exceptions:
            _err(f"orchestrator: {exc}")
        raise typer.Exit(EXIT_STORE) from None


def _batch_summary(
    cfg: Config, result: ServiceResult, started_wall: float, elapsed: float
) -> dict[str, Any]:
    conn = sqlite3.connect(f"file:{cfg.db_path}?mode=ro", uri=True)
    try:
        items = [
            r for r in conn.execute("SELECT seq, id, state, route, stage_index, reason FROM items")
            if r[0] in result.admitted
        ]
        runs = conn.execute(
            "SELECT stage, outcome, duration, slot_wait FROM runs"
            " WHERE started_at >= ? AND outcome IS NOT NULL", (started_wall - 1,),
        ).fetchall()  # fmt: skip
    finally:
        conn.close()
    states: dict[str, int] = {}
    failed = []
    for _seq, item_id, state, route, index, reason in items:
        states[state] = states.get(state, 0) + 1
        if state in ("dead", "rejected"):
            names = json.loads(route)
            failed.append({"id": item_id, "state": state,
                           "stage": names[index] if index < len(names) else None,
                           "reason": reason})  # fmt: skip
    stages: dict[str, dict[str, Any]] = {}
    for stage in [s.name for s in cfg.stages]:
        rows = [r for r in runs if r[0] == stage]
        durations = sorted(r[2] for r in rows if r[2] is not None)
        outcomes: dict[str, int] = {}
        for r in rows:
            outcomes[r[1]] = outcomes.get(r[1], 0) + 1
        stages[stage] = {
            "runs": len(rows),
            "outcomes": outcomes,
            "mean_duration": sum(durations) / len(durations) if durations else None,
            "max_duration": durations[-1] if durations else None,
            "mean_slot_wait": (sum(r[3] or 0 for r in rows) / len(rows)) if rows else None,
        }
    total = len(items)
    done = states.get("done", 0)
    return {
        "ok": not failed and not result.interrupted and done == total,
        "interrupted": result.interrupted,
        "items": total,
        "states": states,
        "elapsed_seconds": round(elapsed, 3),
        "items_per_second": round(total / elapsed, 1) if elapsed > 0 else None,
        "stages": stages,
        "failed_items": failed,
    }


def _print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
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
            failed.add_column(col)
        for f in summary["failed_items"][:50]:
            failed.add_row(f["id"], f["state"], f["stage"] or "-", f["reason"] or "")
        console.print(failed)
        if len(summary["failed_items"]) > 50:
            console.print(f"... and {len(summary['failed_items']) - 50} more")
    if summary["interrupted"]:
        console.print("[yellow]interrupted: the rest stays queued; run again to continue[/]")


@app.callback(invoke_without_command=True)
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    if version:
        print(f"orchestrator {__version__}")
        raise typer.Exit(EXIT_OK)


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit code."""
    try:
        app(args=argv, prog_name="orchestrator")
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_FAILED)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return EXIT_OK
