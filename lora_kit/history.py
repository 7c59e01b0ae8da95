"""Provenance of a stacked adapter or a merged model: which inputs, weights and method made it.

A `History` is written by `stack.stack` into the stacked adapter's safetensors header and by
`merge_files.merge_files` into the merged model's ``model.safetensors`` header, both under the
key ``lora_kit.history`` (a JSON string). Header metadata travels with the weights it describes
(a side file could outlive a re-save of the weights) and is ignored by PEFT and transformers, so
both directories stay loadable by them.

Each source names its weights file by sha256 and carries the source's own history if it had one,
so a stack of stacked adapters records the whole tree. Parsing is strict: a record with a missing
or unknown field, a wrong type, a malformed hash or an unknown schema raises `HistoryError`; a
reader decides whether that is fatal (``lorakit inspect`` shows "unreadable history" and goes
on). Garbage is never returned as a valid record.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ._version import __version__
from .errors import HistoryError

HEADER_KEY = "lora_kit.history"  # in the safetensors header; "history" once the prefix is off
METADATA_NAME = "history"
SCHEMA = 1
OPERATIONS = ("stack", "merge")
MAX_DEPTH = 64  # nesting of stacks of stacks; deeper records are refused as implausible

_SHA256 = re.compile(r"[0-9a-f]{64}")
Scalar = str | int | float | bool | None


class HistoryWarning(UserWarning):
    """An input's recorded history could not be read; it is left out, not guessed."""


