"""Swapping from an adapter directory, with one copy when the file fits a packed adapter.

`lora_kit.swap.make_swappable` stores an adapter's factors back to back in one buffer, in the
order a safetensors file holds them (see `lora_kit.swap.pack`). A file over the same modules
and heads at the padded rank, in the adapter's dtype, then holds in its data area exactly the
bytes of that buffer. Such a swap compares the file's checked header with the layout the
buffer implies (one tuple comparison), checks every value is finite (one reduction), and
copies the factors with one copy instead of building, checking and copying a hundred tensors.

Every other file (another rank, fewer modules, another dtype or key order, an unpacked
adapter) takes the general path, `lora_kit.swap.swap_in`, from the same read; so do files
that fail a check, so errors and their order are the general path's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .adapter_io import (
    META_PREFIX,
    WEIGHTS_NAME,
    adapter_files,
    all_finite,
    check_fingerprint_metadata,
    decode_metadata,
    read_adapter_config,
    read_raw_weights,
)
from .config import LoraConfig
from .errors import LoraKitError
from .fingerprint import compare_fingerprint
from .loading import expected_tensors
from .peft_format import head_key
from .safetensors_read import Layout, SafetensorsRaw, layout_for
from .swap import Packed, _set_rank, _tensor, find_packed, swap_in
from .swap_plan import SwapPlan, swap_plan

if TYPE_CHECKING:
    from .model import AdapterRecord, LoraModel


def swap_from_directory(lm: LoraModel, name: str, root: Path, *, check_base: bool) -> LoraConfig:
    """Swap the adapter in directory ``root`` into adapter ``name`` in place.

    Returns:
        The swapped-in adapter's config.

    Raises:
        As `lora_kit.adapter_io.read_adapter` and `lora_kit.swap.swap_in`.
    """
    record = lm.adapter_record(name)
    root, peft_config, config = read_adapter_config(root)
    weights = read_raw_weights(root / WEIGHTS_NAME)
    if isinstance(weights, SafetensorsRaw) and _swap_packed(
        lm, record, root, config, weights, check_base=check_base
    ):
        return config
    swap_in(lm, name, adapter_files(root, peft_config, config, weights), check_base=check_base)
    return config


@dataclass
class _Fit:
    """How files with one config fill a packed adapter (None fields: they do not fit).

    Attributes:
        config: The config (held so that its ``id`` stays its own).
        targets: Its targeted modules, in its order (for the base fingerprint).
        layout: The layout a fitting file has.
        start: Element offset of the factors in the file's one run.
        scales: ``[modules]`` the scalings, in the order of `Packed.scales`.
        heads: ``(module, parameter, element offset, shape)`` of each saved module's tensor.
    """

    config: LoraConfig
    targets: tuple[str, ...] = ()
    layout: Layout | None = None
    start: int = 0
    scales: Tensor | None = None
    heads: list[tuple[str, str, int, tuple[int, ...]]] = field(default_factory=list)


@dataclass
class _PlanMemo:
    """Per plan: the packing found for some tensor pointers, the fits of recent configs, and
    recorded fingerprint texts found equal to this base's (its value then, by identity: a
    changed base makes `SwapPlan.fingerprint` return another object)."""

    pointers: tuple[int, ...]
    packed: Packed | None
    dicts: list[dict[str, Any]]  # the adapters' parameter/buffer tables, and the names of
    names: list[str]  # the tensors in them whose pointers ``pointers`` holds
    fits: dict[int, _Fit] = field(default_factory=dict)
    fingerprints: dict[str, object] = field(default_factory=dict)


_FITS_KEPT = 16


def _swap_packed(
    lm: LoraModel,
    record: AdapterRecord,
    root: Path,
    config: LoraConfig,
    weights: SafetensorsRaw,
    *,
    check_base: bool,
) -> bool:
    """Swap with one copy if the file fits the packed adapter; False (nothing done) if not."""
    plan = swap_plan(lm, record)
    memo = _memo(plan)
    if memo.packed is None:
        return False
    fit = memo.fits.get(id(config))
    if fit is None:
        if len(memo.fits) >= _FITS_KEPT:
            memo.fits.clear()
        fit = memo.fits[id(config)] = _fit(lm, record, memo.packed, config)
    if fit.layout is None or fit.scales is None or weights.layout.entries != fit.layout.entries:
        return False
    run = weights.runs[0]  # [elements]: the whole data area (one dtype)
    heads = _head_copies(lm, record.name, fit, run)
    if heads is None:
        return False
    if not all_finite(list(weights.runs)):
        return False  # the general path names the tensor
    _check_fingerprint(memo, plan, fit, weights, root, check_base=check_base)
    packed = memo.packed
    with torch.no_grad():  # everything is checked: mutate from here on
        packed.factors.copy_(run[fit.start : fit.start + packed.factors.numel()])
        packed.scales.copy_(fit.scales)
        for adapter in packed.adapters.values():
            _set_rank(adapter, _tensor(adapter, "lora_A").shape[0])
        for target, value in heads:
            target.copy_(value)
    return True


def _head_copies(
    lm: LoraModel, name: str, fit: _Fit, run: Tensor
) -> list[tuple[Tensor, Tensor]] | None:
    """``(head copy tensor, its value in the file)`` pairs, or None where a head copy no longer
    has the tensors the fit was made for (edited since: the plan does not cover head copies)."""
    states: dict[str, dict[str, Tensor]] = {}
    pairs: list[tuple[Tensor, Tensor]] = []
    for head, param, start, shape in fit.heads:
        state = states.get(head)
        if state is None:
            state = states[head] = lm._saved(head).copies[name].state_dict()
        target = state.get(param)
        if target is None or tuple(target.shape) != shape:
            return None
        pairs.append((target, run[start : start + target.numel()].view(shape)))
    if sum(map(len, states.values())) != len(pairs):  # a tensor the fit does not know
        return None
    return pairs


def _check_fingerprint(
    memo: _PlanMemo,
    plan: SwapPlan,
    fit: _Fit,
    weights: SafetensorsRaw,
    root: Path,
    *,
    check_base: bool,
) -> None:
    """Check the recorded base fingerprint as the general path does, skipping the decoding
    and comparing of a recorded text found equal to the same base fingerprint before (adapters
    trained on one base record it byte for byte).

    Raises:
        AdapterFormatError: The recorded fingerprint is malformed.
        AdapterMismatchError: It differs from this base's (with ``check_base``).
    """
    raw_metadata = dict(weights.layout.metadata)
    raw = raw_metadata.get(META_PREFIX + "base_fingerprint")
    actual = plan.fingerprint(fit.targets) if check_base and raw is not None else None
    if raw is not None and actual is not None and memo.fingerprints.get(raw) is actual:
        return
    metadata = decode_metadata(raw_metadata)
    check_fingerprint_metadata(metadata, root / WEIGHTS_NAME)
    recorded = metadata.get("base_fingerprint")
    if actual is not None and isinstance(recorded, dict):
        compare_fingerprint(recorded, actual, str(root))
        if raw is not None:
            if len(memo.fingerprints) >= _FITS_KEPT:
                memo.fingerprints.clear()
            memo.fingerprints[raw] = actual


def _memo(plan: SwapPlan) -> _PlanMemo:
    """The plan's `_PlanMemo`, with the packing found afresh when any tensor moved."""
    memo = plan.memo.get("packed")
    if isinstance(memo, _PlanMemo):
        try:  # one look-up and one data_ptr per tensor, iterated in C
            pointers = tuple(map(Tensor.data_ptr, map(dict.__getitem__, memo.dicts, memo.names)))
        except (KeyError, TypeError):  # a tensor is gone: find the packing afresh
            pointers = ()
        if pointers == memo.pointers:
            return memo
    dicts: list[dict[str, Any]] = []
    names: list[str] = []
    for slot in plan.slots.values():
        adapter = slot.adapter
        dicts += [adapter._parameters, adapter._parameters]
        names += ["lora_A", "lora_B"]
        if "scale" in adapter._buffers:
            dicts.append(adapter._buffers)
            names.append("scale")
    pointers = tuple(map(Tensor.data_ptr, map(dict.__getitem__, dicts, names)))
    packed = find_packed({m: s.adapter for m, s in plan.slots.items()})
    memo = plan.memo["packed"] = _PlanMemo(pointers, packed, dicts, names)
    return memo


