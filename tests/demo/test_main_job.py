"""The README's main job (``lorakit demo``), shortened: every step runs, every check is reported.

With a few training steps the learning claims may or may not hold, so only the exact claims are
asserted (merged = unmerged = PEFT; mixed batch = each adapter alone) and the exit code is
checked against the reported verdicts. The full run's figures are in the README.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from lora_kit.demo import main_job
from lora_kit.demo.generation import SampleSettings
from lora_kit.demo.hotswap_demo import HotswapSettings
from lora_kit.demo.main_job import MainJobSettings
from tests.demo.gpt2_demo_helpers import SHORT
from tests.demo.test_default_job import QUICK

SHORT_JOB = MainJobSettings(
    sentiment=QUICK,
    adapt=SHORT,
    hotswap=HotswapSettings(
        eval_tokens=512, sample=SampleSettings(max_new_tokens=6), switches=50, mixed_new_tokens=5
    ),
    merge_texts=32,
)


def test_short_main_job_runs_every_step_and_reports_each_claim(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main_job.run(tmp_path, json_output=True, quiet=True, settings=SHORT_JOB)
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    checks = report["checks"]
    assert checks["merged model = base + adapter = PEFT"] is True
    assert checks["mixed batch = each adapter alone"] is True
    assert code == (0 if all(checks.values()) else 1)
    merge = report["merge"]
    assert merge["texts"] == 32 and merge["predictions_agree"] is True
    assert merge["merged_max_diff"] <= main_job.MERGE_TOLERANCE
    assert merge["peft_max_diff"] is not None  # peft is a test dependency
    merged = tmp_path / "models" / "bert-sentiment-merged"
    config = transformers.AutoConfig.from_pretrained(merged)
    assert config.architectures == ["BertForSequenceClassification"]
    assert config.id2label == {0: "negative", 1: "neutral", 2: "positive"}
    for name in ("bert-sentiment", "gpt2-shakespeare-roman", "gpt2-posts"):
        assert (tmp_path / "adapters" / name / "adapter_model.safetensors").is_file()
    assert set(report["gpt2"]) == {"roman", "posts"}
    assert report["hotswap"]["mixed"]["passed"] is True


def test_a_second_run_replaces_its_own_merged_model_but_not_a_stranger(tmp_path: Path) -> None:
    stranger = tmp_path / "models" / "bert-sentiment-merged"
    stranger.mkdir(parents=True)
    (stranger / "notes.txt").write_text("mine")
    with pytest.raises(main_job.LoraKitError, match="not a merged model folder written by"):
        main_job._remove_earlier_merge(stranger)
    assert (stranger / "notes.txt").read_text() == "mine"
