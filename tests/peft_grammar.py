"""A small, seeded grammar of adapter configs for the differential tests against `peft`.

Each draw is a dict of config options: PEFT ``LoraConfig`` keyword arguments
(:func:`peft_options`) or lora_kit ``LoraConfig`` keyword arguments (:func:`lora_kit_options`).
The pools below name real modules of the tiny GPT-2 / BERT of ``tests.conftest`` in every form
the formats allow: bare suffixes, dotted partial paths, exact full names, regexes, so that
target, exclude, layer and pattern rules all get exercised, including overlapping pattern keys
in both orders. A draw may be one the library itself rejects; the tests draw again then.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Pools:
    """Everything the grammar may pick for one architecture."""

    suffixes: tuple[str, ...]  # target/exclude list entries (suffixes, partial and full names)
    regexes: tuple[str, ...]  # whole-name regexes (target_modules / exclude_modules strings)
    pattern_keys: tuple[str, ...]  # rank_pattern / alpha_pattern keys
    overlapping: tuple[tuple[str, str], ...]  # key pairs that match some module both
    layers_patterns: tuple[str | list[str], ...]  # right and wrong layers_pattern values
    presets: tuple[str, ...]  # lora_kit presets
    heads: tuple[tuple[str, ...], ...]  # modules_to_save choices (lora_kit direction)


GPT2_POOLS = Pools(
    suffixes=(
        "c_attn",
        "c_proj",
        "c_fc",
        "attn.c_attn",
        "attn.c_proj",
        "mlp.c_proj",
        "mlp.c_fc",
        "h.1.attn.c_attn",
        "h.0.mlp.c_fc",
        "transformer.h.0.attn.c_proj",
        "transformer.h.1.mlp.c_proj",
        "lm_head",  # tied to the embeddings: PEFT saves its base weight too
    ),
    regexes=(
        r".*\.c_attn",
        r".*\.1\.mlp\.c_fc|lm_head",
        r".*\.h\.1\..*c_(fc|proj)",
        r".*(c_attn|c_fc)",
        r"transformer\.h\.0\.attn\.c_proj",
        r".*mlp\.c_proj",
        r".*\.0\..*c_\w+",
    ),
    pattern_keys=(
        "c_attn",
        "c_proj",
        "mlp.c_proj",
        "h.1.attn.c_attn",
        "h.0.mlp.c_fc",
        r"h\.0\..*",
        r".*\.1\..*",
        r"c_(fc|proj)",
        "transformer.h.0.attn.c_attn",
        "attn.*",
    ),
    overlapping=(
        ("c_attn", "h.1.attn.c_attn"),
        ("c_proj", "mlp.c_proj"),
        (r"h\.0\..*", "h.0.mlp.c_fc"),
        (r".*\.1\..*", "c_proj"),
    ),
    layers_patterns=("h", ["h"], ["layers", "h"], "layers", "transformer.h"),
    presets=("gpt2-attn", "gpt2-all"),
    heads=((), (), ("ln_f",)),
)

BERT_POOLS = Pools(
    suffixes=(
        "query",
        "key",
        "value",
        "dense",
        "output.dense",
        "attention.output.dense",
        "intermediate.dense",
        "self.query",
        "layer.1.attention.self.value",
        "bert.encoder.layer.0.attention.self.key",
        "pooler.dense",
        "bert.encoder.layer.1.output.dense",
    ),
    regexes=(
        r".*\.(query|value)",
        r".*layer\.1\..*dense",
        r".*self\.(key|value)",
        r"bert\.encoder\.layer\.0\.attention\.self\.query",
        r".*dense",
        r".*\.0\..*(query|dense)",
    ),
    pattern_keys=(
        "query",
        "value",
        "dense",
        "output.dense",
        "layer.0.attention.self.query",
        "attention.output.dense",
        r"layer\.1\..*",
        "(key|value)",
        "layer.0.*value",
        "bert.encoder.layer.1.intermediate.dense",
    ),
    overlapping=(
        ("query", "layer.0.attention.self.query"),
        ("dense", "attention.output.dense"),
        (r"layer\.1\..*", "(key|value)"),
        ("output.dense", "bert.encoder.layer.1.output.dense"),
    ),
    layers_patterns=("layer", ["layer"], ["h", "layer"], "layers", "encoder.layer"),
    presets=("bert-qv", "bert-all"),
    heads=(
        (),
        ("classifier",),
        ("pooler",),
        ("classifier", "pooler"),
        ("bert.pooler",),  # a dotted suffix ("fier" alone: see test_peft_config_semantics)
        ("pooler.dense",),
        ("layer.1",),  # a whole block: no adapter inside it either
    ),
)

POOLS = {"gpt2": GPT2_POOLS, "bert": BERT_POOLS}


def _subset(rng: random.Random, pool: tuple[str, ...], low: int, high: int) -> list[str]:
    return rng.sample(pool, rng.randint(low, high))


def _patterns(rng: random.Random, pools: Pools, values: tuple[Any, ...]) -> dict[str, Any]:
    """0-3 keys, sometimes an overlapping pair in a random order, each with a random value."""
    keys = _subset(rng, pools.pattern_keys, 0, 3)
    if rng.random() < 0.4:
        pair = list(rng.choice(pools.overlapping))
        rng.shuffle(pair)
        keys = [k for k in keys if k not in pair] + pair
        rng.shuffle(keys)
    return {k: rng.choice(values) for k in keys}


RANKS = (1, 2, 3, 5, 6)
ALPHAS = (1, 3, 5.5, 12, 32)


def _targets(rng: random.Random, pools: Pools, with_all_linear: bool) -> str | list[str]:
    form = rng.random()
    if form < 0.55:
        return _subset(rng, pools.suffixes, 1, 3)
    if form < 0.9 or not with_all_linear:
        return rng.choice(pools.regexes)
    return "all-linear"


def _exclude(rng: random.Random, pools: Pools) -> str | list[str] | None:
    form = rng.random()
    if form < 0.6:
        return None
    if form < 0.85:
        return _subset(rng, pools.suffixes, 1, 2)
    return rng.choice(pools.regexes)


def _layers(rng: random.Random) -> int | list[int]:
    if rng.random() < 0.3:
        return rng.choice((0, 1))
    return sorted(rng.sample((0, 1, 2), rng.randint(1, 2)))  # 2 exists in neither model


def peft_options(arch: str, rng: random.Random) -> dict[str, Any]:
    """Keyword arguments for a PEFT ``LoraConfig`` (without ``init_lora_weights``)."""
    pools = POOLS[arch]
    targets = _targets(rng, pools, with_all_linear=True)
    options: dict[str, Any] = {
        "r": rng.choice((2, 4)),
        "lora_alpha": rng.choice((4, 8, 6.5)),
        "target_modules": targets,
        "exclude_modules": _exclude(rng, pools),
        "rank_pattern": _patterns(rng, pools, RANKS),
        "alpha_pattern": _patterns(rng, pools, ALPHAS),
        "use_rslora": rng.random() < 0.3,
    }
    if isinstance(targets, list) and rng.random() < 0.6:
        options["layers_to_transform"] = _layers(rng)
        if rng.random() < 0.4:
            options["layers_pattern"] = rng.choice(pools.layers_patterns)
    if arch == "bert":
        options["task_type"] = rng.choice(("SEQ_CLS", "SEQ_CLS", None))
        if rng.random() < 0.3:
            options["modules_to_save"] = list(rng.choice(BERT_POOLS.heads[1:]))
    else:
        options["task_type"] = rng.choice(("CAUSAL_LM", None))
        if rng.random() < 0.15:
            options["modules_to_save"] = ["ln_f"]
    return options


def lora_kit_options(arch: str, rng: random.Random) -> dict[str, Any]:
    """Keyword arguments for a lora_kit ``LoraConfig``."""
    pools = POOLS[arch]
    form = rng.random()
    targets: str | list[str] = (
        rng.choice(pools.presets) if form < 0.25 else _targets(rng, pools, with_all_linear=False)
    )
    options: dict[str, Any] = {
        "r": rng.choice((2, 4)),
        "alpha": rng.choice((4.0, 8.0, 6.5)),
        "targets": targets,
        "exclude": _exclude(rng, pools),
        "rank_pattern": _patterns(rng, pools, RANKS),
        "alpha_pattern": _patterns(rng, pools, ALPHAS),
        "use_rslora": rng.random() < 0.3,
        "modules_to_save": rng.choice(pools.heads),
    }
    if rng.random() < 0.4:
        layers = _layers(rng)
        options["layers"] = [layers] if isinstance(layers, int) else layers
        if rng.random() < 0.3:
            options["layers_pattern"] = rng.choice(pools.layers_patterns)
    return options
