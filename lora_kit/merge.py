"""Exact merging: fold adapters into the base weights, and undo it bit-exactly.

The arithmetic is one rule, shared by the in-memory merge and ``lorakit merge``: the update
``sum_k w_k * scaling_k * B_k @ A_k`` is computed in fp32 (transposed for Conv1D, whose weight is
stored ``[in, out]``), added to the base weight in fp32, and rounded **once** into the base's
dtype. A result holding NaN/inf is refused before anything changes.

``unmerge()`` restores the very tensors that were there before (the merge keeps them aside), so
it is bit-exact however often it is repeated, in any dtype. The cost: one extra copy of every
merged projection's weight while merged (reported as `MergeReport.kept_bytes`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .errors import ConfigError, MergedStateError, NonFiniteError
from .fingerprint import weight_digest
from .layers import LoRALinear
from .routing import Selection
from .saved_modules import SavedModule
from .surgery import rewrap, unwrap, wrappers
from .swap_plan import forget_plans

if TYPE_CHECKING:
    from .model import AdapterSelection, LoraModel


def lora_delta(a: Tensor, b: Tensor, scaling: float, *, fan_in_fan_out: bool = False) -> Tensor:
    """``scaling * B @ A`` in fp32, in the base weight's stored layout.

    Args:
        a: ``lora_A``, ``[r, in]``.
        b: ``lora_B``, ``[out, r]``.
        scaling: The adapter's scaling times any extra weight.
        fan_in_fan_out: True for Conv1D (result ``[in, out]``), else ``[out, in]``.
    """
    # Contiguous in the stored layout: Conv1D's [in, out] is A^T @ B^T, not a transposed view.
    delta = a.float().t() @ b.float().t() if fan_in_fan_out else b.float() @ a.float()
    return delta if scaling == 1.0 else delta.mul_(scaling)  # x * 1.0 == x: skip the pass


def weighted_delta(
    terms: Iterable[tuple[Tensor, Tensor, float]], *, fan_in_fan_out: bool = False
) -> Tensor:
    """``sum_k c_k * B_k @ A_k`` in fp32 for ``terms = [(A_k, B_k, c_k)]`` (c = weight * scaling).

    Computed as one GEMM over the rank-concatenated factors (the ``cat`` stacking identity).
    """
    a_list, b_list = [], []
    for a, b, coeff in terms:
        a_list.append(a.float())  # [r_k, in]
        b_list.append(b.float() * coeff)  # [out, r_k]
    if not a_list:
        raise ConfigError("weighted_delta needs at least one (A, B, coefficient) term")
    return lora_delta(
        torch.cat(a_list), torch.cat(b_list, dim=1), 1.0, fan_in_fan_out=fan_in_fan_out
    )


def merged_weight(
    weight: Tensor, delta: Tensor, where: str, dtype: torch.dtype | None = None
) -> Tensor:
    """``weight + delta`` added in fp32 and rounded once into ``dtype`` (default: ``weight``'s).

    Neither input is changed (`merge_update` is the variant that reuses ``delta``'s buffer).

    Raises:
        NonFiniteError: The result holds NaN/inf (e.g. fp16 overflow); names ``where``.
    """
    return merge_update(weight, delta.clone(), where, dtype)[0]


def merge_update(
    weight: Tensor, delta: Tensor, where: str, dtype: torch.dtype | None = None
) -> tuple[Tensor, float]:
    """`merged_weight`, and the largest absolute change it makes to one element.

    ``delta`` (fp32, as `weighted_delta` returns it) is consumed: the sum is formed in its
    buffer. The change is measured in fp32 on the rounded result; it doubles as the finiteness
    check (NaN/inf anywhere in the result makes it non-finite), so the result is read twice in
    all: once to round, once to measure.

    Raises:
        NonFiniteError: The result holds NaN/inf (e.g. fp16 overflow); names ``where``.
    """
    dtype = weight.dtype if dtype is None else dtype
    total = delta.to(weight.device, torch.float32)
    total.add_(weight.detach())  # fp32 sum (a + b == b + a bitwise: same as weight + delta)
    out = total.to(dtype)  # rounded once; the same tensor when dtype is fp32
    diff = out - weight if out.dtype == weight.dtype == torch.float32 else out.float() - weight
    change = float(diff.abs_().max()) if diff.numel() else 0.0
    if not math.isfinite(change) and not bool(torch.isfinite(out).all()):
        raise NonFiniteError(
            f"merging into {where} gives NaN or infinity (in {dtype}); nothing was "
            f"changed. Check the adapter weights, use smaller merge weights, or a wider dtype"
        )
    return out, change


@dataclass(frozen=True)
class MergeReport:
    """What a merge did.

    Attributes:
        weights: The merged ``(adapter, weight)`` pairs.
        max_change: Module -> largest absolute change made to one base weight element.
        heads: ``modules_to_save`` module -> the adapter whose copy is now in use.
        kept_bytes: Memory held while merged to make ``unmerge()`` bit-exact;
            ``merge_and_unload()`` frees it (a report keeps the figure of its merge).
    """

    weights: tuple[tuple[str, float], ...]
    max_change: Mapping[str, float]
    heads: Mapping[str, str]
    kept_bytes: int

    def __str__(self) -> str:
        parts = ", ".join(f"{n}*{w:g}" for n, w in self.weights)
        top = max(self.max_change.items(), key=lambda kv: kv[1], default=("-", 0.0))
        return (
            f"merged {parts} into {len(self.max_change)} modules (largest change {top[1]:.3g} "
            f"in {top[0]}); {self.kept_bytes / 2**20:.1f} MiB kept for unmerge()"
        )


@dataclass(frozen=True)
class _MergeState:
    report: MergeReport
    previous_default: Selection


def _layers(lm: LoraModel) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in lm.model.named_modules() if isinstance(m, LoRALinear)]


def merge(lm: LoraModel, selection: AdapterSelection) -> MergeReport:
    """Fold ``selection`` (a name or ``{name: weight}``) into ``lm``'s base weights in place.

    See :meth:`LoraModel.merge`.
    """
    if lm._merge_state is not None:
        raise MergedStateError(
            f"adapters {list(lm._merge_state.report.weights)} are already merged: call "
            f"lm.unmerge() before merging again"
        )
    sel = lm._selection(selection)
    if not sel.weights:
        raise ConfigError("merge needs an adapter name or a {name: weight} mapping, got none")
    new: dict[str, Tensor] = {}
    change: dict[str, float] = {}
    layers = _layers(lm)
    for name, layer in layers:  # validate everything before mutating anything
        terms = [
            (ad.lora_A, ad.lora_B, ad.scaling * w)
            for ad, w in ((layer.adapter(n), w) for n, w in sel.weights if n in layer.adapters)
        ]
        if not terms:
            continue
        with torch.no_grad():
            delta = weighted_delta(terms, fan_in_fan_out=layer.fan_in_fan_out)
            out, change[name] = merge_update(layer.weight, delta, name)
        new[name] = out
    _refuse_tied(lm.model, [(name, layer) for name, layer in layers if name in new])
    kept = 0
    by_name = dict(layers)
    for name in new:  # cache the base fingerprint first: save_adapter() while merged stays right
        weight_digest(by_name[name])
    saved = [(n, m) for n, m in lm.model.named_modules() if isinstance(m, SavedModule)]
    with _all_or_nothing() as edit:
        for name, layer in layers:
            edit.set(layer, "merged", sel)
            if name in new:
                edit.set(layer, "unmerged_weight", layer.weight.data)
                kept += layer.weight.numel() * layer.weight.element_size()
                edit.set(layer.weight, "data", new[name])
        previous = lm.router.default
        edit.set(lm.router, "default", sel)
        heads: dict[str, str] = {}
        for n, m in saved:  # the merged adapters' head, even inside lm.using()
            edit.set(m, "merged", sel)
            heads[n] = next((a for a, _ in sel.weights if a in m.copies), "(original)")
        report = MergeReport(sel.weights, change, heads, kept)
        edit.set(lm, "_merge_state", _MergeState(report, previous))
    return report


class _Changes:
    """Attribute assignments made so far, each with the value it replaced."""

    def __init__(self) -> None:
        self._done: list[tuple[object, str, object]] = []

    def set(self, owner: object, attribute: str, value: object) -> None:
        """``setattr(owner, attribute, value)``, remembering the value it replaces."""
        self._done.append((owner, attribute, getattr(owner, attribute)))
        setattr(owner, attribute, value)

    def undo(self) -> None:
        """Put every replaced value back, the latest first."""
        for owner, attribute, value in reversed(self._done):
            setattr(owner, attribute, value)


@contextmanager
def _all_or_nothing() -> Iterator[_Changes]:
    """Assignments made through the yielded `_Changes` are all taken back if the block raises.

    Merging and unmerging change every layer one by one (its weight, its merged selection) and
    the model's record last: interrupted half-way (Ctrl-C, an error), the model would otherwise
    be partly merged with no record of it, which unmerge() cannot restore.
    """
    changes = _Changes()
    try:
        yield changes
    except BaseException:
        changes.undo()
        raise


def _refuse_tied(model: nn.Module, layers: list[tuple[str, LoRALinear]]) -> None:
    """Raise if a projection to merge into shares its weight with another parameter.

    A tied weight (GPT-2's ``lm_head`` is the token embedding) would change in both places:
    merging into the head would also rewrite the input embeddings.

    Raises:
        ConfigError: Naming the projection and the parameters its weight is tied to.
    """
    if not layers:
        return
    owners: dict[tuple[torch.device, int], list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        if param.device.type != "meta":
            owners.setdefault((param.device, param.untyped_storage().data_ptr()), []).append(pname)
    for name, layer in layers:
        weight = layer.weight
        key = (weight.device, weight.untyped_storage().data_ptr())
        tied = [n for n in owners.get(key, []) if n != f"{name}.base.weight"]
        if tied:
            raise ConfigError(
                f"cannot merge into {name!r}: its weight is tied to {tied}, which would change "
                f"too (nothing was changed). Run the adapter unmerged, or untie the weights "
                f"(give {name} its own copy) before merging"
            )


def unmerge(lm: LoraModel) -> MergeReport | None:
    """Restore the pre-merge base weights bit-exactly; see :meth:`LoraModel.unmerge`."""
    state: _MergeState | None = lm._merge_state
    if state is None:
        return None
    saved = [m for m in lm.model.modules() if isinstance(m, SavedModule)]
    with _all_or_nothing() as edit:
        for _, layer in _layers(lm):
            if layer.unmerged_weight is not None:
                edit.set(layer.weight, "data", layer.unmerged_weight)
            edit.set(layer, "unmerged_weight", None)
            edit.set(layer, "merged", None)
        for module in saved:
            edit.set(module, "merged", None)
        edit.set(lm.router, "default", state.previous_default)
        edit.set(lm, "_merge_state", None)
    return state.report


def merge_and_unload(lm: LoraModel, selection: AdapterSelection = None) -> nn.Module:
    """Fold the adapters in for good and return the plain model; see ``LoraModel``.

    The pre-merge weights are kept until every wrapper is gone, so that an unwrap interrupted
    part-way is undone exactly: the wrappers go back, and a merge made by this call is undone.
    (Keeping them costs no more at the peak: merging holds every new weight beside the old.)
    """
    merging = lm._merge_state is None
    if merging:
        merge(lm, selection if selection is not None else dict(lm.router.default.weights))
    elif selection is not None:
        raise MergedStateError(
            "adapters are already merged; call merge_and_unload() without a selection to keep "
            "them, or lm.unmerge() first to merge another selection"
        )
    model = lm.model
    found = wrappers(model)
    try:
        for name, module in found:
            unwrap(model, name, module)
    except BaseException:
        for name, module in found:
            rewrap(model, name, module)
        if merging:
            unmerge(lm)
        raise
    for _, module in found:
        if isinstance(module, LoRALinear):
            module.unmerged_weight = None  # the pre-merge weights are freed here
    lm._adapters.clear()
    cache = lm._adapter_cache()
    if cache is not None:  # registered adapters were for the unmerged base
        cache.clear()
    forget_plans(lm)
    lm.router.default = Selection()
    lm._merge_state = None
    return model
