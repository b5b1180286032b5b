"""What ``orchestrator check`` prints: the plan a config describes (sources → routes → stages)."""

from __future__ import annotations

import os
import re
import shlex
from typing import TYPE_CHECKING, Any

from orchestrator.durations import format_duration, format_size
from orchestrator.errors import StoreUnavailable
from orchestrator.instance import check_state_dir

if TYPE_CHECKING:
    from pathlib import Path

    from rich.console import Console

    from orchestrator.config import Config, Disposition, SourceConfig, StageConfig

__all__ = ["config_warnings", "plan_dict", "print_plan", "state_warnings"]


def _disposition(d: Disposition) -> str:
    return f"move:{d.dir}" if d.action == "move" else d.action


def _how_to_pass(program: str, name: str) -> str:
    """How a value reaches the code of ``program`` (as `pipeline.find_code` names it)."""
    from orchestrator.pipeline import AWK, SHELLS

    if program in SHELLS or program in ("su", "runuser", "flock", "script"):
        return f'pass it as an argument after the script (["sh", "-c", "… \\"$1\\" …", "sh", "{{{name}}}"])'
    if program == "python":
        return "pass it as an argument after the code (sys.argv[1])"
    if program in AWK:
        return f"pass it with -v (-v {name}={{{name}}})"
    return "pass it as an argument after the code"


def config_warnings(config: Config) -> list[str]:
    """What is valid but most likely a mistake, each with its path (``check``, and the log of
    ``run`` and ``batch`` at start)."""
    from orchestrator.pipeline import (
        PLACEHOLDERS,
        find_code,
        placeholder_lookalikes,
        uses_placeholder,
    )

    out = []
    if config.db_path is None:
        out.append(
            "state: the PostgreSQL store is not available in this version; run, batch and "
            'stress refuse this config (use state = "sqlite")'
        )
    for i, stage in enumerate(config.stages):
        if stage.cwd is not None and not os.path.isdir(stage.cwd):
            out.append(
                f"stages[{i}].cwd: {str(stage.cwd)!r} is not a folder (yet); every run of this "
                "stage fails until it is"
            )
        problem = _program_problem(stage, config.base_dir)
        if problem is not None:
            out.append(f"stages[{i}].command[0]: {problem}")
        found = find_code(stage.command)
        if found is not None:
            code, program = found
            # (``${name}`` is the shell's own: only a bare ``{name}`` meant a placeholder)
            named = [p for p in PLACEHOLDERS
                     if re.search(r"(?<!\$)\{" + p + r"\}", stage.command[code])]  # fmt: skip
            if named:
                out.append(
                    f"stages[{i}].command[{code}]: {{{named[0]}}} is not substituted inside "
                    f"the code of {program!r} (a file name there would run as code); "
                    f"{_how_to_pass(program, named[0])} or read "
                    f"ORCH_{named[0].upper()}"
                )
        elif (joined := find_code(stage.command, joined=True)) is not None:
            start, program = joined
            where = "on the other host" if program == "ssh" else "(sh -c)"
            for k in range(start, len(stage.command)):
                named = [p for p in PLACEHOLDERS if uses_placeholder(stage.command[k : k + 1], p)]
                if named:
                    out.append(
                        f"stages[{i}].command[{k}]: {program} joins the words from"
                        f" command[{start}] on and runs them through a shell {where}, so"
                        f" {{{named[0]}}} there is code to it (a file name holding $(…) would"
                        " run); quote the value for that shell yourself, in a script of yours"
                        " that gets it as an argument, or avoid the placeholder there"
                    )
                    break
        for index, word, meant in placeholder_lookalikes(stage.command):
            out.append(
                f"stages[{i}].command[{index}]: {word} is not a placeholder (did you mean"
                f" {meant}?); it is passed to the command as written"
            )
    return out


def _program_problem(stage: StageConfig, base_dir: Path) -> str | None:
    """Why ``stage``'s program cannot be started from here, as the service looks it up
    (`find_program`); None when it can, or when a placeholder names it.

    Only a warning: the service may run with another PATH, or the program be installed before
    it starts. (Found by an acceptance tester, session 17: a misspelt program passed ``check``
    and every item died after all its attempts.)
    """
    from orchestrator.runner import find_program

    if stage.call is not None or "{" in stage.command[0]:
        return None
    program = stage.command[0]
    where = find_program(program, stage.env, base_dir)
    fails = "every run of this stage fails"
    if where is None:
        if "PATH" in stage.env:
            return f"{program!r} is not found in the stage's PATH; {fails} until it is"
        return (
            f"{program!r} is not found in PATH here; {fails} unless it is in the PATH the "
            "service runs with"
        )
    if not os.path.exists(where):
        return f"{where!r} does not exist (yet); {fails} until it does"
    if os.path.isdir(where) or not os.access(where, os.X_OK):
        return f"{where!r} is not an executable file; {fails} until it is"
    return None


def state_warnings(config: Config) -> list[str]:
    """What `check_state_dir` says about the state folder when it is there (``check``; ``run``
    and ``batch`` refuse or log it themselves when they take the folder)."""
    try:
        return [f"state_dir: {w}" for w in check_state_dir(config.state_dir)]
    except FileNotFoundError:
        return []  # made private (0700) at the first start
    except StoreUnavailable as exc:
        return [f"state_dir: {exc}; run, batch and purge refuse it"]


