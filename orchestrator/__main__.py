"""``python -m orchestrator``."""

from __future__ import annotations

from orchestrator.launcher import launch

launch()
