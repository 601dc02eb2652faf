"""Subcommands of `copack` contributed by `sim`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this component's commands to the top-level app."""
