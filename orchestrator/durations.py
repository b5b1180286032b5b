"""Durations and sizes as written in a config file, and how to print them back.

Synopsis::

    parse_duration("1m30s")   # 90.0 (float seconds, the unit used everywhere)
    parse_duration(30)        # 30.0
    parse_size("1.5 MiB")     # 1572864 (int bytes)
    format_duration(5400)     # "1h30m"

Durations are a number of seconds (``30``, ``1.5``, ``"30"``) or a string of one or more
``<number><unit>`` parts with the units in decreasing order: ``ms``, ``s``, ``m``, ``h``,
``d`` (``"250ms"``, ``"30s"``, ``"5m"``, ``"1h30m"``, ``"1.5s"``, ``"1d"``). Units are lower case
(``"5M"`` could mean months or megabytes, so it is refused). Negative durations are refused.

Sizes are a number of bytes (``512``, ``"512"``) or a number with a unit, a space optional and
the unit's case ignored: ``B``; ``KB`` ``MB`` ``GB`` ``TB`` are powers of 1000; ``KiB`` ``MiB``
``GiB`` ``TiB`` and the one-letter ``K`` ``M`` ``G`` ``T`` are powers of 1024. ``b`` means bytes,
never bits.
"""

from __future__ import annotations

import datetime
import json
import math
import re
from collections.abc import Mapping
from decimal import Decimal

__all__ = ["describe_value", "format_duration", "format_size", "parse_duration", "parse_size"]

# Seconds per duration unit, largest first: parts of a duration must follow this order.
DURATION_UNITS: dict[str, float] = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}

# Bytes per size unit (lower case); the ``i`` forms and bare letters are binary, as in ``ls -h``.
SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}

# Longest rendering of a bad value in an error message; a whole array or table can be huge.
MAX_DESCRIBED_CHARS = 80

_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_BARE_NUMBER_RE = re.compile(rf"\s*({_NUMBER})\s*")
_DURATION_PART_RE = re.compile(rf"\s*({_NUMBER})\s*(ms|s|m|h|d)\s*")
_SIZE_RE = re.compile(rf"\s*({_NUMBER})\s*([A-Za-z]*)\s*")


def describe_value(value: object) -> str:
    """Render a config value the way a TOML file spells it, for error messages.

    Strings come out in double quotes (``"soon"``), booleans as ``true``/``false``, arrays and
    tables with a leading word (``array ["a", 1]``, ``table {a = 1}``), so an error says both
    what was found and what kind of thing it is. Long renderings are cut with ``…``.

    Args:
        value: Anything that ``tomllib`` can produce (other objects fall back to ``repr``).

    Returns:
        A one-line description, at most about ``MAX_DESCRIBED_CHARS`` characters long.
    """
    text = _toml(value)
    if isinstance(value, list | tuple):
        text = f"array {text}"
    elif isinstance(value, Mapping):
        text = f"table {text}"
    elif isinstance(value, datetime.datetime | datetime.date | datetime.time):
        text = f"{type(value).__name__} {text}"
    if len(text) > MAX_DESCRIBED_CHARS:
        text = text[: MAX_DESCRIBED_CHARS - 1] + "…"
    return text


def _toml(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, datetime.datetime | datetime.date | datetime.time):
        return value.isoformat()
    return repr(value)


def parse_duration(value: object) -> float:
    """Turn a duration from a config file into float seconds.

    Args:
        value: A non-negative int or float (seconds), a numeric string (``"30"``), or a
            string of unit parts in decreasing order (``"250ms"``, ``"1m30s"``, ``"2h"``,
            ``"1d"``); see the module docstring. ``True``/``False`` are not durations.

    Returns:
        The duration in seconds, finite and ``>= 0``.

    Raises:
        ValueError: If ``value`` is not a duration; the message shows the value, for example
            ``expected a duration like "30s", got "soon"``.
    """
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = _parse_duration_text(value)
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f'expected a duration like "30s", got {describe_value(value)}')
    return seconds


def _parse_duration_text(text: str) -> float | None:
    bare = _BARE_NUMBER_RE.fullmatch(text)
    if bare:
        return float(bare.group(1))
    units = list(DURATION_UNITS)
    total = 0.0
    position = 0
    last_unit = -1
    while position < len(text):
        part = _DURATION_PART_RE.match(text, position)
        if part is None:
            return None
        unit = units.index(part.group(2))
        if unit <= last_unit:  # "30s1m" or "1m1m": almost certainly a typo
            return None
        last_unit = unit
        total += float(part.group(1)) * DURATION_UNITS[part.group(2)]
        position = part.end()
    return total if last_unit >= 0 else None


def parse_size(value: object) -> int:
    """Turn a size from a config file into a number of bytes.

    Args:
        value: A non-negative int (bytes), a whole float, or a string such as ``"512"``,
            ``"10 KB"``, ``"10KB"``, ``"1.5 MiB"``, ``"2 GB"``; see the module docstring for the
            units.

    Returns:
        The size in bytes (fractions of a byte are dropped).

    Raises:
        ValueError: If ``value`` is not a size; the message shows the value, for example
            ``expected a size like "10 MB", got "huge"``.
    """
    size: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    elif isinstance(value, float) and value.is_integer():
        size = int(value)
    elif isinstance(value, str):
        match = _SIZE_RE.fullmatch(value)
        if match and match.group(2).lower() in SIZE_UNITS:
            size = int(Decimal(match.group(1)) * SIZE_UNITS[match.group(2).lower()])
    if size is None or size < 0:
        raise ValueError(f'expected a size like "10 MB", got {describe_value(value)}')
    return size


def format_duration(seconds: float | None) -> str:
    """Render float seconds the way a config file would write them.

    The result parses back with `parse_duration` (to the millisecond).

    Args:
        seconds: A duration in seconds, or ``None`` for "no limit".

    Returns:
        ``"250ms"``, ``"30s"``, ``"1.5s"``, ``"5m"``, ``"1h30m"``, ``"1d2h"``, or ``"none"`` for
        ``None`` (``"inf"`` for an infinite duration).
    """
    if seconds is None:
        return "none"
    if math.isnan(seconds):
        return "nan"
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if math.isinf(seconds):
        return "inf"
    millis = round(seconds * 1000)
    if millis == 0:
        return "0s" if seconds == 0 else f"{seconds * 1000:.3g}ms"
    if millis < 1000:
        return f"{millis}ms"
    days, millis = divmod(millis, 86_400_000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    parts = [f"{n}{unit}" for n, unit in ((days, "d"), (hours, "h"), (minutes, "m")) if n]
    if millis:
        parts.append(f"{millis / 1000:g}s")
    return "".join(parts)


def format_size(size: int) -> str:
    """Render a number of bytes for people, in decimal units (``"256 MB"``, ``"4.1 KB"``).

    Three significant digits at most; the result parses back with `parse_size` (approximately).
    """
    for unit, factor in (("GB", 1000**3), ("MB", 1000**2), ("KB", 1000)):
        if size >= factor * 0.9995:  # 999,999 is "1 MB", not "1e+03 KB"
            return f"{size / factor:.3g} {unit}"
    return f"{size} B"
