"""Mixed batches: every row of a batch uses its own adapter (or none), in one forward pass.

A :class:`RowPlan` is built once per call from ``adapter_names`` and travels to every layer in
the thread-local :class:`~lora_kit.routing.Selection` (``Selection.rows``). Each layer groups the
rows by adapter: rows sharing an adapter are gathered with ``index_select``, go through that
adapter's two small GEMMs together, and are added back with ``index_add_``. The cost grows with
the number of *distinct* adapters in the batch, never with the number of rows; a batch whose
rows all use one adapter takes exactly the single-adapter path.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import AdapterNameError, LoraKitError

if TYPE_CHECKING:
    from .layers import LoraAdapter, LoRALinear
    from .saved_modules import SavedModule

# (adapter name or None for the base, row indices or None for "every row")
Group = tuple[str | None, Tensor | None]


class RowPlan:
    """The adapter of each row of one call, and its row groups (cached per batch size/device).

    Generation may expand the batch (``num_return_sequences``, beams) with
    ``repeat_interleave``; a batch of ``k * len(names)`` rows is mapped back the same way.

    Attributes:
        names: One adapter name (or None: base model) per input row.
    """

    def __init__(self, names: Sequence[str | None]) -> None:
        self.names: tuple[str | None, ...] = tuple(names)
        self._groups: dict[tuple[int, torch.device], tuple[Group, ...]] = {}
        self._slots: dict[tuple[int, torch.device], Tensor] = {}
        self._stacks: dict[tuple[int, torch.device, torch.dtype], Stack] = {}

    def groups(self, batch: int, device: torch.device) -> tuple[Group, ...]:
        """Row groups for a batch of ``batch`` rows on ``device``.

        Raises:
            AdapterNameError: ``batch`` is not a multiple of the number of names.
        """
        key = (batch, device)
        cached = self._groups.get(key)
        if cached is not None:
            return cached
        n = len(self.names)
        if n == 0 or batch % n:
            raise AdapterNameError(
                f"adapter_names has {n} entries but the batch has {batch} rows; give one "
                f"adapter name (or None) per input row"
            )
        expand = batch // n
        rows: dict[str | None, list[int]] = {}
        for row in range(batch):
            rows.setdefault(self.names[row // expand], []).append(row)
        groups: list[Group] = []
        for name, members in rows.items():
            index = None if len(members) == batch else torch.tensor(members, device=device)
            groups.append((name, index))
        result = tuple(groups)
        self._groups[key] = result
        return result

    def identity(self, batch: int) -> bool:
        """Whether row ``i`` is the ``i``-th distinct name (every row its own adapter)."""
        return len(set(self.names)) == len(self.names) == batch

    def slots(self, batch: int, device: torch.device) -> Tensor:
        """``[batch]`` int64: each row's position among the distinct names (first-seen order)."""
        key = (batch, device)
        cached = self._slots.get(key)
        if cached is None:
            position = {name: i for i, (name, _) in enumerate(self.groups(batch, device))}
            expand = batch // len(self.names)
            cached = torch.tensor(
                [position[name] for name in self.names], device=device
            ).repeat_interleave(expand)
            self._slots[key] = cached
        return cached

    def stack(self, layer: LoRALinear, batch: int, x: Tensor) -> Stack:
        """The distinct adapters' factors of ``layer``, stacked (see :func:`stacked_factors`).

        Looked up once per layer per call: a whole ``generate`` reuses it at every step.
        """
        key = (id(layer), x.device, x.dtype)
        cached = self._stacks.get(key)
        if cached is None:
            names = tuple(name for name, _ in self.groups(batch, x.device))
            cached = stacked_factors(layer, names, x)
            self._stacks[key] = cached
        return cached


# Stacked factors of the distinct adapters in a layer: scaled A^T [n, in, R] and B^T [n, R, out].
Stack = tuple[Tensor, Tensor]

# Per layer: the last few stacks built, keyed by (names, device, dtype), each with the identity
# and version of the tensors it was built from, so in-place changes (swap_adapter, training)
# and reloads are noticed and the stack rebuilt.
_STACK_CACHE: weakref.WeakKeyDictionary[nn.Module, OrderedDict[Hashable, tuple[Hashable, Stack]]]
_STACK_CACHE = weakref.WeakKeyDictionary()
_STACKS_PER_LAYER = 4


def clear_stacks(model: nn.Module) -> None:
    """Drop the cached stacked factors of every layer of ``model`` (frees their memory)."""
    for module in model.modules():
        _STACK_CACHE.pop(module, None)


def _token(adapter: LoraAdapter | None) -> Hashable:
    if adapter is None:
        return None
    a, b = adapter.lora_A, adapter.lora_B
    scale = adapter._buffers.get("scale")
    scaling = ("t", id(scale), scale._version) if scale is not None else adapter.scaling
    return (id(a), a._version, a.data_ptr(), id(b), b._version, b.data_ptr(), scaling)


