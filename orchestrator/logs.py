"""Log sinks, configured once by the command line: console for people, optional file, JSON lines.

- The console (stderr; journald under systemd) is for people: one line per event with its
  context, colours on a terminal.
- ``[log] file`` adds a file sink, written by a background thread (a slow SD card never blocks
  the event loop), rotated at ``rotation`` bytes, the last ``retention`` files kept, compressed
  (``compression``, gz by default) -- what a small flash disk that nobody cleans needs.
- ``json = true`` writes JSON lines, one object per event with ``time``, ``level``, ``message``
  and the context keys, to the file; with no file, to the console.

Modules only ``from loguru import logger`` and bind context (``item``, ``stage``, ``attempt``,
``run``, ``source``, ``pool``); every line shows the context it was bound with. Every line of a
run (from its claim to its recorded outcome) carries ``item``, ``stage``, ``attempt`` and ``run``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import traceback
from typing import IO, TYPE_CHECKING, Any

import attrs
from loguru import logger

if TYPE_CHECKING:
    import io

    from loguru import Record

    from orchestrator.config import LogConfig

__all__ = ["configure_logging", "debug_enabled", "printable", "reopen_logs"]

#: loguru's number for DEBUG.
DEBUG_LEVEL = 10

#: Context keys shown on every line, in this order.
CONTEXT_KEYS = ("source", "item", "stage", "attempt", "run", "pool")


def _context(record: Record) -> str:
    extra = record["extra"]
    parts = [f"{k}={extra[k]!r}" if k == "item" else f"{k}={extra[k]}"
             for k in CONTEXT_KEYS if k in extra]  # fmt: skip
    return ("  [" + " ".join(parts) + "]") if parts else ""


def printable(text: str) -> str:
    """``text`` with its control characters escaped, newlines and tabs kept: a stage's output
    tail, a file's name or a record's id can hold terminal escape sequences, which must not
    reach a terminal (or a journal viewer) as commands. (The operator commands show text so.)"""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def _human(record: Record) -> str:
    # A field's value is never read as a template (no brace or markup in it is interpreted).
    record["extra"]["_ctx"] = _context(record)
    message = record["message"]
    if message.isprintable():
        return (
            "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
            "{message}<dim>{extra[_ctx]}</dim>\n{exception}"
        )
    # Not into record["message"]: the record is shared with the other sinks (JSON keeps it).
    record["extra"]["_msg"] = printable(message)
    return (
        "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
        "{extra[_msg]}<dim>{extra[_ctx]}</dim>\n{exception}"
    )


def _json(record: Record) -> str:
    doc: dict[str, Any] = {
        "time": record["time"].isoformat(),
        "level": record["level"].name,
        "message": record["message"],
    }
    doc.update({k: v for k, v in record["extra"].items() if not k.startswith("_")})
    exc = record["exception"]
    if exc is not None and exc.type is not None:
        doc["exception"] = f"{exc.type.__name__}: {exc.value}"
        doc["traceback"] = "".join(traceback.format_exception(exc.type, exc.value, exc.traceback))
    record["extra"]["_json"] = json.dumps(doc, default=str)
    return "{extra[_json]}\n"


class _InterceptHandler(logging.Handler):
    """Sends stdlib logging (hypercorn, ...) to loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def debug_enabled() -> bool:
    """Whether any sink takes DEBUG lines; lines built only for them are skipped otherwise.

    loguru keeps the lowest level of its sinks (not a public attribute): when it is not there,
    the answer is yes, and the lines are built as before.
    """
    return getattr(getattr(logger, "_core", None), "min_level", 0) <= DEBUG_LEVEL


def configure_logging(config: LogConfig | None, *, console_level: str | None = None) -> None:
    """Replace loguru's default sink with ours.

    Args:
        config: the ``[log]`` section (None: console only, INFO).
        console_level: overrides the console's level (a batch with a progress bar shows only
            warnings there; the file, if any, still gets everything at ``log.level``). A
            `reopen_logs` keeps it.
    """
    logger.remove()
    _sinks.clear()
    _sinks["console_level"] = console_level
    _add_sinks(config)
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.INFO, force=True)


