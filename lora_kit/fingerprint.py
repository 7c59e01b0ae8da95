"""A fingerprint of the base an adapter was trained on, so it never loads onto the wrong one.

It records the model type, each targeted module's shape and orientation, and a SHA-256 of the
targeted base weights. The hash is taken over the weights rounded to bfloat16, so the same base
loaded in fp32 or bf16 matches; an fp16 copy rounds differently and does not (load it with
``check_base=False`` after checking it is the right model).
"""

from __future__ import annotations

import hashlib
import operator
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .errors import AdapterMismatchError
from .layers import LoRALinear
from .targets import model_type

HASH_DTYPE = torch.bfloat16


def weight_digest(layer: nn.Module) -> str:
    """SHA-256 of a projection's base weight as bf16 bytes.

    While adapters are merged, the weight hashed is the pre-merge one (kept for ``unmerge``).
    Cached on a `LoRALinear` for as long as its weight is the same, unmodified tensor
    (`WeightsSeen`): a base reloaded in place (``load_state_dict``, ``copy_``) is hashed again.
    Computed afresh for a bare Linear/Conv1D.
    """
    if not isinstance(layer, LoRALinear):
        return _digest(_weight(layer))
    weights = (_base_weight(layer),)
    state = tensor_states(weights)
    cached = layer._base_digest
    if cached is not None and state is not None and cached.still(weights, state):
        return cast(str, cached.value)
    digest = _digest(weights[0])
    layer._base_digest = None if state is None else WeightsSeen.of(weights, state, digest)
    return digest


def tensor_states(tensors: Sequence[Tensor | None]) -> tuple[tuple[int, int], ...] | None:
    """Each tensor's ``(in-place version counter, data pointer)``: both change when its content
    is rewritten, except through ``.data``, which goes unseen. None when one is missing or is
    an inference tensor (no version counter)."""
    try:
        return tuple((t._version, t.data_ptr()) for t in tensors)  # type: ignore[union-attr]
    except (AttributeError, RuntimeError):
        return None


@dataclass(frozen=True)
class WeightsSeen:
    """A value computed from some weights, with what identified them then.

    The one rule for "these base weights are unchanged", used by the per-layer digest cache and
    the swap plan's remembered fingerprints: the same tensor objects (weakly held, so a new
    tensor at a recycled address never passes for the old one, and nothing is kept alive) with
    the same `tensor_states`.

    Attributes:
        weights: The tensors, weakly held.
        state: Their `tensor_states` then.
        value: What was computed from them (a digest, a fingerprint).

    ``lora_kit.rows._Seen`` applies the same rule to trainable adapter factors and is kept
    apart on purpose: it also tracks scalings, empty slots and the optimizer step count (a
    fused optimizer updates in place without bumping versions). Base weights are frozen, so
    counting steps here would only make every checkpoint save during training rehash them.
    """

    weights: tuple[weakref.ref[Tensor], ...]
    state: tuple[tuple[int, int], ...]
    value: Any

    @classmethod
    def of(
        cls, weights: Sequence[Tensor | None], state: tuple[tuple[int, int], ...], value: Any
    ) -> WeightsSeen:
        """Remember ``value`` for ``weights`` (all present: ``state`` is not None)."""
        return cls(tuple(weakref.ref(w) for w in weights if w is not None), state, value)

    def still(self, weights: Sequence[Tensor | None], state: tuple[tuple[int, int], ...]) -> bool:
        """Whether ``weights`` (with their current ``state``) are the same, unmodified tensors."""
        return state == self.state and all(
            map(operator.is_, (ref() for ref in self.weights), weights)
        )


def _base_weight(layer: LoRALinear) -> Tensor:
    return layer.unmerged_weight if layer.unmerged_weight is not None else layer.weight


def _digest(weight: Tensor) -> str:
    raw = weight.detach().to(device="cpu", dtype=HASH_DTYPE).contiguous()
    return hashlib.sha256(raw.view(torch.int16).numpy().tobytes()).hexdigest()


def describe(layer: nn.Module) -> list[Any]:
    """``[out_features, in_features, "linear"|"conv1d"]`` of a projection, wrapped or not."""
    if isinstance(layer, LoRALinear):
        return [layer.out_features, layer.in_features, _orientation(layer)]
    if isinstance(layer, Conv1D):
        return [layer.weight.shape[1], layer.weight.shape[0], "conv1d"]
    return [_weight(layer).shape[0], _weight(layer).shape[1], "linear"]


def fingerprint(model: nn.Module, layers: Mapping[str, nn.Module]) -> dict[str, Any]:
    """The fingerprint of ``model`` restricted to the named projections ``layers``.

    Returns:
        ``{"model_type", "modules": {name: [out, in, "linear"|"conv1d"]}, "weights_sha256"}``.
    """
    combined = hashlib.sha256()
    modules: dict[str, list[Any]] = {}
    for name in sorted(layers):
        modules[name] = describe(layers[name])
        combined.update(f"{name}={weight_digest(layers[name])};".encode())
    return {
        "model_type": model_type(model),
        "modules": modules,
        "weights_sha256": combined.hexdigest(),
    }


# What to do about a mismatch when loading an adapter (the default advice).
LOAD_HINT = (
    "load it onto the base it was trained on, or pass check_base=False "
    "(CLI: --no-check-base) if you are sure"
)


def check_fingerprint(
    expected: Mapping[str, Any],
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    source: str,
    hint: str = LOAD_HINT,
) -> None:
    """Raise if ``model`` is not the base ``expected`` was recorded on.

    Args:
        expected: The recorded fingerprint.
        model: The model to check.
        layers: Its targeted projections, by name.
        source: Where ``expected`` came from (for the message).
        hint: How to proceed, ending the message.

    Raises:
        AdapterMismatchError: Naming the first difference (type, module, shape, orientation,
            or weights) and ``hint``.
    """
    compare_fingerprint(expected, fingerprint(model, layers), source, hint)


def compare_fingerprint(
    expected: Mapping[str, Any], actual: Mapping[str, Any], source: str, hint: str = LOAD_HINT
) -> None:
    """Raise if the recorded fingerprint ``expected`` differs from ``actual`` (`fingerprint`).

    Raises:
        AdapterMismatchError: As `check_fingerprint`.
    """
    if expected == actual:  # one comparison in C for the usual case
        return
    if expected.get("model_type") != actual["model_type"]:
        raise AdapterMismatchError(
            f"{source}: adapter was trained on a {expected.get('model_type')!r} model, this base "
            f"is {actual['model_type']!r}; {hint}"
        )
    want = expected.get("modules", {})
    for name in sorted(set(want) | set(actual["modules"])):
        if name not in actual["modules"] or name not in want:
            raise AdapterMismatchError(f"{source}: module {name!r} differs in the base; {hint}")
        if list(want[name]) != actual["modules"][name]:
            raise AdapterMismatchError(
                f"{source}: module {name!r} was {want[name]} [out, in, layout] in the adapter's "
                f"base, here it is {actual['modules'][name]}; {hint}"
            )
    if expected.get("weights_sha256") != actual["weights_sha256"]:
        raise AdapterMismatchError(
            f"{source}: the targeted base weights differ from those the adapter was trained on "
            f"(same shapes, different content: another checkpoint of the same architecture?); "
            f"{hint}"
        )


def _orientation(layer: LoRALinear) -> str:
    return "conv1d" if layer.fan_in_fan_out else "linear"


def _weight(layer: nn.Module) -> Tensor:
    return layer.weight if isinstance(layer, LoRALinear) else cast(Tensor, layer.weight)
