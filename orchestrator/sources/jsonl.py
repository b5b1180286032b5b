"""The jsonl source: records appended to a file, one JSON object per line.

The source reads from its stored position -- the file's (device, inode) and the byte offset just
past the last line it took -- and stores the new position in the same transaction as the items
those lines became (`op_ingest_records`), so a restart after any crash resumes exactly there:
no record is skipped, none is read twice.

- A last line without its newline is still being written: it waits for the newline.
- A line that is not UTF-8, not JSON (``NaN`` and ``Infinity`` are not) or not a JSON object --
  or holds a number too large for a float (``1e999``), lacks ``id_field`` when one is
  configured, or has an id over `MAX_ID_BYTES` or holding NUL or a lone surrogate, or is longer
  than `MAX_LINE` -- becomes a ``rejected`` item whose reason gives the line number, the error
  and the raw bytes (the first 4 KiB, escaped); the lines after it are read as usual. Blank
  lines are skipped.
- Truncation (the file is shorter than the offset, or the bytes before the offset or its first
  bytes are no longer those read there) restarts at offset 0, with a warning. When a file
  rotated away beside the path is a copy of it holding more than was read (logrotate's
  ``copytruncate``), that copy is read from the offset to its end first (`JsonlSource._copy_of`).
- Rotation (another file, or none, at the path): the old file is kept open and read to its end
  through that descriptor -- a writer may still append to it -- and once it has been quiet for
  about one poll (at once in batch mode) the source reads the files rotated away before it got
  to them (`JsonlSource._missed`: beside the path, named after it, modified since the source
  last saw its file at the path), oldest first, each to its end, then follows the file now at
  the path from its start. A restart in the middle of this finds the file it was reading again
  if it was renamed beside the path (by its inode); when it is gone, the source warns, and a
  batch fails the source (exit 1): what was appended to it was not read. A file read again
  (after a restart) adds no record twice (`op_ingest_records`'s ``again``).

An item's id is ``source:<id_field value>`` when ``id_field`` is configured (a record whose id
was taken already is skipped), else ``source:<inode>:<offset>``. The record is the item's payload,
which each stage gets as a JSON file (``{payload}``).

Reading happens in a worker thread, at most `MAX_LINE` + 1 bytes and `STEP_RECORDS` lines per
transaction; a poll takes as many such steps as it needs to reach the end of the file.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import math
import os
import re
import stat
import time
from typing import TYPE_CHECKING

import attrs
import trio
from loguru import logger

from orchestrator.sources.ops import Position, op_ingest_records, op_source_position
from orchestrator.store.records import ItemState, NewItem
from orchestrator.store.sqlite import ESCAPED_MARK

if TYPE_CHECKING:
    from orchestrator.config import SourceConfig
    from orchestrator.store.records import Item
    from orchestrator.workers import Engine

__all__ = [
    "JsonlSource", "Line", "Step", "number_problem", "parse_record", "show_raw", "split_lines",
]  # fmt: skip

#: The longest line, in bytes without its newline (4 MiB); a longer one is rejected (it is
#: skipped up to its newline). A step reads at most one byte more: a line of exactly this
#: length and its newline.
MAX_LINE = 4 << 20
#: Lines per step: one transaction, so a large backlog is ingested in bounded pieces.
STEP_RECORDS = 2000
#: Bytes of a rejected line kept in its reason.
RAW_SHOWN = 4096
#: Bytes read at a time when counting the lines before a stored offset (once, at start).
COUNT_CHUNK = 1 << 20
#: Rejections logged one by one per poll; the rest are counted.
REJECTIONS_LOGGED = 10
#: Bytes before the offset remembered to notice a file truncated and grown back between polls.
TAIL = 64
#: The file's first bytes remembered for the same reason: a file rewritten from its start with
#: other records is noticed even when they end like the old ones (long shared fields).
HEAD = 256
#: A rotated-away file is finished once its size has held still this long (in poll intervals).
QUIET_POLLS = 0.5
#: Seconds a rotated-away file's modification time may lie before the source last saw its file
#: at the path and still count as modified since: file systems stamp times from a coarse clock
#: (a tick, or whole seconds). Taking a file too many only reads it again, which skips what
#: the store holds.
MTIME_SLACK = 1.0
#: Rotated-away files read to their end that are remembered, so as not to read them again.
DONE_KEPT = 64
#: Names of compressed files, which a rotation may leave beside the path: not JSON lines.
COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".lzma", ".z", ".zip", ".br")
#: The name a rotation gives the file: its own, one of these, then a digit (``app.jsonl.1``,
#: ``app.jsonl-20260101``, ``app.jsonl.2026-01-01``) -- not a writer's ``app.jsonl.lock``.
ROTATED_SEPARATORS = (".", "-", "_")
#: What logrotate's ``extension`` puts between the name's stem and its extension: a number
#: after a dot (``app.1.jsonl``) or a date (``app-20260101.jsonl``, ``app_2026-01-01.jsonl``,
#: with hours or seconds after it) -- not a writer's own ``app-2.jsonl``.
_BEFORE_EXTENSION = re.compile(r"\.\d+|[-._]\d{4}-?\d{2}-?\d{2}[-_.\d]*")


def is_rotation_of(name: str, base: str) -> bool:
    """Whether ``name`` is one a rotation gives a file named ``base`` (pure): its own name, a
    separator and a digit (Python's handlers, logrotate), or with logrotate's ``extension``,
    the number or date before the extension (`_BEFORE_EXTENSION`); not a compressed one.

    Found by an acceptance tester (session 16): with ``extension .jsonl`` (``app-20260101.jsonl``)
    the files rotated away before the source read them were not looked for.
    """
    if name.lower().endswith(COMPRESSED):
        return False
    if name.startswith(base) and name[len(base) : len(base) + 1] in ROTATED_SEPARATORS:
        return name[len(base) + 1 : len(base) + 2].isdigit()
    stem, extension = os.path.splitext(base)
    return (
        bool(extension) and name.startswith(stem) and name.endswith(extension)
        and _BEFORE_EXTENSION.fullmatch(name, len(stem), len(name) - len(extension)) is not None
    )  # fmt: skip


@attrs.frozen
class Line:
    """One line of the file, without its newline."""

    offset: int  #: byte offset of its first byte
    number: int  #: 1-based line number in the file
    raw: bytes


def split_lines(
    data: bytes, offset: int, lines_before: int, *, limit: int, final: bool = False
) -> tuple[list[Line], int]:
    """Cut ``data`` (read at ``offset``) into complete lines, at most ``limit`` of them.

    Args:
        lines_before: lines of the file before ``offset`` (numbering goes on from there).
        final: the data ends the file for good: a last line without newline counts too.

    Returns:
        The lines, and how many bytes of ``data`` they span (newlines included).
    """
    lines: list[Line] = []
    pos = 0
    number = lines_before
    while len(lines) < limit:
        end = data.find(b"\n", pos)
        if end < 0:
            if final and pos < len(data):
                lines.append(Line(offset + pos, number + 1, data[pos:]))
                pos = len(data)
            break
        number += 1
        lines.append(Line(offset + pos, number, data[pos:end]))
        pos = end + 1
    return lines, pos


def show_raw(raw: bytes, length: int | None = None, limit: int = RAW_SHOWN) -> str:
    """Bytes as a safe, escaped literal (at most ``limit`` of them), for a reason or a log.

    ``length`` is the length of the whole of which ``raw`` may be only the beginning.
    """
    length = len(raw) if length is None else length
    shown = repr(raw[:limit])
    if length > limit:
        shown += f" (first {limit} of {length} bytes)"
    return shown


_JSON_TYPES = {
    dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean",
    type(None): "null",
}  # fmt: skip


def json_type(value: object) -> str:
    """How JSON calls the type of a parsed value (for messages)."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


#: The longest record id, in UTF-8 bytes. A stage gets its item's id as one argument and in
#: ``ORCH_ITEM``, and Linux refuses to start a program with an argument or an environment
#: entry of 128 KiB or more: a longer id could never run, and failed every attempt.
MAX_ID_BYTES = 65_536


def id_of(record: dict[str, object], field: str) -> str:
    """The item key a record's ``field`` gives it: the string, or an integer's decimal digits
    (so ``1`` and ``"1"`` are the same id, taken once).

    Raises:
        ValueError: the field is missing, empty, too long, not a string or an integer, or holds
            what a stage cannot be given (NUL) or the store cannot hold (a lone surrogate).
    """
    if field not in record:
        raise ValueError(f"no {field!r} field")
    value = record[field]
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{field!r} must be a string or an integer, not {json_type(value)}")
    key = str(value)
    if not key:
        raise ValueError(f"{field!r} is empty")
    # Found by an acceptance tester (session 16): an id holding "\u0000" was taken, then every
    # run failed ("embedded null byte": no argument or environment entry can hold NUL) and a
    # requeue failed the same way; one holding a lone surrogate ("\ud800") was rejected by the
    # store, without the line it came from. Both are refused here, with the line.
    if "\0" in key:
        raise ValueError(
            f"{field!r} holds a NUL character (\\u0000), which no program can be given in its"
            " arguments or environment"
        )
    size = len(key)
    if not key.isascii():
        try:
            size = len(key.encode())
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"{field!r} holds {key[exc.start]!r}, a lone UTF-16 surrogate, which is not"
                " valid UTF-8 text (the store cannot hold it)"
            ) from None
    if size > MAX_ID_BYTES:
        raise ValueError(
            f"{field!r} is {size} bytes long; a stage can be given an id of at most"
            f" {MAX_ID_BYTES} bytes"
        )
    return key


