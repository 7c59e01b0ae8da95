"""Registers the adapter-library commands: list, inspect, verify, diff, push, pull."""

from __future__ import annotations

import typer

from . import diff, hub, inspect_cmd, list_cmd, verify


def register_tooling(app: typer.Typer) -> None:
    """Add the library-tooling commands to ``app``."""
    app.command("list")(list_cmd.list_adapters)
    app.command("inspect")(inspect_cmd.inspect)
    app.command("verify")(verify.verify)
    app.command("diff")(diff.diff)
    app.command("push")(hub.push)
    app.command("pull")(hub.pull)
