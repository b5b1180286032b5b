"""The config file: a TOML document turned into frozen attrs classes, or every problem in it.

Synopsis::

    config = load_config("orchestrator.toml")   # raises ConfigError listing every problem
    config.stage("extract").timeout             # float seconds, or None for no limit
    config.db_path                              # state_dir / "orchestrator.db" for SQLite

Defaults live on the fields. The TOML is structured by one strict `cattrs.Converter`
(``forbid_extra_keys=True``) whose hooks never coerce: ``"many"`` is not an integer, ``"ocr"``
is not an array, ``1`` is not a string, ``"no"`` is not a boolean. Durations are a number of
seconds or a string like ``"30s"`` (see `orchestrator.durations`); TOML integers are accepted
where a number is expected.

Every problem is reported at once, each prefixed with the TOML path of the offending key::

    stages[0].timeout: expected a duration like "30s", got "soon"
    stages[0].concurency: unknown key (did you mean "concurrency"?)
    sources[0].route[1]: unknown stage "ocr" (stages: extract, convert, store)

How: a field that fails to structure is collected by cattrs (detailed validation); the attrs
validators of the fields that did structure are then run as well (they would not run otherwise,
since the class is never instantiated), and those of an array or a table some of whose items
failed over the items that did (``pools.cpu = 0`` is reported beside ``pools.gpu = "one"``);
and the checks that span sections (routes naming stages, stages naming pools, duplicate names)
run over the raw TOML data, skipping parts of the wrong type, so they are reported together with
the rest. With ``import_calls`` (what ``check``, ``run`` and ``batch`` ask for), each Python
stage's function is imported too, and one that cannot be is one more problem. Errors are sorted
in file order.

Relative paths are resolved against the config file's folder (``base_dir``) and made absolute
(normalised, symlinks kept); a config with no folder of its own -- a pipe, a terminal, anything
under /dev or /proc/*/fd -- has them resolved against the current folder. Nothing here reads the
environment.
"""

from __future__ import annotations

import difflib
import enum
import os
import re
import stat
import tomllib
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import attrs
import cattrs
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn, override

from orchestrator.durations import describe_value, format_duration, parse_duration, parse_size
from orchestrator.errors import ConfigError
from orchestrator.files import read_without_waiting

__all__ = [
    "Config",
    "Disposition",
    "FaultsConfig",
    "HousekeepingConfig",
    "HttpConfig",
    "LogConfig",
    "SourceConfig",
    "SourceType",
    "StageConfig",
    "StatusConfig",
    "StoreConfig",
    "WatchdogConfig",
    "load_config",
    "parse_config",
]

# Names of stages, sources and pools: they end up in file names, URLs and metric labels.
NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
#: A Python stage's ``call``: ``package.module:function`` (an attribute path after the colon).
CALL_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")

# Where the HTTP server listens unless told otherwise: loopback, so nothing is exposed by default.
DEFAULT_LISTEN = "127.0.0.1:8787"

# Loguru's level names, in increasing severity.
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")

# Compression formats for rotated log files that loguru writes with the standard library only.
LOG_COMPRESSIONS = ("gz", "bz2", "xz", "zip")

# SQLite `PRAGMA synchronous` modes that keep the store durable in WAL mode (FULL survives power
# loss; NORMAL may lose the last transactions but never corrupts).
SYNCHRONOUS_MODES = ("FULL", "NORMAL")

# Files a directory source skips by default: hidden files and the usual partial-upload suffixes.
DEFAULT_IGNORE = (".*", "*.tmp", "*.part", "*.swp")

#: Where a config's path names a stream, not a file in a folder: ``/dev/stdin``, ``/dev/fd/63``
#: (a shell's ``<(…)``), ``/proc/self/fd/0``, a terminal.
_NO_FOLDER_RE = re.compile(r"/dev/.*|/proc/[^/]+/fd/.*")

# The SQLite database and the default status file, both inside state_dir.
DB_FILENAME = "orchestrator.db"
STATUS_FILENAME = "status.json"

# attrs field metadata keys: a field's own cattrs structure hook; a field that is not a TOML key.
_HOOK = "orchestrator.config.structure"
_NOT_A_KEY = "orchestrator.config.not_a_key"
#: The value of a table's key that failed to structure, in the table its validator is given
#: (so that the key's own checks run); a validator skips it.
_UNSTRUCTURED: Any = object()

# TOML bare keys; any other key is quoted in an error's path.
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_LISTEN_RE = re.compile(r"(\[[0-9A-Za-z:.%]+\]|[^\s:\[\]]+):([0-9]{1,5})")
_SYNTAX_ERROR_RE = re.compile(r"(?P<msg>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)", re.S)

_Segment = str | int
_Problem = tuple[tuple[_Segment, ...], str]
_Hook = Callable[[Any, Any], Any]
_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


class _Invalid(ValueError):
    """One or more problems, each with a path relative to where the exception is caught."""

    def __init__(self, problems: list[_Problem]) -> None:
        super().__init__("; ".join(message for _, message in problems))
        self.problems = problems

    @classmethod
    def here(cls, message: str) -> _Invalid:
        return cls([((), message)])


def _fail(attribute: attrs.Attribute[Any], message: str, *sub: _Segment) -> _Invalid:
    return _Invalid([((attribute.name, *sub), message)])


# Validators
#
# Each raises _Invalid naming its field, so the message lands on the right path however the
# validator is called: by attrs in __init__, or by _validator_problems over a namespace when
# another field of the same table failed (cross-field validators read that namespace with
# getattr and skip when the other field is missing).


def _at_least(minimum: int) -> _Validator:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: int) -> None:
        if value < minimum:
            raise _fail(attribute, f"must be >= {minimum}, got {value!r}")

    return check