def reopen_logs(config: LogConfig | None) -> str | None:
    """Build the sinks again from ``config`` (a reload's ``[log]``): the file is closed and
    opened again at its path, and a changed level, format, file, rotation or retention applies
    from the next line. Returns the log file's path (None: no file, or logging was never
    configured here).

    After logrotate (or a person) renamed the file, the lines go to a new file at the path
    instead of the renamed one. The new file sink is added before the old one goes, so no line
    is lost in between (a line may be in both). The console sink is kept unless its level or
    format changed. Blocks until the old file sink's queue is written out: call it in a worker
    thread.
    """
    if not _sinks:
        return None
    old = dict(_sinks)
    _add_sinks(config, console=old)
    for key in ("console_id", "file_id"):
        if old.get(key) is not None and old[key] != _sinks.get(key):
            logger.remove(old[key])
    return _sinks.get("file")


#: What `configure_logging` set up: the console's level override, the console sink's id and
#: spec (level, JSON or not), the file sink's id and the file's path.
_sinks: dict[str, Any] = {}


def _add_sinks(config: LogConfig | None, *, console: dict[str, Any] | None = None) -> None:
    """Add the sinks ``config`` asks for; keep ``console``'s console sink if it is the same."""
    if config is not None and config.file is not None:
        config.file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Opened now, not at the first line (the sink opens it lazily): a folder, a read-only
        # file system or an immutable file is an error here, before any sink changes, not a
        # traceback per line later.
        fd = os.open(config.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            with contextlib.suppress(OSError):  # older versions made it with the umask's mode
                os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    level = config.level if config is not None else "INFO"
    as_json = config is not None and config.json
    has_file = config is not None and config.file is not None
    console_json = as_json and not has_file  # with a file, JSON goes there; people read stderr
    spec = (_sinks.get("console_level") or level, console_json)
    if console is not None and console.get("console_spec") == spec:
        console_id = console["console_id"]
    else:
        console_id = logger.add(
            sys.stderr, level=spec[0], format=_json if console_json else _human,
            colorize=False if console_json else None, backtrace=False, diagnose=False,
        )  # fmt: skip
    path = file_id = None
    if config is not None and config.file is not None:
        compression = None if config.compression is None else _Compress(config.compression)
        path = str(config.file)
        file_id = logger.add(
            path, level=level, format=_json if as_json else _human, colorize=False,
            rotation=config.rotation_bytes, retention=config.retention, compression=compression,
            enqueue=True, delay=True, backtrace=False, diagnose=False, opener=_private,
        )  # fmt: skip
    _sinks.update(console_id=console_id, console_spec=spec, file_id=file_id, file=path)


def _private(path: str, flags: int) -> int:
    """Open a log file readable by this user only (the lines name items and show output)."""
    return os.open(path, flags, 0o600)


@attrs.frozen
class _Compress:
    """Compress a rotated log file into ``<file>.<kind>``, private like the log, then remove it.

    (loguru's own compression makes the archive with the umask's permissions.) The modules
    are imported on first use: most runs never rotate, and start-up is part of every batch.
    """

    kind: str

    def __call__(self, path: str) -> None:
        target = f"{path}.{self.kind}"
        with open(target, "wb", opener=_private) as out:
            if self.kind == "zip":
                import zipfile

                with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
                    archive.write(path, os.path.basename(path))
            else:
                with self._open(out) as packed, open(path, "rb") as log:
                    shutil.copyfileobj(log, packed)
        os.remove(path)

    def _open(self, out: IO[bytes]) -> io.BufferedIOBase:
        if self.kind == "gz":
            import gzip

            return gzip.GzipFile(fileobj=out, mode="wb")
        if self.kind == "bz2":
            import bz2

            return bz2.BZ2File(out, "wb")
        import lzma

        return lzma.LZMAFile(out, "wb", format=lzma.FORMAT_XZ)
