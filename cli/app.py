"""The `lorakit` Typer application: parses arguments, calls the library, prints."""

from __future__ import annotations

import typer

from lora_kit import __version__

app = typer.Typer(
    name="lorakit",
    help=(
        "LoRA adapters for Hugging Face transformers models: inject, train, save in PEFT's "
        "format, merge and serve.\n\nAdapters live in ./adapters by default. "
        "Run `lorakit COMMAND --help` for each command."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorakit {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """LoRA adapters for Hugging Face transformers models."""


from .generate import generate as _generate  # noqa: E402  (hot-swapping commands)
from .predict import predict as _predict  # noqa: E402

app.command("generate")(_generate)
app.command("predict")(_predict)


def main() -> None:
    """Console-script entry point."""
    app()
