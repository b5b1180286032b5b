"""Errors raised by orchestrator.

The tree::

    OrchestratorError
    ├── ConfigError            the config file cannot be used (every problem listed)
    ├── StoreError
    │   ├── StoreUnavailable   the state store cannot be opened or written
    │   └── StoreLocked        another instance owns the state folder
    ├── LeftoverProcesses      a dead instance's processes could not be ended at start-up
    └── ItemNotFound           an operator named an item the store does not hold
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path


class OrchestratorError(Exception):
    """Raised when orchestrator cannot do what it was asked; the base of every error here."""


class ConfigError(OrchestratorError):
    """Raised when a config file is unreadable or invalid.

    ``errors`` holds every problem found, each prefixed with the path of the offending key
    (``stages[1].timeout: expected a duration like "30s", got "soon"``).
    """

    def __init__(self, errors: Sequence[str], *, path: Path | None = None) -> None:
        self.errors = list(errors)
        self.path = path
        where = f"{path}: " if path is not None else ""
        super().__init__(
            f"{where}{len(self.errors)} error(s) in config:\n" + "\n".join(self.errors)
        )


class StoreError(OrchestratorError):
    """Raised when the state store fails."""


class StoreUnavailable(StoreError):
    """Raised when the state store cannot be opened, read or written."""


class StoreLocked(StoreError):
    """Raised when another live instance holds the state folder's lock."""


class ItemNotFound(OrchestratorError):
    """Raised when an operator names an item id the store does not hold."""

    def __init__(self, item_id: str) -> None:
        self.item_id = item_id
        super().__init__(f"no item {item_id!r} in the store; list them with 'orchestrator items'")


class LeftoverProcesses(OrchestratorError):
    """Raised when processes left by a dead instance survive SIGKILL at start-up.

    Starting anyway could run a limited stage twice, so the service refuses to start.
    """

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        super().__init__(
            f"processes {self.pids} left by a dead instance survive SIGKILL (stuck in the "
            "kernel?); refusing to start while they live"
        )