def _fit(lm: LoraModel, record: AdapterRecord, packed: Packed, config: LoraConfig) -> _Fit:
    """How a file with ``config`` fills ``packed``: it must adapt the same modules at the padded
    rank and save the same heads, and its tensors then lie as `layout_for` says."""
    try:
        targets, heads, expected = expected_tensors(lm.model, config)
    except LoraKitError:
        return _Fit(config)  # the general path raises it, in its order
    if set(targets) != set(record.modules) or set(heads) != set(record.saved_modules):
        return _Fit(config)
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    dtype = packed.factors.dtype
    for key, module, attr in packed.order:
        shape = tuple(_tensor(packed.adapters[module], attr).shape)
        if expected.get(key) != shape:
            return _Fit(config)  # another rank: the general path pads it
        specs.append((key, dtype, shape))
    head_params: dict[str, tuple[str, str]] = {}
    for head in heads:
        for param, value in lm._saved(head).copies[record.name].state_dict().items():
            key = head_key(head, param)
            if value.dtype != dtype or expected.get(key) != tuple(value.shape):
                return _Fit(config)
            specs.append((key, dtype, tuple(value.shape)))
            head_params[key] = (head, param)
    if len(specs) != len(expected):  # a copy without a tensor of its original: not this file
        return _Fit(config)
    specs.sort(key=lambda spec: spec[0])  # the file's order (one dtype: by name)
    layout = layout_for(specs)
    keys = packed.keys
    first = next(i for i, spec in enumerate(specs) if spec[0] == keys[0])
    if tuple(spec[0] for spec in specs[first : first + len(keys)]) != keys:
        return _Fit(config)  # a head's key sorts between factors: not one block
    head_slices = [
        (*head_params[entry[0]], entry[5], entry[2])
        for entry in layout.entries
        if entry[0] in head_params
    ]
    start = layout.entries[first][5]
    scales = torch.tensor(
        [config.scaling_for(module) for module in packed.adapters],
        dtype=packed.scales.dtype,
        device=packed.scales.device,
    )
    return _Fit(config, tuple(targets), layout, start, scales, head_slices)
