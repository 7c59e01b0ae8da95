"""LoraConfig: validation in one place, JSON round-trip, per-module rank/alpha/scaling."""

from __future__ import annotations

import copy
import dataclasses
import math
import pickle
from typing import Any

import pytest

from lora_kit import ConfigError, LoraConfig


def test_json_round_trip_keeps_every_field() -> None:
    config = LoraConfig(
        r=4,
        alpha=8,
        dropout=0.1,
        targets=["c_attn", "mlp.c_fc"],
        exclude="h\\.1\\..*",
        layers=[0, 1],
        layers_pattern=["h", "layers"],
        rank_pattern={"c_fc": 2},
        alpha_pattern={"c_attn": 3.5},
        use_rslora=True,
        init="gaussian",
        modules_to_save=["classifier"],
    )
    again = LoraConfig.from_json(config.to_json())
    assert again == config
    assert again.targets == ("c_attn", "mlp.c_fc")  # lists normalised to tuples
    assert LoraConfig(layers=[1], layers_pattern="h").layers_pattern == ("h",)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"r": 0}, "r"),
        ({"r": -3}, "r"),
        ({"r": 2.5}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"init": "pissa"}, "init"),
        ({"targets": []}, "targets"),
        ({"targets": "(unclosed"}, "targets"),
        ({"layers": [-1]}, "layers"),
        ({"rank_pattern": {"q": 0}}, "rank_pattern"),
        ({"alpha_pattern": {"q": -1.0}}, "alpha_pattern"),
        ({"use_rslora": "yes"}, "use_rslora"),
        # These used to pass (a string is a sequence of one-letter suffixes: no head was saved)
        # or raise an untyped TypeError/ValueError.
        ({"modules_to_save": "classifier"}, "modules_to_save"),
        ({"layers": 3}, "layers"),
        ({"rank_pattern": ["abc"]}, "rank_pattern"),
        ({"alpha_pattern": None}, "alpha_pattern"),
        ({"layers_pattern": "h"}, "layers_pattern"),  # says where indices are, but no layers
        ({"layers": [0], "layers_pattern": []}, "layers_pattern"),
        ({"layers": [0], "layers_pattern": "h|layer"}, "layers_pattern"),  # PEFT splices it
        ({"layers": [0], "layers_pattern": ["(h"]}, "layers_pattern"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=rf"LoraConfig\.{field}"):
        LoraConfig(**kwargs)  # type: ignore[arg-type]


def test_unknown_json_field_is_refused_with_the_accepted_list() -> None:
    with pytest.raises(ConfigError, match="unknown LoraConfig field.*'rank'.*accepted"):
        LoraConfig.from_dict({"rank": 8})
    with pytest.raises(ConfigError, match="not valid JSON"):
        LoraConfig.from_json("{r: 8")
    with pytest.raises(ConfigError, match="not valid JSON"):  # deeper than the parser recurses
        LoraConfig.from_json('{"r": ' + "[" * 200_000)


def test_rank_and_alpha_patterns_follow_peft_suffix_rule() -> None:
    config = LoraConfig(
        r=8,
        alpha=16,
        rank_pattern={"value": 2, "layer\\.1\\..*query": 4},
        alpha_pattern={"query": 32},
    )
    assert config.rank_for("bert.encoder.layer.0.attention.self.value") == 2
    assert config.rank_for("bert.encoder.layer.1.attention.self.query") == 4
    assert config.rank_for("bert.encoder.layer.0.attention.self.query") == 8
    assert config.rank_for("bert.encoder.layer.0.attention.self.xvalue") == 8  # dot boundary
    assert config.scaling_for("bert.encoder.layer.0.attention.self.query") == 32 / 8
    rs = LoraConfig(r=16, alpha=8, use_rslora=True)
    assert math.isclose(rs.scaling_for("any"), 8 / 4)


