"""Output helpers shared by the library-tooling commands (list, inspect, verify, diff, hub)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import typer

from lora_kit.errors import ConfigError, LoraKitError


def fail(message: str, code: int = 1) -> NoReturn:
    """Print ``error: message`` on stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


@contextmanager
def errors_to_exit() -> Iterator[None]:
    """Turn a `LoraKitError` (or an OS error on a path) into a message and exit code 1."""
    try:
        yield
    except LoraKitError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(os_error_text(exc))


def os_error_text(exc: OSError) -> str:
    """An OS error on a path as one line: ``reason: path`` (or the error itself without one)."""
    return f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)


@contextmanager
def usage_errors() -> Iterator[None]:
    """Report a `ConfigError` from checking the arguments alone as bad usage (exit 2)."""
    try:
        yield
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None


def emit_json(data: Any) -> None:
    """Print ``data`` as indented JSON on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table with left-aligned columns."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def human_bytes(size: int) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def number(value: float) -> str:
    """A compact float (``16`` for 16.0, 4 significant digits otherwise)."""
    return f"{value:g}" if float(value).is_integer() else f"{value:.4g}"
