"""Translation between `LoraConfig` and PEFT's ``adapter_config.json``, and PEFT's tensor keys.

Facts (peft 0.21): tensor keys are ``base_model.model.<module path>.lora_A.weight`` /
``.lora_B.weight`` with no adapter name, heads are ``base_model.model.<module path>.<param>``;
GPT-2 Conv1D adapters set ``fan_in_fan_out: true``. We write only the keys an adapter needs, so
older PEFT releases (which reject unknown keys) read our files too.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .config import LoraConfig, pattern_matches
from .errors import AdapterFormatError, ConfigError
from .targets import PRESETS

PREFIX = "base_model.model."

# Keys of a PEFT LoRA config that lora_kit understands (others are ignored with a warning).
_KNOWN_KEYS = {
    "peft_type",
    "task_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "exclude_modules",
    "fan_in_fan_out",
    "bias",
    "use_rslora",
    "use_dora",
    "init_lora_weights",
    "rank_pattern",
    "alpha_pattern",
    "layers_to_transform",
    "layers_pattern",
    "modules_to_save",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "peft_version",
    "auto_mapping",
    "lora_bias",
    "target_parameters",
    "layer_replication",
    "use_qalora",
    "megatron_config",
    "megatron_core",
    "loftq_config",
    "trainable_token_indices",
    "alora_invocation_tokens",
    "qalora_group_size",
    "eva_config",
    "corda_config",
    "astra_config",
    "arrow_config",
    "kasa_config",
    "lora_ga_config",
    "monteclora_config",
    "use_bdlora",
    "velora_config",
    "ensure_weight_tying",
}

# Features that change what an adapter computes or how it trains, or that carry state lora_kit
# cannot hold: key -> (values that mean plain LoRA, what the feature does). Loading such a file
# as plain LoRA would drop the feature, so it is refused. A sub-config written as ``{}`` is
# refused too: PEFT builds it into a default, active config.
_UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "use_dora": ((False, None), "DoRA rescales each adapted output by a learned magnitude"),
    "bias": (("none", None), "the file carries trained biases of the base model"),
    "lora_bias": ((False, None), "lora_B has a trained bias"),
    "target_parameters": ((None, [], ()), "it adapts bare parameters, not modules"),
    "layer_replication": ((None, [], ()), "it repeats blocks of the base model"),
    "use_qalora": ((False, None), "QALoRA pools the input of lora_A in groups"),
    "trainable_token_indices": ((None, {}, []), "it trains rows of the embedding matrix"),
    "alora_invocation_tokens": (
        (None, [], ()),
        "aLoRA applies the update only from the invocation tokens on",
    ),
    "use_bdlora": ((None, False), "BD-LoRA makes lora_A or lora_B block-diagonal"),
    "arrow_config": ((None,), "Arrow routes each token among several LoRA experts"),
    "kasa_config": (
        (None,),
        "KaSA truncates the base weight's smallest singular directions and scales the update "
        "by a learned diagonal (lora_diag)",
    ),
    "velora_config": (
        (None,),
        "VeLoRA trains lora_A through compressed activations and keeps their projection "
        "(lora_velora_embed) in the file",
    ),
    "monteclora_config": (
        (None,),
        "MonteCLoRA trains lora_A under sampled perturbations and keeps its sampler in the file",
    ),
}

# init_lora_weights values that leave the base untouched: they only choose the factors' start
# (EVA, orthogonal, NoRA, MiCA: PEFT's forward is plain LoRA for them; MiCA also keeps lora_B
# frozen in PEFT's training, lora_kit trains both). PiSSA, OLoRA, CorDA, Astra, LoRA-GA and LoftQ
# rewrite the base weights, so an adapter trained with them needs that modified base.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal", "nora", "mica")
_CASELESS_INITS = ("gaussian", "mica", "olora")  # the init names PEFT reads in any case

# Layer names whose weight PEFT's ensure_weight_tying ties to the input embeddings'.
_TIED_LAYER_NAMES = ("embed_tokens", "lm_head")

# What follows a layer's own name in the keys of its tensors: its LoRA factors, the base weight
# PEFT saves beside an adapted embedding or output layer, or a trained copy's parameter (not a
# submodule's: ``lm_head.dense`` of a RoBERTa MLM head is a layer of its own, tied to nothing).
_OWN_TENSOR = re.compile(r"lora_[AB]\.weight|lora_embedding_[AB]|base_layer\.\w+|\w+")

_TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}


def lora_keys(module_name: str) -> tuple[str, str]:
    """The PEFT tensor keys of a module's A and B."""
    base = PREFIX + module_name
    return f"{base}.lora_A.weight", f"{base}.lora_B.weight"


