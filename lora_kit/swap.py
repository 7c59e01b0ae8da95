"""Compile-safe, in-place adapter swapping.

A *swappable* adapter is stored at a fixed maximum rank (its factors zero-padded: extra rows of A
and columns of B are zero, so ``B A`` is unchanged and outputs stay exact) with its scaling in a
0-dim tensor buffer instead of a Python float. Swapping in another adapter then only copies
values into the same tensors (same ``data_ptr``s): a ``torch.compile``d model sees the same
graph inputs and the same Python constants, so it does not recompile, whatever the new adapter's
rank (up to the maximum) or alpha.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .adapter_io import AdapterFiles
from .errors import AdapterMismatchError, ConfigError
from .fingerprint import compare_fingerprint
from .layers import LoraAdapter, LoRALinear, down_t
from .peft_format import head_key, lora_keys
from .swap_plan import forget_plans, swap_plan

if TYPE_CHECKING:
    from .model import AdapterRecord, LoraModel


class PaddedAdapter(LoraAdapter):
    """A `LoraAdapter` held at ``max_rank`` with a tensor ``scale`` (see the module docstring).

    Attributes:
        rank: The rank of the adapter currently held (``<= r``, the padded rank).
        scale: ``[]`` fp32 buffer holding the scaling.
    """

    scale: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        max_rank: int,
        scaling: float,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            r=max_rank,
            scaling=scaling,
            dropout=dropout,
            dtype=dtype,
            device=device,
        )
        self.rank = max_rank

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> PaddedAdapter:
        """``nn.Module._apply`` (``.to()``, ``.half()``, ``.cuda()``...), keeping ``scale`` fp32.

        ``scale`` follows the module's device but not its dtype: ``.half()`` would round a
        scaling such as 0.6 to 0.60009765625, which a plain adapter's Python float scaling
        does not do. Unmoved, it stays the same tensor (a view of the packed scales). From
        the meta device (``to_empty``) there is no value to keep: ``fn``'s result, in fp32.
        """
        scale = self._buffers.get("scale")
        super()._apply(fn, recurse)
        moved = self._buffers.get("scale")
        if scale is not None and moved is not None and moved is not scale:
            source = moved if scale.is_meta else scale
            self._buffers["scale"] = source.to(device=moved.device, dtype=torch.float32)
        return self

    @property
    def scaling(self) -> float:
        """The scaling as a Python float (reads the ``scale`` buffer)."""
        return float(self.scale)

    @scaling.setter
    def scaling(self, value: float) -> None:
        if "scale" in self._buffers:
            with torch.no_grad():
                self.scale.fill_(value)
        else:
            self.register_buffer(
                "scale", torch.tensor(float(value), device=self.lora_A.device), persistent=False
            )

    @torch.no_grad()
    def assign(self, factor_a: Tensor, factor_b: Tensor, scaling: float) -> None:
        """Copy factors of rank ``<= r`` into the padded tensors in place, zeroing the rest."""
        rank = factor_a.shape[0]
        self.lora_A[:rank].copy_(factor_a)
        self.lora_A[rank:].zero_()
        self.lora_B[:, :rank].copy_(factor_b)
        self.lora_B[:, rank:].zero_()
        self.scaling = scaling
        self.rank = rank

    @torch.no_grad()
    def clear(self) -> None:
        """Zero the factors (the adapter then adds exactly nothing)."""
        self.lora_A.zero_()
        self.lora_B.zero_()
        self.rank = 0

    def project(self, x: Tensor, weight: float = 1.0) -> tuple[Tensor, float]:
        """As `LoraAdapter.project`, with the scaling (a tensor) folded into ``h^T``."""
        a = self.lora_A
        if x.dtype != a.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)
        if self.dropout > 0.0:
            x = F.dropout(x, self.dropout, self.training)
        return down_t(x, a) * (self.scale * weight), 1.0  # [r, tokens]

    def delta(self, x: Tensor) -> Tensor:
        """As `LoraAdapter.delta`, with the scaling taken from the ``scale`` buffer."""
        if x.dtype != self.lora_A.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)
        if self.dropout > 0.0:
            x = F.dropout(x, self.dropout, self.training)
        h = F.linear(x, self.lora_A) * self.scale  # [..., r]
        return F.linear(h, self.lora_B)  # [..., out]


def saved_factors(adapter: LoraAdapter) -> tuple[Tensor, Tensor]:
    """``(A, B)`` to save: a padded adapter's factors without their zero padding."""
    if isinstance(adapter, PaddedAdapter):
        return adapter.lora_A[: adapter.rank], adapter.lora_B[:, : adapter.rank]
    return adapter.lora_A, adapter.lora_B


