"""The json source: a file holding one JSON array that its writer rewrites, element by element.

Each element is an object with an ``id_field``; an element whose id the source has not taken
before becomes an item, and a known id is never taken again: the store refuses a duplicate key.
Its payload is the element's text exactly as the file holds it (`split_array`), as the jsonl
source passes its lines: numbers are not read into Python floats and written again. In memory the source keeps the keys of the document it read last
(`JsonArraySource.known`), so an element it saw before costs no question to the store; a writer
that keeps only its latest elements in the file does not make the set grow with its history.
An element that is not an object, has no usable id, holds a number a stage could not parse
(NaN, ``1e999``, an integer of more digits than Python converts), is nested deeper than Python's
JSON reader goes, or holds bytes that are not UTF-8 becomes a ``rejected`` item
(keyed by a hash of its content, so it is rejected once, not at every poll); the others are
taken as usual.

The writer may rewrite the file atomically (rename) or in place. Content that does not parse --
the writer is in the middle of it -- is tried again at the next poll, and a warning is logged
only after `FAILURES_BEFORE_WARNING` polls in a row failed. An unchanged file (same inode, size
and mtime, and not modified within the last `FRESH` seconds, the mtime's granularity) is not
read again. Reading and parsing happen in a worker thread.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import time
from typing import TYPE_CHECKING

import attrs
import trio
from loguru import logger

from orchestrator.sources.jsonl import id_of, json_type, number_problem, open_regular, show_raw
from orchestrator.store.records import ItemState, NewItem

if TYPE_CHECKING:
    from orchestrator.config import SourceConfig
    from orchestrator.workers import Engine

__all__ = ["ArrayRead", "Element", "JsonArraySource", "NotAnArray", "new_elements", "split_array"]

#: Polls in a row that found unparsable content before a warning (a writer mid-rewrite is
#: normal); in batch mode, the source gives up after that many.
FAILURES_BEFORE_WARNING = 5
#: A file modified less than this many seconds ago is read again even if its signature is
#: unchanged: a rewrite within the mtime's granularity would not show in it.
FRESH = 1.0
#: Characters of a rejected element kept in its reason.
ELEMENT_SHOWN = 4096
#: JSON's whitespace, around each element and separator of the array.
_WHITESPACE = re.compile(r"[ \t\n\r]*")
#: A line break and the whitespace after it: in a valid element, only ever between tokens.
_LINE_BREAK = re.compile(r"[\r\n][ \t\r\n]*")
#: Half a surrogate pair: JSON reads one from a string, but UTF-8 cannot hold it.
_SURROGATE = re.compile("[\ud800-\udfff]")


@attrs.frozen
class ArrayRead:
    """What one look at the file found."""

    #: "missing", "unchanged", "failed" or "parsed".
    outcome: str
    items: list[NewItem] = attrs.Factory(list)
    error: str | None = None
    elements: int = 0
    #: The keys of every element the document holds (parsed only).
    keys: set[str] = attrs.Factory(set)
    #: Keys an element repeats of an element before it in the array (only the first is taken).
    duplicates: list[str] = attrs.Factory(list)


@attrs.frozen
class Element:
    """One element of the array, as read."""

    #: The element parsed (a too-long integer in it is kept as its digits: see ``problem``).
    value: object
    #: Its text exactly as the document wrote it: the payload its item gets.
    text: str
    #: Why a stage could not parse it (a number JSON or Python cannot carry), or None.
    problem: str | None = None


class NotAnArray(ValueError):
    """The document is JSON, but not an array."""


def split_array(text: str, *, undecodable: bool = False) -> list[Element]:
    """The elements of the JSON array ``text``, each with its own text (pure).

    An element is read on its own, so its payload can be what the file holds, character for
    character: no number is written again from a Python float (``12345678901234567.89`` and
    ``1e5`` stay as they are), and an element Python cannot read -- an integer of more digits
    than it converts, or one nested deeper than its reader goes -- is kept with its
    ``problem`` instead of failing the document.

    ``undecodable``: ``text`` was decoded with ``surrogateescape`` because the file holds bytes
    that are not UTF-8; each element holding such a byte (a lone surrogate in its own text: the
    JSON escape ``\\udc80`` is six ASCII characters there) gets a ``problem``.

    Raises:
        NotAnArray: JSON, but not an array.
        ValueError: not JSON (a ``JSONDecodeError``, at its place in the whole document).
        RecursionError: the document, not an array, is nested too deep.
    """
    unwritable: list[str] = []  # numbers JSON cannot write, as written, in the element read

    def constant(name: str) -> float:  # NaN, Infinity, -Infinity
        unwritable.append(name)
        return float(name)

    def real(number: str) -> float:  # 1e999 reads as infinity
        value = float(number)
        if math.isinf(value):
            unwritable.append(number)
        return value

    decoder = json.JSONDecoder(parse_constant=constant, parse_float=real)
    index = _skip(text, 0)
    if not text.startswith("[", index):
        document, end = decoder.raw_decode(text, index)
        if _skip(text, end) != len(text):
            raise json.JSONDecodeError("Extra data", text, _skip(text, end))
        raise NotAnArray(f"not a JSON array but {json_type(document)}")
    elements: list[Element] = []
    index = _skip(text, index + 1)
    if text.startswith("]", index):
        end = index + 1
    else:
        while True:
            unwritable.clear()
            problem: str | None = None
            try:
                value, end = decoder.raw_decode(text, index)
            except json.JSONDecodeError:
                raise
            except ValueError:  # an integer past Python's 4,300 digits: this element alone
                value, end, problem = _long_integer(text, index)
            except RecursionError:  # nested deeper than Python's reader goes: this one alone
                end, depth = _container_end(text, index)
                value = text[index:end]  # (not read: its text tells it from other such elements)
                problem = (
                    f"nested {depth} levels deep, deeper than Python's JSON reader goes (a stage"
                    " in Python could not parse its payload)"
                )
            if problem is None and undecodable and _SURROGATE.search(text, index, end):
                value = text[index:end]  # (keyed by its text: its bytes are not text)
                problem = _not_utf8(text[index:end])
            if unwritable:
                problem = number_problem(unwritable[0])
            elements.append(Element(value, text[index:end], problem))
            index = _skip(text, end)
            if text.startswith(",", index):
                index = _skip(text, index + 1)
            elif text.startswith("]", index):
                end = index + 1
                break
            else:
                raise json.JSONDecodeError("Expecting ',' delimiter", text, index)
    if _skip(text, end) != len(text):
        raise json.JSONDecodeError("Extra data", text, _skip(text, end))
    return elements


def _skip(text: str, index: int) -> int:
    match = _WHITESPACE.match(text, index)
    assert match is not None  # (it matches the empty string)
    return match.end()


#: A JSON string, a bracket, or a run of anything else: enough to find where a container ends.
_CONTAINER_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]|[^"\[\]{}]+', re.DOTALL)


def _container_end(text: str, index: int) -> tuple[int, int]:
    """Where the array or object starting at ``index`` ends, and how deep it nests, found by
    its brackets alone (for one too deep for ``json`` to read).

    Raises:
        json.JSONDecodeError: it does not end (the writer is mid-write).
    """
    depth = deepest = 0
    for token in _CONTAINER_TOKEN.finditer(text, index):
        if token[0] in ("[", "{"):
            depth += 1
            deepest = max(deepest, depth)
        elif token[0] in ("]", "}"):
            depth -= 1
            if depth == 0:
                return token.end(), deepest
        elif depth == 0:  # (never: it starts with a bracket, else json would have read it)
            break
    raise json.JSONDecodeError("Unterminated nested element", text, index)


def _not_utf8(element: str) -> str:
    """Why an element read with ``surrogateescape`` is rejected: its first byte that is not
    UTF-8, and where it is in the element."""
    found = _SURROGATE.search(element)
    assert found is not None
    byte = ord(found[0]) - 0xDC00
    at = len(element[: found.start()].encode("utf-8", "surrogateescape"))
    if not 0x80 <= byte <= 0xFF:  # (an encoded surrogate the strict decoding let through)
        return f"holds bytes that are not UTF-8 (at byte {at} of the element)"
    return f"holds bytes that are not UTF-8 (0x{byte:02x} at byte {at} of the element)"


def _long_integer(text: str, index: int) -> tuple[object, int, str]:
    """The element at ``index`` read with its too-long integers kept as their digits, and why
    it is rejected.

    Raises:
        ValueError: it is not JSON after all (a ``JSONDecodeError``: the writer is mid-write).
    """
    long: list[str] = []

    def integer(digits: str) -> object:
        try:
            return int(digits)
        except ValueError:
            long.append(digits)
            return digits

    value, end = json.JSONDecoder(parse_int=integer).raw_decode(text, index)
    assert long, "a JSON element fails with a plain ValueError only over a too-long integer"
    digits = long[0].lstrip("-")
    problem = (
        f"number {long[0][:20]}... has {len(digits)} digits, more than the"
        f" {sys.get_int_max_str_digits()} Python reads in an integer (a stage in Python could not"
        " parse its payload)"
    )
    return value, end, problem


def new_elements(
    config: SourceConfig, elements: list[Element], known: set[str],
    seen: set[str] | None = None, duplicates: list[str] | None = None,
) -> list[NewItem]:  # fmt: skip
    """Items for the elements of the array whose key is not in ``known`` (pure).

    Every element's key is added to ``seen`` when it is given; a key an element repeats of one
    before it, to ``duplicates``.
    """
    assert config.id_field is not None
    route = tuple(config.route)
    seen = set() if seen is None else seen
    items: list[NewItem] = []
    for index, element in enumerate(elements):
        reason = None
        payload = element.text
        if _SURROGATE.search(payload):
            # Half a surrogate pair, read from bytes such as b"\xed\xa0\x80" (only inside a
            # string): the store holds UTF-8 text, so it is kept as the escape JSON reads the same.
            payload = _SURROGATE.sub(lambda m: f"\\u{ord(m[0]):04x}", payload)
        try:
            if element.problem is not None:
                raise ValueError(element.problem)
            if not isinstance(element.value, dict):
                raise ValueError(f"not a JSON object but {json_type(element.value)}")
            key = id_of(element.value, config.id_field)
        except ValueError as exc:
            digest = hashlib.sha256(
                json.dumps(element.value, sort_keys=True, separators=(",", ":")).encode()
            ).hexdigest()[:16]
            key = f"#{digest}"
            reason = f"element {index}: {exc}; element: {_show(payload)}"
        if key in seen:
            if duplicates is not None:
                duplicates.append(key)
            continue
        seen.add(key)
        if key in known:
            continue
        if reason is None:
            items.append(NewItem(id=f"{config.name}:{key}", source=config.name, key=key,
                                 route=route, payload=payload))  # fmt: skip
        else:
            items.append(NewItem(id=f"{config.name}:{key}", source=config.name, key=key,
                                 route=route, state=ItemState.REJECTED, reason=reason))  # fmt: skip
    return items


def _decoded(data: bytes) -> tuple[str, bool]:
    """The file's text as json.loads reads bytes: UTF-8 (a byte-order mark skipped), -16 or -32,
    and surrogates written as bytes let through (`new_elements` escapes them); and whether it
    holds bytes that are not UTF-8.

    Found by an acceptance tester (session 16): one such byte anywhere failed the whole file,
    so no element of it was ever taken. Such bytes are decoded as lone surrogates
    (``surrogateescape``) and only the elements holding them are rejected (`split_array`).
    """
    encoding = json.detect_encoding(data)  # "utf-8-sig" skips a byte-order mark
    try:
        return data.decode(encoding, "surrogatepass"), False
    except UnicodeDecodeError:
        if not encoding.startswith("utf-8"):
            raise
    return data.decode(encoding, "surrogateescape"), True


def _show(text: str) -> str:
    """An element's text for its reason: on one line (a line break and the indentation after
    it, only ever between tokens, become one space), at most `ELEMENT_SHOWN` characters."""
    text = _LINE_BREAK.sub(" ", text)
    if len(text) <= ELEMENT_SHOWN:
        return text
    return f"{text[:ELEMENT_SHOWN]}... (first {ELEMENT_SHOWN} of {len(text)} characters)"


class JsonArraySource:
    """New elements, by ``id_field``, of a JSON array file rewritten by its writer."""

    def __init__(self, config: SourceConfig, known: set[str]) -> None:
        self.config = config
        self.name = config.name
        self.path = os.path.abspath(config.path)
        #: The keys of the elements of the document read last (taken, or refused by the store
        #: as taken before), so the next read offers only what is new in memory.
        self.known = known
        #: (device, inode, size, mtime_ns) of the content last looked at, and whether it parsed.
        self._signature: tuple[int, int, int, int] | None = None
        self._parsed = False
        self._last_error: str | None = None
        #: Polls in a row whose content did not parse.
        self.failures = 0
        #: Repeated ids already warned about (`poll`).
        self._duplicates_said: set[str] = set()
        self._log = logger.bind(source=self.name)

    @property
    def parse_problem(self) -> str | None:
        """Why nothing is taken now, once the file failed to parse long enough to be said."""
        if self.failures < FAILURES_BEFORE_WARNING:
            return None
        return (
            f"{self.path!r} did not parse at {self.failures} polls in a row"
            f" ({self._last_error}); nothing is taken until it does"
        )

    # --- the poller's side (trio) -----------------------------------------------------------

    async def load(self, engine: Engine) -> None:
        """Nothing to learn: the first read offers every element, and the store refuses those
        taken before (once per start, instead of every key the source ever took in memory)."""

    async def poll(self, engine: Engine, *, once: bool) -> bool:
        """Look at the file and ingest new elements; True once it parsed (or, batch, gave up)."""
        found = await trio.to_thread.run_sync(self.read)
        if found.outcome == "failed":
            self.failures += 1
            if self.failures == FAILURES_BEFORE_WARNING:
                self._log.warning(
                    "{} did not parse at {} polls in a row ({}); {}", self.path, self.failures,
                    found.error, "giving up for this batch" if once else "still trying",
                )  # fmt: skip
            if once and self.failures >= FAILURES_BEFORE_WARNING:
                # The batch ends, and says so (exit 1): what the file holds was not taken.
                engine.failed_sources[self.name] = f"{self.path} did not parse: {found.error}"
                return True
            return False
        if self.failures >= FAILURES_BEFORE_WARNING:
            self._log.info("{} parses again", self.path)
        self.failures = 0
        if found.items:
            added = await engine.store.ingest(found.items)
            rejected = [i for i in added if i.state is ItemState.REJECTED]
            if len(added) > len(rejected):
                self._log.info("ingested {} element(s)", len(added) - len(rejected))
            for item in rejected:
                self._log.bind(item=item.id).warning("element rejected: {}", item.reason)
            for item in added:
                engine.admit(item)
        said = [k for k in dict.fromkeys(found.duplicates) if k not in self._duplicates_said]
        if said:  # once per id, not at each read of the same file
            self._duplicates_said.update(said)
            shown = ", ".join(repr(k) for k in said[:5])
            self._log.warning(
                "{} element(s) repeat the id of an element before them in the array ({}{}); "
                "only the first of each is taken", len(said), shown,
                ", ..." if len(said) > 5 else "",
            )  # fmt: skip
        if found.outcome == "parsed":  # only once what it found is in the store
            self.known = found.keys
        return True

    def close(self) -> None:
        """Nothing to let go of (the file is opened only while it is read)."""

    # --- reading (worker thread) ------------------------------------------------------------

    def read(self) -> ArrayRead:
        """Read and parse the file unless it is unchanged (blocking: worker thread)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._signature = None
            return ArrayRead("missing")
        signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        fresh = time.time() - st.st_mtime_ns / 1e9 < FRESH
        if signature == self._signature and not fresh:
            if self._parsed:
                return ArrayRead("unchanged")
            return ArrayRead("failed", error=self._last_error)
        try:
            with open(open_regular(self.path), "rb") as f:
                data = f.read()
        except FileNotFoundError:  # replaced between the stat and the open
            self._signature = None
            return ArrayRead("failed", error="the file was replaced while being read")
        error = None
        elements: list[Element] = []
        try:
            text, undecodable = _decoded(data)
            # NaN, 1e999, 5,000 digits, nested too deep, bytes not UTF-8: that element rejected.
            elements = split_array(text, undecodable=undecodable)
        except NotAnArray as exc:
            error = str(exc)
        # ValueError: also bytes that are not UTF-16/32; RecursionError: not an array, too deep.
        except (ValueError, RecursionError) as exc:
            error = f"not valid JSON: {exc}; starts with {show_raw(data[:80], len(data))}"
        # The signature of what was read: the stat before the read, so a write during the read
        # makes the next poll read again -- as does a file modified just now, whose next rewrite
        # might not change its mtime.
        self._signature = None if fresh else signature
        if error is not None:
            self._parsed, self._last_error = False, error
            return ArrayRead("failed", error=error)
        self._parsed, self._last_error = True, None
        keys: set[str] = set()
        duplicates: list[str] = []
        items = new_elements(self.config, elements, self.known, keys, duplicates)
        return ArrayRead("parsed", items, elements=len(elements), keys=keys, duplicates=duplicates)