def lora_pairs(tensors: Mapping[str, Any], source: str) -> list[tuple[str, Any, Any]]:
    """``(module, A, B)`` for every module of a PEFT adapter's tensors, in file order.

    Checks the pairing a model-free reader (merge on disk, stack) relies on: there is at least
    one module, every ``lora_A`` has its ``lora_B`` and the reverse, and the two agree on the
    rank.

    Raises:
        AdapterFormatError: No LoRA tensors, a factor without its partner, or ranks that
            differ; names the module and ``source``.
    """
    pairs = []
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
        b = tensors.get(f"{PREFIX}{module}.lora_B.weight")
        if b is None:
            raise AdapterFormatError(f"{source}: {module} has lora_A but no lora_B")
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise AdapterFormatError(
                f"{source}: {module} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; "
                f"expected [r, in] and [out, r] with the same r"
            )
        pairs.append((module, a, b))
    for key in tensors:
        if key.endswith(".lora_B.weight"):
            module = key.removeprefix(PREFIX).removesuffix(".lora_B.weight")
            if f"{PREFIX}{module}.lora_A.weight" not in tensors:
                raise AdapterFormatError(f"{source}: {module} has lora_B but no lora_A")
    if not pairs:
        raise AdapterFormatError(f"{source}: the adapter has no lora_A/lora_B tensors")
    return pairs


def head_key(module_name: str, param_name: str) -> str:
    """The PEFT tensor key of a ``modules_to_save`` parameter/buffer."""
    return f"{PREFIX}{module_name}.{param_name}"


def task_type_for(model_class: str) -> str | None:
    """PEFT's task type for a transformers model class name (None if unknown)."""
    for suffix, task in _TASK_TYPES.items():
        if model_class.endswith(suffix):
            return task
    return None


def to_peft_dict(
    config: LoraConfig,
    *,
    target_modules: str | Sequence[str],
    fan_in_fan_out: bool,
    task_type: str | None,
    base_model_name_or_path: str | None,
    peft_version: str,
) -> dict[str, Any]:
    """The ``adapter_config.json`` content for ``config``.

    Args:
        config: The adapter's config.
        target_modules: What PEFT should target, already resolved by the caller (a suffix list,
            a regex, or the exact module names when layers/exclude were used).
        fan_in_fan_out: Whether the targets are Conv1D.
        task_type: PEFT task type (``SEQ_CLS`` makes PEFT restore the classifier head).
        base_model_name_or_path: Recorded as PEFT does.
        peft_version: The PEFT release whose format this mirrors.
    """
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "r": config.r,
        "lora_alpha": int(config.alpha) if float(config.alpha).is_integer() else config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": target_modules
        if isinstance(target_modules, str)
        else list(target_modules),
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "init_lora_weights": "gaussian" if config.init == "gaussian" else True,
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "layers_to_transform": None,
        "layers_pattern": None,
        "modules_to_save": list(config.modules_to_save) or None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "peft_version": peft_version,
    }


def unknown_keys(data: Mapping[str, Any]) -> list[str]:
    """The keys of an ``adapter_config.json`` lora_kit does not know (ignored with a warning)."""
    return sorted(set(data) - _KNOWN_KEYS)


