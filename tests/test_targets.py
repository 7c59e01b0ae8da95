"""Presets and target matching: PEFT's rules, layers/exclude, clear errors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from torch import nn

import lora_kit as lk
from lora_kit.targets import find_saved_modules, find_targets, layer_index
from tests.conftest import tiny_bert, tiny_gpt2


def test_presets_are_listed_and_default_follows_model_type() -> None:
    table = lk.presets()
    assert table["gpt2-all"] == ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    assert {"gpt2-attn", "bert-qv", "bert-all"} <= set(table)
    assert find_targets(tiny_gpt2(), lk.LoraConfig()) == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.1.attn.c_attn",
    ]
    assert [n.rsplit(".", 1)[-1] for n in find_targets(tiny_bert(), lk.LoraConfig())] == [
        "query",
        "value",
    ] * 2


def test_gpt2_all_and_bert_all_cover_every_projection() -> None:
    assert len(find_targets(tiny_gpt2(), lk.LoraConfig(targets="gpt2-all"))) == 8
    bert = find_targets(tiny_bert(), lk.LoraConfig(targets="bert-all"))
    assert len(bert) == 12 and all("classifier" not in n and "pooler" not in n for n in bert)


def test_suffix_regex_layers_exclude() -> None:
    model = tiny_gpt2()
    assert find_targets(model, lk.LoraConfig(targets=["c_proj"], layers=[1])) == [
        "transformer.h.1.attn.c_proj",
        "transformer.h.1.mlp.c_proj",
    ]
    assert find_targets(model, lk.LoraConfig(targets=r".*\.0\.mlp\..*")) == [
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ]
    assert find_targets(model, lk.LoraConfig(targets=["c_proj"], exclude=["mlp.c_proj"])) == [
        "transformer.h.0.attn.c_proj",
        "transformer.h.1.attn.c_proj",
    ]
    # PEFT's rule: a suffix matches on a dot boundary only
    with pytest.raises(lk.NoTargetsError):
        find_targets(model, lk.LoraConfig(targets=["_attn"]))  # "c_attn" ends with it, no dot
    with pytest.raises(lk.UnsupportedModuleError, match="GPT2Attention"):
        find_targets(model, lk.LoraConfig(targets=["attn"]))  # the block, not a projection


def test_no_match_lists_what_the_model_has() -> None:
    with pytest.raises(lk.NoTargetsError, match=r"q_proj.*h\.\*\.attn\.c_attn"):
        find_targets(tiny_gpt2(), lk.LoraConfig(targets=["q_proj"]))


def test_unsupported_module_type_is_refused() -> None:
    with pytest.raises(lk.UnsupportedModuleError, match="Embedding"):
        find_targets(tiny_gpt2(), lk.LoraConfig(targets=["wte"]))
    with pytest.raises(lk.UnsupportedModuleError, match="LayerNorm"):
        find_targets(tiny_gpt2(), lk.LoraConfig(targets=r".*ln_f"))


def test_unknown_model_type_without_targets_says_what_to_pass() -> None:
    import torch

    with pytest.raises(lk.ConfigError, match="no default preset"):
        find_targets(torch.nn.Sequential(torch.nn.Linear(2, 2)), lk.LoraConfig())


def test_layer_index() -> None:
    assert layer_index("transformer.h.11.attn.c_attn") == 11
    assert layer_index("bert.encoder.layer.3.output.dense") == 3
    assert layer_index("classifier") is None


@pytest.mark.parametrize(
    ("build", "regex", "partial", "count"),
    [
        (tiny_gpt2, r"transformer\.h\.\d+\.attn\.c_attn", r"h\.0\.attn\.c_attn", 2),
        (tiny_bert, r".*\.self\.(query|value)", r"query", 4),
    ],
    ids=["gpt2", "bert"],
)
def test_regex_targets_must_match_the_whole_name(
    build: Callable[[], nn.Module], regex: str, partial: str, count: int
) -> None:
    """PEFT's rule for a string target: ``re.fullmatch``; a regex matching only part of a
    name (a search hit) targets nothing."""
    model = build()
    assert len(find_targets(model, lk.LoraConfig(targets=regex))) == count
    with pytest.raises(lk.NoTargetsError):
        find_targets(model, lk.LoraConfig(targets=partial))


@pytest.mark.parametrize(
    ("build", "targets", "head"),
    [
        (tiny_gpt2, ["c_attn", "lm_head"], "lm_head"),
        (tiny_bert, ["query", "classifier"], "classifier"),
    ],
    ids=["gpt2", "bert"],
)
def test_a_module_saved_whole_never_also_gets_an_adapter(
    build: Callable[[], nn.Module], targets: list[str], head: str
) -> None:
    """A head listed in ``modules_to_save`` is skipped even when ``targets`` names it."""
    model = build()
    found = find_targets(model, lk.LoraConfig(targets=targets, modules_to_save=[head]))
    assert found and head not in found and all(n.endswith(targets[0]) for n in found)
    assert head in find_targets(model, lk.LoraConfig(targets=targets))  # without: targeted


def test_layers_filter_suffix_matches_only_not_modules_named_in_full() -> None:
    """PEFT's rule: ``layers_to_transform`` never drops a module named in full in the list."""
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_fc"]
    config = lk.LoraConfig(targets=["transformer.h.0.attn.c_attn", "c_fc"], layers=[1])
    assert find_targets(tiny_gpt2(), config) == names
    # ... but exclude still wins, and a regex is a filter like any suffix
    excluded = lk.LoraConfig(targets=config.targets, layers=[1], exclude=["attn.c_attn"])
    assert find_targets(tiny_gpt2(), excluded) == names[1:]
    regex = lk.LoraConfig(targets=r"transformer\.h\.0\.attn\.c_attn|.*c_fc", layers=[1])
    assert find_targets(tiny_gpt2(), regex) == names[1:]


