"""``lorakit merge``: fold adapters into a base checkpoint on disk, one tensor at a time.

The output is written with `safetensors_stream`: a base tensor that no adapter changes (and
that keeps its dtype) is copied file to file by the kernel without entering the process; each
merged one is read, updated and written alone, so at most one base tensor (plus its update) is
in memory at once: never a second copy of the model. The arithmetic is `merge`'s (fp32 update,
rounded once). Everything is checked before the first byte is written, the output is assembled
in a hidden temporary folder next to ``out`` and renamed into place only when complete.

A `history.History` (base, adapters with their sha256, weights, fingerprint checks, heads kept)
goes into the output's safetensors header as ``lora_kit.history``; transformers ignores it.
``modules_to_save`` heads replace the base's tensors, chosen as `heads` describes; a head the
base has no place for (a classifier trained on a headless checkpoint) makes the output the task
model, as `task_head` describes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .adapter_io import (
    CONFIG_NAME,
    LABELS_NAME,
    WEIGHTS_NAME,
    AdapterFiles,
    file_sha256,
    read_adapter,
)
from .base_model import (
    INDEX,
    SINGLE,
    BaseModelError,
    read_json_object,
    resolve_base,
    weight_files,
)
from .config import as_numbers
from .errors import (
    AdapterMismatchError,
    ConfigError,
    HeadLayoutError,
    LoraKitError,
    NonFiniteError,
)
from .fingerprint import HASH_DTYPE
from .heads import choose_heads
from .history import HEADER_KEY, History, HistorySource, Scalar, source_record
from .merge import merge_update, weighted_delta
from .peft_format import PREFIX, lora_pairs
from .safetensors_read import SafetensorsFormatError, read_header
from .safetensors_stream import ByteRange, write_streaming
from .task_head import TaskLayout, read_labels, task_layout

METADATA_KEY = HEADER_KEY  # the History, as JSON
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Files in a model folder that hold weights: never copied (the merged file replaces them).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx")


@dataclass(frozen=True)
class FileMergeReport:
    """What ``merge_files`` wrote.

    Attributes:
        out: The model folder written.
        adapters: Each adapter's provenance (hashes, weight, fingerprint check).
        dtype: Output dtype (``"as stored"`` if unchanged).
        tensors: Number of tensors written.
        max_change: Merged module -> largest absolute change to one weight element.
        heads: ``modules_to_save`` tensor -> adapter whose copy replaced the base's.
        copied: Non-weight files copied from the base (config, tokenizer, ...).
        task: The task model written when the base had no head for the adapter's (else None).
    """

    out: Path
    adapters: tuple[HistorySource, ...]
    dtype: str
    tensors: int
    max_change: dict[str, float] = field(default_factory=dict)
    heads: dict[str, str] = field(default_factory=dict)
    copied: tuple[str, ...] = ()
    task: TaskLayout | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (for ``--json``)."""
        return {
            "out": str(self.out),
            "adapters": [a.to_dict() for a in self.adapters],
            "dtype": self.dtype,
            "tensors": self.tensors,
            "merged_modules": len(self.max_change),
            "max_change": max(self.max_change.values(), default=0.0),
            "max_change_per_module": self.max_change,
            "heads": self.heads,
            "copied": list(self.copied),
            "task_head": None if self.task is None else self.task.record(),
        }


@dataclass
class _Module:
    """One targeted projection: where its weight is in the base file and what to add."""

    key: str  # base tensor key of the weight
    fan_in_fan_out: bool
    terms: list[tuple[Tensor, Tensor, float]]  # (A, B, weight * scaling)


