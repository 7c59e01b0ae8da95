"""`lorakit stack`: combine several adapters of one base into a single adapter."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lora_kit.stack import METHODS, StackMethod, stack, stack_arguments
from lora_kit_cli.merge import parse_weights

from ._tooling import errors_to_exit, usage_errors


def stack_command(
    adapters: Annotated[
        list[Path],
        typer.Argument(
            help="Adapter directories (usually two or more; one rescales or re-ranks it)."
        ),
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="Adapter directory to write.")],
    weights: Annotated[
        str | None,
        typer.Option(help="Comma-separated weight per adapter, e.g. 0.7,-0.3 (default 1 each)."),
    ] = None,
    method: Annotated[
        str, typer.Option(help=f"One of {', '.join(METHODS)} (cat is exact).")
    ] = "cat",
    rank: Annotated[
        int | None, typer.Option(help="Target rank for svd/ties/dare (default: largest input).")
    ] = None,
    density: Annotated[
        float | None, typer.Option(help="Fraction kept by ties/dare, in (0, 1].")
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="dare's seed (default: random, recorded).")
    ] = None,
    heads: Annotated[
        Path | None,
        typer.Option(
            "--heads",
            help="The input whose modules_to_save head (e.g. a classifier) to keep when "
            "several inputs carry different ones.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report.")] = False,
) -> None:
    """Stack ADAPTERS into one PEFT-format adapter at -o OUT.

    cat concatenates the factors (exact: the update is the weighted sum of the inputs' updates).
    svd truncates that sum to --rank on the factors (fast, optimal) and reports the energy kept.
    ties and dare work on the dense updates (--density, --seed) and are re-factored to --rank.
    Every method reports its relative error against the exact weighted sum.
    Heads (modules_to_save) are never mixed by weight: one input's copy is kept, and inputs
    with different copies need --heads DIR. The inputs, weights and method are recorded in the
    output (lorakit inspect shows them).

    Example: lorakit stack adapters/a adapters/b --weights 0.7,-0.3 --method svd --rank 8 -o ab
    """
    if method not in METHODS:
        raise typer.BadParameter(
            f"{method!r}: use one of {', '.join(METHODS)}", param_hint="--method"
        )
    _refuse_unused_options(method, rank, density, seed)
    chosen: StackMethod = method  # type: ignore[assignment]
    values = parse_weights(weights)
    with usage_errors():
        stack_arguments(len(adapters), values, method, rank, density)
    with errors_to_exit():
        report = stack(
            adapters,
            weights=values,
            method=chosen,
            out=out,
            rank=rank,
            density=density,
            seed=seed,
            heads=heads,
        )
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    typer.echo(str(report))
    worst = max(report.modules, key=lambda m: m.rel_error)
    typer.echo(f"  worst module: {worst.module} (rank {worst.rank}, error {worst.rel_error:.3g})")
    if report.seed is not None:
        typer.echo(f"  seed: {report.seed}")
    for key, source in report.heads.items():
        typer.echo(f"  head {key} taken from {source}")


def _refuse_unused_options(
    method: str, rank: int | None, density: float | None, seed: int | None
) -> None:
    """An option the method ignores is bad usage (it used to be dropped without a word)."""
    if method == "cat" and rank is not None:
        raise typer.BadParameter(
            "cat keeps every rank (the output's is their sum); use --method svd, ties or dare "
            "to reduce it",
            param_hint="--rank",
        )
    if method not in ("ties", "dare") and density is not None:
        raise typer.BadParameter(f"only ties and dare use it, not {method}", param_hint="--density")
    if method != "dare" and seed is not None:
        raise typer.BadParameter(f"only dare uses it, not {method}", param_hint="--seed")


def register(app: typer.Typer) -> None:
    """Add the ``stack`` command to ``app``."""
    app.command("stack")(stack_command)
