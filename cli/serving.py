"""Shared plumbing of `lorakit generate` and `lorakit predict`: adapters, rows, errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from lora_kit import LoraModel
from lora_kit.adapter_io import AdapterFiles
from lora_kit.base_model import model_positions
from lora_kit.errors import AdapterNameError

BASE = "base"

# The --adapter option shared by `lorakit generate` and `lorakit predict`.
AdapterOption = Annotated[
    list[str] | None,
    typer.Option(
        "--adapter",
        "-a",
        help="Adapter to load: a directory, a name in ./adapters ($LORA_KIT_ADAPTERS) or a Hub "
        "id, optionally as NAME=SOURCE. Repeat for several.",
    ),
]
T = TypeVar("T")


def parse_adapter(spec: str) -> tuple[str, str]:
    """``NAME=SOURCE`` or ``SOURCE`` (named after its last path component) -> (name, source)."""
    name, sep, source = spec.partition("=")
    if not sep:
        name, source = Path(spec.rstrip("/")).name or spec, spec
    if name == BASE:  # its rows would read, and be chosen, as the base model's
        raise typer.BadParameter(
            f"{spec!r}: the name {BASE!r} stands for the base model; name the adapter: "
            f"-a NAME={source}",
            param_hint="--adapter",
        )
    return name, source


def load_adapters(
    lm: LoraModel,
    specs: list[str],
    *,
    check_base: bool,
    read: Mapping[str, AdapterFiles] | None = None,
) -> list[str]:
    """Load every ``--adapter`` into ``lm``; returns their names in order.

    ``read`` holds the files of sources already read (by source), which are not read again.
    """
    names = []
    for spec in specs:
        name, source = parse_adapter(spec)
        files = (read or {}).get(source)
        try:
            names.append(
                lm.load_adapter(source if files is None else files, name, check_base=check_base)
            )
        except AdapterNameError as exc:
            if "=" in spec:
                raise
            raise AdapterNameError(f"{exc}; name it on the command line: -a NAME={spec}") from exc
    return names


def assign_rows(
    inputs: list[str], names: list[str], chosen: list[str] | None, option: str
) -> tuple[list[str], list[str | None]]:
    """Rows to run: ``(input, adapter or None)``.

    With ``chosen`` (one name or ``base`` per input) each input runs once with its adapter;
    without it, every input runs with the base and with every adapter (a comparison grid).

    Raises:
        typer.BadParameter: Counts differ or a name is not among the loaded adapters.
    """
    if chosen:
        if len(chosen) != len(inputs):
            raise typer.BadParameter(
                f"give one {option} per input ({len(inputs)} inputs, {len(chosen)} given)",
                param_hint=option,
            )
        rows: list[str | None] = []
        for name in chosen:
            if name != BASE and name not in names:
                raise typer.BadParameter(
                    f"{name!r} is not a loaded adapter; use one of {names} or {BASE!r}",
                    param_hint=option,
                )
            rows.append(None if name == BASE else name)
        return list(inputs), rows
    grid: list[str | None] = [None, *names]
    return [text for text in inputs for _ in grid], [a for _ in inputs for a in grid]


def check_not_empty(tokenizer: Any, texts: list[str], option: str) -> None:
    """Refuse an input the tokenizer turns into no tokens (the model cannot run it).

    Raises:
        typer.BadParameter: An input has no tokens.
    """
    for text, ids in zip(texts, tokenizer(texts)["input_ids"], strict=True):
        if len(ids) == 0:
            raise typer.BadParameter(
                f"{text!r} has no tokens for this tokenizer; give some text", param_hint=option
            )


def position_limit(model: Any, tokenizer: Any) -> int | None:
    """The most tokens one row may hold: the model's positions, or the tokenizer's limit."""
    limits = [
        model_positions(getattr(model, "config", None)),
        getattr(tokenizer, "model_max_length", None),  # 1e30 when the tokenizer sets none
    ]
    found = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000_000]
    return min(found) if found else None


def emit(
    records: list[dict[str, Any]], as_json: bool, human: Callable[[dict[str, Any]], str]
) -> None:
    """Print records as JSON lines (``--json``) or human text."""
    for record in records:
        typer.echo(json.dumps(record) if as_json else human(record))
    sys.stdout.flush()
