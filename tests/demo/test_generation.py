"""Seeded sample generation of the GPT-2 demo."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import lora_kit as lk
from lora_kit.demo.generation import SampleSettings, one_line, sample_text
from lora_kit.demo.shakespeare_job import load_base

SHORT = SampleSettings(max_new_tokens=8)


@pytest.fixture(scope="module")
def lm_and_tokenizer() -> tuple[lk.LoraModel, Any]:
    base, tokenizer = load_base()
    return lk.LoraModel(base), tokenizer


def test_same_seed_same_sample_and_prompt_not_repeated(
    lm_and_tokenizer: tuple[lk.LoraModel, Any],
) -> None:
    lm, tokenizer = lm_and_tokenizer
    first = sample_text(lm, tokenizer, "ROMEO.\n", SHORT)
    torch.manual_seed(123)  # the global RNG state before the call does not matter
    assert sample_text(lm, tokenizer, "ROMEO.\n", SHORT) == first
    others = {sample_text(lm, tokenizer, "ROMEO.\n", SampleSettings(seed=s)) for s in range(1, 4)}
    assert others != {first}  # other seeds draw other tokens
    assert not first.startswith("ROMEO")


def test_greedy_takes_the_most_likely_token(lm_and_tokenizer: tuple[lk.LoraModel, Any]) -> None:
    lm, tokenizer = lm_and_tokenizer
    one = SampleSettings(max_new_tokens=1)
    ids = tokenizer("ROMEO.\n", add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        best = int(lm(input_ids=ids).logits[0, -1].argmax())
    assert sample_text(lm, tokenizer, "ROMEO.\n", one, greedy=True) == tokenizer.decode([best])


def test_one_line_joins_non_blank_lines() -> None:
    assert one_line("\nA line.\n\n  Another.  \n") == "A line. / Another."
