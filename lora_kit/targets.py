"""Target presets and module matching.

Adding an architecture is adding rows to :data:`PRESETS` and :data:`DEFAULT_PRESETS`.
Matching follows PEFT's rules so an ``adapter_config.json`` means the same thing to both:
a list entry matches a module whose name equals it or ends with ``"." + entry``; a string that is
not a preset name is a regular expression that must match the whole module name.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import LoraConfig
from .errors import ConfigError, NoTargetsError, UnsupportedModuleError

SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)


@dataclass(frozen=True)
class Preset:
    """A named set of module-name suffixes for one family of architectures."""

    name: str
    suffixes: tuple[str, ...]
    description: str


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("gpt2-attn", ("c_attn",), "GPT-2 fused QKV projection (PEFT's default)"),
        Preset(
            "gpt2-all",
            ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
            "GPT-2 attention and MLP projections",
        ),
        Preset("bert-qv", ("query", "value"), "BERT query and value (PEFT's default)"),
        Preset(
            "bert-all",
            (
                "query",
                "key",
                "value",
                "attention.output.dense",
                "intermediate.dense",
                "output.dense",
            ),
            "BERT attention and feed-forward projections",
        ),
        Preset("llama-qv", ("q_proj", "v_proj"), "Llama/Mistral/Qwen query and value"),
        Preset(
            "llama-all",
            ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            "Llama/Mistral/Qwen attention and MLP projections",
        ),
    )
}

# model.config.model_type -> preset used when LoraConfig.targets is None.
DEFAULT_PRESETS: dict[str, str] = {
    "gpt2": "gpt2-attn",
    "bert": "bert-qv",
    "roberta": "bert-qv",
    "llama": "llama-qv",
    "mistral": "llama-qv",
    "qwen2": "llama-qv",
}


def presets() -> dict[str, tuple[str, ...]]:
    """The available presets: name -> module-name suffixes they target."""
    return {name: p.suffixes for name, p in PRESETS.items()}


def model_type(model: nn.Module) -> str | None:
    """``model.config.model_type`` if the model has one."""
    config = getattr(model, "config", None)
    value = getattr(config, "model_type", None)
    return value if isinstance(value, str) else None


def resolve_spec(config: LoraConfig, model: nn.Module) -> str | tuple[str, ...]:
    """The concrete target spec: a suffix tuple or a regex (presets and defaults expanded).

    Raises:
        ConfigError: If ``targets`` is None and the model type has no default preset.
    """
    targets = config.targets
    if targets is None:
        mtype = model_type(model)
        if mtype not in DEFAULT_PRESETS:
            raise ConfigError(
                f"LoraConfig.targets is not set and model type {mtype!r} has no default preset; "
                f"pass targets=<preset name, suffix list or regex>; presets: {sorted(PRESETS)}"
            )
        return PRESETS[DEFAULT_PRESETS[mtype]].suffixes
    if isinstance(targets, str) and targets in PRESETS:
        return PRESETS[targets].suffixes
    return targets


def spec_matches(spec: str | tuple[str, ...], name: str) -> bool:
    """PEFT's rule: suffix list (on a dot boundary) or full-match regex."""
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == s or name.endswith("." + s) for s in spec)


def named_in_full(spec: str | tuple[str, ...], name: str) -> bool:
    """Whether a target list names ``name`` in full: such a module is targeted whatever
    ``layers`` says (PEFT's rule; the layer filter applies to suffix matches only)."""
    return not isinstance(spec, str) and name in spec


# PEFT's default (no layers_pattern): the first all-digit part with at least two parts before
# it and one after ("transformer.h.0.attn.c_attn" -> 0; a bare "h.0.attn.c_attn" -> none).
_LAYER_INDEX = re.compile(r".*?\.[^.]*\.(\d+)\.")