def from_peft_dict(data: Mapping[str, Any], source: str) -> LoraConfig:
    """Parse an ``adapter_config.json`` into a `LoraConfig`.

    Unknown keys are ignored with a warning; features lora_kit does not implement are refused
    (LoRA variants, base-rewriting inits, trained biases and tokens, ``ensure_weight_tying`` on
    an embedding layer ...). Keys that do not change the adapter's math are accepted
    (``fan_in_fan_out``: PEFT sets it per layer type; ``megatron_config``: Megatron layers only;
    the sub-configs of inits that are not in use).

    Raises:
        AdapterFormatError: Not a LoRA config, an unsupported feature, or invalid values.
    """
    if data.get("peft_type", "LORA") != "LORA":
        raise AdapterFormatError(
            f"{source}: peft_type is {data.get('peft_type')!r}; lora_kit reads LoRA adapters only"
        )
    for key, (fine, what) in _UNSUPPORTED.items():
        if key in data and data[key] not in fine:
            raise AdapterFormatError(
                f"{source}: {key}={data[key]!r}: {what}. lora_kit does not implement this PEFT "
                f"feature, and reading the file as plain LoRA would drop it. Use PEFT for this "
                f"adapter."
            )
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() in _CASELESS_INITS:
        init = init.lower()  # PEFT compares these without case
    if init not in _PLAIN_INITS:
        raise AdapterFormatError(
            f"{source}: init_lora_weights={init!r} modifies the base weights (PiSSA/OLoRA/LoftQ "
            f"style); lora_kit needs the unmodified base. Use PEFT for this adapter, or have "
            f"PEFT save it as plain LoRA (save_pretrained's "
            f"path_initial_model_for_weight_conversion; not for LoftQ)."
        )
    unknown = unknown_keys(data)
    if unknown:
        warnings.warn(f"{source}: ignoring unknown adapter_config keys {unknown}", stacklevel=3)
    _check_target_modules(data, source)
    _check_unversioned_pattern_keys(data, source)
    layers = data.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    if layers and not isinstance(layers, list):  # tuple() of a float raised a bare TypeError
        raise AdapterFormatError(
            f"{source}: invalid layers_to_transform: {layers!r} is not an int or a list of ints"
        )
    # PEFT reads layers_pattern only with a non-empty layers_to_transform, and an empty one
    # ("", []) as no pattern; a pattern without layers it refuses.
    layers_pattern = data.get("layers_pattern") or None
    if layers_pattern is not None and layers is None:
        raise AdapterFormatError(
            f"{source}: layers_pattern={layers_pattern!r} without layers_to_transform; PEFT "
            f"refuses this config too. Set layers_to_transform or drop layers_pattern"
        )
    modules_to_save = data.get("modules_to_save") or ()  # a list; a string is refused
    try:
        config = LoraConfig(
            r=data.get("r", 8),
            alpha=data.get("lora_alpha", 8),
            dropout=data.get("lora_dropout", 0.0),
            targets=data["target_modules"],
            exclude=data.get("exclude_modules") or None,
            layers=tuple(layers) if layers else None,
            layers_pattern=layers_pattern if layers else None,
            rank_pattern=data.get("rank_pattern") or {},
            alpha_pattern=data.get("alpha_pattern") or {},
            use_rslora=bool(data.get("use_rslora", False)),
            init="gaussian" if init == "gaussian" else "zero_b",
            modules_to_save=modules_to_save,
        )
    except ConfigError as exc:
        named = re.search(r"LoraConfig\.(\w+)", str(exc))
        json_key = _PEFT_NAMES.get(named.group(1), named.group(1)) if named else None
        what = f"invalid {json_key}" if json_key else "invalid adapter_config.json"
        raise AdapterFormatError(f"{source}: {what}: {exc}") from exc
    if data.get("ensure_weight_tying"):
        _check_weight_tying(config, source)
    return config


# LoraConfig field -> the adapter_config.json key it is read from (where the names differ).
_PEFT_NAMES = {
    "alpha": "lora_alpha",
    "dropout": "lora_dropout",
    "targets": "target_modules",
    "exclude": "exclude_modules",
    "layers": "layers_to_transform",
}


