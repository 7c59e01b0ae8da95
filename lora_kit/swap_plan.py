"""The layers and adapter modules of a resident adapter, resolved once per model for swapping.

`swap_in` needs, for each module an adapter targets, its `LoRALinear` and its adapter module.
Resolving them walks the model's child dictionaries (a few steps per module, a hundred
modules); a hot swap does it on every call. A `SwapPlan` remembers what the walk found together
with every parent -> child link it followed, and is reused only while each of those links still
holds the same object (one dictionary look-up per link): a plan is never stale, whatever
changed the model (adding, deleting or re-storing adapters, unwrapping, editing it by hand).
Plans are also dropped where lora_kit itself removes or replaces adapter modules, so a deleted
adapter's tensors are not kept alive by a plan. A plan also remembers the base fingerprint of
each target set it was asked for, so a swap compares the file's recorded fingerprint with a
stored one instead of rebuilding it.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from torch import Tensor, nn

from .fingerprint import WeightsSeen, fingerprint, tensor_states
from .layers import LoraAdapter, LoRALinear
from .peft_format import lora_keys

if TYPE_CHECKING:
    from .model import AdapterRecord, LoraModel


@dataclass(frozen=True)
class Links:
    """Every parent -> child link a plan followed, each once, as three aligned columns.

    A parent is held by its child dictionary (``nn.Module._modules``, created with the module
    and never replaced), so `hold` checks every link with ``map`` in C instead of a Python
    loop: a hundred-odd look-ups on every swap.

    Attributes:
        child_dicts: Each link's parent's child dictionary.
        names: Each link's child name.
        children: The child each link led to when the plan was made.
    """

    child_dicts: tuple[dict[str, nn.Module | None], ...]
    names: tuple[str, ...]
    children: tuple[nn.Module, ...]

    def hold(self) -> bool:
        """Whether every link still leads to the same child."""
        found = map(dict.get, self.child_dicts, self.names)
        return all(map(operator.is_, found, self.children))


@dataclass(frozen=True)
class SwapSlot:
    """One targeted module of a resident adapter.

    Attributes:
        module: The module's dotted name.
        adapter: Its adapter module (a `PaddedAdapter` or a plain `LoraAdapter`).
        key_a: PEFT key of the A factor in an adapter file.
        key_b: PEFT key of the B factor.
    """

    module: str
    adapter: LoraAdapter
    key_a: str
    key_b: str


@dataclass(frozen=True)
class SwapPlan:
    """What resolving adapter ``name``'s modules found (see the module docstring).

    Attributes:
        name: The adapter.
        root: The wrapped model (``lm.model``) the links start from.
        modules: The record's modules, in its order.
        layers: Module name -> its `LoRALinear`.
        slots: Module name -> `SwapSlot`, in the record's order.
        links: Every parent -> child link followed.
        weight_dicts: Module name -> its base module's parameter dictionary.
    """

    name: str
    root: nn.Module
    modules: tuple[str, ...]
    layers: dict[str, LoRALinear]
    slots: dict[str, SwapSlot]
    links: Links
    weight_dicts: dict[str, dict[str, nn.Parameter | None]]
    _fingerprints: dict[tuple[str, ...], WeightsSeen] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    # What other modules remember per plan (`lora_kit.swap_packed`: the packing found).
    memo: dict[str, object] = field(default_factory=dict, init=False, repr=False, compare=False)

    def is_current(self, lm: LoraModel) -> bool:
        """Whether ``lm`` still wraps ``root`` and every link leads where it led."""
        return lm._modules.get("model") is self.root and self.links.hold()

    def fingerprint(self, targets: Sequence[str]) -> dict[str, Any]:
        """The base fingerprint (`lora_kit.fingerprint.fingerprint`) over ``targets``.

        Remembered per target set while the targeted base weights are unchanged (the rule of
        `lora_kit.fingerprint.WeightsSeen`, as for the per-layer digests), checked on weights
        read from the parameter dictionaries this plan resolved once, which is a few
        microseconds per layer less than going through each layer's digest cache on every
        swap. Swaps are refused while adapters are merged, so the weight here is always the
        unmerged one.
        """
        key = tuple(targets)
        weights: list[Tensor | None] = [self.weight_dicts[t].get("weight") for t in key]
        state = tensor_states(weights)
        found = self._fingerprints.get(key)
        if found is not None and state is not None and found.still(weights, state):
            return cast(dict[str, Any], found.value)
        computed = fingerprint(self.root, {t: self.layers[t] for t in key})
        if state is not None:
            self._fingerprints[key] = WeightsSeen.of(weights, state, computed)
        return computed


# Keyed weakly by the LoraModel; a plan holds no reference to it (links start at ``lm.model``),
# so the model handle can be garbage collected with its plans.
_PLANS: weakref.WeakKeyDictionary[nn.Module, dict[str, SwapPlan]] = weakref.WeakKeyDictionary()


def swap_plan(lm: LoraModel, record: AdapterRecord) -> SwapPlan:
    """The current `SwapPlan` of adapter ``record.name``: remembered, or resolved afresh.

    Raises:
        LoraKitError: A module of the record is no longer a LoRA layer (the model was edited).
    """
    plans = _PLANS.setdefault(lm, {})
    plan = plans.get(record.name)
    if plan is not None and plan.modules == record.modules and plan.is_current(lm):
        return plan
    plan = _resolve(lm, record)
    plans[record.name] = plan
    return plan


def forget_plans(lm: LoraModel, name: str | None = None) -> None:
    """Drop the remembered plan of adapter ``name`` (of every adapter for None)."""
    plans = _PLANS.get(lm)
    if plans is None:
        return
    if name is None:
        plans.clear()
    else:
        plans.pop(name, None)


def _resolve(lm: LoraModel, record: AdapterRecord) -> SwapPlan:
    name = record.name
    layers = {module: lm._layer(module) for module in record.modules}  # raises if edited
    slots: dict[str, SwapSlot] = {}
    links: dict[tuple[int, str], tuple[dict[str, nn.Module | None], str, nn.Module]] = {}
    weight_dicts: dict[str, dict[str, nn.Parameter | None]] = {}

    def follow(parent: nn.Module, child: str) -> nn.Module:
        found = parent._modules[child]
        if found is None:  # unreachable: _layer resolved this path
            raise KeyError(child)
        links[(id(parent), child)] = (parent._modules, child, found)
        return found

    root = lm.model
    for module, layer in layers.items():
        node = root
        for part in module.split("."):
            node = follow(node, part)
        weight_dicts[module] = follow(layer, "base")._parameters  # its projection's weights
        box = follow(layer, "adapters")  # the layer's ModuleDict of adapters
        adapter = follow(box, name)
        if not isinstance(adapter, LoraAdapter):  # unreachable: adapters hold LoraAdapters
            raise TypeError(f"{module}: adapter {name!r} is a {type(adapter).__name__}")
        key_a, key_b = lora_keys(module)
        slots[module] = SwapSlot(module, adapter, key_a, key_b)
    dicts, names, children = zip(*links.values(), strict=True) if links else ((), (), ())
    links_found = Links(dicts, names, children)
    return SwapPlan(name, root, record.modules, layers, slots, links_found, weight_dicts)