def test_layer_index_with_layers_pattern_takes_the_index_after_the_pattern() -> None:
    name = "model.layers.3.experts.1.w1"
    assert layer_index(name) == 3
    assert layer_index(name, ("layers",)) == 3
    assert layer_index(name, ("experts",)) == 1
    assert layer_index(name, ("blocks", "experts", "layers")) == 1  # the first pattern that fits
    assert layer_index(name, ("blocks",)) is None
    assert layer_index("model.layers.3", ("layers",)) is None  # an index is never the last part
    assert layer_index("h.0.attn.c_attn", ("h",)) == 0  # at the start of the name too


def test_layers_pattern_picks_the_module_list() -> None:
    model = tiny_gpt2()
    same = lk.LoraConfig(targets=["c_attn"], layers=[1], layers_pattern="h")
    assert find_targets(model, same) == ["transformer.h.1.attn.c_attn"]
    other = lk.LoraConfig(targets=["transformer.h.0.attn.c_attn", "c_fc"], layers=[1])
    assert find_targets(
        model, lk.LoraConfig(**{**other.to_dict(), "layers_pattern": "layers"})
    ) == [
        "transformer.h.0.attn.c_attn"  # no "layers.<i>." in GPT-2: only the name given in full
    ]
    with pytest.raises(lk.NoTargetsError, match="layers_pattern"):
        find_targets(model, lk.LoraConfig(targets=["c_attn"], layers=[1], layers_pattern="layers"))


def test_modules_to_save_match_whole_name_parts_as_in_peft() -> None:
    model = tiny_bert()
    assert find_saved_modules(model, ("classifier",)) == ["classifier"]
    # PEFT 0.21 and older saved "classifier" for "fier" too; 0.22 matches whole name parts.
    assert find_saved_modules(model, ("fier",)) == []
    assert find_saved_modules(model, ("pooler",)) == ["bert.pooler"]
    assert find_saved_modules(model, ("bert.pooler",)) == ["bert.pooler"]
    assert find_saved_modules(model, ("t.pooler",)) == []
    assert find_saved_modules(model, ("dropout", "score")) == []  # no weights / no such module
