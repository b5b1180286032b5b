"""What the operator commands (``items``, ``show``, ``status``, ``requeue``) read, and how they show it.

They run in the operator's own process beside a running service: reads go through a read-only
connection (`connect_readonly`; WAL lets them read while the service writes, and they see
committed transactions only), the one write (`requeue`) is a single short ``BEGIN IMMEDIATE``
transaction, and none of them takes the instance lock. Plain synchronous code: no event loop of
ours runs in these processes.

Each command has a ``*_data`` function returning plain JSON-able data (what ``--json`` prints)
and a ``render_*`` function turning that data into a rich renderable for people. Text that came
from outside -- item ids, paths, reasons, output tails -- never reaches the terminal raw: an id
with a control character is shown as its ``repr``, and control characters in free text are
escaped, so neither a newline in a file name nor an escape sequence in a program's output can
break a table or drive the terminal.
"""

from __future__ import annotations

import ast
import contextlib
import datetime as dt
import json
import os
import signal
import socket
import sqlite3
import time
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Group
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from orchestrator.errors import StoreUnavailable
from orchestrator.files import read_without_waiting
from orchestrator.logs import printable as clean
from orchestrator.store.records import ItemState
from orchestrator.store.sqlite import (
    RequeueReport,
    connect,
    op_counts_by_stage,
    op_find_items,
    op_get_item,
    op_item_events,
    op_item_runs,
    op_recent_failures,
    op_requeue,
    op_running_runs,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from pathlib import Path

    from rich.console import RenderableType

    from orchestrator.config import Config
    from orchestrator.store.records import Item, RunRecord

__all__ = [
    "ITEM_STATES",
    "RECENT_FAILURES",
    "clean",
    "items_data",
    "read_status_file",
    "render_items",
    "render_show",
    "render_status",
    "requeue",
    "show_data",
    "show_id",
    "status_data",
]

#: Every value ``items --state`` accepts, in lifecycle order.
ITEM_STATES = tuple(s.value for s in ItemState)
#: How many failed runs ``status`` lists (the newest).
RECENT_FAILURES = 10
#: Per-stage item counts ``status`` shows, in this order (rejected items have no stage).
STAGE_COUNTS = ("queued", "running", "retry_wait", "done", "dead")
#: Lines of a run's output tail ``show`` prints for people (``--json`` has all of it).
TAIL_LINES = 20


# --- reading ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    # One read transaction around several queries: they all see the same committed state, even
    # while the service commits between them.
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _item_dict(item: Item) -> dict[str, Any]:
    return {
        "seq": item.seq, "id": item.id, "source": item.source, "key": item.key,
        "path": item.path, "route": list(item.route), "stage_index": item.stage_index,
        # A rejected item never entered its route: it is at no stage.
        "stage": None if item.state is ItemState.REJECTED else item.stage,
        "state": item.state.value, "attempts": item.attempts,
        "interruptions": item.interruptions, "not_before": item.not_before,
        "reason": item.reason, "created_at": item.created_at, "updated_at": item.updated_at,
    }  # fmt: skip


def _run_dict(run: RunRecord) -> dict[str, Any]:
    return {
        "id": run.id, "stage": run.stage, "attempt": run.attempt, "started_at": run.started_at,
        "ended_at": run.ended_at, "outcome": run.outcome, "exit_code": run.exit_code,
        "signal": run.signal, "duration": run.duration, "slot_wait": run.slot_wait,
        "pid": run.pid, "log_path": run.log_path, "reason": run.reason, "tail": run.tail,
    }  # fmt: skip


def items_data(
    conn: sqlite3.Connection, *, state: str | None = None, stage: str | None = None,
    limit: int | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """Items, oldest first, as JSON-able dicts (``stage`` is None once done, or rejected).

    Raises:
        ValueError: ``state`` is not one of `ITEM_STATES`.
    """
    if state is not None and state not in ITEM_STATES:
        raise ValueError(f"unknown state {state!r}; valid states: {', '.join(ITEM_STATES)}")
    return [_item_dict(i) for i in op_find_items(conn, state=state, stage=stage, limit=limit)]


def show_data(conn: sqlite3.Connection, item_id: str) -> dict[str, Any]:
    """One item's whole history: ``{"item": …, "runs": […], "events": […]}``, oldest first.

    Raises:
        ItemNotFound: the store holds no item ``item_id``.
    """
    with _snapshot(conn):
        item = op_get_item(conn, unshow_id(conn, item_id))
        runs = op_item_runs(conn, item.seq)
        events = op_item_events(conn, item.seq)
    data = _item_dict(item)
    data["payload"] = item.payload
    return {
        "item": data,
        "runs": [_run_dict(r) for r in runs],
        "events": [
            {"at": e.at, "event": e.event, "stage": e.stage, "state": e.state, "detail": e.detail}
            for e in events
        ],
    }


def _parse_time(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def read_status_file(path: Path, now: float) -> dict[str, Any] | None:
    """What the service's status file says about it, or None when there is no file.

    Read defensively: any key may be missing. ``alive`` is whether its pid runs here (None when
    the file names another host or no pid); ``age`` is seconds since it was last written;
    ``stale`` is true past two of its intervals. A file that cannot be read or parsed gives
    ``{"path": …, "error": …}``.
    """
    try:
        raw = read_without_waiting(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return {"path": str(path), "error": f"cannot read the status file: {exc}"}
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        return {"path": str(path), "error": f"the status file is not valid JSON: {exc}"}
    if not isinstance(doc, dict):
        return {"path": str(path), "error": "the status file is not a JSON object"}
    pid = doc.get("pid")
    host = doc.get("host")
    alive: bool | None = None
    if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
        if host is None or host == socket.gethostname():
            alive = _pid_alive(pid)
    updated = _parse_time(doc.get("updated_unix", doc.get("updated")))
    age = None if updated is None else max(0.0, now - updated)
    interval = doc.get("interval")
    stale = (
        age is not None and isinstance(interval, int | float) and interval > 0
        and age > 2 * interval
    )  # fmt: skip

    def table(key: str) -> dict[str, dict[str, Any]]:
        value = doc.get(key)
        if not isinstance(value, dict):
            return {}
        return {str(k): v for k, v in value.items() if isinstance(v, dict)}

    return {
        "path": str(path), "pid": pid, "host": host, "alive": alive,
        "version": doc.get("version"), "instance": doc.get("instance"),
        "state": doc.get("state"), "phase": doc.get("phase"), "reason": doc.get("reason"),
        "started": doc.get("started"),
        "updated": doc.get("updated"),
        "age": None if age is None else round(age, 3), "interval": interval, "stale": stale,
        "stages": table("stages"), "pools": table("pools"),
        "reload": doc.get("reload") if isinstance(doc.get("reload"), dict) else None,
    }  # fmt: skip


def status_data(conn: sqlite3.Connection, config: Config, now: float) -> dict[str, Any]:
    """Counts per stage, running runs and recent failures from the store; slots from the service.

    Stages come in config order, then any stage the store knows but the config no longer names.
    ``service`` is `read_status_file`'s view of ``config.status_path`` (None: no file).
    """
    with _snapshot(conn):
        counts, rejected = op_counts_by_stage(conn)
        open_runs = op_running_runs(conn)
        failed_runs = op_recent_failures(conn, RECENT_FAILURES)
    names = [s.name for s in config.stages]
    names += sorted(set(counts) - set(names))
    stages = {
        name: {state: counts.get(name, {}).get(state, 0) for state in STAGE_COUNTS}
        for name in names
    }
    running = [
        {"run": run.id, "item": item_id, "stage": run.stage, "attempt": run.attempt,
         "pid": run.pid, "started_at": run.started_at,
         "age": round(max(0.0, now - run.started_at), 3)}
        for item_id, run in open_runs
    ]  # fmt: skip
    failures = [
        {"run": run.id, "at": run.ended_at, "item": item_id, "stage": run.stage,
         "attempt": run.attempt, "outcome": run.outcome, "exit_code": run.exit_code,
         "reason": run.reason}
        for item_id, run in failed_runs
    ]  # fmt: skip
    return {
        "stages": stages,
        "rejected": rejected,
        "running": running,
        "recent_failures": failures,
        "service": read_status_file(config.status_path, now),
    }


# --- reload ----------------------------------------------------------------------------------

#: How often `reload_service` looks at the status file for the service's answer.
RELOAD_POLL = 0.05


def reload_service(
    status_path: Path, *, interval: float, timeout: float,
    starting_limit: float | None = None,
) -> tuple[int, dict[str, Any]]:  # fmt: skip
    """SIGHUP the service whose status file is ``status_path``; wait for its answer there.

    The service is signalled only when its status file names a live process on this host
    that started when the service did (`orchestrator.health.judge`: a reused pid is never
    signalled) and it is running or starting (it takes the signal from before its status file
    names it, and answers once it runs), not draining.

    ``timeout`` counts from when the service runs: while it says ``starting`` (recovering a
    dead instance's runs, up to ``starting_limit``), the answer is waited for.

    Returns:
        The exit status (0 reloaded, 1 the config was refused, 3 no service or no answer) and
        the service's ``reload`` record (or ``{"error": why}``).
    """
    from orchestrator.health import STARTING_LIMIT, judge

    if starting_limit is None:
        starting_limit = STARTING_LIMIT
    verdict = judge(status_path, interval=interval)
    if not verdict.pid_alive or verdict.pid is None:
        why = "; ".join(verdict.reasons) or f"no live service on this host ({status_path})"
        if not status_path.exists():
            why += (" (a changed state_dir or [status] file takes a restart: a running service"
                    " still writes where its config said when it started; signal it yourself:"
                    " kill -HUP PID)")  # fmt: skip
        return 3, {"error": why}
    if verdict.state not in ("running", "starting"):
        return 3, {"error": f"the service (pid {verdict.pid}) is {verdict.state}, not running"}
    before = _reload_number(status_path)
    os.kill(verdict.pid, signal.SIGHUP)
    start = time.monotonic()
    deadline = start + timeout
    while time.monotonic() < deadline:
        time.sleep(RELOAD_POLL)
        doc = _status_doc(status_path)
        record = doc.get("reload") if doc is not None else None
        if isinstance(record, dict) and record.get("number", 0) > before:
            return (0 if record.get("ok") else 1), record
        if doc is not None and doc.get("state") == "starting" and doc.get("pid") == verdict.pid:
            # It answers once it runs: the time counts from then (within starting_limit).
            deadline = min(max(deadline, time.monotonic() + timeout), start + starting_limit)
    return 3, {"error": f"no answer from the service (pid {verdict.pid}) within {timeout:g}s "
                        "(its log says why)"}  # fmt: skip


def _status_doc(status_path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(read_without_waiting(status_path))
    except (OSError, ValueError):
        return None  # (being replaced: the next look sees it)
    return doc if isinstance(doc, dict) else None


def _reload_record(status_path: Path) -> dict[str, Any] | None:
    doc = _status_doc(status_path)
    record = doc.get("reload") if doc is not None else None
    return record if isinstance(record, dict) else None


def _reload_number(status_path: Path) -> int:
    record = _reload_record(status_path)
    number = record.get("number", 0) if record is not None else 0
    return number if isinstance(number, int) else 0


# --- writing ---------------------------------------------------------------------------------


def requeue(
    path: Path, ids: Sequence[str] | None, *, dead: bool, stage: str | None, config: Config,
    to: str | None = None,
) -> RequeueReport:  # fmt: skip
    """Requeue dead items (or, with ``to``, dead and parked items at stage ``to``) in one write
    transaction; see `op_requeue`.

    Opens its own read-write connection (never creating the store) and waits up to the store's
    ``busy_timeout`` for the service's current transaction to end.

    Raises:
        StoreUnavailable: no store at ``path``, or it could not be written.
    """
    conn = connect(
        path, synchronous=config.store.synchronous, busy_timeout=config.store.busy_timeout,
        create=False,
    )  # fmt: skip
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if ids is not None:
                ids = [unshow_id(conn, i) for i in ids]
            report = op_requeue(
                conn, ids, dead=dead, stage=stage, known_stages=[s.name for s in config.stages],
                to=to, routes={source.name: source.route for source in config.sources},
            )  # fmt: skip
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot write the store {str(path)!r}: {exc}") from exc
    finally:
        conn.close()
    return report


# --- rendering for people --------------------------------------------------------------------


def show_id(text: str) -> str:
    """``text`` as is when it prints cleanly on one line, else its ``repr``."""
    return text if text.isprintable() else repr(text)


def unshow_id(conn: sqlite3.Connection, text: str) -> str:
    """The item id ``text`` names on a command line: itself, or, when no item has that id and
    ``text`` is the quoted form `show_id` prints for an id that does not print cleanly (a
    newline in a file name), the id it stands for -- so what ``items`` prints can be pasted."""
    if len(text) < 2 or text[0] != text[-1] or text[0] not in "'\"":
        return text
    if conn.execute("SELECT 1 FROM items WHERE id = ?", (text,)).fetchone() is not None:
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text
    return value if isinstance(value, str) and show_id(value) == text else text


def _when(ts: float | None, *, short: bool = False) -> str:
    if ts is None:
        return "-"
    return time.strftime("%m-%d %H:%M:%S" if short else "%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02}m"
    return f"{s // 86400}d{s % 86400 // 3600:02}h"


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def _opt(value: Any) -> Text:
    return Text("-" if value is None else clean(str(value)))


def _indent(renderable: RenderableType, spaces: int) -> RenderableType:
    return Padding(renderable, (0, 0, 0, spaces), expand=False)


def _table(title: str) -> Table:
    return Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                 show_edge=False, pad_edge=False)  # fmt: skip


def render_items(rows: list[dict[str, Any]]) -> RenderableType:
    """The ``items`` table."""
    if not rows:
        return Text("no items")
    table = _table(f"{len(rows)} item(s)")
    # An id is folded, never cut short: it is what the other commands take.
    table.add_column("id", overflow="fold", ratio=3)
    table.add_column("source", overflow="fold", ratio=1)
    table.add_column("state", no_wrap=True)
    table.add_column("stage", no_wrap=True)
    table.add_column("attempts", justify="right")
    table.add_column("updated", no_wrap=True)
    table.add_column("reason", overflow="fold", ratio=2)
    for r in rows:
        table.add_row(
            Text(show_id(r["id"])), Text(show_id(r["source"])), r["state"], _opt(r["stage"]),
            _attempts(r), _when(r["updated_at"], short=True), _opt(r["reason"]),
        )  # fmt: skip
    return table


def _attempts(item: dict[str, Any]) -> str:
    """An item's attempts at the stage it is at; "-" once it has none (done, or rejected)."""
    return "-" if item["stage"] is None else str(item["attempts"])


def _run_block(run: dict[str, Any]) -> RenderableType:
    head = Text()
    head.append(f"run {run['id']}", style="bold")
    head.append(f"  {run['stage']}  attempt {run['attempt']}  ")
    outcome = run["outcome"] or "running"
    head.append(outcome, style="green" if outcome == "ok" else "red" if run["outcome"] else "cyan")
    facts = [
        f"started {_when(run['started_at'])}",
        f"ended {_when(run['ended_at'])}",
        f"exit {run['exit_code'] if run['exit_code'] is not None else '-'}",
    ]
    if run["signal"] is not None:
        facts.append(f"signal {run['signal']}")
    facts += [f"duration {_secs(run['duration'])}", f"slot wait {_secs(run['slot_wait'])}",
              f"pid {run['pid'] if run['pid'] is not None else '-'}"]  # fmt: skip
    parts: list[RenderableType] = [head, _indent(Text("  ".join(facts)), 4)]
    if run["reason"]:
        parts.append(_indent(Text(f"reason: {clean(run['reason'])}"), 4))
    if run["log_path"]:
        gone = "" if os.path.exists(run["log_path"]) else " (no longer on disk: see [housekeeping])"
        parts.append(_indent(Text(f"log: {show_id(run['log_path'])}{gone}"), 4))
    if run["tail"]:
        lines = run["tail"].rstrip("\n").split("\n")
        shown = lines[-TAIL_LINES:]
        tail = Text(style="dim")
        if len(lines) > len(shown):
            tail.append(f"… {len(lines) - len(shown)} more line(s) above\n")
        tail.append("\n".join(clean(line) for line in shown))
        parts.append(_indent(tail, 6))
    return Group(*parts)


def render_show(data: dict[str, Any]) -> RenderableType:
    """The ``show`` report: fields, then every run with its output tail, then the events."""
    item = data["item"]
    head = Text()
    head.append("item ", style="bold")
    head.append(show_id(item["id"]), style="bold")
    fields = Table.grid(padding=(0, 2))
    fields.add_column(style="dim")
    fields.add_column()
    where = f" at {item['stage']}" if item["stage"] else ""
    rows: list[tuple[str, Text]] = [
        ("state", Text(f"{item['state']}{where}")),
        ("source", Text(f"{show_id(item['source'])}  key {show_id(item['key'])}")),
        ("path", _opt(None if item["path"] is None else show_id(item["path"]))),
        ("route", Text(" → ".join(item["route"]) or "-")),
        ("attempts", Text(f"{_attempts(item)}  interruptions {item['interruptions']}")),
        ("reason", _opt(item["reason"])),
        ("created", Text(_when(item["created_at"]))),
        ("updated", Text(_when(item["updated_at"]))),
    ]
    if item["not_before"] is not None:
        rows.append(("not before", Text(_when(item["not_before"]))))
    if item.get("payload") is not None:
        rows.append(("payload", Text(clean(item["payload"]))))
    for name, value in rows:
        fields.add_row(name, value)
    parts: list[RenderableType] = [head, _indent(fields, 2), Text()]
    parts.append(Text(f"runs ({len(data['runs'])})", style="bold"))
    parts += [_indent(_run_block(run), 2) for run in data["runs"]]
    parts.append(Text())
    events = _table(f"events ({len(data['events'])})")
    for col in ("at", "event", "stage", "state", "detail"):
        events.add_column(col, overflow="fold", no_wrap=col == "at")
    for e in data["events"]:
        events.add_row(_when(e["at"]), e["event"], _opt(e["stage"]), _opt(e["state"]),
                       _opt(e["detail"]))  # fmt: skip
    parts.append(events)
    return Group(*parts)


def _slots(info: dict[str, Any] | None, total_key: str) -> tuple[str, str, Text]:
    if not info:
        return "-", "-", Text("-")
    if info.get("in_config") is False:  # items left at a stage the config no longer has
        return "not in config", "-", Text("-")
    busy, total = info.get("busy"), info.get(total_key)
    holders = info.get("holders")
    names = ", ".join(show_id(str(h)) for h in holders) if isinstance(holders, list) else ""
    return (
        f"{busy if busy is not None else '?'}/{total if total is not None else '?'}",
        str(info.get("waiting", "-")),
        Text(names or "-"),
    )


def _service_line(service: dict[str, Any] | None) -> Text:
    line = Text("service: ", style="bold")
    if service is None:
        line.append("not running (no status file)", style="yellow")
        return line
    if "error" in service:
        line.append(clean(service["error"]), style="red")
        return line
    pid, alive = service.get("pid"), service.get("alive")
    host = show_id(str(service["host"])) if service.get("host") is not None else "?"
    line.append(f"pid {pid if pid is not None else '?'} on {host} ")
    if alive is None:
        line.append("(liveness unknown)", style="yellow")
    elif alive:
        line.append("(alive)", style="green")
    else:
        line.append("(gone)", style="red")
    if service.get("state"):
        line.append(f", {clean(str(service['state']))}")
        if service["state"] == "starting" and service.get("phase"):
            line.append(f" ({clean(str(service['phase']))})")
        if service["state"] == "failed" and service.get("reason"):
            line.append(f" ({clean(str(service['reason']))})", style="red")
    line.append(f", status file updated {_age(service.get('age'))} ago")
    if service.get("stale"):
        line.append(" (stale)", style="red")
    if service.get("version"):
        line.append(f", version {clean(str(service['version']))}")
    return line


def _reload_line(reload: dict[str, Any]) -> Text:
    line = Text("last reload: ", style="bold")
    line.append(f"{clean(str(reload.get('at', '?')))}, ")
    errors = reload.get("errors") or []
    if not reload.get("ok"):
        line.append(f"the config has {len(errors)} error(s), limits unchanged", style="red")
        if errors:
            line.append(f" ({clean(str(errors[0]))}{', …' if len(errors) > 1 else ''})")
        return line
    applied = reload.get("applied") or []
    line.append(", ".join(clean(str(a)) for a in applied) if applied else "limits unchanged")
    later = reload.get("not_applied") or []
    if later:
        line.append("; until a restart: " + ", ".join(clean(str(k)) for k in later),
                    style="yellow")  # fmt: skip
    return line


def render_status(data: dict[str, Any]) -> RenderableType:
    """The ``status`` view: service, stages with slots, pools, running runs, recent failures."""
    service = data["service"]
    live = service if service is not None and "error" not in service else None
    parts: list[RenderableType] = [_service_line(service)]
    if live and live.get("reload"):
        parts.append(_reload_line(live["reload"]))
    stages = _table("stages")
    for col in ("stage", "queued", "running", "retry", "done", "dead", "slots", "waiting",
                "holders"):  # fmt: skip
        stages.add_column(col, justify="left" if col in ("stage", "holders") else "right",
                          overflow="fold")  # fmt: skip
    for name, counts in data["stages"].items():
        slots = _slots(live["stages"].get(name) if live else None, "concurrency")
        stages.add_row(name, *(str(counts[s]) for s in STAGE_COUNTS), *slots)
    parts.append(stages)
    if live and live["pools"]:
        pools = _table("pools")
        for col in ("pool", "slots", "waiting", "holders"):
            pools.add_column(col, justify="right" if col in ("slots", "waiting") else "left",
                             overflow="fold")  # fmt: skip
        for name, info in live["pools"].items():
            pools.add_row(Text(show_id(name)), *_slots(info, "size"))
        parts.append(pools)
    parts.append(Text(f"rejected items: {data['rejected']}"))
    if data["running"]:
        running = _table("running")
        for col in ("run", "item", "stage", "attempt", "pid", "age"):
            running.add_column(col, overflow="fold" if col == "item" else "ellipsis")
        for r in data["running"]:
            running.add_row(str(r["run"]), Text(show_id(r["item"])), r["stage"],
                            str(r["attempt"]), str(r["pid"] or "-"), _age(r["age"]))  # fmt: skip
        parts.append(running)
    else:
        parts.append(Text("running: none"))
    if data["recent_failures"]:
        failures = _table("recent failures")
        for col in ("when", "item", "stage", "outcome", "reason"):
            failures.add_column(col, overflow="fold", no_wrap=col == "when")
        for f in data["recent_failures"]:
            failures.add_row(_when(f["at"]), Text(show_id(f["item"])), f["stage"], f["outcome"],
                             _opt(f["reason"]))  # fmt: skip
        parts.append(failures)
    return Group(*parts)
