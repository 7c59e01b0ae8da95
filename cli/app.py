"""The `lorakit` Typer application: parses arguments, calls the library, prints."""

from __future__ import annotations

import typer

from lora_kit import __version__

from .tooling_commands import register_tooling

app = typer.Typer(
    name="lorakit",
    help=(
        "LoRA adapters for Hugging Face transformers models: inject, train, save in PEFT's "
        "format, merge and serve.\n\nAdapters live in ./adapters by default. "
        "Run `lorakit COMMAND --help` for each command.\n\n"
        "Exit codes: 0 success, 1 failure or misfit (a lora_kit error such as a corrupt or "
        "mismatched adapter; message on stderr), 2 bad usage."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
register_tooling(app)  # list, inspect, verify, diff, push, pull (issue 7)


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


from . import demo as _demo  # noqa: E402  (commands register after the app exists)

app.command("demo")(_demo.demo)


from lora_kit_cli.train import train_command  # noqa: E402

app.command("train", help=train_command.__doc__)(train_command)


from .generate import generate as _generate  # noqa: E402  (hot-swapping commands)
from .predict import predict as _predict  # noqa: E402

app.command("generate")(_generate)
app.command("predict")(_predict)


def main() -> None:
    """Console-script entry point."""
    app()


from lora_kit_cli import merge as _merge, stack as _stack  # noqa: E402, I001 (issue 5)

_merge.register(app), _stack.register(app)