def live_record(lm: LoraModel, record: AdapterRecord) -> AdapterRecord:
    """``record`` without the modules a swap left empty (rank 0), as its config targets."""
    modules = tuple(
        m
        for m in record.modules
        if not (isinstance(a := lm._layer(m).adapter(record.name), PaddedAdapter) and a.rank == 0)
    )
    return replace(record, modules=modules)


def check_max_rank(ranks: Mapping[str, int], max_rank: int, source: str) -> None:
    """Raise unless every rank fits ``max_rank``.

    Raises:
        ConfigError: ``max_rank`` is not a positive int.
        AdapterMismatchError: A module's rank exceeds it.
    """
    if not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < 1:
        raise ConfigError(f"max_rank must be a positive integer, got {max_rank!r}")
    for module, rank in ranks.items():
        if rank > max_rank:
            raise AdapterMismatchError(
                f"{source}: {module} has rank {rank}, above max_rank={max_rank}; declare a "
                f"larger max_rank when loading the adapter that will be swapped"
            )


@torch.inference_mode(False)  # long-lived tensors (see loading.load_files)
def make_swappable(lm: LoraModel, name: str, max_rank: int) -> None:
    """Re-store adapter ``name`` as packed `PaddedAdapter`s of rank ``max_rank`` (see `pack`).

    New tensors, once: do this before ``torch.compile``; later swaps keep these tensors. An
    adapter already packed at ``max_rank`` is left as it is (same tensors).

    Raises:
        AdapterNameError: Unknown adapter.
        ConfigError, AdapterMismatchError: See :func:`check_max_rank`.
    """
    record = lm.adapter_record(name)
    layers = {m: lm._layer(m) for m in record.modules}
    current = {m: layer.adapter(name) for m, layer in layers.items()}
    check_max_rank({m: adapter.r for m, adapter in current.items()}, max_rank, name)
    if all(a.r == max_rank for a in current.values()) and find_packed(current) is not None:
        return
    padded: dict[str, PaddedAdapter] = {}
    for module, old in current.items():  # every new adapter first: a failure changes nothing
        new = PaddedAdapter(
            old.lora_A.shape[1],
            old.lora_B.shape[0],
            max_rank=max_rank,
            scaling=old.scaling,
            dropout=old.dropout,
            dtype=old.lora_A.dtype,
            device=old.lora_A.device,
        )
        rank = old.rank if isinstance(old, PaddedAdapter) else old.r
        new.assign(old.lora_A[:rank], old.lora_B[:, :rank], old.scaling)
        new.train(old.training)
        padded[module] = new
    pack(padded)
    replaced: list[tuple[LoRALinear, LoraAdapter]] = []
    try:  # then store them; put the old modules back if interrupted part-way
        for module, new in padded.items():
            layer = layers[module]
            replaced.append((layer, layer.adapter(name)))
            layer.adapters[name] = new
    except BaseException:
        for layer, old in replaced:
            layer.adapters[name] = old
        raise
    forget_plans(lm, name)  # it held the replaced adapter modules


@dataclass(frozen=True)
class Packed:
    """Where a packed adapter's tensors lie (see `pack`), as found by `find_packed`.

    Attributes:
        adapters: Module name -> its `PaddedAdapter`, modules sorted by name.
        order: ``(PEFT key, module, "lora_A" | "lora_B")`` of each factor, in buffer order
            (sorted by key).
        factors: ``[elements]``: every factor, back to back in ``order``.
        scales: ``[modules]``: every ``scale`` buffer, in ``adapters`` order.
    """

    adapters: dict[str, PaddedAdapter]
    order: tuple[tuple[str, str, str], ...]
    factors: Tensor
    scales: Tensor

    @property
    def keys(self) -> tuple[str, ...]:
        """The PEFT keys of the factors, in buffer order."""
        return tuple(key for key, _, _ in self.order)


def pack(adapters: Mapping[str, PaddedAdapter]) -> None:
    """Re-store the factors of ``adapters`` as views of one buffer, and the scales of another.

    The factors lie back to back in the sorted order of their PEFT keys: the order in which a
    safetensors file holds an adapter's tensors (its writer sorts tensors of one dtype by
    name). A file saved at the padded rank over the same modules then holds, in its data
    area, exactly the bytes of that buffer, and a swap copies them with one copy
    (`lora_kit.swap_packed`). Adapters of mixed dtypes or devices are left as they are.
    Call on adapters not yet in a model: it replaces their parameters.
    """
    items = sorted(adapters.items())
    if not items:
        return
    first = items[0][1].lora_A
    if any(a.lora_A.dtype != first.dtype or a.lora_A.device != first.device for _, a in items):
        return
    order = _factor_order(items)
    flat = torch.empty(
        sum(_tensor(adapters[module], attr).numel() for _, module, attr in order),
        dtype=first.dtype,
        device=first.device,
    )
    offset = 0
    with torch.no_grad():
        for _, module, attr in order:
            adapter = adapters[module]
            old = _tensor(adapter, attr)
            view = flat[offset : offset + old.numel()].view(old.shape)
            view.copy_(old)
            adapter._parameters[attr] = nn.Parameter(view, requires_grad=old.requires_grad)
            offset += old.numel()
        old_scales = [_tensor(adapter, "scale") for _, adapter in items]
        scales = torch.stack(old_scales)  # [modules]
        for index, (_, adapter) in enumerate(items):
            adapter._buffers["scale"] = scales[index]  # a 0-dim view


