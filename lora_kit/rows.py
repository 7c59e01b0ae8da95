"""Mixed batches: every row of a batch uses its own adapter (or none), in one forward pass.

A :class:`RowPlan` is built once per call from ``adapter_names`` and travels to every layer in
the thread-local :class:`~lora_kit.routing.Selection` (``Selection.rows``). The first time a
layer sees the plan it decides, once for the whole call (a ``generate`` reuses the decision at
every step), how to add the rows' adapters (:class:`Prepared`):

* inference: the distinct adapters' factors are stacked (cached across calls while their tensors
  are unchanged) and every row goes through its own adapter's factors in two batched GEMMs
  (``bmm`` + ``baddbmm_``): the same two kernels however many distinct adapters the batch holds,
  and no gather at all when each adapter's rows are one contiguous run of equal length (distinct
  names, possibly repeated by ``generate``'s batch expansion);
* with autograd on (or dropout active), rows are grouped by adapter instead: one
  ``index_select``/GEMMs/``index_add_`` per distinct adapter.

The cost grows with the number of *distinct* adapters in the batch, never with the number of
rows; a batch whose rows all use one adapter takes exactly the single-adapter path.
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .errors import AdapterNameError

if TYPE_CHECKING:
    from .layers import LoraAdapter, LoRALinear

# (adapter name or None for the base, row indices or None for "every row")
Group = tuple[str | None, Tensor | None]


INPUT_KEYS = ("input_ids", "inputs_embeds", "inputs", "pixel_values", "input_values")
"""Keyword arguments whose first dimension is a call's batch (the first positional one too)."""


def input_rows(args: Sequence[Any], kwargs: Mapping[str, Any]) -> int | None:
    """The number of input rows of a forward/``generate`` call; None if no input tensor tells.

    Read before ``generate`` expands the batch (beams, ``num_return_sequences``), so it is the
    number of rows the caller gave, the number ``adapter_names`` must match.
    """
    for value in (*args[:1], *(kwargs.get(key) for key in INPUT_KEYS)):
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


def check_row_count(names: Sequence[str | None], rows: int | None) -> None:
    """Refuse ``adapter_names`` whose length is not the call's number of input rows.

    Raises:
        AdapterNameError: ``rows`` is known and differs from ``len(names)``.
    """
    if rows is not None and rows != len(names):
        raise AdapterNameError(
            f"adapter_names has {len(names)} entries but the input has {rows} rows; give one "
            f"adapter name (or None) per input row"
        )