@dataclass(frozen=True)
class HistorySource:
    """One input of a stack or merge.

    Attributes:
        path: The directory as it was given.
        weight: Its weight in the combination.
        weights_sha256: sha256 of its ``adapter_model.safetensors``.
        config_sha256: sha256 of its ``adapter_config.json``.
        fingerprint: Merge only: the base-fingerprint check (``match``, ``mismatch (forced)``,
            ``none recorded``); None for a stack.
        history: The input's own history (it was itself stacked), if it had a readable one.
        history_error: Why the input's history could not be read (it had one), else None.
    """

    path: str
    weight: float
    weights_sha256: str
    config_sha256: str
    fingerprint: str | None = None
    history: History | None = None
    history_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (nested history included)."""
        return {
            "path": self.path,
            "weight": self.weight,
            "weights_sha256": self.weights_sha256,
            "config_sha256": self.config_sha256,
            "fingerprint": self.fingerprint,
            "history": self.history.to_dict() if self.history is not None else None,
            "history_error": self.history_error,
        }

    @classmethod
    def from_dict(cls, data: object, where: str = "source", depth: int = 0) -> HistorySource:
        """Parse `to_dict`'s output.

        Raises:
            HistoryError: Anything missing, unknown or of the wrong type.
        """
        required = {"path", "weight", "weights_sha256", "config_sha256"}
        obj = _fields(data, where, required, {"fingerprint", "history", "history_error"})
        nested = obj.get("history")
        return cls(
            path=_str(obj, "path", where),
            weight=_finite(obj, "weight", where),
            weights_sha256=_sha(obj, "weights_sha256", where),
            config_sha256=_sha(obj, "config_sha256", where),
            fingerprint=_opt_str(obj, "fingerprint", where),
            history=None
            if nested is None
            else History.from_dict(nested, f"{where}.history", depth + 1),
            history_error=_opt_str(obj, "history_error", where),
        )


@dataclass(frozen=True)
class History:
    """How a stacked adapter or merged model was made.

    Attributes:
        operation: ``"stack"`` or ``"merge"``.
        method: ``cat``/``svd``/``ties``/``dare`` for a stack, ``linear`` for a merge.
        sources: The inputs, in order.
        lora_kit_version: The lora_kit that wrote it.
        created: ISO-8601 UTC time it was written.
        base: Merge only: the base model folder or Hub id as given.
        heads: ``modules_to_save`` tensor (without PEFT's prefix) -> path of the source whose
            copy was kept.
        options: The operation's settings (``rank``, ``density``, ``seed``; ``dtype``,
            ``force``), JSON scalars.
        metrics: Figures of the result (a stack's ``energy_kept`` and ``rel_error``).
    """

    operation: str
    method: str
    sources: tuple[HistorySource, ...]
    lora_kit_version: str = __version__
    created: str = field(default_factory=lambda: utc_now())
    base: str | None = None
    heads: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Scalar] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with ``schema``."""
        return {
            "schema": SCHEMA,
            "operation": self.operation,
            "method": self.method,
            "lora_kit_version": self.lora_kit_version,
            "created": self.created,
            "base": self.base,
            "sources": [s.to_dict() for s in self.sources],
            "heads": dict(self.heads),
            "options": dict(self.options),
            "metrics": dict(self.metrics),
        }

    @classmethod
    def from_dict(cls, data: object, where: str = "history", depth: int = 0) -> History:
        """Parse `to_dict`'s output (``where`` names the part in error messages).

        Raises:
            HistoryError: Unknown schema, a missing or unknown field, a wrong type or value.
        """
        if depth > MAX_DEPTH:
            raise HistoryError(f"{where}: nested deeper than {MAX_DEPTH} levels")
        required = {"schema", "operation", "method", "lora_kit_version", "created", "sources"}
        obj = _fields(data, where, required, {"base", "heads", "options", "metrics"})
        schema = obj["schema"]
        if isinstance(schema, bool) or schema != SCHEMA:
            raise HistoryError(
                f"{where}: schema {schema!r} is not {SCHEMA} (written by another lora_kit "
                f"version? this is {__version__})"
            )
        operation = _str(obj, "operation", where)
        if operation not in OPERATIONS:
            raise HistoryError(f"{where}: operation {operation!r} is not one of {OPERATIONS}")
        created = _str(obj, "created", where)
        try:
            datetime.fromisoformat(created)
        except ValueError:
            raise HistoryError(f"{where}: created {created!r} is not an ISO-8601 time") from None
        sources = obj["sources"]
        if not isinstance(sources, list) or not sources:
            raise HistoryError(f"{where}: sources must be a non-empty list")
        return cls(
            operation=operation,
            method=_str(obj, "method", where),
            sources=tuple(
                HistorySource.from_dict(s, f"{where}.sources[{i}]", depth)
                for i, s in enumerate(sources)
            ),
            lora_kit_version=_str(obj, "lora_kit_version", where),
            created=created,
            base=_opt_str(obj, "base", where),
            heads=_mapping(obj, "heads", where, lambda v: isinstance(v, str)),
            options=_mapping(obj, "options", where, _is_scalar),
            metrics={
                k: float(v) for k, v in _mapping(obj, "metrics", where, _is_finite_number).items()
            },
        )


def utc_now() -> str:
    """The current UTC time as lora_kit records it (ISO-8601, seconds)."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_history(metadata: Mapping[str, Any], where: str = "history") -> History | None:
    """The `History` in lora_kit metadata (prefix stripped), or None if there is none.

    The value may be decoded already (a dict) or still be the header's JSON text.

    Raises:
        HistoryError: There is a record but it is not a valid one.
    """
    if METADATA_NAME not in metadata:
        return None
    value = metadata[METADATA_NAME]
    if isinstance(value, str):  # header text that did not decode as JSON, or a JSON string
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise HistoryError(f"{where}: not valid JSON ({exc})") from None
    return History.from_dict(value, where)


def source_record(
    path: Path,
    metadata: Mapping[str, Any],
    weight: float,
    hashes: tuple[str, str],
    fingerprint: str | None = None,
) -> HistorySource:
    """A `HistorySource` for an input, with its own history nested when it has a readable one.

    Args:
        path: The input directory.
        metadata: Its decoded lora_kit metadata.
        weight: Its weight.
        hashes: sha256 of its weights file and of its config file.
        fingerprint: Merge's base-fingerprint check, if any.

    An unreadable history is not copied: the source records why (``history_error``) and a
    `HistoryWarning` is issued.
    """
    nested: History | None = None
    error: str | None = None
    try:
        nested = read_history(metadata, f"{path}: history")
    except HistoryError as exc:
        error = str(exc)
        message = f"unreadable history left out of the record: {error}"
        warnings.warn(message, HistoryWarning, stacklevel=3)
    return HistorySource(str(path), float(weight), hashes[0], hashes[1], fingerprint, nested, error)


def describe(history: History, indent: str = "") -> list[str]:
    """Human-readable lines (one per operation and source; nested sources indented)."""
    options = ", ".join(f"{k}={v}" for k, v in history.options.items() if v is not None)
    metrics = ", ".join(f"{k} {v:.6g}" for k, v in history.metrics.items())
    head = f"{indent}{history.operation} ({history.method})"
    if history.base is not None:
        head += f" onto base {history.base}"
    head += f", {history.created}, lora_kit {history.lora_kit_version}"
    lines = [head + (f"; {options}" if options else "") + (f"; {metrics}" if metrics else "")]
    for source in history.sources:
        check = f", base fingerprint {source.fingerprint}" if source.fingerprint else ""
        lines.append(
            f"{indent}  {source.weight:+g} x {source.path}  "
            f"(weights sha256 {source.weights_sha256[:12]}...{check})"
        )
        if source.history is not None:
            lines += describe(source.history, indent + "    ")
        elif source.history_error is not None:
            lines.append(f"{indent}    unreadable history: {source.history_error}")
    by_source: dict[str, list[str]] = {}
    for key, path in history.heads.items():
        by_source.setdefault(path, []).append(key)
    for path, keys in by_source.items():
        lines.append(f"{indent}  head {', '.join(keys)} from {path}")
    return lines


# ---- strict field readers ------------------------------------------------------------------


def _fields(data: object, where: str, required: set[str], optional: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise HistoryError(f"{where}: expected a JSON object, got {type(data).__name__}")
    missing = sorted(required - data.keys())
    if missing:
        raise HistoryError(f"{where}: missing field(s) {missing}")
    unknown = sorted(data.keys() - required - optional)
    if unknown:
        raise HistoryError(f"{where}: unknown field(s) {unknown}")
    return data


def _str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj[key]
    if not isinstance(value, str) or not value:
        raise HistoryError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value


def _opt_str(obj: Mapping[str, Any], key: str, where: str) -> str | None:
    return None if obj.get(key) is None else _str(obj, key, where)


def _sha(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = _str(obj, key, where)
    if not _SHA256.fullmatch(value):
        raise HistoryError(f"{where}: {key} is not a sha256 hex digest: {value!r}")
    return value


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, (str, bool)) or _is_finite_number(value)


def _finite(obj: Mapping[str, Any], key: str, where: str) -> float:
    value = obj[key]
    if not _is_finite_number(value):
        raise HistoryError(f"{where}: {key} must be a finite number, got {value!r}")
    return float(value)


def _mapping(
    obj: Mapping[str, Any], key: str, where: str, valid: Callable[[object], bool]
) -> dict[str, Any]:
    value = obj.get(key, {})
    if not isinstance(value, dict) or not all(valid(v) for v in value.values()):
        raise HistoryError(f"{where}: {key} must be an object of plain values, got {value!r}")
    return dict(value)
