"""`lorakit diff A B`: how two adapters differ."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lora_kit.diff import diff_adapters

from ._tooling import emit_json, errors_to_exit, number, table


def diff(
    first: Annotated[Path, typer.Argument(metavar="A", help="First adapter directory.")],
    second: Annotated[Path, typer.Argument(metavar="B", help="Second adapter directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Compare two adapters: configs, modules, ranks and how far apart their updates are.

    Per common module it prints the relative difference of their updates,
    ||dW_A - dW_B||_F / max(||dW_A||_F, ||dW_B||_F) (0 = same update, computed from the
    factors in float64). Exit code 0 whether or not they differ; 1 if either cannot be read.

    Example: lorakit diff adapters/a adapters/b
    """
    with errors_to_exit():
        result = diff_adapters(first, second)
    if as_json:
        emit_json(result.to_dict())
        return
    echo = typer.echo
    echo(f"A  {result.a}\nB  {result.b}")
    if result.identical:
        echo("identical: same config, modules and updates (relative difference <= 1e-12)")
    for key, (value_a, value_b) in result.config.items():
        echo(f"config {key}: A={json.dumps(value_a)}  B={json.dumps(value_b)}")
    for name in result.only_in_a:
        echo(f"only in A: {name}")
    for name in result.only_in_b:
        echo(f"only in B: {name}")
    if result.saved_modules_differ:
        echo("modules_to_save tensors differ")
    if result.modules:
        rows = [
            [
                m.name,
                f"{m.rank_a}/{m.rank_b}",
                f"{number(m.scaling_a)}/{number(m.scaling_b)}",
                f"{m.norm_a:.4g}/{m.norm_b:.4g}",
                "shapes differ"
                if m.relative_difference is None
                else f"{m.relative_difference:.3e}",
            ]
            for m in result.modules
        ]
        echo("")
        echo(table(["MODULE", "R A/B", "SCALING A/B", "||dW|| A/B", "REL.DIFF"], rows))
    else:
        echo("no module in common")