class RowPlan:
    """The adapter of each row of one call, and its row groups (cached per batch size/device).

    Generation may expand the batch (``num_return_sequences``, beams) with
    ``repeat_interleave``; a batch of ``k * len(names)`` rows is mapped back the same way.

    Attributes:
        names: One adapter name (or None: base model) per input row.
    """

    def __init__(self, names: Sequence[str | None]) -> None:
        self.names: tuple[str | None, ...] = tuple(names)
        # Each name once, first-seen order: the slots of the stacked factors.
        self.distinct: tuple[str | None, ...] = tuple(dict.fromkeys(self.names))
        self._members: dict[int, dict[str | None, list[int]]] = {}
        self._groups: dict[tuple[int, torch.device], tuple[Group, ...]] = {}
        self._slots: dict[tuple[int, torch.device], Tensor] = {}
        self._prepared: dict[nn.Module, Prepared] = {}

    def members(self, batch: int) -> dict[str | None, list[int]]:
        """Each distinct name's rows in a batch of ``batch`` rows (first-seen order).

        Raises:
            AdapterNameError: ``batch`` is not a multiple of the number of names.
        """
        cached = self._members.get(batch)
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
        self._members[batch] = rows
        return rows

    def groups(self, batch: int, device: torch.device) -> tuple[Group, ...]:
        """Row groups for a batch of ``batch`` rows on ``device``: index tensors, made on first use.

        Raises:
            AdapterNameError: ``batch`` is not a multiple of the number of names.
        """
        key = (batch, device)
        cached = self._groups.get(key)
        if cached is not None:
            return cached
        groups: list[Group] = []
        for name, rows in self.members(batch).items():
            index = None if len(rows) == batch else torch.tensor(rows, device=device)
            groups.append((name, index))
        result = tuple(groups)
        self._groups[key] = result
        return result

    def runs(self) -> bool:
        """Whether each distinct name's rows form one contiguous run, all runs equally long.

        True when the names are all different (each row its own adapter, in any batch
        expansion): slot ``i`` then holds rows ``[i * k, (i + 1) * k)``, so the rows can be
        reshaped into ``[slots, k * tokens, ...]`` with no gather.
        """
        return len(self.distinct) == len(self.names)

    def slots(self, batch: int, device: torch.device) -> Tensor:
        """``[batch]`` int64: each row's position among the distinct names (first-seen order)."""
        key = (batch, device)
        cached = self._slots.get(key)
        if cached is None:
            position = {name: i for i, name in enumerate(self.distinct)}
            expand = batch // len(self.names)
            cached = torch.tensor(
                [position[name] for name in self.names], device=device
            ).repeat_interleave(expand)
            self._slots[key] = cached
        return cached

    def prepared(self, layer: LoRALinear, x: Tensor) -> Prepared:
        """How ``layer`` adds the rows' adapters for input ``x``: decided once per call."""
        grad = torch.is_grad_enabled()
        found = self._prepared.get(layer)
        if found is not None and found.matches(x, grad):
            return found
        batch, device = x.shape[0], x.device
        members = self.members(batch)  # raises on a batch that does not fit the names
        stack = None
        if len(members) > 1 and not grad:
            adapters = _adapters(layer, self.distinct)
            if _can_gather(adapters):
                stack = _stacked(layer, self.distinct, adapters, x.dtype, device)
        # The gathered path needs no per-adapter index tensors: its kernels are the same
        # whatever the number of distinct adapters.
        groups = self.groups(batch, device) if stack is None else ()
        slots = None if stack is None or self.runs() else self.slots(batch, device)
        found = Prepared(batch, x.dtype, device, grad, groups, stack, slots)
        self._prepared[layer] = found
        return found


# Under torch.compile the per-call bookkeeping runs outside the graph (a graph break): traced,
# its guards would hold the plan's cache sizes and every new call would recompile. In eager mode
# the plain method is called: the disable wrapper costs about 0.5 µs a call, per layer.
_prepared_outside_graph = torch.compiler.disable(RowPlan.prepared)


# Stacked factors of the distinct adapters in a layer: scaled A^T [n, in, R] and B^T [n, R, out].
Stack = tuple[Tensor, Tensor]


class Prepared:
    """One layer's way of adding a call's rows (see the module docstring); built once per call.

    Attributes:
        groups: The row groups (used without a stack; empty with one).
        stack: The distinct adapters' stacked factors, or None to add group by group.
        slots: ``[batch]`` stack slot of each row, or None when the rows form equal runs.
    """

    __slots__ = ("batch", "device", "dtype", "grad", "groups", "slots", "stack")

    def __init__(
        self,
        batch: int,
        dtype: torch.dtype,
        device: torch.device,
        grad: bool,
        groups: tuple[Group, ...],
        stack: Stack | None,
        slots: Tensor | None,
    ) -> None:
        self.batch, self.dtype, self.device, self.grad = batch, dtype, device, grad
        self.groups, self.stack, self.slots = groups, stack, slots

    def matches(self, x: Tensor, grad: bool) -> bool:
        """Whether this applies to input ``x`` under the current grad mode."""
        return (
            x.shape[0] == self.batch
            and x.dtype == self.dtype
            and grad == self.grad
            and x.device == self.device
        )


