"""`lorakit stack` (placeholder until stack.py lands)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the ``stack`` command to ``app`` (no-op placeholder)."""