def _positive_duration(_inst: Any, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and value <= 0:
        raise _fail(attribute, f"must be > 0, got {format_duration(value)}")


def _rate(_inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
    if not 0 <= value <= 1:
        raise _fail(attribute, f"must be between 0 and 1, got {value!r}")


def _name(_inst: Any, attribute: attrs.Attribute[Any], value: str) -> None:
    if not NAME_RE.fullmatch(value):
        raise _fail(
            attribute,
            f'invalid name {describe_value(value)} (use letters, digits, "_", ".", "-")',
        )


def _not_empty(_inst: Any, attribute: attrs.Attribute[Any], value: tuple[Any, ...]) -> None:
    if not value:
        raise _fail(attribute, "must not be empty")


def _command(inst: Any, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    if not value and inst.call is not None:
        return  # a Python stage (whether it has either is checked on the raw data)
    _not_empty(inst, attribute, value)
    if not value[0] and _positions(value)[0] == 0:  # (not when the program had the wrong type)
        raise _fail(attribute, "must not be empty (the program to run)", 0)


def _call(_inst: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not CALL_RE.fullmatch(value):
        raise _fail(attribute, f'expected "module:function", got {describe_value(value)}')


def _no_repeats(what: str) -> _Validator:
    def check(_inst: Any, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
        problems: list[_Problem] = []
        for index, item in enumerate(value):
            if item in value[:index]:
                message = f"{what} {describe_value(item)} is listed twice"
                problems.append(((attribute.name, index), message))
        if problems:
            raise _Invalid(problems)

    return check


def _name_patterns(_inst: Any, attribute: attrs.Attribute[Any], value: tuple[str, ...]) -> None:
    """Patterns match a file's name, never its folder: one with a "/" (or none at all) can never
    match anything, which would make the source take nothing without a word."""
    if not value:
        raise _fail(attribute, "must not be empty")
    problems: list[_Problem] = []
    for index, pattern in enumerate(value):
        if not pattern:
            problems.append(((attribute.name, index), "must not be empty"))
        elif "/" in pattern:
            problems.append((
                (attribute.name, index),
                f"{describe_value(pattern)} can never match: patterns match file names, not "
                'folders (with recursive = true, every subfolder is searched; use "*.txt")',
            ))  # fmt: skip
    if problems:
        raise _Invalid(problems)


def _exit_codes(_inst: Any, attribute: attrs.Attribute[Any], value: tuple[int, ...]) -> None:
    problems: list[_Problem] = [
        ((attribute.name, index), f"must be between 1 and 255, got {code!r}")
        for index, code in enumerate(value)
        if not 1 <= code <= 255
    ]
    if problems:
        raise _Invalid(problems)


def _env(_inst: Any, attribute: attrs.Attribute[Any], value: Mapping[str, str]) -> None:
    problems: list[_Problem] = []
    for key, text in value.items():
        if not key or "=" in key or "\0" in key:
            message = f"invalid environment variable name {describe_value(key)}"
            problems.append(((attribute.name, key), message))
        elif text is not _UNSTRUCTURED and "\0" in text:
            problems.append(((attribute.name, key), "must not contain a NUL character"))
    if problems:
        raise _Invalid(problems)


def _pools(_inst: Any, attribute: attrs.Attribute[Any], value: Mapping[str, int]) -> None:
    problems: list[_Problem] = []
    for name, size in value.items():
        if not NAME_RE.fullmatch(name):
            message = (
                f'invalid pool name {describe_value(name)} (use letters, digits, "_", ".", "-")'
            )
            problems.append(((attribute.name, name), message))
        elif size is not _UNSTRUCTURED and size < 1:
            problems.append(((attribute.name, name), f"must be >= 1, got {size!r}"))
    if problems:
        raise _Invalid(problems)


def _at_least_field(other: str) -> _Validator:
    def check(inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
        floor = getattr(inst, other, None)
        if floor is not None and value < floor:
            message = f"must be >= {other} ({format_duration(floor)}), got {format_duration(value)}"
            raise _fail(attribute, message)

    return check


def _more_than_field(other: str) -> _Validator:
    def check(inst: Any, attribute: attrs.Attribute[Any], value: float) -> None:
        floor = getattr(inst, other, None)
        if floor is not None and value <= floor:
            message = f"must be > {other} ({format_duration(floor)}), got {format_duration(value)}"
            raise _fail(attribute, message)

    return check


def _on_dead(_inst: Any, attribute: attrs.Attribute[Any], value: Disposition) -> None:
    if value.action == "delete":
        message = '"delete" is not allowed (a dead item can be requeued); use "keep" or "move:DIR"'
        raise _fail(attribute, message)


def _id_field(inst: Any, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is None and getattr(inst, "type", None) is SourceType.JSON:
        raise _fail(attribute, 'required for a source of type "json"')


def _disposition_dir(inst: Any, attribute: attrs.Attribute[Any], value: Path | None) -> None:
    if (value is None) != (getattr(inst, "action", None) != "move"):
        raise _fail(attribute, 'a folder is given with "move", and only with "move"')


# Field hooks: how one field's TOML value becomes its Python value (strict, no coercion).


def _structure_duration(value: Any, _type: Any) -> float:
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise _Invalid.here(str(exc)) from None


def _structure_size(value: Any, _type: Any) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise _Invalid.here(str(exc)) from None


def _structure_size_text(value: Any, _type: Any) -> str:
    try:
        size = parse_size(value)
    except ValueError as exc:
        raise _Invalid.here(str(exc)) from None
    if size == 0:
        raise _Invalid.here(f"must be more than 0 bytes, got {describe_value(value)}")
    return str(value)


def _choice(choices: tuple[str, ...]) -> _Hook:
    def structure(value: Any, _type: Any) -> str:
        if isinstance(value, str) and value.upper() in choices:
            return value.upper()
        raise _Invalid.here(f"expected one of {', '.join(choices)}, got {describe_value(value)}")

    return structure


def _structure_listen(value: Any, _type: Any) -> str | None:
    if value is False:
        return None
    match = _LISTEN_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise _Invalid.here(
            f'expected "host:port", "[v6]:port" or false, got {describe_value(value)}'
        )
    if int(match.group(2)) > 65535:
        raise _Invalid.here(f"port must be between 0 and 65535, got {describe_value(value)}")
    return str(value)


def _structure_compression(value: Any, _type: Any) -> str | None:
    if value is False:
        return None
    if isinstance(value, str) and value in LOG_COMPRESSIONS:
        return value
    choices = ", ".join(LOG_COMPRESSIONS)
    raise _Invalid.here(f"expected one of {choices} or false, got {describe_value(value)}")


def _or_false(hook: _Hook) -> _Hook:
    """``hook``, with TOML ``false`` meaning None (a rule switched off)."""

    def structure(value: Any, type_: Any) -> Any:
        return None if value is False else hook(value, type_)

    return structure


def _positive_size(_inst: Any, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and value <= 0:
        raise _fail(attribute, f"must be more than 0 bytes, got {value!r}")


def _structure_state(value: Any, _type: Any) -> str:
    if isinstance(value, str):
        if value.lower() == "sqlite":
            return "sqlite"
        if value.lower().startswith(("postgresql://", "postgres://")):
            return value
    raise _Invalid.here(f'expected "sqlite" or a postgresql:// URL, got {describe_value(value)}')


def _structure_patterns(value: Any, _type: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list):
        raise _Invalid.here(
            f"expected a string or an array of strings, got {describe_value(value)}"
        )
    patterns: tuple[str, ...] = _converter.structure(value, tuple[str, ...])
    return patterns


def _hooked(default: Any, hook: _Hook, validator: _Validator | None = None) -> Any:
    return attrs.field(default=default, validator=validator, metadata={_HOOK: hook})


def _duration(default: float | None, validator: _Validator | None = None) -> Any:
    return _hooked(default, _structure_duration, validator)


# The model


class SourceType(enum.StrEnum):
    """What a source reads: new files in a folder, appended JSON lines, or a rewritten JSON array."""

    DIRECTORY = "directory"
    JSONL = "jsonl"
    JSON = "json"


@attrs.frozen(kw_only=True)
class Disposition:
    """What happens to a source's input once its item is done or dead.

    Written ``"keep"``, ``"delete"`` or ``"move:DIR"`` in TOML; ``str()`` gives that form back.
    """

    action: Literal["keep", "delete", "move"] = "keep"
    dir: Path | None = attrs.field(default=None, validator=_disposition_dir)

    def __str__(self) -> str:
        return f"move:{self.dir}" if self.action == "move" else self.action


@attrs.frozen(kw_only=True)
class StoreConfig:
    """Tuning of the SQLite store (``[store]``)."""

    synchronous: Literal["FULL", "NORMAL"] = _hooked("FULL", _choice(SYNCHRONOUS_MODES))
    busy_timeout: float = _duration(5.0)


@attrs.frozen(kw_only=True)
class HttpConfig:
    """The HTTP server for /health, /metrics and /status (``[http]``)."""

    #: ``"host:port"`` or ``"[v6]:port"``; ``None`` (TOML ``false``) disables the server.
    listen: str | None = _hooked(DEFAULT_LISTEN, _structure_listen)


@attrs.frozen(kw_only=True)
class StatusConfig:
    """The status file (``[status]``)."""

    interval: float = _duration(10.0, _positive_duration)
    #: ``None`` means ``state_dir / "status.json"``; see `Config.status_path`.
    file: Path | None = None


@attrs.frozen(kw_only=True)
class LogConfig:
    """Logging (``[log]``)."""

    level: str = _hooked("INFO", _choice(LOG_LEVELS))
    file: Path | None = None
    #: A size such as ``"10 MB"``, kept as written; `rotation_bytes` is the parsed value.
    rotation: str = _hooked("10 MB", _structure_size_text)
    #: How many rotated files are kept.
    retention: int = attrs.field(default=5, validator=_at_least(1))
    compression: str | None = _hooked("gz", _structure_compression)
    json: bool = False

    @property
    def rotation_bytes(self) -> int:
        """The rotation size in bytes (pass this to loguru: its own size parser differs)."""
        return parse_size(self.rotation)


@attrs.frozen(kw_only=True)
class HousekeepingConfig:
    """What the service cleans up by itself (``[housekeeping]``); see `orchestrator.housekeeping`."""

    #: How often the run logs are pruned and old items purged (also once at start).
    interval: float = _duration(600.0, _positive_duration)
    #: A run's log is removed this long after it was last written; None (``false``) keeps them.
    run_logs_max_age: float | None = _hooked(
        7 * 86400.0, _or_false(_structure_duration), _positive_duration
    )
    #: Beyond this much disk space in run logs, the oldest go; None (``false``): no budget.
    run_logs_max_size: int | None = _hooked(
        256 * 1000**2, _or_false(_structure_size), _positive_size
    )
    #: Done, dead and rejected items unchanged this long are purged, as ``orchestrator purge
    #: --older-than`` does; None (``false``, the default): only that command purges.
    items_max_age: float | None = _hooked(None, _or_false(_structure_duration), _positive_duration)


@attrs.frozen(kw_only=True)
class WatchdogConfig:
    """Thresholds of the watchdog (``[watchdog]``), all in seconds."""

    loop_stall_warn: float = _duration(5.0, _positive_duration)
    loop_stall_timeout: float = _duration(
        60.0, attrs.validators.and_(_positive_duration, _more_than_field("loop_stall_warn"))
    )
    stall_after: float = _duration(300.0, _positive_duration)
    slot_wait_warn: float = _duration(600.0, _positive_duration)


@attrs.frozen(kw_only=True)
class FaultsConfig:
    """Fault injection for stress tests (``[faults]``); rates are probabilities per run."""

    enabled: bool = False
    delay_rate: float = attrs.field(default=0.0, validator=_rate)
    delay: float = _duration(1.0)
    fail_rate: float = attrs.field(default=0.0, validator=_rate)
    hang_rate: float = attrs.field(default=0.0, validator=_rate)
    #: Stages faults are injected into; empty means every stage.
    stages: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class SourceConfig:
    """Where items come from (``[[sources]]``)."""

    name: str = attrs.field(validator=_name)
    type: SourceType
    path: Path
    #: Stage names, in order, that every item of this source goes through.
    route: tuple[str, ...] = attrs.field(
        validator=attrs.validators.and_(_not_empty, _no_repeats("stage"))
    )
    #: Glob patterns of file names to take; TOML accepts a string or an array of strings.
    pattern: tuple[str, ...] = _hooked(("*",), _structure_patterns, _name_patterns)
    recursive: bool = False
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    #: A file is taken once its size and mtime have held still this long.
    settle: float = _duration(1.0)
    poll_interval: float = _duration(2.0, _positive_duration)
    on_done: Disposition = Disposition(action="keep")
    on_dead: Disposition = attrs.field(default=Disposition(action="keep"), validator=_on_dead)
    reingest_changed: bool = False
    #: The record field holding an item's stable id (required for "json", optional for "jsonl").
    id_field: str | None = attrs.field(default=None, validator=_id_field)


@attrs.frozen(kw_only=True)
class StageConfig:
    """A named step: a command and its limits, timeouts and retries (``[[stages]]``)."""

    name: str = attrs.field(validator=_name)
    #: A Python stage instead of a command: ``"module:function"``, an ``async def`` called with
    #: a `orchestrator.calls.StageRun` (see there). Exactly one of ``command`` and ``call``.
    call: str | None = attrs.field(default=None, validator=_call)
    #: argv template; placeholders such as ``{path}`` are substituted as whole arguments.
    command: tuple[str, ...] = attrs.field(default=(), validator=_command)
    concurrency: int = attrs.field(default=1, validator=_at_least(1))
    pools: tuple[str, ...] = attrs.field(default=(), validator=_no_repeats("pool"))
    #: Wall-clock limit of one run; ``None`` means no limit.
    timeout: float | None = _duration(None, _positive_duration)
    #: Limit on silence (no output) of one run; ``None`` means no limit.
    stall_timeout: float | None = _duration(None, _positive_duration)
    grace_period: float = _duration(10.0)
    retries: int = attrs.field(default=0, validator=_at_least(0))
    backoff: float = _duration(1.0)
    backoff_max: float = _duration(300.0, _at_least_field("backoff"))
    fatal_exit_codes: tuple[int, ...] = attrs.field(default=(), validator=_exit_codes)
    env: Mapping[str, str] = attrs.field(factory=dict, validator=_env, hash=False)
    cwd: Path | None = None
    #: Bytes of output kept per run; TOML accepts an integer or a size such as "1 MB".
    output_limit: int = _hooked(1_048_576, _structure_size)
    #: Make the item's workdir for the routes through this stage even when its command names
    #: neither ``{workdir}`` nor ``ORCH_WORKDIR``: for a program that reads ``ORCH_WORKDIR`` from
    #: its environment. (Making one for every item costs a fifth of a trivial stage's rate.)
    workdir: bool = False


def _stages_given(_inst: Any, attribute: attrs.Attribute[Any], value: tuple[Any, ...]) -> None:
    if not value:
        raise _fail(attribute, "at least one stage is required")


@attrs.frozen(kw_only=True)
class Config:
    """The whole config file. Build it with `load_config` or `parse_config`."""

    state_dir: Path = Path("state")
    #: ``"sqlite"`` (a file in state_dir) or a ``postgresql://`` URL.
    state: str = _hooked("sqlite", _structure_state)
    #: How long running stages may finish after SIGTERM before they are cancelled.
    shutdown_grace: float = _duration(30.0)
    #: An item whose runs were interrupted this many times is dead as a poison item.
    max_interruptions: int = attrs.field(default=3, validator=_at_least(1))
    store: StoreConfig = attrs.field(factory=StoreConfig)
    http: HttpConfig = attrs.field(factory=HttpConfig)
    status: StatusConfig = attrs.field(factory=StatusConfig)
    log: LogConfig = attrs.field(factory=LogConfig)
    watchdog: WatchdogConfig = attrs.field(factory=WatchdogConfig)
    housekeeping: HousekeepingConfig = attrs.field(factory=HousekeepingConfig)
    faults: FaultsConfig = attrs.field(factory=FaultsConfig)
    #: Named limits shared by stages: pool name -> slots.
    pools: Mapping[str, int] = attrs.field(factory=dict, validator=_pools, hash=False)
    sources: tuple[SourceConfig, ...] = ()
    stages: tuple[StageConfig, ...] = attrs.field(default=(), validator=_stages_given)
    #: The folder relative paths were resolved against (the config file's folder); not a key.
    base_dir: Path = attrs.field(default=Path(), metadata={_NOT_A_KEY: True})

    @property
    def db_path(self) -> Path | None:
        """The SQLite database file, or ``None`` when the state is in PostgreSQL."""
        return self.state_dir / DB_FILENAME if self.state == "sqlite" else None

    @property
    def status_path(self) -> Path:
        """The status file: ``status.file``, or ``state_dir / "status.json"`` by default."""
        return (
            self.status.file if self.status.file is not None else self.state_dir / STATUS_FILENAME
        )

    def stage(self, name: str) -> StageConfig:
        """Return the stage called ``name``.

        Raises:
            KeyError: If there is no such stage.
        """
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"no stage named {name!r}")

    def source(self, name: str) -> SourceConfig:
        """Return the source called ``name``.

        Raises:
            KeyError: If there is no such source.
        """
        for source in self.sources:
            if source.name == name:
                return source
        raise KeyError(f"no source named {name!r}")


_CLASSES = (
    Disposition,
    StoreConfig,
    HttpConfig,
    StatusConfig,
    LogConfig,
    WatchdogConfig,
    FaultsConfig,
    SourceConfig,
    StageConfig,
    Config,
)
for _cls in _CLASSES:
    attrs.resolve_types(_cls)


# The converter


def _strict(kind: type, accepted: tuple[type, ...], expected: str) -> _Hook:
    def structure(value: Any, _type: Any) -> Any:
        if (isinstance(value, bool) and kind is not bool) or not isinstance(value, accepted):
            raise _Invalid.here(f"expected {expected}, got {describe_value(value)}")
        return kind(value)

    return structure


def _structure_path(value: Any, _type: Any) -> Path:
    if not isinstance(value, str) or not value:
        raise _Invalid.here(f"expected a path, got {describe_value(value)}")
    return Path(value)


def _structure_source_type(value: Any, _type: Any) -> SourceType:
    if isinstance(value, str) and value in SourceType.__members__.values():
        return SourceType(value)
    choices = ", ".join(SourceType)
    raise _Invalid.here(f"expected one of {choices}, got {describe_value(value)}")


def _structure_disposition(value: Any, _type: Any) -> Disposition:
    if value == "keep":
        return Disposition(action="keep")
    if value == "delete":
        return Disposition(action="delete")
    if isinstance(value, str) and value.startswith("move:") and value[5:].strip():
        return Disposition(action="move", dir=Path(value[5:].strip()))
    raise _Invalid.here(f'expected "keep", "delete" or "move:DIR", got {describe_value(value)}')


def _is_array(type_: Any) -> bool:
    origin, args = get_origin(type_), get_args(type_)
    return origin is list or (origin is tuple and len(args) == 2 and args[1] is Ellipsis)


def _array_hook(type_: Any) -> _Hook:
    item_type = get_args(type_)[0]
    make = tuple if get_origin(type_) is tuple else list

    def structure(value: Any, _type: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise _Invalid.here(f"expected an array, got {describe_value(value)}")
        items, errors = [], []
        for index, item in enumerate(value):
            try:
                items.append(_converter.structure(item, item_type))
            except Exception as exc:
                exc.add_note(IterableValidationNote(f"@ index {index}", index, item_type))
                errors.append(exc)
        if errors:
            raise IterableValidationError(f"while structuring {type_!r}", errors, type_)
        return make(items)

    return structure


def _is_table(type_: Any) -> bool:
    return get_origin(type_) in (dict, Mapping) and get_args(type_)[:1] == (str,)


def _table_hook(type_: Any) -> _Hook:
    value_type = get_args(type_)[1]

    def structure(value: Any, _type: Any) -> dict[str, Any]:
        if not isinstance(value, Mapping):
            raise _Invalid.here(f"expected a table, got {describe_value(value)}")
        items, errors = {}, []
        for key, item in value.items():
            try:
                items[key] = _converter.structure(item, value_type)
            except Exception as exc:
                exc.add_note(IterableValidationNote(f"@ key {key!r}", key, value_type))
                errors.append(exc)
        if errors:
            raise IterableValidationError(f"while structuring {type_!r}", errors, type_)
        return items

    return structure


def _class_hook(cls: type[Any]) -> _Hook:
    overrides: dict[str, Any] = {}
    for field in attrs.fields(cls):
        if field.metadata.get(_NOT_A_KEY):
            overrides[field.name] = override(omit=True)
        elif _HOOK in field.metadata:
            overrides[field.name] = override(struct_hook=field.metadata[_HOOK])
    generated = make_dict_structure_fn(cls, _converter, **overrides)

    def structure(value: Any, _type: Any) -> Any:
        if not isinstance(value, Mapping):
            raise _Invalid.here(f"expected a table, got {describe_value(value)}")
        try:
            return generated(value, cls)
        except ClassValidationError as exc:
            raise _with_validator_problems(exc, cls, value) from None

    return structure


def _with_validator_problems(
    exc: ClassValidationError, cls: type[Any], raw: Mapping[str, Any]
) -> ClassValidationError:
    # cattrs reports the fields that failed to structure and never calls __init__, so the
    # validators of the other fields would stay silent until the next run: run them here. When
    # __init__ itself failed (a validator), this collects every failing validator, not the first.
    with_notes, without = exc.group_exceptions()
    failed = {note.name for _, note in with_notes}
    problems = _validator_problems(cls, raw, failed)
    if not problems:
        return exc
    kept = [sub for sub, _ in with_notes] + [
        sub for sub in without if not isinstance(sub, _Invalid)
    ]
    return ClassValidationError(exc.message, [*kept, _Invalid(problems)], cls)


def _structure_field(field: attrs.Attribute[Any], value: Any) -> Any:
    hook = field.metadata.get(_HOOK)
    type_: Any = field.type
    return hook(value, type_) if hook is not None else _converter.structure(value, type_)


class _Survivors(tuple[Any, ...]):
    """The items of an array that structured, when others did not; ``positions`` holds the index
    each had in the array (a validator's problems are moved back to those indices)."""

    positions: tuple[int, ...]


def _positions(value: tuple[Any, ...]) -> tuple[int, ...]:
    """The index in the TOML array of each item of ``value`` (some may have been left out)."""
    return value.positions if isinstance(value, _Survivors) else tuple(range(len(value)))


def _survivors(field: attrs.Attribute[Any], value: Any) -> Any:
    """The items of an array field that structure, when some do not (None when none do: an
    emptiness check would report what the type errors already say); a table field's every key,
    those whose value failed given `_UNSTRUCTURED`; None for a field that is neither."""
    type_: Any = field.type
    if _is_array(type_) and isinstance(value, list):
        kept: list[Any] = []
        positions: list[int] = []
        for index, item in enumerate(value):
            try:
                kept.append(_converter.structure(item, get_args(type_)[0]))
            except Exception:  # already reported by cattrs
                continue
            positions.append(index)
        survivors = _Survivors(kept)
        survivors.positions = tuple(positions)
        return survivors if kept else None
    if _is_table(type_) and isinstance(value, Mapping):
        # Every key is kept, so that a key's own checks (a pool's name) still run: one whose
        # value failed is given `_UNSTRUCTURED`, which a validator skips.
        table: dict[str, Any] = {}
        for key, item in value.items():
            try:
                table[key] = _converter.structure(item, get_args(type_)[1])
            except Exception:  # already reported by cattrs
                table[key] = _UNSTRUCTURED
        return table
    return None


def _moved_back(problems: list[_Problem], value: Any) -> list[_Problem]:
    """``problems`` about the survivors ``value``, at the indices their items had in TOML."""
    if not isinstance(value, _Survivors):
        return problems
    moved: list[_Problem] = []
    for path, message in problems:
        if len(path) > 1 and isinstance(path[1], int) and 0 <= path[1] < len(value.positions):
            path = (path[0], value.positions[path[1]], *path[2:])
        moved.append((path, message))
    return moved


def _validator_problems(cls: type[Any], raw: Mapping[str, Any], failed: set[str]) -> list[_Problem]:
    # A field that failed to structure is checked too when it is an array or a table: over the
    # items that did (a type error in pools.gpu must not hide that pools.cpu is 0).
    fields = [f for f in attrs.fields(cls) if not f.metadata.get(_NOT_A_KEY)]
    values: dict[str, Any] = {}
    partial: dict[str, Any] = {}
    for field in fields:
        if field.name in failed:
            if field.validator is not None and field.name in raw:
                survivors = _survivors(field, raw[field.name])
                if survivors is not None:
                    partial[field.name] = survivors
        elif field.name in raw:
            try:
                values[field.name] = _structure_field(field, raw[field.name])
            except Exception:  # already reported by cattrs
                continue
        elif isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
            if not field.default.takes_self:
                values[field.name] = field.default.factory()
        elif field.default is not attrs.NOTHING:
            values[field.name] = field.default
    # Only whole values in the namespace: a cross-field validator never sees survivors.
    namespace = types.SimpleNamespace(**values)
    problems: list[_Problem] = []
    for field in fields:
        value = values.get(field.name, partial.get(field.name, attrs.NOTHING))
        if field.validator is not None and value is not attrs.NOTHING:
            try:
                field.validator(namespace, field, value)
            except _Invalid as exc:
                problems.extend(_moved_back(exc.problems, value))
    return problems


_converter = cattrs.Converter(forbid_extra_keys=True)
for _kind, _accepted, _expected in (
    (str, (str,), "a string"),
    (int, (int,), "an integer"),
    (float, (int, float), "a number"),
    (bool, (bool,), "true or false"),
):
    _converter.register_structure_hook(_kind, _strict(_kind, _accepted, _expected))
_converter.register_structure_hook(Path, _structure_path)
_converter.register_structure_hook(SourceType, _structure_source_type)
_converter.register_structure_hook_factory(_is_array, _array_hook)
_converter.register_structure_hook_factory(_is_table, _table_hook)
_converter.register_structure_hook_factory(attrs.has, _class_hook)
# Registered last so that it wins over the attrs-class factory above.
_converter.register_structure_hook(Disposition, _structure_disposition)


# Turning exceptions into "path: message" lines


def _collect(exc: BaseException, path: tuple[_Segment, ...], out: list[_Problem]) -> None:
    if isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, note in with_notes:
            _collect(sub, (*path, note.name), out)
        for sub in without:
            _collect(sub, path, out)
    elif isinstance(exc, IterableValidationError):
        iter_notes, others = exc.group_exceptions()
        for sub, iter_note in iter_notes:
            _collect(sub, (*path, iter_note.index), out)
        for sub in others:
            _collect(sub, path, out)
    elif isinstance(exc, ForbiddenExtraKeysError):
        keys = [f.name for f in attrs.fields(exc.cl) if not f.metadata.get(_NOT_A_KEY)]
        for key in sorted(exc.extra_fields):
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean {describe_value(close[0])}?)" if close else ""
            out.append(((*path, key), f"unknown key{hint}"))
    elif isinstance(exc, _Invalid):
        out.extend(((*path, *sub), message) for sub, message in exc.problems)
    elif isinstance(exc, KeyError):
        out.append((path, "required key missing"))
    else:
        out.append((path, f"invalid value ({exc})"))


#: Source keys that only a directory source uses, and those only record sources use: a key
#: given to the wrong type would be silently ignored, so it is an error.
DIRECTORY_ONLY_KEYS = (
    "pattern", "recursive", "ignore", "settle", "on_done", "on_dead", "reingest_changed",
)  # fmt: skip
RECORD_ONLY_KEYS = ("id_field",)
#: Stage keys about a process, which a Python stage (``call``) does not have.
COMMAND_ONLY_KEYS = (
    "stall_timeout", "grace_period", "fatal_exit_codes", "env", "cwd", "output_limit", "workdir",
)  # fmt: skip


def _cross_reference_problems(data: Mapping[str, Any]) -> list[_Problem]:
    # Over the raw data, so these are found even when the sections failed to structure; every
    # part of the wrong type is skipped (its structural error is reported elsewhere).
    problems: list[_Problem] = []
    stage_names = _unique_names(data.get("stages"), "stages", "stage", problems)
    _unique_names(data.get("sources"), "sources", "source", problems)
    stages_known = isinstance(data.get("stages", []), list)
    listed_stages = ", ".join(stage_names) or "none defined"

    def check_stage_refs(refs: Any, at: tuple[_Segment, ...]) -> None:
        if stages_known and isinstance(refs, list):
            for index, ref in enumerate(refs):
                if isinstance(ref, str) and ref not in stage_names:
                    message = f"unknown stage {describe_value(ref)} (stages: {listed_stages})"
                    problems.append(((*at, index), message))

    sources = data.get("sources")
    for index, source in enumerate(sources if isinstance(sources, list) else []):
        if isinstance(source, Mapping):
            check_stage_refs(source.get("route"), ("sources", index, "route"))
            kind = source.get("type")
            wrong = DIRECTORY_ONLY_KEYS if kind in ("jsonl", "json") else (
                RECORD_ONLY_KEYS if kind == "directory" else ()
            )  # fmt: skip
            for key in wrong:
                if key in source:
                    only = "record sources (jsonl, json)" if key in RECORD_ONLY_KEYS else (
                        'sources of type "directory"'
                    )  # fmt: skip
                    problems.append(((
                        "sources", index, key), f"only for {only}, not {describe_value(kind)}"
                    ))  # fmt: skip
    faults = data.get("faults")
    if isinstance(faults, Mapping):
        check_stage_refs(faults.get("stages"), ("faults", "stages"))

    stages = data.get("stages")
    for index, stage in enumerate(stages if isinstance(stages, list) else []):
        if not isinstance(stage, Mapping):
            continue
        if "call" in stage and "command" in stage:
            problems.append(
                (("stages", index, "call"), 'a stage has "command" or "call", not both')
            )
        elif "call" not in stage and "command" not in stage:
            problems.append((("stages", index), 'needs "command" (a program and its arguments) or'
                             ' "call" (an async Python function, "module:function")'))  # fmt: skip
        elif "call" in stage:
            for key in COMMAND_ONLY_KEYS:
                if key in stage:
                    message = 'only for stages with a "command", not a "call"'
                    problems.append((("stages", index, key), message))
    pools = data.get("pools", {})
    if isinstance(pools, Mapping) and isinstance(stages, list):
        listed_pools = ", ".join(pools) or "none defined"
        for index, stage in enumerate(stages):
            refs = stage.get("pools") if isinstance(stage, Mapping) else None
            for ref_index, ref in enumerate(refs if isinstance(refs, list) else []):
                if isinstance(ref, str) and ref not in pools:
                    message = f"unknown pool {describe_value(ref)} (pools: {listed_pools})"
                    problems.append((("stages", index, "pools", ref_index), message))
    return problems


def _unique_names(entries: Any, key: str, what: str, problems: list[_Problem]) -> list[str]:
    names: list[str] = []
    for index, entry in enumerate(entries if isinstance(entries, list) else []):
        name = entry.get("name") if isinstance(entry, Mapping) else None
        if not isinstance(name, str):
            continue
        if name in names:
            problems.append(((key, index, "name"), f"duplicate {what} name {describe_value(name)}"))
        else:
            names.append(name)
    return names


def _file_order(data: Any, path: tuple[_Segment, ...]) -> list[int]:
    # tomllib keeps keys in the order they first appear, so positions in the raw data give file
    # order; a missing key sorts after its siblings.
    order: list[int] = []
    node = data
    for segment in path:
        if isinstance(node, Mapping):
            keys = list(node)
            order.append(keys.index(segment) if segment in node else len(keys))
            node = node.get(segment) if isinstance(segment, str) else None
        elif isinstance(node, list) and isinstance(segment, int) and 0 <= segment < len(node):
            order.append(segment)
            node = node[segment]
        else:
            order.append(0)
            node = None
    return order


def _format_path(path: tuple[_Segment, ...]) -> str:
    text = ""
    for segment in path:
        if isinstance(segment, int):
            text += f"[{segment}]"
        else:
            key = segment if _BARE_KEY_RE.fullmatch(segment) else describe_value(segment)
            text += f".{key}" if text else key
    return text


def _render(problems: list[_Problem], data: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    for path, message in sorted(problems, key=lambda problem: _file_order(data, problem[0])):
        line = f"{_format_path(path)}: {message}" if path else message
        if line not in lines:
            lines.append(line)
    return lines


# Public API


def parse_config(data: Mapping[str, Any], *, base_dir: Path, import_calls: bool = False) -> Config:
    """Validate parsed TOML data and build a `Config`.

    Args:
        data: The document as `tomllib` returns it.
        base_dir: The folder relative paths are resolved against (the config file's folder);
            made absolute first.
        import_calls: Also import the function of each Python stage (``call``), as a service
            must before it starts (`orchestrator.calls.import_call`): one that cannot be
            imported is an error like the others, reported with them. Only a config that has
            a ``call`` imports `orchestrator.calls`.

    Returns:
        The config, with every path absolute.

    Raises:
        ConfigError: If anything is wrong; ``errors`` lists every problem as
            ``<path>: <message>`` in file order, and ``path`` is ``None``.
    """
    if not isinstance(data, Mapping):
        raise ConfigError([f"expected a table of settings, got {describe_value(data)}"])
    problems: list[_Problem] = []
    config: Config | None = None
    try:
        config = _converter.structure(data, Config)
    except ClassValidationError as exc:
        _collect(exc, (), problems)
    crossed = _cross_reference_problems(data)
    # A stage with neither "command" nor "call" is said once, not also as an empty command.
    without = {(*path, "command") for path, message in crossed if message.startswith("needs")}
    problems = [p for p in problems if p[0] not in without] + crossed
    base_dir = Path(os.path.normpath(Path(base_dir).absolute()))
    if import_calls:
        problems += _call_problems(data, base_dir)
    if problems or config is None:
        raise ConfigError(_render(problems, data))
    return _resolve_paths(config, base_dir)


def _call_problems(data: Mapping[str, Any], base_dir: Path) -> list[_Problem]:
    # Over the raw data, so that a function that cannot be imported is reported with the rest
    # of the config's problems, not once they are fixed; a malformed call is reported already.
    stages = data.get("stages")
    calls = [
        (index, stage["call"])
        for index, stage in enumerate(stages if isinstance(stages, list) else [])
        if isinstance(stage, Mapping)
        and isinstance(stage.get("call"), str)
        and CALL_RE.fullmatch(stage["call"])
    ]
    if not calls:
        return []
    from orchestrator.calls import import_call  # (trio and the runner: only when a stage calls)

    problems: list[_Problem] = []
    for index, call in calls:
        try:
            import_call(call, base_dir)
        except ValueError as exc:
            problems.append((("stages", index, "call"), str(exc)))
    return problems


def load_config(
    path: str | os.PathLike[str], *, import_calls: bool = False, stream_ok: bool = False
) -> Config:
    """Read a TOML config file and build a `Config`.

    Relative paths in the file are resolved against the file's folder (`config_folder`).

    Args:
        path: The config file.
        import_calls: Also import the Python stages' functions (see `parse_config`).
        stream_ok: A pipe or a terminal may hold the config (``check -c /dev/stdin``): read
            to its end (at once when nobody writes to it).

    Returns:
        The config, with every path absolute.

    Raises:
        ConfigError: If the file cannot be read, is not valid TOML (one error,
            ``line L, column C: <message>``), or does not describe a valid config (every
            problem, as in `parse_config`); ``path`` is the file.
    """
    config_path = Path(path)
    try:
        data = tomllib.loads(read_without_waiting(config_path, stream_ok=stream_ok).decode())
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            [f"cannot read config: {reason[:1].lower()}{reason[1:]}"], path=config_path
        ) from exc
    except UnicodeDecodeError as exc:
        message = f"cannot read config: not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise ConfigError([message], path=config_path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([_syntax_error(exc)], path=config_path) from None
    try:
        return parse_config(data, base_dir=config_folder(config_path), import_calls=import_calls)
    except ConfigError as exc:
        raise ConfigError(exc.errors, path=config_path) from None


def config_folder(path: Path) -> Path:
    """The folder the relative paths of the config at ``path`` are relative to: the file's, or
    the current folder when the config has none of its own.

    A pipe, a terminal, or anything under /dev or /proc/*/fd names no folder that means
    anything for the config (found by an acceptance tester, session 17: ``envsubst < t.toml |
    orchestrator check -c /dev/stdin`` put the state in /dev/state and looked for the Python
    stages' modules in /dev). There the paths are taken as a command would take them: from
    where it is run.
    """
    absolute = os.path.normpath(os.path.abspath(path))
    try:
        mode = os.stat(path).st_mode
    except OSError:
        mode = stat.S_IFREG
    if _NO_FOLDER_RE.fullmatch(absolute) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode):
        return Path.cwd()
    return Path(absolute).parent


#: The keys of a config that the commands reading a service's state need (`load_for_reading`).
READING_KEYS = ("state_dir", "state", "status", "store")
_READING_KEY_RE = re.compile(
    r"^\s*(state_dir\s*=|state\s*=|\[\s*status\s*\]|\[\s*store\s*\]|status\.|store\.)", re.M
)


def load_for_reading(path: str | os.PathLike[str]) -> tuple[Config, list[str]]:
    """The config at ``path`` for a command that only reads the state (``items``, ``show``,
    ``status``, ``health``), and the errors it has.

    A config with errors elsewhere -- an edit half done beside a running service, which keeps
    the config it started with -- still says where the state is: then the config returned is
    made of its `READING_KEYS` and its stages' names only, and its errors are returned to be
    shown as a warning.

    Raises:
        ConfigError: as `load_config`, when the file cannot be read, is not TOML, or the keys
            that say where the state is have errors themselves.
    """
    try:
        return load_config(path), []
    except ConfigError as exc:
        failure = exc
    try:
        text = read_without_waiting(path).decode()
    except (OSError, UnicodeDecodeError):
        raise failure from None
    data = _parse_what_parses(text)
    if data is None:
        raise failure from None
    names = [
        s["name"] for s in data.get("stages", ()) if isinstance(s, dict) and isinstance(s.get("name"), str)
    ] if isinstance(data.get("stages"), list) else []  # fmt: skip
    reduced = {key: data[key] for key in READING_KEYS if key in data}
    reduced["stages"] = [{"name": n, "command": ["true"]} for n in dict.fromkeys(names)] or [
        {"name": "stage", "command": ["true"]}
    ]
    try:
        return parse_config(reduced, base_dir=config_folder(Path(path))), failure.errors
    except ConfigError:
        raise failure from None


def _parse_what_parses(text: str) -> dict[str, Any] | None:
    """``text`` as TOML; or, when it is an edit half done (an unfinished line), the longest
    beginning of it that parses, unless a key saying where the state is comes after that
    (not guessed); or None."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        error = exc
    lines = text.splitlines()
    match = _SYNTAX_ERROR_RE.fullmatch(str(error))
    # From the line the error names (or the end: an array left open is found only there).
    for n in range(int(match["line"]) - 1 if match else len(lines) - 1, -1, -1):
        try:
            data = tomllib.loads("\n".join(lines[:n]))
        except tomllib.TOMLDecodeError:
            continue
        return None if _READING_KEY_RE.search("\n".join(lines[n:])) else data
    return None


def _syntax_error(exc: tomllib.TOMLDecodeError) -> str:
    text = str(exc)
    match = _SYNTAX_ERROR_RE.fullmatch(text)
    if match:
        message = match["msg"]
        return f"line {match['line']}, column {match['col']}: {message[:1].lower()}{message[1:]}"
    return f"invalid TOML: {text[:1].lower()}{text[1:]}"


def _resolve_paths(config: Config, base_dir: Path) -> Config:
    def resolve(path: Path) -> Path:
        return Path(os.path.normpath(base_dir / path))

    def resolve_optional(path: Path | None) -> Path | None:
        return None if path is None else resolve(path)

    def resolve_disposition(disposition: Disposition) -> Disposition:
        return attrs.evolve(disposition, dir=resolve_optional(disposition.dir))

    return attrs.evolve(
        config,
        base_dir=base_dir,
        state_dir=resolve(config.state_dir),
        status=attrs.evolve(config.status, file=resolve_optional(config.status.file)),
        log=attrs.evolve(config.log, file=resolve_optional(config.log.file)),
        sources=tuple(
            attrs.evolve(
                source,
                path=resolve(source.path),
                on_done=resolve_disposition(source.on_done),
                on_dead=resolve_disposition(source.on_dead),
            )
            for source in config.sources
        ),
        stages=tuple(
            attrs.evolve(stage, cwd=resolve_optional(stage.cwd)) for stage in config.stages
        ),
    )
