"""A fingerprint of the base an adapter was trained on, so it never loads onto the wrong one.

It records the model type, each targeted module's shape and orientation, and a SHA-256 of the
targeted base weights. The hash is taken over the weights rounded to bfloat16, so the same base
loaded in fp32 or bf16 matches; an fp16 copy rounds differently and does not (load it with
``check_base=False`` after checking it is the right model).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
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
    Cached on a `LoRALinear` for as long as its weight tensor is the same, unmodified one
    (`digest_key`): a base reloaded in place (``load_state_dict``, ``copy_``) is hashed again.
    Computed afresh for a bare Linear/Conv1D.
    """
    if not isinstance(layer, LoRALinear):
        return _digest(_weight(layer))
    key = digest_key(layer)
    cached = layer._base_digest
    if key is not None and cached is not None and cached[0] == key:
        return cached[1]
    digest = _digest(_base_weight(layer))
    layer._base_digest = None if key is None else (key, digest)
    return digest


def digest_key(layer: LoRALinear) -> tuple[Any, ...] | None:
    """What identifies the content of ``layer``'s base weight without reading it: the tensor's
    memory, in-place version counter, dtype and shape (None for an inference tensor, which has
    no version counter). Writes through ``.data`` bypass the version counter and go unseen."""
    weight = _base_weight(layer)
    if weight.is_inference():
        return None
    return (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))


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


def check_fingerprint(
    expected: Mapping[str, Any], model: nn.Module, layers: Mapping[str, nn.Module], source: str
) -> None:
    """Raise if ``model`` is not the base ``expected`` was recorded on.

    Raises:
        AdapterMismatchError: Naming the first difference (type, module, shape, orientation,
            or weights) and how to proceed.
    """
    compare_fingerprint(expected, fingerprint(model, layers), source)


def compare_fingerprint(
    expected: Mapping[str, Any], actual: Mapping[str, Any], source: str
) -> None:
    """Raise if the recorded fingerprint ``expected`` differs from ``actual`` (`fingerprint`).

    Raises:
        AdapterMismatchError: As `check_fingerprint`.
    """
    if expected == actual:  # one comparison in C for the usual case
        return
    hint = "load it onto the base it was trained on, or pass check_base=False if you are sure"
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
