"""Fast, strict loading of a parsed adapter into a live model.

The same checks as `LoraModel.load_adapter` always made (keys, shapes, base fingerprint; all
before anything changes), with the work that does not depend on the adapter's weights done once:

* the modules a target specification selects, and the key -> shape table an adapter must
  match, are cached per model and specification (module names and shapes do not change when
  lora_kit wraps them), so loading the 1000th adapter does not walk the whole module tree or
  rebuild the table again; the check against the table itself runs on every load;
* the adapter tensors read from the file become the parameters directly (no random
  initialisation followed by a copy); only a dtype conversion copies.
"""

from __future__ import annotations

import weakref
from collections.abc import Hashable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .adapter_io import AdapterFiles
from .config import LoraConfig
from .errors import AdapterMismatchError, ConfigError
from .fingerprint import check_fingerprint, describe
from .layers import LoraAdapter, LoRALinear
from .peft_format import PREFIX, head_key, lora_keys
from .saved_modules import SavedModule
from .surgery import refuse_adapted_heads, submodule, wrap_lora, wrap_saved
from .targets import find_saved_modules, find_targets, saves_module

if TYPE_CHECKING:
    from .model import LoraModel

_TARGETS: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, tuple[str, ...]]] = (
    weakref.WeakKeyDictionary()
)
Expected = tuple[tuple[str, ...], tuple[str, ...], Mapping[str, tuple[int, ...]]]
_EXPECTED: weakref.WeakKeyDictionary[nn.Module, dict[Hashable, Expected]] = (
    weakref.WeakKeyDictionary()
)


# dtypes adapter factors can be held in (trainable, and supported by the CPU/GPU GEMMs).
ADAPTER_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
)


def check_adapter_dtype(dtype: object) -> None:
    """Raise `ConfigError` unless ``dtype`` is one of `ADAPTER_DTYPES`."""
    if dtype not in ADAPTER_DTYPES:
        raise ConfigError(
            f"adapter_dtype must be one of {[str(d) for d in ADAPTER_DTYPES]}, got {dtype!r}"
        )


def _target_spec(config: LoraConfig) -> Hashable:
    """The config fields that decide which modules are targeted and saved (a memo key)."""
    return (
        config.targets,
        config.exclude,
        config.layers,
        config.layers_pattern,
        config.modules_to_save,
    )


def cached_targets(
    model: nn.Module, config: LoraConfig, source: str | None = None
) -> tuple[str, ...]:
    """`find_targets` memoised per model and target specification (``source`` as there)."""
    key = _target_spec(config)
    per_model = _TARGETS.setdefault(model, {})
    found = per_model.get(key)
    if found is None:
        found = tuple(find_targets(model, config, source))
        per_model[key] = found
    return found


def cached_heads(model: nn.Module, config: LoraConfig) -> tuple[str, ...]:
    """`find_saved_modules` memoised per model and ``modules_to_save``."""
    if not config.modules_to_save:
        return ()
    key: Hashable = ("heads", config.modules_to_save)
    per_model = _TARGETS.setdefault(model, {})
    found = per_model.get(key)
    if found is None:
        found = tuple(find_saved_modules(model, config.modules_to_save))
        per_model[key] = found
    return found


# Adapter tensors outlive the call: never inference tensors, even when loaded inside
# torch.inference_mode (they would have no version counter and refuse later in-place swaps).
@torch.inference_mode(False)
def load_files(
    lm: LoraModel,
    files: AdapterFiles,
    name: str,
    *,
    check_base: bool,
    adapter_dtype: torch.dtype,
) -> None:
    """Add the adapter in ``files`` to ``lm`` as ``name`` (validated first; not activated).

    Raises:
        ConfigError: ``adapter_dtype`` is not a floating dtype adapters can use, or a
            ``modules_to_save`` module carries another adapter's LoRA layers.
        AdapterNameError: ``name`` is invalid or taken.
        AdapterMismatchError: Keys, shapes or base fingerprint do not fit the model.
    """
    check_adapter_dtype(adapter_dtype)
    lm._check_new_name(name)
    config, source, model = files.config, str(files.path), lm.model
    targets, heads, expected = expected_tensors(model, config, source)
    refuse_adapted_heads(model, heads, source)
    files.check_pattern_order(targets)
    check_keys(expected, files.tensors, source, config.modules_to_save)
    modules = {target: submodule(model, target) for target in targets}  # resolved once
    check_base_weights(modules, files.base_weights, source)
    fp = files.metadata.get("base_fingerprint")
    if check_base and isinstance(fp, dict):
        check_fingerprint(fp, model, modules, source)
    # Everything is validated: mutate from here on (taken back if interrupted).
    with lm._undoing_add(name):
        _inject(lm, files, name, targets, heads, modules, adapter_dtype)