# Per layer: the last few stacks built, keyed by (names, device, dtype), each with a record of
# the tensors it was built from (identity and version) and of the optimizer steps taken, so
# in-place changes (swap_adapter, training) and reloads are noticed and the stack rebuilt.
_STACK_CACHE: weakref.WeakKeyDictionary[nn.Module, OrderedDict[Hashable, tuple[_Seen, Stack]]]
_STACK_CACHE = weakref.WeakKeyDictionary()
_STACKS_PER_LAYER = 4
# Guards the per-layer LRU orders: concurrent calls (threads) look up, reorder and evict entries.
_STACK_LOCK = threading.Lock()


# Optimizer steps taken in this process (counted once a stack exists): fused optimizers
# (``fused=True``) update parameters in place without bumping their version counters.
_optimizer_steps = 0
_counting_steps = False


def _count_step(optimizer: object, args: object, kwargs: object) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


def _steps_taken() -> int:
    """Optimizer steps so far (from the first call on: starts counting them)."""
    global _counting_steps
    if not _counting_steps:
        register_optimizer_step_post_hook(_count_step)
        _counting_steps = True
    return _optimizer_steps


def clear_stacks(model: nn.Module) -> None:
    """Drop the cached stacked factors of every layer of ``model`` (frees their memory)."""
    for module in model.modules():
        _STACK_CACHE.pop(module, None)


class _Seen:
    """What a stack was built from: per slot, the factor tensors and their state.

    The state holds each tensor's identity, version and data pointer, and the scaling: any
    in-place update, swap or reassignment changes it; the optimizer step count changes with any
    step, also one that bumps no version (a fused optimizer). Tensors are held by weak
    reference: a cached stack never keeps a deleted adapter's tensors alive, and once one of
    them dies the record is stale for good (its ``id`` could pass to a new tensor).

    Same identity rule as `lora_kit.fingerprint.WeightsSeen` (identity + versions/pointers),
    kept apart on purpose: this one is for trainable adapter factors, so it also holds each
    slot's scaling (a Python float, no tensor state), empty slots (None), and the optimizer
    step count, which the frozen-base `WeightsSeen` must not hold (every step would rehash the
    base); and it runs per layer and call (one state tuple compared), so it reads the modules'
    dictionaries directly.
    """

    __slots__ = ("alive", "refs", "state", "steps")

    def __init__(self, adapters: list[LoraAdapter | None]) -> None:
        alive = [True]

        def died(_: weakref.ref[Tensor], alive: list[bool] = alive) -> None:
            alive[0] = False

        tensors = [t for a in adapters if a is not None for t in _tensors(a)]
        self.refs = tuple(weakref.ref(t, died) for t in tensors)  # kept: their callbacks fire
        self.alive, self.state, self.steps = alive, _state(adapters), _steps_taken()

    def still(self, adapters: list[LoraAdapter | None]) -> bool:
        """Whether ``adapters`` hold the same tensors, unchanged since the stack was built."""
        if self.steps != _optimizer_steps or _state(adapters) != self.state:
            return False
        # Read after the state: an id seen there that belonged to a dead tensor means the
        # tensor died first, so its callback has run. While all are alive, equal ids are the
        # same tensors.
        return self.alive[0]


def _tensors(adapter: LoraAdapter) -> tuple[Tensor, ...]:
    """An adapter's A, B (and scale buffer, if it has one)."""
    a, b = _factors(adapter)
    scale = adapter._buffers.get("scale")
    return (a, b) if scale is None else (a, b, scale)


def _factors(adapter: LoraAdapter) -> tuple[Tensor, Tensor]:
    """A and B from the parameter dict (per layer and call: no nn.Module attribute lookup), or
    as attributes for a parametrized factor (``torch.nn.utils.parametrize``: a new tensor at
    each read, so a stack built from it never matches again and is rebuilt, never stale)."""
    params = adapter._parameters
    a, b = params.get("lora_A"), params.get("lora_B")
    if a is None or b is None:
        return adapter.lora_A, adapter.lora_B
    return a, b


