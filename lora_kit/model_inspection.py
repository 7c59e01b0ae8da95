"""What is inside a model folder (such as one ``lorakit merge`` wrote): size, dtypes, history.

Only the safetensors headers are read (never the tensor data), so this is instant for any size.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from .adapter_io import CONFIG_NAME as ADAPTER_CONFIG_NAME
from .base_model import INDEX, SINGLE, BaseModelError, read_json_object, weight_files
from .history import HEADER_KEY, METADATA_NAME, History
from .inspection import checked_history


@dataclass(frozen=True)
class ModelReport:
    """The inspection of one model folder (see :func:`inspect_model`).

    Attributes:
        path: The folder.
        model_type: ``config.json``'s ``model_type`` (None if absent).
        architectures: ``config.json``'s ``architectures``.
        weight_files: The safetensors files read.
        tensors: Number of tensors.
        parameters: Elements in all tensors.
        file_bytes: Size of the weight files.
        dtypes: safetensors dtype code -> number of tensors.
        history: How the model was made, if ``lorakit merge`` made it (see `history`).
        history_error: Why a recorded history could not be read (then ``history`` is None).
    """

    path: str
    model_type: str | None
    architectures: tuple[str, ...]
    weight_files: tuple[str, ...]
    tensors: int
    parameters: int
    file_bytes: int
    dtypes: dict[str, int] = field(default_factory=dict)
    history: History | None = None
    history_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "kind": "model",
            "path": self.path,
            "model_type": self.model_type,
            "architectures": list(self.architectures),
            "weight_files": list(self.weight_files),
            "tensors": self.tensors,
            "parameters": self.parameters,
            "file_bytes": self.file_bytes,
            "dtypes": dict(self.dtypes),
            "history": self.history.to_dict() if self.history is not None else None,
            "history_error": self.history_error,
        }


def is_model_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a transformers model folder with safetensors weights (not an adapter)."""
    root = Path(path)
    return (
        root.is_dir()
        and not (root / ADAPTER_CONFIG_NAME).exists()
        and (root / "config.json").is_file()
        and ((root / SINGLE).is_file() or (root / INDEX).is_file())
    )


def inspect_model(path: str | os.PathLike[str]) -> ModelReport:
    """Read a model folder's config and safetensors headers; nothing is written.

    An unreadable recorded history does not fail the inspection: it is reported in
    ``history_error``.

    Raises:
        BaseModelError: Not a model folder, or an unreadable config, index or weights file.
    """
    root = Path(path)
    if not is_model_dir(root):
        raise BaseModelError(
            f"{str(root)!r} is not a model folder (config.json plus {SINGLE} or {INDEX})"
        )
    config = read_json_object(root / "config.json")
    files = weight_files(root) or []  # is_model_dir: one of the two files is there
    tensors = parameters = 0
    dtypes: Counter[str] = Counter()
    recorded: dict[str, Any] = {}
    for name in files:
        try:
            with safe_open(str(root / name), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if HEADER_KEY in metadata and not recorded:
                    recorded = {METADATA_NAME: metadata[HEADER_KEY]}
                for key in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                    piece = handle.get_slice(key)
                    shape = piece.get_shape()
                    tensors += 1
                    parameters += _numel(shape)
                    dtypes[str(piece.get_dtype())] += 1
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise BaseModelError(
                f"{root / name}: unreadable safetensors file ({exc}); it may be truncated"
            ) from exc
    history, error = checked_history(recorded, str(root))
    architectures = config.get("architectures") or []
    return ModelReport(
        path=str(root),
        model_type=config.get("model_type") if isinstance(config.get("model_type"), str) else None,
        architectures=tuple(str(a) for a in architectures)
        if isinstance(architectures, list)
        else (),
        weight_files=tuple(files),
        tensors=tensors,
        parameters=parameters,
        file_bytes=sum((root / name).stat().st_size for name in files),
        dtypes=dict(sorted(dtypes.items())),
        history=history,
        history_error=error,
    )


def _numel(shape: list[int]) -> int:
    count = 1
    for dim in shape:
        count *= int(dim)
    return count
