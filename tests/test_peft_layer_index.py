"""``layers_to_transform`` (lora_kit's ``layers``) against the real `peft`, on bases with and
without a prefix before their block list.

PEFT reads a block index, without ``layers_pattern``, only from an all-digit name part with at
least two parts before it: ``transformer.h.0.attn.c_attn`` is block 0, but a bare
``GPT2Model``'s ``h.0.attn.c_attn`` is in no block, so PEFT adapts nothing there (lora_kit read
block 0, and refused PEFT's files as missing tensors). Each case checks that both libraries
target the same modules (or both refuse), and that each one's file means the same to the other.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig as PeftConfig
from peft import PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import (
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
)

import lora_kit as lk
from lora_kit.targets import layer_index
from tests.conftest import VOCAB, randomize, tiny_bert_config, tiny_gpt2_config

TOL = {"rtol": 1e-5, "atol": 1e-5}
# PEFT's NoMatchingPeftModuleError is a ValueError saying this (its module moved in 0.22)
NO_MATCH = r"Target modules .* not found in the base model"
_GPT2 = tiny_gpt2_config()
_BERT = tiny_bert_config()


def _builder(cls: Callable[[Any], nn.Module], config: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return cls(config).eval()

    return build


# name -> (builder, suffix target, the name of block 0's target in full, another suffix)
BASES: dict[str, tuple[Callable[[], nn.Module], str, str, str]] = {
    "gpt2-bare": (_builder(GPT2Model, _GPT2), "c_attn", "h.0.attn.c_attn", "c_fc"),
    "gpt2-lm": (_builder(GPT2LMHeadModel, _GPT2), "c_attn", "transformer.h.0.attn.c_attn", "c_fc"),
    "bert-bare": (
        _builder(BertModel, _BERT),
        "query",
        "encoder.layer.0.attention.self.query",
        "value",
    ),
    "bert-cls": (
        _builder(BertForSequenceClassification, _BERT),
        "query",
        "bert.encoder.layer.0.attention.self.query",
        "value",
    ),
}

# (layers, layers_pattern, whether the targets name block 0's module in full too)
CONFIGS: list[tuple[list[int], str | None, bool]] = [
    ([0], None, False),
    ([1], None, False),
    ([0], "h", False),
    ([1], "h", False),
    ([1], "layer", False),
    ([1], None, True),
    ([1], "h", True),
]

CASES = [(base, *config) for base in BASES for config in CONFIGS]
IDS = [f"{b}-layers{ly}-{p}{'-full' if f else ''}" for b, ly, p, f in CASES]


def _options(base: str, layers: list[int], pattern: str | None, full: bool) -> dict[str, Any]:
    _, suffix, full_name, other = BASES[base]
    return {
        "targets": [full_name, other] if full else [suffix],
        "layers": layers,
        "layers_pattern": pattern,
    }


def _peft_targets(model: nn.Module) -> set[str]:
    return {n for n, m in model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


def _outputs(model: nn.Module) -> dict[str, torch.Tensor]:
    """Logits where the model has a head, and the last hidden states (the tiny BERT's 3-way
    head on one pooled token hardly moves; its hidden states show the adapter)."""
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    got = {"hidden": out.hidden_states[-1]}
    if hasattr(out, "logits"):
        got["logits"] = out.logits
    return got


def _assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key, value in got.items():
        torch.testing.assert_close(value, expected[key], **TOL)


def _peft_build(base: str, options: dict[str, Any]) -> nn.Module:
    config = PeftConfig(
        r=2,
        lora_alpha=4,
        target_modules=options["targets"],
        layers_to_transform=options["layers"],
        layers_pattern=options["layers_pattern"],
        init_lora_weights=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(BASES[base][0](), config).eval()


def _peft_load(base: str, path: Path) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(BASES[base][0](), str(path)).eval()


@pytest.mark.parametrize(("base", "layers", "pattern", "full"), CASES, ids=IDS)
def test_layers_target_what_peft_targets_and_files_mean_the_same(
    base: str, layers: list[int], pattern: str | None, full: bool, tmp_path: Path
) -> None:
    options = _options(base, layers, pattern, full)
    config = lk.LoraConfig(r=2, alpha=4, **options)
    try:
        peft_model = _peft_build(base, options)
    except ValueError as exc:
        assert re.search(NO_MATCH, str(exc)), exc  # PEFT adapts nothing with this config
        with pytest.raises(lk.NoTargetsError, match="no block index in names like"):
            lk.inject(BASES[base][0](), config)
        return
    lm = lk.inject(BASES[base][0](), config)
    assert set(lm.adapter_record("default").modules) == _peft_targets(peft_model)

    # PEFT's file, read by lora_kit: as PEFT's own loader reads it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model.save_pretrained(str(tmp_path / "p"))
    reference = _peft_load(base, tmp_path / "p")
    loaded = lk.LoraModel.from_pretrained(BASES[base][0](), tmp_path / "p")
    assert set(loaded.adapter_record("default").modules) == _peft_targets(reference)
    _assert_close(_outputs(loaded), _outputs(reference))

    # lora_kit's file, read by PEFT
    randomize(lm, seed=0, std=0.1)
    path = lm.save_adapter(tmp_path / "k")
    reloaded = _peft_load(base, path)
    assert _peft_targets(reloaded) == set(lm.adapter_record("default").modules)
    _assert_close(_outputs(reloaded), _outputs(lm))
    with lm.disabled():
        base = _outputs(lm)["hidden"]
    assert not torch.allclose(base, _outputs(reloaded)["hidden"], **TOL)  # the adapter counts


def test_no_block_index_on_a_bare_gpt2_says_to_set_layers_pattern() -> None:
    with pytest.raises(
        lk.NoTargetsError,
        match=r"no block index in names like 'h\.0\.attn\.c_attn'.*layers_pattern='h'",
    ):
        lk.inject(BASES["gpt2-bare"][0](), lk.LoraConfig(targets=["c_attn"], layers=[0]))


def test_layers_past_the_blocks_are_not_blamed_on_a_missing_block_index() -> None:
    """A regex sweeping up the unindexed lm_head beside blocks of index 0 and 1: ``layers=[7]``
    names no block, which is what the refusal says, not that no block index was found."""
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB))
    config = lk.LoraConfig(targets=r".*(c_attn|lm_head)", layers=[7])
    with pytest.raises(lk.NoTargetsError) as info:
        lk.inject(model, config)
    assert "no block index" not in str(info.value)
    assert "layers=(7,)" in str(info.value)


def test_a_file_without_the_pattern_is_refused_by_both_naming_the_fix(tmp_path: Path) -> None:
    """A bare GPT-2 adapter whose adapter_config.json selects block 1 by suffix and
    layers_to_transform without layers_pattern: PEFT adapts nothing with it and refuses it;
    lora_kit refuses it too, saying what to write (it loads once the pattern is there)."""
    config = lk.LoraConfig(r=2, targets=["c_attn"], layers=[1], layers_pattern="h")
    lm = lk.inject(BASES["gpt2-bare"][0](), config)
    randomize(lm, seed=0, std=0.1)
    path = lm.save_adapter(tmp_path / "k")  # saved with the module named in full
    config_path = path / "adapter_config.json"
    data = json.loads(config_path.read_text())
    assert data["target_modules"] == ["h.1.attn.c_attn"]
    edits = {"target_modules": ["c_attn"], "layers_to_transform": [1], "layers_pattern": None}
    config_path.write_text(json.dumps({**data, **edits}))
    with pytest.raises(ValueError, match=NO_MATCH):
        _peft_load("gpt2-bare", path)
    with pytest.raises(lk.NoTargetsError, match=r'no block index.*"layers_pattern": "h"'):
        lk.LoraModel.from_pretrained(BASES["gpt2-bare"][0](), path)
    config_path.write_text(json.dumps({**data, **edits, "layers_pattern": "h"}))
    loaded = lk.LoraModel.from_pretrained(BASES["gpt2-bare"][0](), path)
    reference = _peft_load("gpt2-bare", path)
    assert set(loaded.adapter_record("default").modules) == _peft_targets(reference)
    _assert_close(_outputs(loaded), _outputs(reference))


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("transformer.h.0.attn.c_attn", 0),
        ("encoder.layer.1.attention.self.query", 1),
        ("h.0.attn.c_attn", None),  # one part before the index: PEFT reads no block
        ("0.fc", None),
        ("model.layers.3", None),  # the index is the last part
        ("a.b.c1.2.d", 2),  # an index is a whole part
        ("a.b.1x.2.d", 2),
    ],
)
def test_layer_index_without_a_pattern_is_peft_s(name: str, index: int | None) -> None:
    assert layer_index(name) == index