def stacked_factors(layer: LoRALinear, names: tuple[str | None, ...], x: Tensor) -> Stack:
    """``layer``'s factors of the adapters ``names`` stacked and zero-padded to one rank.

    The scaling is folded into A. Entries for None, or for an adapter that does not adapt this
    layer, are zeros. Cached per layer across calls while the adapters' tensors are unchanged.
    """
    adapters = [layer.adapter(n) if n is not None and n in layer.adapters else None for n in names]
    key: Hashable = (names, x.device, x.dtype)
    token = tuple(_token(a) for a in adapters)
    per_layer = _STACK_CACHE.setdefault(layer, OrderedDict())
    hit = per_layer.get(key)
    if hit is not None and hit[0] == token:
        per_layer.move_to_end(key)
        return hit[1]
    present = [a for a in adapters if a is not None]
    rank = max((a.r for a in present), default=0)
    dtype = present[0].lora_A.dtype if present else x.dtype
    n, device = len(names), x.device
    a_stack = torch.zeros((n, rank, layer.in_features), dtype=dtype, device=device)  # [n, R, in]
    b_stack = torch.zeros((n, layer.out_features, rank), dtype=dtype, device=device)  # [n, out, R]
    with torch.no_grad():
        for i, adapter in enumerate(adapters):  # one entry per distinct adapter, not per row
            if adapter is not None:
                scale = adapter._buffers.get("scale")
                torch.mul(
                    adapter.lora_A,
                    scale if scale is not None else adapter.scaling,
                    out=a_stack[i, : adapter.r],
                )
                b_stack[i, :, : adapter.r].copy_(adapter.lora_B)
    stack = (a_stack.transpose(1, 2), b_stack.transpose(1, 2))
    per_layer[key] = (token, stack)
    per_layer.move_to_end(key)
    while len(per_layer) > _STACKS_PER_LAYER:
        per_layer.popitem(last=False)
    return stack


def add_rows(layer: LoRALinear, out: Tensor, x: Tensor, plan: RowPlan) -> Tensor:
    """Add each row's own adapter contribution to ``out``.

    Inference (no autograd, no active dropout) gathers each row's factors from the distinct
    adapters stacked once per call and runs two batched GEMMs: the per-layer work is the same
    few kernels however many distinct adapters the batch holds. With autograd on, rows are
    grouped by adapter instead (one ``index_select``/GEMMs/``index_add_`` per distinct adapter).

    Args:
        layer: The LoRA layer.
        out: Base output ``[batch, ..., out_features]``.
        x: Layer input ``[batch, ..., in_features]``.
        plan: The call's row plan.

    Returns:
        ``out`` with the adapters' contributions added (in place where possible).
    """
    adapters = layer.adapters
    groups = plan.groups(x.shape[0], x.device)
    if len(groups) > 1 and _can_gather(layer, groups):
        return _add_gathered(layer, out, x, plan)
    for name, index in groups:
        if name is None or name not in adapters:
            continue
        adapter = layer.adapter(name)
        if index is None:  # every row uses this adapter: the single-adapter path
            out = adapter.add_to(out, x)
            continue
        xs = x.index_select(0, index)  # [rows, ..., in]
        delta = adapter.delta(xs)  # [rows, ..., out]
        out = out.index_add_(0, index, delta.to(out.dtype))
    return out


def _can_gather(layer: LoRALinear, groups: tuple[Group, ...]) -> bool:
    if torch.is_grad_enabled():
        return False
    for name, _ in groups:
        if name is not None and name in layer.adapters:
            adapter = layer.adapter(name)
            if adapter.dropout > 0.0 and adapter.training:
                return False
    return True


def _add_gathered(layer: LoRALinear, out: Tensor, x: Tensor, plan: RowPlan) -> Tensor:
    batch = x.shape[0]
    a_t, b_t = plan.stack(layer, batch, x)
    if a_t.shape[0] != batch or not plan.identity(batch):  # rows -> their adapter's slot
        slots = plan.slots(batch, x.device)
        a_t, b_t = a_t.index_select(0, slots), b_t.index_select(0, slots)
    x3 = x.reshape(batch, -1, x.shape[-1])  # [batch, tokens, in]
    if x3.dtype != a_t.dtype:
        x3 = x3.to(a_t.dtype)
    h = torch.bmm(x3, a_t)  # [batch, tokens, R], scaling folded into A
    if out.dtype == h.dtype and out.is_contiguous():
        out.view(batch, -1, out.shape[-1]).baddbmm_(h, b_t)  # out += h @ B^T, per row
        return out
    return out.add_(torch.bmm(h, b_t).view(out.shape).to(out.dtype))


def run_saved_rows(wrapper: SavedModule, plan: RowPlan, args: Any, kwargs: Any) -> Any:
    """Run each row through its adapter's copy of a saved module (the original for others).

    Tensor arguments whose first dimension is the batch are split by row group; the outputs
    (one tensor) are reassembled in row order.

    Raises:
        LoraKitError: The module takes no batched tensor or returns something else than a tensor.
    """
    batched = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.dim() > 0]
    if not batched:
        raise LoraKitError(
            "per-row adapters need a batched tensor input to the saved module; call it with "
            "a single adapter (lm.using(name)) instead"
        )
    batch, device = batched[0].shape[0], batched[0].device
    by_module: dict[int, tuple[nn.Module, list[Tensor | None]]] = {}
    for name, index in plan.groups(batch, device):
        module = wrapper.copies[name] if name is not None and name in wrapper.copies else None
        chosen = module if module is not None else wrapper.original
        by_module.setdefault(id(chosen), (chosen, []))[1].append(index)
    if len(by_module) == 1:
        module, _ = next(iter(by_module.values()))
        return module(*args, **kwargs)
    out: Tensor | None = None
    for module, indices in by_module.values():
        index = torch.cat([i for i in indices if i is not None])  # [rows]

        def take(value: Any, index: Tensor = index) -> Any:
            if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == batch:
                return value.index_select(0, index)
            return value

        result = module(*(take(a) for a in args), **{k: take(v) for k, v in kwargs.items()})
        if not isinstance(result, Tensor):
            raise LoraKitError(
                f"per-row adapters support saved modules returning a tensor, "
                f"{type(module).__name__} returned {type(result).__name__}"
            )
        if out is None:
            out = result.new_empty((batch, *result.shape[1:]))  # [batch, ...]
        out.index_copy_(0, index, result)
    return out
