"""`lorakit merge`: fold adapters into a base model and write a plain transformers folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lora_kit.merge_files import DTYPES, merge_arguments, merge_files

from ._tooling import errors_to_exit, usage_errors


def parse_weights(text: str | None) -> list[float] | None:
    """``"0.7,-0.3"`` -> ``[0.7, -0.3]`` (a usage error, exit 2, if malformed)."""
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: give comma-separated numbers, one per adapter, e.g. 0.7,-0.3"
        ) from None


def merge(
    base: Annotated[
        str, typer.Argument(help="Base model folder (save_pretrained, safetensors) or Hub id.")
    ],
    adapters: Annotated[list[Path], typer.Argument(help="One or more adapter directories.")],
    out: Annotated[
        Path, typer.Option("-o", "--out", help="Model folder to create (must not exist).")
    ],
    weights: Annotated[
        str | None,
        typer.Option(help="Comma-separated weight per adapter, e.g. 0.7,-0.3 (default 1 each)."),
    ] = None,
    dtype: Annotated[
        str | None,
        typer.Option(help=f"Output dtype: {', '.join(DTYPES)} (default: as stored)."),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Merge even if an adapter's base fingerprint differs.")
    ] = False,
    heads: Annotated[
        Path | None,
        typer.Option(
            "--heads",
            help="The adapter whose modules_to_save head (e.g. a classifier) to write when "
            "several carry different ones.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report.")] = False,
) -> None:
    """Merge ADAPTERS into BASE and write a complete model folder to -o OUT.

    The update sum_k w_k * scaling_k * B_k @ A_k is computed in fp32 and rounded once into the
    output dtype. The base is streamed one tensor at a time (never a second copy in memory);
    config and tokenizer files are copied; an adapter's modules_to_save head replaces the base's
    (adapters with different heads need --heads DIR). A head the base lacks (a classifier
    trained on a headless BertModel checkpoint) makes the output the task model, e.g.
    BertForSequenceClassification, with labels from the adapter's labels.json. The history
    (base, adapter hashes, weights, lora_kit version) is recorded in the safetensors metadata
    under "lora_kit.history"; lorakit inspect OUT shows it. Nothing is left behind on error.
    Load the result with plain transformers: AutoModel*.from_pretrained(OUT).

    Example: lorakit merge ./gpt2 adapters/a adapters/b --weights 0.7,-0.3 -o gpt2-ab
    """
    values = parse_weights(weights)
    with usage_errors():
        merge_arguments(len(adapters), values, dtype)
    with errors_to_exit():
        report = merge_files(
            base,
            adapters,
            out,
            weights=values,
            dtype=dtype,
            force=force,
            heads=heads,
        )
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    top = max(report.max_change.items(), key=lambda kv: kv[1], default=("-", 0.0))
    typer.echo(f"wrote {report.out} ({report.tensors} tensors, dtype {report.dtype})")
    for src in report.adapters:
        typer.echo(
            f"  + {src.weight:g} x {src.path}  (base fingerprint: {src.fingerprint}, "
            f"weights sha256 {src.weights_sha256[:12]})"
        )
    typer.echo(
        f"  {len(report.max_change)} modules changed, largest change {top[1]:.3g} in {top[0]}"
    )
    for key, source in report.heads.items():
        typer.echo(f"  head {key} taken from {source}")
    task = report.task
    if task is not None:
        names = ", ".join(task.id2label.values())
        typer.echo(
            f"  the base had no head: wrote {task.architecture} with {len(task.id2label)} "
            f"labels ({names}; from {task.labels_from})"
        )
        if task.prefix_added:
            typer.echo(f"  base tensors renamed under {task.prefix_added!r}")
        if task.dropped:
            typer.echo(f"  left out (no place in {task.architecture}): {', '.join(task.dropped)}")
    typer.echo(f"  copied: {', '.join(report.copied)}")


def register(app: typer.Typer) -> None:
    """Add the ``merge`` command to ``app``."""
    app.command("merge")(merge)