def _check_target_modules(data: Mapping[str, Any], source: str) -> None:
    """Refuse target_modules that lora_kit would read otherwise than PEFT.

    Raises:
        AdapterFormatError: Missing; ``all-linear`` (in any case: PEFT's model-specific
            expansion); a lora_kit preset name (PEFT reads a string as a regex over whole
            module names); a regex with ``layers_to_transform``/``layers_pattern`` (PEFT
            refuses that config).
    """
    targets = data.get("target_modules")
    if targets is None:
        raise AdapterFormatError(f"{source}: adapter_config.json has no target_modules")
    if not isinstance(targets, str):
        return
    if targets.lower() == "all-linear":
        raise AdapterFormatError(
            f"{source}: target_modules={targets!r} depends on PEFT's model-specific expansion; "
            f"re-save the adapter with an explicit module list"
        )
    if targets in PRESETS:
        raise AdapterFormatError(
            f"{source}: target_modules={targets!r} is a lora_kit preset name, but in an "
            f"adapter_config.json a string is a regex over whole module names (PEFT adapts "
            f"nothing with it); write the module list instead: {list(PRESETS[targets].suffixes)}"
        )
    for key in ("layers_to_transform", "layers_pattern"):
        if data.get(key) is not None:
            raise AdapterFormatError(
                f"{source}: {key}={data[key]!r} with a regex target_modules; PEFT refuses this "
                f"config too (the regex alone says which modules): fold the layers into it"
            )


# LoraConfig fields that PEFT 0.15 added (it writes every field, None included): an unversioned
# file holding one was written by PEFT 0.15 to 0.17, which grouped pattern keys as PEFT does now.
_GROUPING_PEFT_FIELDS = ("trainable_token_indices", "corda_config")


def _check_unversioned_pattern_keys(data: Mapping[str, Any], source: str) -> None:
    """Refuse a top-level ``|`` in a pattern key of a file without ``peft_version``.

    PEFT 0.14 and older (which did not record ``peft_version``) matched a
    ``rank_pattern``/``alpha_pattern`` key ``K`` with ``re.match(rf".*\\.{K}$", name)``: the
    alternatives of ``"a|b"`` were not grouped, so ``b`` had to match from the start of the name
    and applied to no module. Current PEFT (and lora_kit) group the key, so such a file would load
    silently with other alphas (or ranks) than the PEFT that wrote it used. PEFT 0.15 to 0.17
    grouped it too but recorded no ``peft_version`` either (from 0.18 on it does); their files
    carry fields that 0.14's lacked (`_GROUPING_PEFT_FIELDS`) and are not refused.

    Raises:
        AdapterFormatError: Naming the field and the key.
    """
    if data.get("peft_version") or any(name in data for name in _GROUPING_PEFT_FIELDS):
        return
    for field in ("rank_pattern", "alpha_pattern"):
        for key in data.get(field) or {}:
            if isinstance(key, str) and _top_level_alternation(key):
                raise AdapterFormatError(
                    f"{source}: {field} key {key!r} has a top-level '|' in a file without "
                    f"peft_version: the PEFT releases that wrote such files did not group the "
                    f"alternatives (re.match(r'.*\\.' + key + '$')), so only the first one "
                    f"applied, and only as a prefix; current PEFT applies every alternative. "
                    f"Load it with the PEFT that wrote it, or rewrite the key as the modules it "
                    f'meant and add "peft_version" to adapter_config.json'
                )


def check_pattern_order(
    peft_config: Mapping[str, Any],
    written_by_peft: bool,
    modules: Iterable[str],
    source: str,
    tensors: Mapping[str, Any],
) -> None:
    """Refuse pattern keys whose order decided a module's value but was not kept in the file.

    When two ``rank_pattern``/``alpha_pattern`` keys match one module, the first wins. PEFT
    before 0.22 saved ``adapter_config.json`` with sorted keys, so the file no longer holds the
    order the writer used, and reading it may apply the other key (alpha: other outputs; rank:
    a shape mismatch blamed on the base). Files from PEFT 0.22 on and from lora_kit keep it.

    Args:
        peft_config: The raw ``adapter_config.json``.
        written_by_peft: Whether PEFT wrote the file (lora_kit's files keep the order).
        modules: The adapted module names.
        source: The adapter, for the message.
        tensors: The file's tensors: a module's ``lora_A`` holds the rank its writer applied, so
            overlapping ``rank_pattern`` keys are refused only where the key read first gives
            another rank (the sorted order may well be the writer's).

    Raises:
        AdapterFormatError: Naming the module, the two keys and their values.
    """
    if not written_by_peft or _version(peft_config.get("peft_version")) >= (0, 22):
        return
    modules = tuple(modules)  # read once per field
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = peft_config.get(field) or {}
        for module in modules:
            hits = [(k, v) for k, v in patterns.items() if pattern_matches(k, module)]
            down = tensors.get(lora_keys(module)[0])
            if (
                field == "rank_pattern"
                and hits
                and getattr(down, "shape", (None,))[0] == hits[0][1]
            ):
                continue  # the rank read is the rank the tensors have
            if len({v for _, v in hits}) > 1:
                (k1, v1), (k2, v2) = hits[0], next(h for h in hits if h[1] != hits[0][1])
                raise AdapterFormatError(
                    f"{source}: {field} keys {k1!r} ({v1}) and {k2!r} ({v2}) both match {module}; "
                    f"PEFT before 0.22 saved adapter_config.json with sorted keys, so which one "
                    f"its writer applied is lost. Keep only the key meant for {module} (or make "
                    f"the keys match disjoint modules) in adapter_config.json"
                )


