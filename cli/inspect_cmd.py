"""`lorakit inspect PATH`: what is inside one adapter (or a merged model folder)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lora_kit.history import History, describe
from lora_kit.inspection import DEFAULT_RANK_THRESHOLD, inspect_adapter
from lora_kit.model_inspection import inspect_model, is_model_dir

from ._tooling import emit_json, errors_to_exit, human_bytes, number, table


def inspect(
    adapter: Annotated[
        Path,
        typer.Argument(
            help="An adapter directory (lora_kit's or PEFT's), or a model folder such as "
            "lorakit merge writes."
        ),
    ],
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold",
            callback=_check_threshold,
            help="Effective rank counts singular values above THRESHOLD x the largest one; "
            "in [0, 1).",
        ),
    ] = DEFAULT_RANK_THRESHOLD,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON (with every singular value) for scripts.")
    ] = False,
) -> None:
    """Show what is inside an adapter: config, per-module numbers, size, provenance.

    Per module: shape, rank, alpha, scaling, parameters, the norm of its update and its
    effective rank; plus the adapter's size and provenance (base fingerprint, and the
    stacking history when lorakit stack made it, nested for stacks of stacks).

    Norms and singular values are those of each module's update scaling * B @ A, computed
    from the low-rank factors in float64. Nothing is written.

    Given a model folder (config.json + safetensors), shows its size, dtypes and the merge
    history lorakit merge recorded (base, adapters with their sha256 and weights, heads).
    An unreadable history is reported (a warning, "unreadable history") but does not fail.

    Example: lorakit inspect adapters/sst2 --threshold 1e-2
    """
    if is_model_dir(adapter):
        _inspect_model(adapter, as_json)
        return
    with errors_to_exit():
        report = inspect_adapter(adapter, threshold)
    if report.history_error is not None:
        typer.echo(f"warning: {report.history_error}", err=True)
    if as_json:
        emit_json(report.to_dict())
        return
    echo = typer.echo
    echo(f"adapter   {report.path}  (origin: {report.origin})")
    echo(
        f"size      {report.parameters:,} parameters, {human_bytes(report.file_bytes)} "
        f"weights file, {len(report.modules)} modules"
    )
    echo("config    " + json.dumps(report.config, sort_keys=True))
    for key, value in sorted(report.provenance.items()):
        if key == "base_fingerprint" and isinstance(value, dict):
            value = (
                f"{value.get('model_type')}, {len(value.get('modules', {}))} modules, "
                f"weights sha256 {str(value.get('weights_sha256'))[:16]}..."
            )
        echo(f"{key:<9} {value if isinstance(value, str) else json.dumps(value)}")
    _echo_history(report.history, report.history_error)
    echo("")
    rows = [
        [
            m.name,
            f"{m.out_features}x{m.in_features}",
            m.rank,
            number(m.alpha),
            number(m.scaling),
            f"{m.parameters:,}",
            f"{m.delta_norm:.4g}",
            f"{m.effective_rank}/{m.rank}",
        ]
        for m in report.modules
    ]
    headers = ["MODULE", "OUTxIN", "R", "ALPHA", "SCALING", "PARAMS", "||dW||_F", "EFF.RANK"]
    echo(table(headers, rows))
    for key, shape in report.saved_modules.items():
        echo(f"saved module tensor {key} {shape}")
    echo(f"(effective rank: singular values of dW above {report.threshold:g} x the largest)")


def _check_threshold(value: float) -> float:
    if not 0.0 <= value < 1.0:
        raise typer.BadParameter(
            f"{value} is not in [0, 1) (a fraction of the largest singular value)"
        )
    return value


def _inspect_model(path: Path, as_json: bool) -> None:
    with errors_to_exit():
        report = inspect_model(path)
    if report.history_error is not None:
        typer.echo(f"warning: {report.history_error}", err=True)
    if as_json:
        emit_json(report.to_dict())
        return
    arch = ", ".join(report.architectures) or "no architectures listed"
    typer.echo(f"model     {report.path}  ({report.model_type or 'unknown model_type'}; {arch})")
    dtypes = ", ".join(f"{code} x {n}" for code, n in report.dtypes.items())
    typer.echo(
        f"size      {report.parameters:,} parameters in {report.tensors} tensors, "
        f"{human_bytes(report.file_bytes)} ({', '.join(report.weight_files)}); {dtypes}"
    )
    _echo_history(report.history, report.history_error)


def _echo_history(history: History | None, error: str | None) -> None:
    if error is not None:
        typer.echo(f"history   unreadable history: {error}")
    elif history is None:
        typer.echo("history   none recorded (not made by lorakit stack or merge)")
    else:
        lines = describe(history)
        typer.echo(f"history   {lines[0]}")
        for line in lines[1:]:
            typer.echo(f"          {line}")