def _state(adapters: list[LoraAdapter | None]) -> tuple[Hashable, ...]:
    """Per slot: A's and B's identity, version and data pointer, the scaling (a float, or the
    scale buffer's identity, version and data pointer) and the adapter's conversion count (a
    ``.half()``/``.float()`` round trip keeps identities and versions); None for an empty slot.

    Read through the modules' dictionaries directly: this runs per layer and call.
    """
    state: list[Hashable] = []
    append = state.append
    for adapter in adapters:
        if adapter is None:
            append(None)
            continue
        params = adapter._parameters
        a: Tensor | None = params.get("lora_A")
        b: Tensor | None = params.get("lora_B")
        if a is None or b is None:  # a parametrized factor (see `_factors`)
            a, b = _factors(adapter)
        scale = adapter._buffers.get("scale")
        # The scaling: a Python float, or the scale buffer's identity, version and pointer.
        last = adapter.scaling if scale is None else (id(scale), scale._version, scale.data_ptr())
        conversions = adapter.conversions
        append(
            (id(a), a._version, a.data_ptr(), id(b), b._version, b.data_ptr(), last, conversions)
        )
    return tuple(state)


def stacked_factors(layer: LoRALinear, names: tuple[str | None, ...], x: Tensor) -> Stack:
    """``layer``'s factors of the adapters ``names`` stacked and zero-padded to one rank.

    The scaling is folded into A. Entries for None, or for an adapter that does not adapt this
    layer, are zeros. Cached per layer across calls while the adapters' tensors are unchanged.

    Returns:
        ``(A^T [n, in, R], B^T [n, R, out])``, the layouts ``bmm``/``baddbmm_`` run fastest
        with (A^T as a transposed view, B^T contiguous).
    """
    return _stacked(layer, names, _adapters(layer, names), x.dtype, x.device)


def _adapters(layer: LoRALinear, names: tuple[str | None, ...]) -> list[LoraAdapter | None]:
    """``layer``'s adapter of each name (None for None or a name it does not hold)."""
    get = layer.adapters._modules.get
    return [get(n) if n is not None else None for n in names]  # type: ignore[misc]


def _stacked(
    layer: LoRALinear,
    names: tuple[str | None, ...],
    adapters: list[LoraAdapter | None],
    x_dtype: torch.dtype,
    device: torch.device,
) -> Stack:
    """`stacked_factors` for an input of ``x_dtype`` on ``device``, given ``layer``'s adapters
    of ``names`` (the caller has them, and the device, already: this runs per layer and call)."""
    key: Hashable = (names, device, x_dtype)
    with _STACK_LOCK:
        per_layer = _STACK_CACHE.get(layer)
        if per_layer is None:
            per_layer = _STACK_CACHE.setdefault(layer, OrderedDict())
        hit = per_layer.get(key)
        latest = hit is not None and next(reversed(per_layer)) == key
    if hit is not None and hit[0].still(adapters):  # validated outside the lock
        if not latest:
            with _STACK_LOCK:
                if key in per_layer:  # another thread may have evicted it meanwhile
                    per_layer.move_to_end(key)
        return hit[1]
    seen = _Seen(adapters)
    present = [a for a in adapters if a is not None]
    rank = max((a.r for a in present), default=0)
    # The widest adapter dtype: an fp32 adapter is never rounded for sharing a batch with a
    # bf16 one.
    dtypes = [a.lora_A.dtype for a in present]
    dtype = functools.reduce(torch.promote_types, dtypes) if dtypes else x_dtype
    n = len(names)
    a_stack = torch.zeros((n, rank, layer.in_features), dtype=dtype, device=device)  # [n, R, in]
    b_t = torch.zeros((n, rank, layer.out_features), dtype=dtype, device=device)  # [n, R, out]
    with torch.no_grad():
        for i, adapter in enumerate(adapters):  # one entry per distinct adapter, not per row
            if adapter is not None:
                scale = adapter._buffers.get("scale")
                torch.mul(
                    adapter.lora_A,
                    scale if scale is not None else adapter.scaling,
                    out=a_stack[i, : adapter.r],
                )
                b_t[i, : adapter.r].copy_(adapter.lora_B.t())
    stack = (a_stack.transpose(1, 2), b_t)
    with _STACK_LOCK:
        per_layer[key] = (seen, stack)
        per_layer.move_to_end(key)
        while len(per_layer) > _STACKS_PER_LAYER:
            per_layer.popitem(last=False)
    return stack