def test_first_matching_pattern_wins_and_survives_a_json_round_trip() -> None:
    """PEFT's rule (``get_pattern_key``): the first key that matches wins, so key order is part
    of the config. ``to_json`` sorted nested keys too, so a round trip could change a module's
    rank and alpha (layer 1's value: rank 2 -> 4, alpha 4 -> 32). Exact: ints and dict lookups.
    """
    layer1, layer0 = "bert.encoder.layer.1.attention.self.value", "bert.encoder.layer.0.output"
    config = LoraConfig(
        r=8,
        alpha=16,
        rank_pattern={"value": 2, "layer\\.1\\..*value": 4},
        alpha_pattern={"value": 4.0, "layer\\.1\\..*value": 32.0},
    )
    for again in (config, LoraConfig.from_json(config.to_json())):
        assert again.rank_for(layer1) == 2 and again.alpha_for(layer1) == 4.0
        assert again.scaling_for(layer1) == 4.0 / 2
        assert again.rank_for(layer0) == 8 and again.alpha_for(layer0) == 16
        assert list(again.rank_pattern) == ["value", "layer\\.1\\..*value"]
    swapped = LoraConfig(r=8, rank_pattern={"layer\\.1\\..*value": 4, "value": 2})
    assert swapped.rank_for(layer1) == 4  # the order, not the specificity, decides


def test_configs_differing_only_in_pattern_order_are_not_equal() -> None:
    """Dict equality ignores order, so two configs whose overlapping patterns give layer 1 rank
    2 and rank 4 compared equal."""
    first = LoraConfig(r=8, rank_pattern={"value": 2, "layer\\.1\\..*value": 4})
    second = LoraConfig(r=8, rank_pattern={"layer\\.1\\..*value": 4, "value": 2})
    value = "bert.encoder.layer.1.attention.self.value"
    assert first.rank_for(value) != second.rank_for(value)
    assert first != second
    assert first == LoraConfig.from_json(first.to_json())
    assert LoraConfig(alpha_pattern={"a": 1.0, "b": 2.0}) != LoraConfig(
        alpha_pattern={"b": 2.0, "a": 1.0}
    )


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.__setitem__("c_fc", 3),
        lambda m: m.__delitem__("c_attn"),
        lambda m: m.update({"x": 1}),
        lambda m: m.pop("c_attn"),
        lambda m: m.popitem(),
        lambda m: m.clear(),
        lambda m: m.setdefault("x", 1),
        lambda m: m.__ior__({"x": 1}),
    ],
)
def test_pattern_mappings_are_read_only(edit: Any) -> None:
    # A frozen config whose mappings could still be edited in place (configs read from one
    # adapter_config.json text share one object, so the edit would reach all of them).
    config = LoraConfig(rank_pattern={"c_attn": 4, "c_fc": 2}, alpha_pattern={"c_fc": 8})
    for mapping in (config.rank_pattern, config.alpha_pattern):
        with pytest.raises(ConfigError, match=r"read-only.*dataclasses.replace"):
            edit(mapping)
    assert dict(config.rank_pattern) == {"c_attn": 4, "c_fc": 2}
    assert dict(config.alpha_pattern) == {"c_fc": 8}


def test_read_only_patterns_still_copy_pickle_and_serialise() -> None:
    config = LoraConfig(rank_pattern={"c_attn": 4, "c_fc": 2}, alpha_pattern={"c_fc": 8.0})
    for other in (
        copy.copy(config),
        copy.deepcopy(config),
        pickle.loads(pickle.dumps(config)),
        LoraConfig.from_json(config.to_json()),
    ):
        assert other == config
        assert list(other.rank_pattern.items()) == [("c_attn", 4), ("c_fc", 2)]  # order kept
        with pytest.raises(ConfigError):
            other.rank_pattern["x"] = 1  # type: ignore[index]
    # to_dict hands out plain dicts (the caller's to edit); replace() makes a new config.
    as_dict = config.to_dict()
    as_dict["rank_pattern"]["x"] = 1
    assert "x" not in config.rank_pattern
    changed = dataclasses.replace(config, rank_pattern={**config.rank_pattern, "c_proj": 1})
    assert changed.rank_pattern == {"c_attn": 4, "c_fc": 2, "c_proj": 1}
    assert config.rank_pattern == {"c_attn": 4, "c_fc": 2}
    # A caller's dict is copied, not wrapped: editing it later changes no config.
    mine = {"c_attn": 4}
    config = LoraConfig(rank_pattern=mine)
    mine["c_attn"] = 1
    assert config.rank_pattern == {"c_attn": 4}