def _inject(
    lm: LoraModel,
    files: AdapterFiles,
    name: str,
    targets: tuple[str, ...],
    heads: tuple[str, ...],
    modules: Mapping[str, nn.Module],
    adapter_dtype: torch.dtype,
) -> None:
    """The mutating half of `load_files`: wrap, attach the file's tensors, record."""
    from .model import AdapterRecord

    model, config = lm.model, files.config
    if not lm._adapters:
        model.requires_grad_(False)
    for target in targets:
        module = modules[target]
        layer = module if isinstance(module, LoRALinear) else wrap_lora(model, target, lm.router)
        key_a, key_b = lora_keys(target)
        device = layer.weight.device
        # Always a fresh allocation: tensors read from a file may sit at any offset of a shared
        # buffer, and BLAS kernels (MKL) can round differently for unaligned operands, so a
        # loaded adapter would not compute bit for bit what the saved one did.
        factor_a = files.tensors[key_a].to(device, adapter_dtype, copy=True)
        factor_b = files.tensors[key_b].to(device, adapter_dtype, copy=True)
        adapter = LoraAdapter(
            layer.in_features,
            layer.out_features,
            r=factor_a.shape[0],
            scaling=config.scaling_for(target),
            dropout=config.dropout,
            factors=(factor_a, factor_b),
        )
        layer.add(name, adapter)
    for head in heads:
        prefix = head_key(head, "")
        state = {k[len(prefix) :]: v for k, v in files.tensors.items() if k.startswith(prefix)}
        wrap_saved(model, head, lm.router).add(name).load_state_dict(state, strict=True)
    lm._adapters[name] = AdapterRecord(name, config, targets, heads, str(files.path))