def layer_index(name: str, patterns: tuple[str, ...] | None = None) -> int | None:
    """The block index of a module, read as PEFT reads it for ``layers_to_transform``.

    Args:
        name: The module's dotted name in the model.
        patterns: PEFT's ``layers_pattern``: regexes for the module list whose index is the
            block, tried in order.

    Returns:
        Without ``patterns``, the first all-digit part of ``name`` that has at least two parts
        before it and one after (so a bare ``GPT2Model``'s ``"h.0.attn.c_attn"`` has none, as
        in PEFT; ``layers_pattern="h"`` finds its blocks). With them, the integer part that
        follows the earliest part of the name matching a pattern. ``None`` when there is none.
    """
    if patterns is None:
        match = _LAYER_INDEX.match(name)
        return int(match.group(1)) if match else None
    for pattern in patterns:
        # the pattern starts at the name's start or after a dot (shortest prefix first), and
        # is followed by ".<index>." (an index is never the name's last part)
        match = re.match(rf"(?:.*?\.)?(?:{pattern})\.(\d+)\.", name)
        if match:
            return int(match.group(1))
    return None


def iter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every module that could be targeted, skipping the insides of lora_kit's own wrappers.

    A module lora_kit already wrapped is yielded under its own name (as the wrapper), never as
    ``<name>.base``; modules inside a ``modules_to_save`` wrapper are never yielded (a head that
    is trained whole must not also get an adapter, the same rule PEFT applies).
    """
    from .layers import LoRALinear
    from .saved_modules import SavedModule

    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix) for prefix in skip):
            continue
        if isinstance(module, LoRALinear | SavedModule):
            skip.append(name + ".")
        yield name, module


def find_targets(model: nn.Module, config: LoraConfig, source: str | None = None) -> list[str]:
    """Names of the modules ``config`` targets, in model order.

    Args:
        model: The model to search.
        config: The target specification.
        source: The adapter directory ``config`` was read from, if any: errors then name it and
            say what to do with the file (rather than how to change a ``LoraConfig``).

    Raises:
        NoTargetsError: Nothing matched; the message lists the modules the model does have.
        UnsupportedModuleError: A matched module is not a Linear or Conv1D.
    """
    from .layers import LoRALinear
    from .saved_modules import SavedModule

    spec = resolve_spec(config, model)
    wanted_layers = set(config.layers) if config.layers is not None else None
    matched: list[str] = []
    candidates: list[str] = []
    unindexed: list[str] = []  # targets the layer filter dropped for want of a block index
    indexed = False  # whether any target had one (then ``layers`` is what missed)
    for name, module in iter_layers(model):
        if isinstance(module, SavedModule) or not name:
            continue
        is_supported = isinstance(module, (*SUPPORTED_TYPES, LoRALinear))
        if is_supported:
            candidates.append(name)
        if not spec_matches(spec, name):
            continue
        if config.exclude is not None and spec_matches(config.exclude, name):
            continue
        if inside_any(name, config.modules_to_save):
            continue  # a head trained whole never also gets an adapter (PEFT's rule too)
        if wanted_layers is not None and not named_in_full(spec, name):
            index = layer_index(name, config.layers_pattern)
            if index is None and is_supported:
                unindexed.append(name)
            indexed = indexed or (index is not None and is_supported)
            if index not in wanted_layers:
                continue
        if not is_supported:
            # A regex may sweep up containers ("h.0.attn") and parameter-free leaves (dropout,
            # activations); only a module with weights of its own is a real, unsupported target.
            if isinstance(spec, str) and not any(True for _ in module.parameters(recurse=False)):
                continue
            kind = type(module).__name__
            if source is not None:
                raise UnsupportedModuleError(
                    f"{source}: the adapter targets {name!r} (type {kind}); lora_kit adapts only "
                    f"nn.Linear and transformers Conv1D layers, so it cannot load this adapter; "
                    f"use PEFT for it if PEFT supports that layer type"
                )
            raise UnsupportedModuleError(
                f"target {name!r} is a {kind}; lora_kit wraps only nn.Linear and transformers "
                f"Conv1D: narrow LoraConfig.targets"
            )
        matched.append(name)
    if not matched:
        shown = ", ".join(_short_names(candidates))
        pattern = f", layers_pattern={config.layers_pattern}" if config.layers_pattern else ""
        found = (
            f"targets {spec!r} (layers={config.layers}{pattern}, exclude={config.exclude!r}) "
            f"matched no Linear/Conv1D module of this {type(model).__name__}. Its Linear/Conv1D "
            f"modules are: {shown}."
        )
        if unindexed and not indexed:
            prefix = f"{source}: the adapter's " if source is not None else ""
            raise NoTargetsError(f"{prefix}{found} {_no_block_index(unindexed, config, source)}")
        if source is not None:
            raise NoTargetsError(
                f"{source}: the adapter's {found} Was it saved for another model? Load it into "
                f"the base it was trained on"
            )
        raise NoTargetsError(f"{found} Pass one of these suffixes or a preset: {sorted(PRESETS)}")
    return matched


def _no_block_index(names: list[str], config: LoraConfig, source: str | None) -> str:
    """Why the layer filter dropped ``names`` (no block index in them), and how to fix it."""
    example = names[0]
    if config.layers_pattern is None:
        why = (
            f"The layer filter found no block index in names like {example!r}: as in PEFT, "
            f"without layers_pattern the block is the first integer part with at least two "
            f"parts before it (e.g. 'transformer.h.0.attn.c_attn'); PEFT adapts nothing here "
            f"either."
        )
    else:
        why = (
            f"The layer filter found no block index in names like {example!r}: no part of "
            f"them matching layers_pattern={list(config.layers_pattern)} is followed by an "
            f"integer part (PEFT reads them so too and adapts nothing)."
        )
    parts = example.split(".")
    lists = [p for p, nxt in itertools.pairwise(parts[:-1]) if nxt.isdigit()]
    suggestion = f"layers_pattern={lists[0]!r}" if lists else "a layers_pattern"
    if source is not None:
        key = f'"layers_pattern": "{lists[0]}"' if lists else '"layers_pattern"'
        return f"{why} Set {key} in its adapter_config.json"
    return f"{why} Set {suggestion} (the module list whose index is the block), or drop layers"


def saves_module(entry: str, name: str) -> bool:
    """Whether ``modules_to_save`` entry ``entry`` names module ``name``: PEFT's rule since
    0.22, whole name parts only (``name`` is ``entry`` or ends with ``"." + entry``)."""
    return name == entry or name.endswith("." + entry)


def find_saved_modules(model: nn.Module, suffixes: tuple[str, ...]) -> list[str]:
    """Names of the modules matched by ``modules_to_save`` suffixes (missing ones are skipped,
    as PEFT does for its task defaults such as ``"score"`` on a BERT model).

    PEFT's rule since PEFT 0.22: a module whose name is the string or ends with ``"." +`` it
    (``"classifier"`` or ``"bert.pooler"``, not ``"fier"``; PEFT 0.21 and older also matched
    inside a name part); modules without weights are left out (saving them changes nothing).
    """
    from .saved_modules import SavedModule

    found = []
    for name, module in iter_layers(model):
        matched = bool(name) and any(saves_module(s, name) for s in suffixes)
        if matched and (isinstance(module, SavedModule) or any(True for _ in module.parameters())):
            found.append(name)
    return found


def inside_any(name: str, suffixes: tuple[str, ...]) -> bool:
    """Whether ``name`` is, or lies inside, a module matched by one of ``suffixes``."""
    parts = name.split(".")
    prefixes = {
        ".".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)
    }
    return any(s in prefixes for s in suffixes)


def _short_names(names: list[str], limit: int = 12) -> list[str]:
    """Distinct names with block indices collapsed (``h.*.attn.c_attn``), at most ``limit``."""
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(re.sub(r"\.\d+\.", ".*.", name), None)
    out = list(seen)
    return out[:limit] + ([f"... ({len(out) - limit} more)"] if len(out) > limit else [])
