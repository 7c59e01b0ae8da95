"""`lorakit list [DIR]`: the adapters in the library."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lora_kit.library import scan_library

from ._tooling import emit_json, errors_to_exit, human_bytes, number, table


def list_adapters(
    directory: Annotated[
        Path | None,
        typer.Argument(
            help="Folder of adapters (searched recursively), or one adapter. Default: the "
            "library, $LORA_KIT_ADAPTERS or ./adapters.",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List the adapters in the library ($LORA_KIT_ADAPTERS, else ./adapters) or DIRECTORY.

    Shows each adapter's name, base model, targeted modules, rank/alpha, size, creation time
    and origin (lora_kit or PEFT). Entries that look like adapters but cannot be read are
    reported on stderr and make the exit code 1. Hidden .*.tmp entries left by interrupted
    saves (a killed process) are listed with their size, for you to delete once no save is
    running. Nothing is written or removed.

    Example: lorakit list adapters --json
    """
    with errors_to_exit():
        scan = scan_library(directory)
    if as_json:
        emit_json(scan.to_dict())
    elif scan.adapters:
        rows = [
            [
                a.name,
                a.base or "?",
                ",".join(a.targets),
                f"{a.r}/{number(a.alpha)}" + ("*" if len(a.ranks) > 1 else ""),
                human_bytes(a.size_bytes),
                a.created.replace("+00:00", "Z") + ("" if a.created_source == "metadata" else "~"),
                a.origin,
            ]
            for a in scan.adapters
        ]
        headers = ["NAME", "BASE", "TARGETS", "R/ALPHA", "SIZE", "CREATED", "ORIGIN"]
        typer.echo(table(headers, rows))
        notes = []
        if any(len(a.ranks) > 1 for a in scan.adapters):
            notes.append("* ranks vary per module")
        if any(a.created_source != "metadata" for a in scan.adapters):
            notes.append("~ time from the weights file's mtime")
        if notes:
            typer.echo(f"({'; '.join(notes)})")
    else:
        typer.echo(f"no adapters in {scan.root}")
    if scan.leftovers and not as_json:
        size = human_bytes(sum(x.size_bytes for x in scan.leftovers))
        typer.echo(
            f"{len(scan.leftovers)} leftover(s) of interrupted saves ({size}); delete them "
            f"once no save is running:"
        )
        for leftover in scan.leftovers:
            typer.echo(f"  {leftover.path}  {human_bytes(leftover.size_bytes)}")
    for problem in scan.problems:
        typer.echo(f"error: {problem.name}: {problem.error}", err=True)
    if scan.problems:
        raise typer.Exit(1)