#: What Python's json reads (and writes) for NaN and the infinities, which JSON does not have.
NON_FINITE_CONSTANTS = ("NaN", "Infinity", "-Infinity")


def number_problem(text: str) -> str:
    """Why a record holding the number ``text`` (as written) is rejected: ``NaN`` and
    ``Infinity`` are not JSON, and a number too large for a float (``1e999``) reads as infinity.
    Python reads all three, and a stage's strict parser would fail on the payload every attempt
    (or read another number). Both record sources say it in these words."""
    if text in NON_FINITE_CONSTANTS:
        return f"not valid JSON ({text} is not a JSON number)"
    sign = "-" if text.startswith("-") else ""
    return (
        f"number {text} is out of range (it reads as {sign}infinity, which JSON has no number for)"
    )


class _NumberProblem(ValueError):
    """A number JSON cannot carry, in `number_problem`'s words."""


def _not_json(constant: str) -> object:
    """``json.loads``'s hook for ``NaN``, ``Infinity`` and ``-Infinity``."""
    raise _NumberProblem(number_problem(constant))


def _finite(text: str) -> float:
    """``json.loads``'s hook for numbers with a fraction or an exponent: not one past a float's
    range (integers have no such limit, and come back written as they were)."""
    value = float(text)
    if math.isinf(value):
        raise _NumberProblem(number_problem(text))
    return value


