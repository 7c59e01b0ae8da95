"""Mixed batches through a saved module (``modules_to_save``): each row, its adapter's copy.

Rows whose adapter saves its own copy of the module (a classifier head, say) go through that
copy; the others through the frozen original. Two ways, decided per call:

* batched (inference, small ``nn.Linear`` modules such as a classification head): the chosen
  modules' weights are stacked for this call and every row goes through its own module in one
  ``baddbmm``, the same few kernels however many distinct adapters the batch holds. Nothing is
  cached, so no in-place edit or swap can be served stale; the stack is rebuilt per call, which
  is why this is kept to stacks up to `BATCHED_MAX_ELEMENTS` weights in all (one matrix per
  row where rows of one name are gathered);
* grouped (anything else: autograd on, another module type, several inputs, a large module):
  the rows are split by module, each group run through its module, and the outputs put back
  in row order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import LoraKitError
from .layers import runs_plain

if TYPE_CHECKING:
    from .rows import RowPlan
    from .saved_modules import SavedModule

# Largest stack of weights (elements, all modules together) built per call for the batched
# path: a BERT-base head with 8 copies is 8 x 2 x 768 = 12,288. A large module (an LM head of
# 50,257 x 768) would cost a copy of every copy per call; it takes the grouped path instead.
# Rows not in equal runs gather one matrix per row, so there the stack counts every row.
BATCHED_MAX_ELEMENTS = 1 << 20


def run_saved_rows(wrapper: SavedModule, plan: RowPlan, args: Any, kwargs: Any) -> Any:
    """Run each row through its adapter's copy of a saved module (the original for others).

    Tensor arguments whose first dimension is the batch are split by row group; the outputs
    (one tensor) are reassembled in row order. Under ``torch.compile`` this runs outside the
    graph: traced, its choice of modules per call would be guarded on, and every call with
    other names would compile again.

    Raises:
        LoraKitError: The module takes no batched tensor or returns something else than a tensor.
    """
    if torch.compiler.is_compiling():
        return _rows_outside_graph(wrapper, plan, args, kwargs)
    return _rows(wrapper, plan, args, kwargs)


def _rows(wrapper: SavedModule, plan: RowPlan, args: Any, kwargs: Any) -> Any:
    batched = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor) and a.dim() > 0]
    if not batched:
        raise LoraKitError(
            "per-row adapters need a batched tensor input to the saved module; call it with "
            "a single adapter (lm.using(name)) instead"
        )
    batch, device = batched[0].shape[0], batched[0].device
    plan.members(batch)  # raises on a batch that does not fit the names
    # Each distinct name's module: its adapter's copy, else the original (no copy, or None).
    copies = wrapper.copies._modules
    found = [copies.get(name) if name is not None else None for name in plan.distinct]
    modules = [wrapper.original if m is None else m for m in found]
    if len({id(m) for m in modules}) == 1:  # one module for every row: no split at all
        return modules[0](*args, **kwargs)
    if not kwargs and len(args) == 1 and len(batched) == 1:
        out = _batched_linear(modules, plan, batched[0])
        if out is not None:
            return out
    return _grouped(modules, plan, args, kwargs, batch, device)


_rows_outside_graph = torch.compiler.disable(_rows)


def _batched_linear(modules: list[nn.Module], plan: RowPlan, x: Tensor) -> Tensor | None:
    """Each row of ``x`` through its slot's ``nn.Linear`` in one ``baddbmm``; None if this path
    does not apply (then the caller groups the rows)."""
    if torch.is_grad_enabled() or _autocasting(x) or x.dim() < 2:
        return None
    weights: list[Tensor] = []
    biases: list[Tensor] = []
    for module in modules:
        if type(module) is not nn.Linear or not runs_plain(module):
            return None
        w, bias = module.weight, module.bias
        if w.shape[1] != x.shape[-1] or w.dtype != x.dtype or w.device != x.device:
            return None  # the module itself says what is wrong with such an input
        weights.append(w)
        if bias is not None:
            biases.append(bias)
    if biases and len(biases) != len(weights):
        return None
    if any(w.shape != weights[0].shape for w in weights):
        return None
    batch, out_features = x.shape[0], weights[0].shape[0]
    runs = plan.runs()  # slot i holds rows [i * k, (i + 1) * k): reshape, no gather
    # One weight matrix per group: the distinct names' stack, or one gathered per row.
    groups = len(weights) if runs else batch
    if groups * weights[0].numel() > BATCHED_MAX_ELEMENTS:
        return None
    w_t = torch.stack(weights).transpose(1, 2)  # [n, in, out]
    b = torch.stack(biases) if biases else None  # [n, out]
    if not runs:
        slots = plan.slots(batch, x.device)  # [batch]
        w_t = w_t.index_select(0, slots)  # [batch, in, out]
        b = None if b is None else b.index_select(0, slots)  # [batch, out]
    x3 = x.reshape(groups, -1, x.shape[-1])  # [groups, rows per group * tokens, in]
    # [groups, rows * tokens, out]
    out = torch.bmm(x3, w_t) if b is None else torch.baddbmm(b.unsqueeze(1), x3, w_t)
    return out.reshape(*x.shape[:-1], out_features)  # [batch, ..., out]


def _autocasting(x: Tensor) -> bool:
    """Whether autocast is on for ``x``'s device (never on one without autocast, such as meta,
    where asking raises)."""
    device = x.device.type
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def _grouped(
    modules: list[nn.Module],
    plan: RowPlan,
    args: Any,
    kwargs: Any,
    batch: int,
    device: torch.device,
) -> Any:
    """Each row group through its module (``modules[i]`` for ``plan.distinct[i]``, at least two
    different ones); outputs reassembled in row order."""
    by_module: dict[int, tuple[nn.Module, list[Tensor | None]]] = {}
    # The groups come in the names' first-seen order, as plan.distinct and so ``modules``.
    for chosen, (_, index) in zip(modules, plan.groups(batch, device), strict=True):
        by_module.setdefault(id(chosen), (chosen, []))[1].append(index)
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