def find_packed(adapters: Mapping[str, LoraAdapter]) -> Packed | None:
    """The packing of ``adapters`` (module -> adapter) if `pack` made it and it still holds.

    It no longer holds once anything re-stored a tensor (``.to()``, ``.half()``, assigning a
    parameter): the check is on the tensors themselves, not on a record of the packing.
    """
    items = sorted(adapters.items())
    padded: dict[str, PaddedAdapter] = {}
    for module, adapter in items:
        if not isinstance(adapter, PaddedAdapter):
            return None
        padded[module] = adapter
    if not padded:
        return None
    order = _factor_order(list(padded.items()))
    factors = _one_run([_tensor(padded[module], attr) for _, module, attr in order])
    scales = _one_run([_tensor(adapter, "scale") for adapter in padded.values()])
    if factors is None or scales is None:
        return None
    return Packed(padded, order, factors, scales)


def _factor_order(items: list[tuple[str, PaddedAdapter]]) -> tuple[tuple[str, str, str], ...]:
    """``(PEFT key, module, "lora_A" | "lora_B")`` of every factor, sorted by key."""
    order = [
        (key, module, attr)
        for module, _ in items
        for key, attr in zip(lora_keys(module), ("lora_A", "lora_B"), strict=True)
    ]
    return tuple(sorted(order))


def _one_run(tensors: list[Tensor]) -> Tensor | None:
    """A ``[elements]`` view over ``tensors`` if they lie back to back, in order, in one storage."""
    first = tensors[0]
    storage = first.untyped_storage().data_ptr()
    start = offset = first.storage_offset()
    for tensor in tensors:
        if (
            tensor.dtype != first.dtype
            or tensor.device != first.device
            or not tensor.is_contiguous()
            or tensor.storage_offset() != offset
            or tensor.untyped_storage().data_ptr() != storage
        ):
            return None
        offset += tensor.numel()
    return first.detach().as_strided((offset - start,), (1,), start)