def strict_json(text: str | bytes) -> object:
    """``json.loads`` without NaN, Infinity or a number that reads as infinity (``1e999``).

    Raises:
        ValueError: not JSON, or holding one of those (`number_problem` says which).
    """
    return json.loads(text, parse_constant=_not_json, parse_float=_finite)


def parse_record(raw: bytes, id_field: str | None) -> tuple[str, str | None] | None:
    """Check one line: ``(payload text, id)``; None for a blank line (pure).

    Raises:
        ValueError: why the line is not a valid record.
    """
    if not raw.strip():
        return None
    if raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark, as some Windows tools write first
        raw = raw[3:]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        record = strict_json(text)
    except _NumberProblem as exc:  # NaN, Infinity, 1e999
        raise ValueError(str(exc)) from None
    except ValueError as exc:  # a JSONDecodeError
        raise ValueError(f"not valid JSON ({exc})") from None
    except RecursionError:
        raise ValueError("not valid JSON (nested too deeply)") from None
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object but {json_type(record)}")
    key = id_of(record, id_field) if id_field is not None else None
    return text.strip(), key


@attrs.define
class _Open:
    fd: int
    device: int
    inode: int
    path: str
    #: Found beside the path (rotated away): a restart may come upon it again.
    beside: bool = False


@attrs.frozen
class _Skip:
    """A line longer than `MAX_LINE`, being skipped up to its newline."""

    offset: int
    number: int
    head: bytes
    scanned: int  #: searched for its newline up to here