def plan_dict(config: Config) -> dict[str, Any]:
    """The plan as plain data (``check --json``)."""
    users: dict[str, list[str]] = {p: [] for p in config.pools}
    for stage in config.stages:
        for pool in stage.pools:
            users.setdefault(pool, []).append(stage.name)
    return {
        "state_dir": str(config.state_dir),
        "state": config.state,
        "synchronous": config.store.synchronous,
        "shutdown_grace": config.shutdown_grace,
        "http": config.http.listen,
        "housekeeping": {
            "interval": config.housekeeping.interval,
            "run_logs_max_age": config.housekeeping.run_logs_max_age,
            "run_logs_max_size": config.housekeeping.run_logs_max_size,
            "items_max_age": config.housekeeping.items_max_age,
        },
        "sources": [_source_dict(s) for s in config.sources],
        "stages": [
            {
                "name": s.name,
                "command": list(s.command),
                "call": s.call,
                "concurrency": s.concurrency,
                "pools": list(s.pools),
                "timeout": s.timeout,
                "stall_timeout": s.stall_timeout,
                "grace_period": s.grace_period,
                "retries": s.retries,
                "backoff": s.backoff,
                "backoff_max": s.backoff_max,
                "fatal_exit_codes": list(s.fatal_exit_codes),
                "env": dict(s.env),
                "cwd": None if s.cwd is None else str(s.cwd),
                "output_limit": s.output_limit,
                "workdir": s.workdir,
            }
            for s in config.stages
        ],
        "pools": {
            name: {"size": size, "stages": users.get(name, [])}
            for name, size in config.pools.items()
        },
        "warnings": config_warnings(config) + state_warnings(config),
    }


def _source_dict(s: SourceConfig) -> dict[str, Any]:
    """A source's keys that apply to its type (a record source has no pattern or settle)."""
    out: dict[str, Any] = {"name": s.name, "type": s.type.value, "path": str(s.path)}
    if s.type == "directory":
        out.update(
            pattern=list(s.pattern), recursive=s.recursive, settle=s.settle,
            on_done=_disposition(s.on_done), on_dead=_disposition(s.on_dead),
        )  # fmt: skip
    else:
        out["id_field"] = s.id_field
    out.update(poll_interval=s.poll_interval, route=list(s.route))
    return out


def print_plan(config: Config, path: Path, console: Console) -> None:
    """Print the plan for people on ``console`` (the command line's: into a pipe or a file it
    does not wrap lines, so a path is not cut in two)."""
    from rich.markup import escape
    from rich.table import Table

    d = format_duration
    console.print(f"[bold]{path}[/]: ok")
    for warning in config_warnings(config) + state_warnings(config):
        console.print(f"[yellow]warning[/]: {escape(warning)}", soft_wrap=True)
    where = config.state_dir if config.state == "sqlite" else config.state
    console.print(f"state: {where} ({config.state}, synchronous={config.store.synchronous}); "
                  f"shutdown grace {d(config.shutdown_grace)}; http {config.http.listen or 'off'}")  # fmt: skip
    keep = config.housekeeping
    size = keep.run_logs_max_size
    console.print(f"run logs: kept {d(keep.run_logs_max_age) if keep.run_logs_max_age else 'for ever'}"
                  f", {format_size(size) if size else 'no size limit'} at most")  # fmt: skip
    age = keep.items_max_age
    console.print(f"ended items: purged after {d(age)}" if age else
                  "ended items: kept until `orchestrator purge`")  # fmt: skip
    console.print()
    if not config.sources:
        console.print("sources: none (items only arrive through the store)")
    for s in config.sources:
        if s.type == "directory":
            how = f"pattern {', '.join(s.pattern)}  settle {d(s.settle)}"
        else:
            how = f"id_field {s.id_field}" if s.id_field else "ids: file and offset"
        console.print(
            f"source [bold]{s.name}[/] ({s.type.value}) {escape(str(s.path))}  {escape(how)}  "
            f"poll {d(s.poll_interval)}"
        )
        console.print("  route: " + " → ".join(s.route))
    console.print()
    table = Table(title="stages", title_justify="left")
    for col in ("stage", "limit", "pools", "timeout", "stall", "grace", "retries", "backoff"):
        table.add_column(col)
    for st in config.stages:
        table.add_row(
            st.name, str(st.concurrency), ", ".join(st.pools) or "-", d(st.timeout),
            d(st.stall_timeout), d(st.grace_period), str(st.retries),
            f"{d(st.backoff)}..{d(st.backoff_max)}",
        )  # fmt: skip
    console.print(table)
    for st in config.stages:
        what = f"call {st.call} (Python, in the service)" if st.call else shlex.join(st.command)
        extra = [f"cwd {st.cwd}" if st.cwd is not None else "",
                 f"env {', '.join(st.env)}" if st.env else "",
                 "workdir made" if st.workdir else ""]  # fmt: skip
        more = "  (" + "; ".join(e for e in extra if e) + ")" if any(extra) else ""
        console.print(f"{st.name}: {escape(what + more)}", soft_wrap=True)
    if config.pools:
        users = plan_dict(config)["pools"]
        for name, info in users.items():
            console.print(f"pool [bold]{name}[/] = {info['size']}  used by: "
                          f"{', '.join(info['stages']) or 'no stage'}")  # fmt: skip
