"""Resolving and loading a base model given as a local folder or a Hugging Face Hub id.

Offline mode (``HF_HUB_OFFLINE=1``) is respected: only the local Hub cache is consulted. When
nothing works, the error lists every place that was tried.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError
from torch import nn

from .errors import LoraKitError


class BaseModelError(LoraKitError):
    """A base model could not be found or loaded."""


def hub_offline() -> bool:
    """Whether Hugging Face Hub access is switched off (``HF_HUB_OFFLINE``)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_base(spec: str | os.PathLike[str]) -> Path:
    """The local folder holding base model ``spec`` (a folder, or a Hub id in cache/online).

    Raises:
        BaseModelError: Neither a folder nor a resolvable Hub id; the message lists what was
            tried.
    """
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BaseModelError(
                f"{str(path)!r} is a folder but has no config.json: pass a transformers model "
                f"folder (written by save_pretrained) or a Hub id"
            )
        return path
    where = "is a file, not a model folder" if path.is_file() else "does not exist"
    tried = [f"local folder {str(path)!r}: {where}"]
    repo_id = str(spec)
    if path.is_file() or repo_id.count("/") > 1 or not repo_id:
        raise BaseModelError(f"cannot resolve base model {repo_id!r}; tried: {'; '.join(tried)}")
    from huggingface_hub import snapshot_download

    attempts = [True] if hub_offline() else [True, False]
    for local_only in attempts:
        where = "Hugging Face cache" if local_only else "Hugging Face Hub (network)"
        try:
            return Path(snapshot_download(repo_id, local_files_only=local_only))
        except Exception as exc:  # huggingface_hub raises many types; we report each
            tried.append(f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    if hub_offline():
        tried.append("network: skipped because HF_HUB_OFFLINE is set")
    raise BaseModelError(f"cannot resolve base model {repo_id!r}; tried: {'; '.join(tried)}")


def load_base(
    spec: str | os.PathLike[str],
    *,
    model_class: str | None = None,
    dtype: torch.dtype | None = None,
    extra: dict[str, Any] | None = None,
) -> nn.Module:
    """Load a transformers model from a folder or Hub id.

    Args:
        spec: Folder or Hub id.
        model_class: transformers class name (e.g. ``"AutoModelForSequenceClassification"``);
            defaults to the first of the checkpoint's ``architectures``, else ``AutoModel``.
        dtype: Load weights in this dtype (default: as stored).
        extra: Further ``from_pretrained`` options (e.g. ``{"num_labels": 3}``).

    Raises:
        BaseModelError: Not found, unknown class, or the checkpoint failed to load.
    """
    folder = resolve_base(spec)
    config = load_config(folder)
    name = model_class or next(iter(getattr(config, "architectures", None) or []), "AutoModel")
    cls = getattr(transformers, name, None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise BaseModelError(f"{folder}: transformers has no model class {name!r}")
    options: dict[str, Any] = dict(extra or {})
    if dtype is not None:
        options["dtype"] = dtype
    try:
        model: nn.Module = cls.from_pretrained(folder, local_files_only=True, **options)
    except SafetensorError as exc:  # not an OSError: it escaped as a traceback
        raise BaseModelError(
            f"{folder}: unreadable safetensors weights ({exc}); the file may be truncated or "
            f"corrupt: re-save or re-download the base"
        ) from exc
    except (OSError, ValueError, RuntimeError) as exc:
        raise BaseModelError(f"{folder}: could not load as {name}: {exc}") from exc
    return model.eval()


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON object file of a base model folder (``config.json``, a shard index).

    Raises:
        BaseModelError: Unreadable, not JSON, or not an object; names the file.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BaseModelError(f"{path}: unreadable JSON ({exc}); re-save the base") from exc
    if not isinstance(data, dict):
        raise BaseModelError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


SINGLE = "model.safetensors"  # a base saved in one safetensors file
INDEX = "model.safetensors.index.json"  # ... or sharded, with this index


def weight_files(folder: Path) -> list[str] | None:
    """The safetensors files holding a model folder's weights, in name order.

    Returns:
        ``[SINGLE]``; else the shards named by ``INDEX``'s ``weight_map``; None when the folder
        has neither file.

    Raises:
        BaseModelError: The index is unreadable, its ``weight_map`` is not a non-empty object of
            file names, or it names a file outside the folder.
    """
    if (folder / SINGLE).is_file():
        return [SINGLE]
    if not (folder / INDEX).is_file():
        return None
    weight_map = read_json_object(folder / INDEX).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise BaseModelError(
            f"{folder / INDEX}: no weight_map (an object of tensor name -> shard file); "
            f"re-save the base with save_pretrained"
        )
    files = sorted(set(weight_map.values()), key=str)
    for name in files:
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise BaseModelError(
                f"{folder / INDEX}: weight_map names {name!r}, not a file in this folder; "
                f"re-save the base with save_pretrained"
            )
    return files


def load_config(folder: Path) -> Any:
    """The transformers config in ``folder``.

    Raises:
        BaseModelError: ``config.json`` is unreadable, or names a model type this transformers
            does not know (a checkpoint newer than the installed release).
    """
    try:
        return transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        version = f" (installed transformers {transformers.__version__})"
        raise BaseModelError(
            f"{folder}: cannot read config.json: {first}"
            + (version if isinstance(exc, ValueError) else "")
        ) from exc


def model_positions(config: Any) -> int | None:
    """The most token positions a model with this config takes in one row, if it says.

    Read from ``n_positions`` (GPT-2) or ``max_position_embeddings`` (BERT, Llama); the smaller
    when both are set. None when neither is a positive int (e.g. a relative-position model).
    """
    limits = [getattr(config, name, None) for name in ("n_positions", "max_position_embeddings")]
    found = [n for n in limits if isinstance(n, int) and n > 0]
    return min(found) if found else None


def load_tokenizer(spec: str | os.PathLike[str]) -> Any | None:
    """The tokenizer stored with base ``spec``, or None if it has none.

    Raises:
        BaseModelError: ``spec`` cannot be resolved or its config is unreadable.
    """
    folder = resolve_base(spec)
    load_config(folder)  # an unreadable config is reported as such, not as "no tokenizer"
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError):
        return None
