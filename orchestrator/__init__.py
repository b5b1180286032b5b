"""orchestrator: a Trio pipeline orchestrator for files and records through external stages."""

from __future__ import annotations

from orchestrator.errors import (
    ConfigError,
    ItemNotFound,
    OrchestratorError,
    StoreError,
    StoreLocked,
    StoreUnavailable,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ItemNotFound",
    "OrchestratorError",
    "StoreError",
    "StoreLocked",
    "StoreUnavailable",
    "__version__",
]
