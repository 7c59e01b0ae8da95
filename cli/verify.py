"""`lorakit verify ADAPTER --base BASE`: does an adapter fit a base model?"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import transformers
import typer

from lora_kit.adapter_io import read_adapter
from lora_kit.base_model import load_base
from lora_kit.verify import verify_fit

from ._tooling import emit_json, errors_to_exit


def verify(
    adapter: Annotated[Path, typer.Argument(help="The adapter directory.")],
    base: Annotated[
        str,
        typer.Option(
            "--base", "-b", help="Base model: a save_pretrained folder or a Hub id (cached)."
        ),
    ],
    model_class: Annotated[
        str | None,
        typer.Option(
            "--model-class",
            help="transformers class to load BASE with (default: the checkpoint's architecture).",
        ),
    ] = None,
    check_fingerprint: Annotated[
        bool,
        typer.Option(
            "--fingerprint/--no-fingerprint",
            "--check-base/--no-check-base",  # the name generate/predict and load errors use
            help="Compare the base fingerprint lora_kit recorded (skip e.g. for an fp16 copy).",
        ),
    ] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Check that an adapter fits a base model (exit code 0 only if it does).

    Checks tensor keys and shapes, Conv1D/Linear orientation, the recorded base fingerprint,
    and coverage (the share of the adapter's tensors that land on a
    module; 100% expected). Finally it loads the adapter onto BASE to confirm.

    Exit code 0 only when it fits; 1 when it does not (the first misfit is named with what to
    do) or when ADAPTER/BASE cannot be read. Nothing is written.

    Example: lorakit verify adapters/sst2 --base ./bert-base --json
    """
    transformers.utils.logging.disable_progress_bar()
    with errors_to_exit():
        files = read_adapter(adapter)  # a bad adapter fails before the base is loaded
        model = load_base(base, model_class=model_class)
        report = verify_fit(files, model, check_base=check_fingerprint)
    if as_json:
        emit_json({"base": base, **report.to_dict()})
    else:
        verdict = "FITS" if report.fits else "DOES NOT FIT"
        typer.echo(f"{verdict}: {report.adapter} on {base}")
        typer.echo(
            f"coverage     {100 * report.coverage:.1f}% ({report.used}/{report.tensors} tensors "
            f"land on a module; {report.modules} modules targeted)"
        )
        typer.echo(f"fingerprint  {report.fingerprint}")
        typer.echo(f"orientation  {report.orientation}")
        for key in report.unused:
            typer.echo(f"unused       {key}")
    if not report.fits:
        typer.echo(f"error: {report.problems[0]}", err=True)
        for extra in report.problems[1:]:
            typer.echo(f"also: {extra}", err=True)
        if report.fingerprint == "mismatch":
            typer.echo("(--no-fingerprint skips the fingerprint check)", err=True)
        raise typer.Exit(1)