def add_rows(layer: LoRALinear, out: Tensor, x: Tensor, plan: RowPlan) -> Tensor:
    """Add each row's own adapter contribution to ``out``.

    Inference (no autograd, no active dropout) runs every row through its own adapter's
    stacked factors in two batched GEMMs: the per-layer work is the same few kernels however
    many distinct adapters the batch holds. With autograd on, rows are grouped by adapter
    instead (one ``index_select``/GEMMs/``index_add_`` per distinct adapter).

    Args:
        layer: The LoRA layer.
        out: Base output ``[batch, ..., out_features]``.
        x: Layer input ``[batch, ..., in_features]``.
        plan: The call's row plan.

    Returns:
        ``out`` with the adapters' contributions added (in place where possible).
    """
    if torch.compiler.is_compiling():
        prepared = _prepared_outside_graph(plan, layer, x)
    else:
        prepared = plan.prepared(layer, x)
    if prepared.stack is not None:
        return _add_gathered(out, x, prepared.stack, prepared.slots)
    adapters = layer.adapters
    for name, index in prepared.groups:
        if name is None or name not in adapters:
            continue
        adapter = layer.adapter(name)
        if index is None:  # every row uses this adapter: the single-adapter path
            out = adapter.add_to(out, x)
            continue
        xs = x.index_select(0, index)  # [rows, ..., in]
        delta = adapter.delta(xs).to(out.dtype)  # [rows, ..., out]
        # Out of place under autograd: the base output is usually a view (see add_low_rank_).
        if torch.is_grad_enabled():
            out = out.index_add(0, index, delta)
        else:
            out = out.index_add_(0, index, delta)
    return out


def _can_gather(adapters: list[LoraAdapter | None]) -> bool:
    """Whether no adapter applies dropout (the batched GEMMs have none): inference only."""
    for adapter in adapters:
        if adapter is not None and adapter.dropout > 0.0 and adapter.training:
            return False
    return True


def _add_gathered(out: Tensor, x: Tensor, stack: Stack, slots: Tensor | None) -> Tensor:
    a_t, b_t = stack  # [n, in, R], [n, R, out]
    if slots is not None:  # rows -> their adapter's slot
        a_t, b_t = a_t.index_select(0, slots), b_t.index_select(0, slots)
    groups = a_t.shape[0]  # the batch, or the distinct adapters with their rows in runs
    x3 = x.reshape(groups, -1, x.shape[-1])  # [groups, rows per group * tokens, in]
    if x3.dtype != a_t.dtype:
        x3 = x3.to(a_t.dtype)
    h = torch.bmm(x3, a_t)  # [groups, rows * tokens, R], scaling folded into A
    # Under autocast h comes back in the autocast dtype while b_t keeps the stack's: the
    # in-place baddbmm_ would refuse the mix, the out-of-place bmm lets autocast cast.
    if out.dtype == h.dtype == b_t.dtype and out.is_contiguous():
        out.view(groups, -1, out.shape[-1]).baddbmm_(h, b_t)  # out += h @ B^T, per group
        return out
    return out.add_(torch.bmm(h, b_t).view(out.shape).to(out.dtype))