def swap_in(lm: LoraModel, name: str, files: AdapterFiles, *, check_base: bool) -> None:
    """Copy the adapter in ``files`` into adapter ``name``'s tensors in place.

    The new adapter may target a subset of ``name``'s modules (the others are zeroed) and have
    any rank up to the padded rank (any rank equal to the current one for a plain adapter).
    Everything is validated before any tensor changes; the copies are not undone if they fail
    part-way (see `LoraModel.swap_adapter`): every tensor, rank and scaling of ``name`` is
    written, so the next swap makes it whole.

    Raises:
        AdapterNameError: Unknown adapter.
        AdapterMismatchError: The new adapter targets modules ``name`` does not, has too large a
            rank, a different head set, wrong shapes, or another base.
    """
    from .loading import check_base_weights, check_keys, expected_tensors

    record = lm.adapter_record(name)
    source = str(files.path)
    config = files.config
    # Targets, heads and the key -> shape table are memoised per model and config.
    targets, heads, expected = expected_tensors(lm.model, config, source)
    resident = set(record.modules)
    extra = sorted(set(targets) - resident)
    if extra:
        raise AdapterMismatchError(
            f"{source}: targets {extra[0]!r}, which adapter {name!r} does not adapt; in-place "
            f"swapping needs the same or fewer modules (load it as a new adapter instead)"
        )
    extra_heads = sorted(set(heads) - set(record.saved_modules))
    if extra_heads:
        raise AdapterMismatchError(
            f"{source}: saves module {extra_heads[0]!r}, which adapter {name!r} has no copy of; "
            f"load it as a new adapter instead"
        )
    plan = swap_plan(lm, record)  # the layers and adapter modules, remembered per model
    slots = plan.slots
    wanted = set(targets)
    left_out = [m for m in record.modules if m not in wanted]
    if any(not isinstance(slots[m].adapter, PaddedAdapter) for m in left_out):
        raise AdapterMismatchError(
            f"{source}: does not adapt {left_out[0]!r}, which adapter {name!r} does; swapping in "
            f"an adapter over fewer modules needs {name!r} loaded with max_rank="
        )
    files.check_pattern_order(targets)
    ranks = {target: config.rank_for(target) for target in targets}
    for target, rank in ranks.items():
        adapter = slots[target].adapter
        limit = _tensor(adapter, "lora_A").shape[0]  # adapter.r
        if (rank > limit) if isinstance(adapter, PaddedAdapter) else (rank != limit):
            kind = "its padded rank" if isinstance(adapter, PaddedAdapter) else "its rank"
            raise AdapterMismatchError(
                f"{source}: {target} has rank {rank}; adapter {name!r} holds {kind} {limit} "
                f"there (load the adapter to be swapped with max_rank >= {rank})"
            )
    check_keys(expected, files.tensors, source, files.config.modules_to_save)
    check_base_weights({t: plan.layers[t] for t in targets}, files.base_weights, source)
    fp = files.metadata.get("base_fingerprint")
    if check_base and isinstance(fp, dict):
        compare_fingerprint(fp, plan.fingerprint(targets), source)
    # Everything is validated: mutate from here on. The copies run as a few batched
    # (foreach) kernels instead of several small ops per layer.
    dst: list[Tensor] = []
    src: list[Tensor] = []
    zero: list[Tensor] = []
    scales: list[Tensor] = []
    values: list[Tensor] = []
    new_ranks: list[tuple[PaddedAdapter, int]] = []  # set once the tensors are written
    new_scalings: list[tuple[LoraAdapter, float]] = []  # the same, for plain adapters
    tensors = files.tensors
    with torch.no_grad():
        for module, slot in slots.items():
            adapter = slot.adapter
            a, b = _tensor(adapter, "lora_A"), _tensor(adapter, "lora_B")
            if module not in wanted:
                zero.extend((a, b))
                if isinstance(adapter, PaddedAdapter):
                    new_ranks.append((adapter, 0))
                continue
            tensor_a, tensor_b = tensors[slot.key_a], tensors[slot.key_b]
            rank = tensor_a.shape[0]
            if rank == a.shape[0]:  # the common case: no padding, whole tensors
                dst.extend((a, b))
            else:
                dst.extend((a[:rank], b[:, :rank]))
                zero.extend((a[rank:], b[:, rank:]))
            if tensor_a.dtype != a.dtype:
                tensor_a, tensor_b = tensor_a.to(a.dtype), tensor_b.to(b.dtype)
            src.extend((tensor_a, tensor_b))
            if isinstance(adapter, PaddedAdapter):
                new_ranks.append((adapter, rank))
                scale = _tensor(adapter, "scale")
                scales.append(scale)
                values.append(_scalar(config.scaling_for(module), scale))
            else:
                new_scalings.append((adapter, config.scaling_for(module)))
        if dst:
            torch._foreach_copy_(dst, src)
        if zero:
            torch._foreach_zero_(zero)
        if scales:
            torch._foreach_copy_(scales, values)
        for padded, rank in new_ranks:
            _set_rank(padded, rank)
        for plain, scaling in new_scalings:
            plain.scaling = scaling
        for head in record.saved_modules:
            wrapper = lm._saved(head)
            if head in heads:
                prefix = head_key(head, "")
                state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            else:  # the new adapter does not save this module: behave as the original
                state = wrapper.original.state_dict()
            for key, value in wrapper.copies[name].state_dict().items():
                value.copy_(state[key])


def _tensor(adapter: LoraAdapter, name: str) -> Tensor:
    """``getattr(adapter, name)`` for a parameter or buffer, from its dict when it is there.

    ``nn.Module.__getattr__`` (a Python fallback) costs about a microsecond; a swap reads three
    tensors per module.
    """
    found: Tensor | None = adapter._parameters.get(name)
    if found is None:
        found = adapter._buffers.get(name)
    return found if found is not None else cast(Tensor, getattr(adapter, name))


def _set_rank(adapter: PaddedAdapter, rank: int) -> None:
    """Set the plain-int ``rank`` attribute, skipping ``nn.Module.__setattr__``'s checks.

    ``rank`` is never a parameter, buffer or submodule, so ``nn.Module.__setattr__`` would end
    in this same ``object.__setattr__``; it is called 48 times per GPT-2 swap.
    """
    if adapter.__dict__.get("rank") != rank:
        object.__setattr__(adapter, "rank", rank)


# 0-dim source tensors for the scale buffers, one per (value, device, dtype): swaps reuse them.
_SCALARS: dict[tuple[float, torch.device, torch.dtype], Tensor] = {}


def _scalar(value: float, like: Tensor) -> Tensor:
    key = (value, like.device, like.dtype)
    found = _SCALARS.get(key)
    if found is None:
        if len(_SCALARS) > 256:  # a handful of distinct scalings in practice; stay bounded
            _SCALARS.clear()
        found = torch.tensor(value, device=like.device, dtype=like.dtype)
        _SCALARS[key] = found
    return found
