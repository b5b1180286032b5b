"""Sources turn files and records into items (DESIGN §2, §6).

- `DirectorySource` (``type = "directory"``): new files of a folder, once they have settled;
  moved, deleted or kept when their item ends.
- `JsonlSource` (``type = "jsonl"``): records appended to a JSON-lines file, read from a stored
  position that is committed with the items it produced.
- `JsonArraySource` (``type = "json"``): new elements, by ``id_field``, of a JSON array that its
  writer rewrites.

Each does its file system work in worker threads and keeps the pure part (what is new, what is
valid) separate, for tests. `orchestrator.pollers` drives them on ``trio_util.periodic``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.sources.directory import DirectorySource, FileSeen
    from orchestrator.sources.jsonarray import JsonArraySource
    from orchestrator.sources.jsonl import JsonlSource
    from orchestrator.sources.ops import Position

__all__ = ["DirectorySource", "FileSeen", "JsonArraySource", "JsonlSource", "Position"]

#: Each name's module, imported on first use: a service loads only its own source types.
_MODULES = {
    "DirectorySource": "directory",
    "FileSeen": "directory",
    "JsonArraySource": "jsonarray",
    "JsonlSource": "jsonl",
    "Position": "ops",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