def _version(text: object) -> tuple[int, int]:
    """``(major, minor)`` of a ``peft_version`` string; ``(0, 0)`` when absent or unreadable
    (treated as old)."""
    match = re.match(r"(\d+)\.(\d+)", text) if isinstance(text, str) else None
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def _top_level_alternation(pattern: str) -> bool:
    """Whether ``pattern`` has a ``|`` outside every group and character class."""
    depth, in_class, i = 0, False, 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
            if pattern[i + 1 : i + 2] == "^":
                i += 1
            if pattern[i + 1 : i + 2] == "]":  # a leading ']' is a literal
                i += 1
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "|" and depth == 0:
            return True
        i += 1
    return False


def _check_weight_tying(config: LoraConfig, source: str) -> None:
    """Refuse ``ensure_weight_tying`` where PEFT would tie adapters or saved copies.

    With the flag, PEFT shares the adapter (or the trained copy) of a targeted or saved
    ``lm_head``/``embed_tokens`` between the input embeddings and the output layer of a base
    that ties their weights; lora_kit adapts and saves modules one by one. Elsewhere PEFT ignores
    the flag, and so does lora_kit.

    Raises:
        AdapterFormatError: A ``target_modules`` or ``modules_to_save`` entry names such a layer
            (PEFT's test: the last name part, or a whole-name match of a target regex).
    """
    targets = config.targets
    if isinstance(targets, str):
        found = [("target_modules", n) for n in _TIED_LAYER_NAMES if re.fullmatch(targets, n)]
    else:
        found = [("target_modules", t) for t in targets or () if _is_tied_layer(t)]
    found += [("modules_to_save", m) for m in config.modules_to_save if _is_tied_layer(m)]
    if found:
        field, entry = found[0]
        raise _tying_error(source, f"{entry!r} in {field}")


def check_tied_tensors(peft_config: Mapping[str, Any], keys: Iterable[str], source: str) -> None:
    """Refuse tensors of an ``lm_head``/``embed_tokens`` in a file with ``ensure_weight_tying``.

    PEFT rewrites the config of a tied adapter when it saves it (the input embeddings' full
    name in place of ``lm_head``), so the config alone does not always show the tie: the tensors
    saved for the tied layer do.

    Raises:
        AdapterFormatError: Naming the first such tensor.
    """
    if not peft_config.get("ensure_weight_tying"):
        return
    for key in keys:
        parts = key.removeprefix(PREFIX).split(".")
        for i, part in enumerate(parts):
            if part in _TIED_LAYER_NAMES and _OWN_TENSOR.fullmatch(".".join(parts[i + 1 :])):
                raise _tying_error(source, f"tensor {key!r} (of {part!r}) in the file")


def _is_tied_layer(entry: str) -> bool:
    return entry.rpartition(".")[2] in _TIED_LAYER_NAMES


def _tying_error(source: str, what: str) -> AdapterFormatError:
    return AdapterFormatError(
        f"{source}: ensure_weight_tying=True with {what}: on a base whose output layer shares "
        f"the input embeddings' weight, PEFT ties the adapter or trained copy of one to the "
        f"other, which lora_kit does not implement. Use PEFT for this adapter; if the base does "
        f"not tie its embeddings (PEFT then ignores the flag), set ensure_weight_tying to false "
        f"in adapter_config.json"
    )