@attrs.frozen
class Step:
    """What one read found: records, and where the source stands after them."""

    records: list[tuple[NewItem, bool]] = attrs.Factory(list)
    #: Stored together with the records (None: the stored position stays).
    position: Position | None = None
    offset: int = 0
    lines: int = 0
    #: A limit cut the read short, or the source moved to another file: read again at once.
    more: bool = False
    #: Everything the source holds now is read (an incomplete last line aside).
    at_end: bool = True
    #: The rotated-away file is finished: close it.
    finish: bool = False
    skip: _Skip | None = None
    #: The last bytes before ``offset`` (None: unchanged).
    tail: bytes | None = None
    #: The file's first bytes (None: unchanged).
    head: bytes | None = None
    #: The records come from a file beside the path, perhaps read before (`op_ingest_records`).
    again: bool = False


class JsonlSource:
    """Records appended to a JSON-lines file, followed across truncation and rotation."""

    def __init__(self, config: SourceConfig, position: Position | None = None) -> None:
        self.config = config
        self.name = config.name
        self.path = os.path.abspath(config.path)
        #: The committed position (as the store holds it).
        self.stored = position
        self._file: _Open | None = None
        #: Where reading goes on in the open file, and the lines before that.
        self.offset = 0
        self.lines = 0
        self._skip: _Skip | None = None
        self._tail = b""
        self._head = b""
        #: While the open file is no longer at the path: its size and since when it held it.
        self._rotated: tuple[int, float] | None = None
        #: The last file was read to its end and let go (no warning when it is gone).
        self._finished = False
        #: When the file followed was last seen at the path (see `Position.seen`).
        self._seen = position.seen if position is not None else None
        #: Rotated-away files read to their end: (device, inode) -> (size, mtime in ns) then.
        self._done: dict[tuple[int, int], tuple[int, int]] = {}
        #: Why records may have been lost, when they may have (a batch then fails the source).
        self.gap: str | None = None
        self._log = logger.bind(source=self.name)

    # --- the poller's side (trio) -----------------------------------------------------------

    async def load(self, engine: Engine) -> None:
        """Learn the stored position."""
        self.stored = await engine.store.read(lambda c: op_source_position(c, self.name))
        if self.stored is not None:
            self._seen = self.stored.seen

    async def poll(self, engine: Engine, *, once: bool) -> bool:
        """Read what was appended and ingest it; True once at the end of the file."""
        rejected: list[Item] = []
        while True:
            step = await trio.to_thread.run_sync(self.read, once)
            if step.records or step.position is not None:
                added = await engine.store.call(functools.partial(
                    op_ingest_records, source=self.name, records=step.records,
                    position=step.position, again=step.again,
                ))  # fmt: skip
                self._report(step, added, rejected)
                for item in added:
                    engine.admit(item)
            self.apply(step)
            if not step.more:
                break
        for item in rejected[:REJECTIONS_LOGGED]:
            self._log.bind(item=item.id).warning("record rejected: {}", item.reason)
        if len(rejected) > REJECTIONS_LOGGED:
            self._log.warning(
                "... and {} more record(s) rejected", len(rejected) - REJECTIONS_LOGGED
            )
        if once and self.gap is not None:
            # The batch ends, and says so (exit 1): what the source was given may not all be in.
            engine.failed_sources[self.name] = self.gap
        return step.at_end

    def _report(self, step: Step, added: list[Item], rejected: list[Item]) -> None:
        good = [i for i in added if i.state is not ItemState.REJECTED]
        rejected += [i for i in added if i.state is ItemState.REJECTED]
        if good:
            self._log.info("ingested {} record(s)", len(good))
        skipped = len(step.records) - len(added)
        if skipped:
            # Which: a correction sent under a known id is ignored, and someone will ask why.
            left = collections.Counter(i.key for i in added)
            ids: list[str] = []
            for new, _ in step.records:
                if left[new.key]:
                    left[new.key] -= 1
                elif len(ids) < 3:
                    ids.append(new.key)
            self._log.info(
                "skipped {} record(s) whose id was taken already ({}{})", skipped,
                ", ".join(repr(i) for i in ids), ", …" if skipped > len(ids) else "",
            )  # fmt: skip

    def close(self) -> None:
        """Let go of the open file."""
        if self._file is not None:
            os.close(self._file.fd)
            self._file = None

    def apply(self, step: Step) -> None:
        """Take ``step`` as done (its records are committed)."""
        self.offset, self.lines, self._skip = step.offset, step.lines, step.skip
        if step.tail is not None:
            self._tail = step.tail
        if step.head is not None:
            self._head = step.head
        if step.position is not None:
            self.stored = step.position
        if step.finish:
            self.close()
            self._rotated = None
            self._finished = True

    # --- reading (worker thread) ------------------------------------------------------------

    def read(self, hurry: bool = False) -> Step:
        """Read the next piece of the file (blocking: worker thread); `apply` it once committed.

        Args:
            hurry: finish a rotated-away file as soon as it is read to its end (batch mode)
                rather than once it has been quiet for a poll.
        """
        if self._file is None:
            self._open()
            if self._file is None:
                return Step(offset=self.offset, lines=self.lines)
        f = self._file
        now = time.time()  # (before the look at the path: a file rotated away later is newer)
        size = os.fstat(f.fd).st_size
        if self._truncated(f, size):
            copy = self._copy_of(f)
            if copy is not None and self._attach_beside(copy, self.offset):
                os.close(f.fd)
                self._log.warning(
                    "{} was truncated (now {} bytes, was read up to byte {}), and {} is a copy"
                    " of it (copytruncate): reading the copy from there to its end, then {}"
                    " from its start", f.path, size, self.offset, copy, f.path,
                )  # fmt: skip
                return Step(offset=self.offset, lines=self.lines, more=True, at_end=False)
            self._log.warning(
                "{} was truncated (now {} bytes, was read up to byte {}); reading it again "
                "from its start", f.path, size, max(self.offset, self._skip.scanned if self._skip else 0),
            )  # fmt: skip
            self.offset, self.lines, self._skip, self._tail, self._head = 0, 0, None, b"", b""
        rotated = self._moved(f)
        if not rotated:
            self._seen = now
        elif self._rotated is None or self._rotated[0] != size:
            self._rotated = (size, time.monotonic())
        quiet = rotated and (
            hurry or (
                self._rotated is not None
                and time.monotonic() - self._rotated[1] >= QUIET_POLLS * self.config.poll_interval
            )
        )  # fmt: skip
        if self._skip is not None:
            return self._read_skipping(f, size, final=quiet)
        start = self.offset
        data = os.pread(f.fd, min(MAX_LINE + 1, size - start), start) if size > start else b""
        if len(data) > MAX_LINE and b"\n" not in data:
            # One line longer than MAX_LINE: reject it once its newline shows up (or, in a
            # rotated-away file, its end).
            skip = _Skip(start, self.lines + 1, data[:RAW_SHOWN], start + len(data))
            return Step(offset=start, lines=self.lines, more=True, at_end=False, skip=skip)
        to_end = start + len(data) >= size
        lines, used = split_lines(data, start, self.lines, limit=STEP_RECORDS,
                                  final=quiet and to_end)  # fmt: skip
        records = [r for r in (self._record(f, line) for line in lines) if r is not None]
        end = start + used
        number = lines[-1].number if lines else self.lines
        if quiet and end >= size:
            return self._finish(f, records, end, number)
        more = end < size and (len(lines) == STEP_RECORDS or not to_end)
        tail = (self._tail + data[:used])[-TAIL:] if used else None
        head = self._head_to(f, end)
        return Step(
            records=records, offset=end, lines=number, more=more, at_end=not more and not rotated,
            position=self._position(f, end, self._tail if tail is None else tail, head),
            tail=tail, head=head, again=f.beside,
        )  # fmt: skip

    def _read_skipping(self, f: _Open, size: int, *, final: bool) -> Step:
        skip = self._skip
        assert skip is not None
        data = os.pread(f.fd, min(MAX_LINE + 1, size - skip.scanned), skip.scanned)
        newline = data.find(b"\n")
        if newline < 0 and not (final and skip.scanned + len(data) >= size):
            scanned = skip.scanned + len(data)
            return Step(
                offset=self.offset, lines=self.lines, skip=attrs.evolve(skip, scanned=scanned),
                more=scanned < size, at_end=scanned >= size and not final,
            )  # fmt: skip
        end = skip.scanned + (newline + 1 if newline >= 0 else len(data))
        length = end - skip.offset - (1 if newline >= 0 else 0)
        error = f"longer than {_size(MAX_LINE)} ({length} bytes)"
        line = Line(skip.offset, skip.number, skip.head)
        record = self._rejected(f, line, error, length)
        tail = data[: end - skip.scanned][-TAIL:]
        head = self._head_to(f, end)
        return Step(
            records=[record], position=self._position(f, end, tail, head), offset=end,
            lines=skip.number, more=True, at_end=False, tail=tail, head=head, again=f.beside,
        )  # fmt: skip

    def _finish(self, f: _Open, records: list[tuple[NewItem, bool]], end: int, number: int) -> Step:
        """The rotated-away file is read to its end: store where the next file starts -- one
        rotated away too before it was read, oldest first, else the path's."""
        st = os.fstat(f.fd)
        self._done[(f.device, f.inode)] = (st.st_size, st.st_mtime_ns)
        while len(self._done) > DONE_KEPT:
            del self._done[next(iter(self._done))]
        missed = self._missed()
        try:
            now_at_path = os.stat(self.path)
        except FileNotFoundError:
            now_at_path = None
        follow = missed[0][1] if missed else now_at_path
        if follow is None:
            position = Position(f.device, f.inode, end, seen=self._seen)
            self._log.info("{} was removed and is read to its end", f.path)
        else:
            position = Position(follow.st_dev, follow.st_ino, 0, seen=self._seen)
            # (The next read says which rotated-away file it reads first, when there is one.)
            self._log.info(
                "{} was rotated and is read to its end{}", f.path,
                "" if missed else f"; following {self.path} from its start",
            )  # fmt: skip
        return Step(
            records=records, position=position, offset=0, lines=0, more=True, at_end=False,
            finish=True, tail=b"", head=b"", again=f.beside,
        )  # fmt: skip

    def _head_to(self, f: _Open, end: int) -> bytes | None:
        """The file's first bytes up to ``end`` (at most HEAD); None when they are known."""
        want = min(HEAD, end)
        return None if len(self._head) >= want else os.pread(f.fd, want, 0)

    def _position(self, f: _Open, end: int, tail: bytes, head: bytes | None) -> Position | None:
        position = Position(f.device, f.inode, end, tail, self._head if head is None else head,
                            self._seen)  # fmt: skip
        # Found by an acceptance tester (session 17): a file rewritten in place with as many
        # bytes was read again from its start up to the same offset; the position compares
        # equal (tail and head are not part of it), so the new tail and head were never
        # stored, and every later start found the file "truncated" and took its records again.
        stored = self.stored
        if stored is not None and position == stored:
            if (position.tail, position.head) == (stored.tail, stored.head):
                return None
        return position

    def _record(self, f: _Open, line: Line) -> tuple[NewItem, bool] | None:
        try:
            parsed = parse_record(line.raw, self.config.id_field)
        except ValueError as exc:
            return self._rejected(f, line, str(exc), len(line.raw))
        if parsed is None:
            return None
        payload, key = parsed
        route = tuple(self.config.route)
        if key is not None:
            item = NewItem(id=f"{self.name}:{key}", source=self.name, key=key, route=route,
                           payload=payload)  # fmt: skip
            return item, False
        key = f"{f.inode}:{line.offset}"
        item = NewItem(id=f"{self.name}:{key}", source=self.name, key=key, route=route,
                       payload=payload)  # fmt: skip
        return item, True

    def _rejected(self, f: _Open, line: Line, error: str, length: int) -> tuple[NewItem, bool]:
        shown = show_raw(line.raw, length)
        key = f"{f.inode}:{line.offset}"
        if self.config.id_field is not None:
            # Where ids are the keys, a line without a usable one is keyed by its place with a
            # mark no id holds (ids holding NUL are refused): a record whose id is "123:58"
            # was taken for the line rejected at inode 123, byte 58, and skipped (found by an
            # acceptance tester, session 16).
            key = ESCAPED_MARK + key
        reason = f"line {line.number} (byte {line.offset}) of {f.path}: {error}; raw: {shown}"
        item = NewItem(
            id=f"{self.name}:{key}", source=self.name, key=key, route=tuple(self.config.route),
            state=ItemState.REJECTED, reason=reason,
        )  # fmt: skip
        return item, True

    def _truncated(self, f: _Open, size: int) -> bool:
        reached = max(self.offset, self._skip.scanned if self._skip is not None else 0)
        if size < reached:
            return True
        if self.offset == 0:
            return False
        # Found by an acceptance tester (session 16): a file truncated and written again with
        # records ending like the old ones (long shared fields) had the same bytes before the
        # offset, and the records before it were never read. Its first bytes differ.
        if self._head and os.pread(f.fd, len(self._head), 0) != self._head:
            return True
        # Shrunk and grown again past the offset between two polls: the bytes before the offset
        # are no longer those read there (after a restart, all we know is that a line ended).
        tail = self._tail or b"\n"
        return os.pread(f.fd, len(tail), self.offset - len(tail)) != tail

    def _copy_of(self, f: _Open) -> str | None:
        """A copy of the truncated file ``f`` beside the path that holds more than was read.

        Found by an acceptance tester (session 17): logrotate's ``copytruncate`` copies the
        file beside the path (``app.jsonl.1``), then truncates it; what was appended after the
        source's last read is in the copy only, and was lost. A copy is a file `_missed` finds
        (named as a rotation names it, modified since the source last saw its file) that is
        longer than the offset, and holds the file's first bytes and those before the offset.
        """
        if f.beside or self.offset == 0 or self._skip is not None:
            return None
        tail = self._tail or b"\n"
        for path, st in self._missed():
            if st.st_size <= self.offset:
                continue
            try:
                fd = open_regular(path)
            except OSError:
                continue
            try:
                same = (
                    os.pread(fd, len(self._head), 0) == self._head
                    and os.pread(fd, len(tail), self.offset - len(tail)) == tail
                )  # fmt: skip
            except OSError:
                same = False
            finally:
                os.close(fd)
            if same:
                return path
        return None

    def _moved(self, f: _Open) -> bool:
        """Whether the path no longer names the open file (rotated away, or removed)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (st.st_dev, st.st_ino) != (f.device, f.inode)

    def _open(self) -> None:
        stored = self.stored
        try:
            st: os.stat_result | None = os.stat(self.path)
        except FileNotFoundError:
            st = None
        if stored is not None and (
            st is None or (st.st_dev, st.st_ino) != (stored.device, stored.inode)
        ):
            # After a restart, the file we were reading may have been renamed beside the path.
            # (One this process finished is not looked for: what it was given is all read.)
            beside = None if self._finished else self._find_beside(stored)
            if beside is not None and self._attach_beside(beside, stored.offset, stored):
                if stored.offset > 0:
                    self._log.info("resuming {} at byte {}: it was rotated away from {}",
                                   beside, stored.offset, self.path)  # fmt: skip
                return
            if beside is None and stored.offset > 0 and not self._finished:
                gap = (
                    f"the file read up to byte {stored.offset} (inode {stored.inode}) is no"
                    f" longer at {self.path} nor beside it: what was appended to it after that"
                    " was not read"
                )
                if gap != self.gap:
                    self.gap = gap
                    self._log.warning("{}", gap)
            # Found by an acceptance tester (session 16): rotated twice between two reads, the
            # file in the middle was never read. Files rotated away since the source last saw
            # its file at the path, and not read, come before the path's.
            for path, _ in self._missed():
                if self._attach_beside(path, 0):
                    self._log.info("reading {} from its start: it was rotated away from {} "
                                   "before it was read", path, self.path)  # fmt: skip
                    return
            if st is None:
                return
            stored = None
        if st is None:
            return
        self._attach(self.path, stored.offset if stored is not None else 0, stored)

    def _attach_beside(self, path: str, offset: int, expect: Position | None = None) -> bool:
        """`_attach` a file beside the path (strictly); one that cannot be read is said, and
        passed over from then on rather than tried at every poll."""
        try:
            return self._attach(path, offset, expect, strict=True)
        except OSError as exc:
            gap = f"{path} was rotated away from {self.path} and cannot be read: {exc}"
            if gap != self.gap:
                self.gap = gap
                self._log.warning("{}", gap)
            with contextlib.suppress(OSError):
                st = os.stat(path)
                self._done[(st.st_dev, st.st_ino)] = (st.st_size, st.st_mtime_ns)
            return False

    def _attach(
        self, path: str, offset: int, expect: Position | None = None, *, strict: bool = False
    ) -> bool:
        """Open ``path`` to read from ``offset``; False (nothing opened) when ``strict`` and it
        is not the ``expect``-ed file (or is gone)."""
        try:
            fd = open_regular(path)
        except FileNotFoundError:
            if strict:
                return False
            raise
        try:
            st = os.fstat(fd)
            if expect is not None and (st.st_dev, st.st_ino) != (expect.device, expect.inode):
                if strict:
                    os.close(fd)
                    return False
                offset = 0  # replaced between the stat and the open: a new file
            lines = _count_lines(fd, min(offset, st.st_size)) if offset else 0
        except BaseException:
            os.close(fd)
            raise
        self._file = _Open(fd, st.st_dev, st.st_ino, path, beside=path != self.path)
        self.offset, self.lines, self._skip, self._rotated = offset, lines, None, None
        # The stored bytes before the stored offset, and the file's first ones: the first read
        # checks the file still has them there (a file recreated under a reused inode, or
        # rewritten from its start, does not).
        resumed = expect is not None and offset == expect.offset and offset > 0
        self._tail = expect.tail if resumed and expect is not None else b""
        self._head = expect.head if resumed and expect is not None else b""
        self._finished = False
        return True

    def _missed(self) -> list[tuple[str, os.stat_result]]:
        """Files rotated away from the path that the source has not read, oldest first.

        That is, in the path's folder, regular files named as a rotation names it
        (`ROTATED_SEPARATORS`; not compressed), modified since the source last saw its file at
        the path, and neither read to their end (as they are now) nor the path's file.
        """
        if self._seen is None:
            return []
        since = self._seen - MTIME_SLACK
        folder, base = os.path.split(self.path)
        try:
            st = os.stat(self.path)
            at_path: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            at_path = None
        found: list[tuple[str, os.stat_result]] = []
        try:
            with os.scandir(folder) as listing:
                for entry in listing:
                    if not is_rotation_of(entry.name, base):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    ident = (st.st_dev, st.st_ino)
                    if (
                        not stat.S_ISREG(st.st_mode) or st.st_mtime < since or ident == at_path
                        or self._done.get(ident) == (st.st_size, st.st_mtime_ns)
                    ):  # fmt: skip
                        continue
                    found.append((entry.path, st))
        except OSError:
            return []
        return sorted(found, key=lambda pair: (pair[1].st_mtime_ns, pair[0]))

    def _find_beside(self, stored: Position) -> str | None:
        """The file with the stored inode in the path's folder (where rotation renames it)."""
        folder = os.path.dirname(self.path)
        try:
            with os.scandir(folder) as listing:
                for entry in listing:
                    if entry.inode() != stored.inode or entry.path == self.path:
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if st.st_dev == stored.device and entry.is_file(follow_symlinks=False):
                        return entry.path
        except OSError:
            return None
        return None


def _size(n: int) -> str:
    """A byte count as the README gives it (``4 MiB``)."""
    return f"{n >> 20} MiB" if n and n % (1 << 20) == 0 else f"{n} bytes"


class NotARegularFile(OSError):
    """A record source's path names a folder, a FIFO, a socket or a device."""


def open_regular(path: str) -> int:
    """Open ``path`` for reading, refusing anything but a regular file (blocking: thread).

    Opened without waiting: a plain ``open`` of a FIFO waits for a writer, for ever, in a
    thread that shutdown then waits for (found in session 6).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = (
                "a folder"
                if stat.S_ISDIR(mode)
                else "a FIFO"
                if stat.S_ISFIFO(mode)
                else ("a socket" if stat.S_ISSOCK(mode) else "a device")
            )
            raise NotARegularFile(f"{path!r} is {kind}, not a regular file")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _count_lines(fd: int, end: int) -> int:
    count = 0
    offset = 0
    while offset < end:
        chunk = os.pread(fd, min(COUNT_CHUNK, end - offset), offset)
        if not chunk:
            break
        count += chunk.count(b"\n")
        offset += len(chunk)
    return count