def merge_files(
    base: str | os.PathLike[str],
    adapters: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    weights: Sequence[float] | None = None,
    dtype: str | None = None,
    force: bool = False,
    heads: str | os.PathLike[str] | None = None,
) -> FileMergeReport:
    """Merge ``adapters`` (with ``weights``, default 1 each) into ``base``; write model ``out``.

    When the adapters carry a head the base lacks (a classifier trained on a headless
    ``BertModel`` checkpoint), the output is the task model, as `lora_kit.task_head` describes:
    the base's tensors under the task model's names, the head, and a config naming the task
    architecture and labels (from the adapter's ``labels.json`` when it has one).

    Args:
        base: Model folder or Hub id (see `base_model.resolve_base`); safetensors weights.
        adapters: Adapter directories (lora_kit's or PEFT's).
        out: New folder to create (must not exist); plain transformers loads it.
        weights: One finite weight per adapter; negative subtracts.
        dtype: ``float32``/``float16``/``bfloat16`` for floating tensors (default: as stored).
        force: Merge even if an adapter's recorded base fingerprint differs from ``base``.
        heads: The adapter whose ``modules_to_save`` head to keep when several carry different
            copies (see `lora_kit.heads`); not needed when at most one has a head.

    Raises:
        ConfigError: Bad weights/dtype/``heads``, or ``out`` exists.
        BaseModelError: Base not found or not in safetensors.
        AdapterFormatError, AdapterMismatchError: Unreadable adapter, or it does not fit.
        HeadConflictError: Adapters carry different copies of a head and ``heads`` is not given.
        HeadLayoutError: A head the base lacks cannot be placed (unknown task or head names).
        NonFiniteError: The merge would produce NaN/inf, or ``dtype`` overflows a tensor to
            infinity. Nothing is written in any case.
    """
    target = Path(out)
    if target.exists():
        raise ConfigError(f"output {str(target)!r} already exists: remove it or pick another -o")
    if not adapters:
        raise ConfigError("give at least one adapter directory to merge")
    coeffs = merge_arguments(len(adapters), weights, dtype)
    out_dtype = _dtype(dtype)
    folder = resolve_base(base)
    store = _Base(folder)
    config = read_json_object(folder / "config.json")
    files = [read_adapter(p) for p in adapters]
    layout = _layout(files, choose_heads(files, heads), store, out_dtype)
    modules: dict[str, _Module] = {}
    sources = []
    for files_k, coeff in zip(files, coeffs, strict=True):
        found = _plan(files_k, coeff, store, modules)
        status = _check_fingerprint(files_k, found, config, store, force)
        sources.append(_provenance(files_k, coeff, status))
    by_key = {m.key: (name, m) for name, m in modules.items()}
    written = set(layout.keys.values())
    lost = sorted(name for name, m in modules.items() if m.key not in written)
    if lost:  # only possible when the output is a task model that has no place for them
        raise HeadLayoutError(
            f"adapted modules {lost} are not part of {layout.architecture}, which lorakit merge "
            f"writes for this headless base; their updates would be lost"
        )
    change: dict[str, float] = {}

    def produce(key: str) -> Tensor:
        base_key = layout.keys[key]
        # A head's tensor, else the base's (base_key is None only for a head the base lacks).
        stored = layout.heads[key][1] if key in layout.heads else store.load(str(base_key))
        if base_key not in by_key:
            return _converted(stored, layout.dtypes[key], key)
        name, mod = by_key[base_key]
        delta = weighted_delta(mod.terms, fan_in_fan_out=mod.fan_in_fan_out)
        new, change[name] = merge_update(stored, delta, name, layout.dtypes[key])
        return new  # the fp32 sum, rounded once

    copies = {
        key: store.byte_range(base_key)
        for key, base_key in layout.keys.items()
        if base_key is not None
        and key not in layout.heads
        and base_key not in by_key
        and layout.dtypes[key] == store.dtype(base_key, None)
    }
    options: dict[str, Scalar] = {"dtype": dtype or "as stored", "force": force}
    if layout.task is not None:
        options.update(layout.task.record())
    history = History(
        operation="merge",
        method="linear",
        sources=tuple(sources),
        base=str(base),
        heads={k: v[0] for k, v in layout.heads.items()},
        options=options,
    )
    new_config = None if layout.task is None else layout.task.config(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        write_streaming(
            tmp / SINGLE,
            [(k, layout.dtypes[k], layout.shapes[k]) for k in layout.keys],
            produce,
            {"format": "pt", METADATA_KEY: json.dumps(history.to_dict())},
            copies,
        )
        copied = _copy_side_files(folder, tmp, dtype, new_config)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FileMergeReport(
        out=target,
        adapters=tuple(sources),
        dtype=dtype or "as stored",
        tensors=len(layout.keys),
        max_change=change,
        heads=dict(history.heads),
        copied=copied,
        task=layout.task,
    )


@dataclass(frozen=True)
class _Layout:
    """The output's tensors, in file order, and where each comes from."""

    keys: dict[str, str | None]  # output key -> base key (None: a head the base lacks)
    dtypes: dict[str, torch.dtype]
    shapes: dict[str, tuple[int, ...]]
    heads: dict[str, tuple[str, Tensor]]  # output key -> (adapter path, head tensor)
    task: TaskLayout | None  # set when the base had no head and the output is the task model

    @property
    def architecture(self) -> str:
        """The task model's class name, or "the base's architecture"."""
        return self.task.architecture if self.task is not None else "the base's architecture"


def _layout(
    files: Sequence[AdapterFiles], kept: dict[str, int], store: _Base, out: torch.dtype | None
) -> _Layout:
    """The base's tensors (in its file order) with the kept heads in place, or the task model."""
    bodies = {
        key.removeprefix(PREFIX): (files[i], files[i].tensors[key]) for key, i in kept.items()
    }
    in_base = {body: _head_base_key(body, store.shards) for body in bodies}
    if all(in_base.values()):  # the base has every head: replace its copies
        heads = {}
        for body, base_key in in_base.items():
            source, tensor = bodies[body]
            _check_head_shape(source, body, tensor, store.shape(str(base_key)))
            heads[str(base_key)] = (str(source.path), tensor)
        keys: dict[str, str | None] = {k: k for k in store.ordered}
        return _Layout(
            keys=keys,
            dtypes={k: store.dtype(k, out) for k in keys},
            shapes={k: store.shape(k) for k in keys},
            heads=heads,
            task=None,
        )
    owners = {id(f) for f, _ in bodies.values()}
    owner = next(f for f, _ in bodies.values())
    if len(owners) > 1:
        raise HeadLayoutError(
            f"the heads kept come from several adapters "
            f"({', '.join(sorted({str(f.path) for f, _ in bodies.values()}))}) and the base has "
            f"none; lorakit merge adds a missing head from one adapter only: choose it with "
            f"--heads DIR"
        )
    task = task_layout(
        store.folder,
        {k: store.shape(k) for k in store.ordered},
        {body: tensor for body, (_, tensor) in bodies.items()},
        owner.peft_config.get("task_type"),
        read_labels(owner.path / LABELS_NAME),
        str(owner.path),
    )
    floating = next((d for d in store.stored_dtypes() if d.is_floating_point), torch.float32)
    keys = {**task.base_keys, **dict.fromkeys(k for k in task.head_keys if k not in task.base_keys)}
    heads = {k: (str(owner.path), bodies[body][1]) for k, body in task.head_keys.items()}
    return _Layout(
        keys=keys,
        dtypes={
            k: store.dtype(b, out) if b is not None else (out or floating) for k, b in keys.items()
        },
        shapes={
            k: store.shape(b) if b is not None else tuple(heads[k][1].shape)
            for k, b in keys.items()
        },
        heads=heads,
        task=task,
    )


def _converted(stored: Tensor, dtype: torch.dtype, key: str) -> Tensor:
    """``stored`` in ``dtype``; refused if rounding turns a finite value into infinity.

    (fp32 values beyond fp16's range, about 65504, overflow. Values that were already
    NaN/inf, like a mask buffer's, are left as they are.)

    Raises:
        NonFiniteError: Naming ``key`` and the dtype.
    """
    out = stored.to(dtype)
    if out.dtype == stored.dtype or not out.is_floating_point() or bool(out.isfinite().all()):
        return out
    if bool((stored.isfinite() & ~out.isfinite()).any()):
        raise NonFiniteError(
            f"tensor {key!r} does not fit {dtype}: values overflow to infinity (nothing was "
            f"written); use a wider --dtype such as bfloat16 or float32"
        )
    return out


def merge_arguments(n: int, weights: Sequence[float] | None, dtype: str | None) -> list[float]:
    """Check `merge_files`' arguments before any file is read; returns one weight per adapter.

    Weights are read as `stack` and `LoraModel.set_adapter` read them (`config.as_numbers`).

    Raises:
        ConfigError: Weights that are not a list of numbers, a weight count other than ``n``, a
            non-finite weight, an unknown dtype.
    """
    _dtype(dtype)
    values = [1.0] * n if weights is None else as_numbers(weights)
    if values is None:
        raise ConfigError(f"merge weights must be a list of numbers, got {weights!r}")
    if len(values) != n:
        raise ConfigError(f"got {len(values)} weights for {n} adapters: give one per adapter")
    for w in values:
        if not math.isfinite(w):
            raise ConfigError(f"merge weights must be finite, got {w!r}")
    return values


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in DTYPES:
        raise ConfigError(f"unknown --dtype {name!r}; use one of {sorted(DTYPES)}")
    return DTYPES[name]


class _Base:
    """The base checkpoint's safetensors file(s); tensors are read one at a time.

    Tensors are read with plain file reads (not a memory map), so what a finished tensor used
    is returned to the OS at once and the process never holds more than one tensor of the base.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        files = weight_files(folder)
        if files is None:
            present = sorted(p.name for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
            raise BaseModelError(
                f"{folder}: no {SINGLE} or {INDEX} (found {present or 'no weight files'}); "
                f"lorakit merge streams safetensors only: re-save the base with "
                f"save_pretrained(safe_serialization=True)"
            )
        # key -> (file, dtype, shape, absolute start, end)
        self.entries: dict[str, tuple[str, torch.dtype, tuple[int, ...], int, int]] = {}
        for name in files:
            for key, entry in _read_header(folder / name).items():
                self.entries[key] = (name, *entry)
        self.shards = {k: v[0] for k, v in self.entries.items()}
        # File order: adjacent tensors that go out unchanged are copied in one call.
        self.ordered = sorted(
            self.entries, key=lambda k: (files.index(self.shards[k]), self.entries[k][3])
        )

    def load(self, key: str) -> Tensor:
        """The tensor ``key`` (a fresh CPU tensor)."""
        name, stored, shape, begin, end = self.entries[key]
        dtype = self._stored(key, stored)
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        raw = torch.empty(end - begin, dtype=torch.uint8)  # not zeroed: readinto fills it
        with (self.folder / name).open("rb", buffering=0) as handle:
            handle.seek(begin)
            if handle.readinto(raw.numpy().data) != end - begin:
                raise BaseModelError(f"{self.folder / name}: truncated at tensor {key!r}")
        return raw.view(dtype).reshape(shape)

    def byte_range(self, key: str) -> ByteRange:
        """Where ``key``'s bytes are, to copy them as they are."""
        name, _, _, begin, end = self.entries[key]
        return ByteRange(self.folder / name, begin, end)

    def stored_dtypes(self) -> list[torch.dtype]:
        """The dtype of every tensor, in file order."""
        return [self._stored(k, self.entries[k][1]) for k in self.ordered]

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` without loading it."""
        return self.entries[key][2]

    def dtype(self, key: str, out: torch.dtype | None) -> torch.dtype:
        """The dtype ``key`` is written in: ``out`` for floating tensors, else as stored."""
        stored = self._stored(key, self.entries[key][1])
        return out if out is not None and stored.is_floating_point else stored

    def _stored(self, key: str, dtype: torch.dtype) -> torch.dtype:
        if dtype not in _STORED:
            raise BaseModelError(f"{self.folder}: tensor {key!r} has dtype {dtype}, unsupported")
        return dtype


def _read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """``key -> (dtype, shape, start, end)`` (absolute offsets), checked against the file.

    Raises:
        BaseModelError: A malformed, truncated or corrupt file, before anything is written.
    """
    try:
        return read_header(path)
    except (OSError, SafetensorsFormatError) as exc:
        raise BaseModelError(f"{path}: unreadable safetensors file ({exc})") from exc


# The dtypes the streamed writer handles (no fp8 or unsigned wider than a byte).
_STORED = {torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64,
           torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool}  # fmt: skip


def _base_key(module: str, shards: dict[str, str], source: str) -> str:
    # A bare backbone checkpoint (e.g. the Hub's "gpt2") names "h.0.attn.c_attn" what a model
    # with a head calls "transformer.h.0.attn.c_attn": accept either.
    for candidate in (module, module.partition(".")[2]):
        if candidate and f"{candidate}.weight" in shards:
            return f"{candidate}.weight"
    raise AdapterMismatchError(
        f"{source}: the base has no weight for adapted module {module!r} (looked for "
        f"{module}.weight); was the adapter trained on another architecture? (A weight tied "
        f"to another, like GPT-2's lm_head to its token embeddings, is not stored and cannot be "
        f"merged: it would change both.)"
    )


def _head_base_key(body: str, shards: dict[str, str]) -> str | None:
    """The base tensor a head tensor replaces (its name, or without the task prefix), if any."""
    for candidate in (body, body.partition(".")[2]):
        if candidate and candidate in shards:
            return candidate
    return None


def _check_head_shape(
    source: AdapterFiles, body: str, tensor: Tensor, shape: tuple[int, ...]
) -> None:
    if tuple(tensor.shape) != shape:
        raise AdapterMismatchError(
            f"{source.path}: head tensor {body!r} is {list(tensor.shape)} but the "
            f"base's is {list(shape)}; was the head trained for another number of labels?"
        )


def _plan(
    files: AdapterFiles, coeff: float, store: _Base, modules: dict[str, _Module]
) -> dict[str, str]:
    """Add ``files``' LoRA terms to ``modules``; return its module -> base key map."""
    source = str(files.path)
    found: dict[str, str] = {}
    fp_modules = (files.metadata.get("base_fingerprint") or {}).get("modules", {})
    fan_default = bool(files.peft_config.get("fan_in_fan_out", False))
    pairs = lora_pairs(files.tensors, source)
    files.check_pattern_order(module for module, _, _ in pairs)
    for module, a, b in pairs:  # heads: see _heads
        base_key = _base_key(module, store.shards, source)
        shape = store.shape(base_key)
        out_f, in_f = b.shape[0], a.shape[1]
        if shape not in ((out_f, in_f), (in_f, out_f)):
            raise AdapterMismatchError(
                f"{source}: {module} is {list(shape)} in the base but the adapter is for "
                f"[{out_f}, {in_f}] [out, in]; the adapter belongs to another base"
            )
        if out_f == in_f:
            layout = (fp_modules.get(module) or [0, 0, None])[2]
            fan = layout == "conv1d" if layout else fan_default
        else:
            fan = shape == (in_f, out_f)
        scaling = files.config.scaling_for(module) * coeff
        entry = modules.setdefault(module, _Module(base_key, fan, []))
        entry.terms.append((a, b, scaling))
        found[module] = base_key
    return found


def _check_fingerprint(
    files: AdapterFiles, found: dict[str, str], config: dict[str, Any], store: _Base, force: bool
) -> str:
    """Compare the adapter's recorded base fingerprint with the base files (as `fingerprint`)."""
    expected = files.metadata.get("base_fingerprint")
    if not isinstance(expected, dict):
        return "none recorded"
    combined = hashlib.sha256()
    for module in sorted(found):
        # The same bytes as fingerprint.weight_digest: the stored weight rounded to bf16.
        weight = store.load(found[module]).to(HASH_DTYPE).contiguous()
        digest = hashlib.sha256(weight.view(torch.int16).numpy().tobytes()).hexdigest()
        combined.update(f"{module}={digest};".encode())
    problems = []
    if expected.get("model_type") != config.get("model_type"):
        problems.append(
            f"model type {expected.get('model_type')!r} vs base {config.get('model_type')!r}"
        )
    if expected.get("weights_sha256") != combined.hexdigest():
        problems.append("the targeted base weights differ")
    if not problems:
        return "match"
    if force:
        return "mismatch (forced)"
    raise AdapterMismatchError(
        f"{files.path}: adapter was not trained on this base ({'; '.join(problems)}); merge it "
        f"onto the base it was trained on, or pass --force (force=True) if you are sure"
    )


def _provenance(files: AdapterFiles, coeff: float, status: str) -> HistorySource:
    hashes = file_sha256(files.path / WEIGHTS_NAME), file_sha256(files.path / CONFIG_NAME)
    return source_record(files.path, files.metadata, coeff, hashes, status)


def _copy_side_files(
    folder: Path, dest: Path, dtype: str | None, config: dict[str, Any] | None
) -> tuple[str, ...]:
    """Copy ``folder``'s non-weight files; ``config`` (if given) replaces its config.json."""
    copied = []
    for entry in sorted(folder.iterdir()):
        if not entry.is_file() or entry.name.startswith("."):
            continue
        if entry.name.endswith(_WEIGHT_SUFFIXES) or entry.name.endswith(".index.json"):
            continue
        shutil.copy2(entry, dest / entry.name)
        copied.append(entry.name)
    if not copied or "config.json" not in copied:
        raise LoraKitError(f"{folder}: nothing copied; the base folder has no config.json")
    if config is None and dtype is None:
        return tuple(copied)
    cfg = (
        dict(config)
        if config is not None
        else json.loads((dest / "config.json").read_text(encoding="utf-8"))
    )
    if dtype is not None:
        for key in ("dtype", "torch_dtype"):
            if key in cfg:
                cfg[key] = dtype
    (dest / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    return tuple(copied)