def features(layer: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a Linear, Conv1D or `LoRALinear`."""
    if isinstance(layer, LoRALinear):
        return layer.out_features, layer.in_features
    out_f, in_f, _ = describe(layer)
    return out_f, in_f


def expected_tensors(model: nn.Module, config: LoraConfig, source: str | None = None) -> Expected:
    """What an adapter with ``config`` must hold to fit ``model`` (used by loading and verify).

    Memoised per model and the config fields it depends on (targets and ranks). ``source``, the
    directory ``config`` was read from, goes into the errors (see `find_targets`).

    Returns:
        ``(targets, heads, expected)``: the targeted projections, the ``modules_to_save``
        modules, and PEFT tensor key -> required shape (read-only).

    Raises:
        NoTargetsError, UnsupportedModuleError: ``config`` targets nothing usable in ``model``.
    """
    key: Hashable = (_target_spec(config), config.r, tuple(config.rank_pattern.items()))
    per_model = _EXPECTED.setdefault(model, {})
    found = per_model.get(key)
    if found is None:
        found = _expected_tensors(model, config, source)
        per_model[key] = found
    return found


def _expected_tensors(model: nn.Module, config: LoraConfig, source: str | None) -> Expected:
    targets = cached_targets(model, config, source)
    heads = cached_heads(model, config)
    expected: dict[str, tuple[int, ...]] = {}
    for target in targets:
        out_f, in_f = features(submodule(model, target))
        rank = config.rank_for(target)
        key_a, key_b = lora_keys(target)
        expected[key_a], expected[key_b] = (rank, in_f), (out_f, rank)
    for head in heads:
        module = submodule(model, head)
        original = module.original if isinstance(module, SavedModule) else module
        for key, value in original.state_dict().items():
            expected[head_key(head, key)] = tuple(value.shape)
    return targets, heads, MappingProxyType(expected)


def check_base_weights(
    modules: Mapping[str, nn.Module], base_weights: Mapping[str, Tensor], source: str
) -> None:
    """Raise unless every base weight saved beside the adapter equals the model's own.

    PEFT saves the base weight of an embedding or output layer it adapts (a tied ``lm_head``)
    and writes it into the model on loading: a no-op exactly when it is the model's weight,
    which lora_kit then need not do either. It never replaces base weights.

    Raises:
        AdapterMismatchError: A copy is of a module not adapted, or differs from the weight.
    """
    for key, saved in base_weights.items():
        module_name, _, param = key.removeprefix(PREFIX).rpartition(".base_layer.")
        module = modules.get(module_name)
        base = module.base if isinstance(module, LoRALinear) else module
        current = getattr(base, param, None) if base is not None else None
        if not isinstance(current, Tensor):
            raise AdapterMismatchError(
                f"{source}: holds base weight {key!r}, but {module_name!r} is not a module the "
                f"adapter adapts in this model"
            )
        same = tuple(current.shape) == tuple(saved.shape) and torch.equal(
            current.detach().cpu(), saved.to(current.dtype)
        )
        if not same:
            raise AdapterMismatchError(
                f"{source}: {key} (a base weight PEFT saves beside an adapted embedding or output "
                f"layer, and writes into the model when loading) differs from this model's "
                f"{module_name}.{param}; lora_kit never changes base weights: load the adapter "
                f"into the base it was trained with"
            )


def check_keys(
    expected: Mapping[str, tuple[int, ...]],
    tensors: Mapping[str, Tensor],
    source: str,
    saved: tuple[str, ...] = (),
) -> None:
    """Raise unless ``tensors`` holds exactly the ``expected`` keys, at the expected shapes.

    ``saved`` (the config's ``modules_to_save``) only sharpens the message for a saved module
    that older PEFT matched and lora_kit does not.

    Raises:
        AdapterMismatchError: Naming the first missing key, else the first unexpected one,
            else the first tensor of another shape.
    """
    if expected.keys() != tensors.keys():
        _check_key_sets(expected, tensors, source, saved)
    for key, shape in expected.items():
        got = tuple(tensors[key].shape)
        if got != shape:
            module = key.removeprefix("base_model.model.")
            raise AdapterMismatchError(
                f"{source}: {module} has shape {list(got)} in the file, this model needs "
                f"{list(shape)}; the adapter was trained on a base with other dimensions"
            )


def _check_key_sets(
    expected: Mapping[str, tuple[int, ...]],
    tensors: Mapping[str, Tensor],
    source: str,
    saved: tuple[str, ...],
) -> None:
    """Raise naming the first missing, else the first unexpected, key."""
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise AdapterMismatchError(
            f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all): the "
            f"adapter's config targets this module but the file has no weights for it; was it "
            f"saved for another model or with other targets?"
        )
    unexpected = sorted(k for k in tensors if k not in expected)
    for key in unexpected:
        module = key.removeprefix("base_model.model.").rpartition(".")[0]  # less weight/bias
        for entry in saved:
            if module.endswith(entry) and not saves_module(entry, module):  # PEFT <= 0.21
                part = module.rpartition(".")[2]
                raise AdapterMismatchError(
                    f"{source}: unexpected tensor {key!r}: modules_to_save entry {entry!r} ends "
                    f"the module name {module!r} inside a name part. PEFT 0.21 and older saved "
                    f"such modules; PEFT 0.22 and lora_kit match whole name parts only. Write "
                    f"{part!r} in modules_to_save of adapter_config.json to load this file"
                )
    if unexpected:
        example = next(iter(expected), "none")
        raise AdapterMismatchError(
            f"{source}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} in all) matches "
            f"no targeted module of this model (expected keys like {example!r}); the adapter "
            f"was probably saved for a different model or module naming"
        )
