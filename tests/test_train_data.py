"""Training data: packing, label mapping, and clear errors before training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import encode, tokenizer

from lora_kit.errors import DataError
from lora_kit.train import hf_encoder, load_causal_lm, load_classification, read_texts


def test_pack_txt_folder_into_blocks(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("w1 w2 w3 w4 w5")
    (tmp_path / "d" / "b.txt").write_text("w6 w7 w8")
    data = load_causal_lm(tmp_path / "d", encode, max_length=3, eos_id=0)
    # stream: 11 12 13 14 15 0 16 17 18 0 -> 3 full blocks of 3, tail dropped
    assert [e.input_ids for e in data.examples] == [(11, 12, 13), (14, 15, 0), (16, 17, 18)]
    batch = data.collate([0, 2])
    assert batch["labels"].tolist() == [[11, 12, 13], [16, 17, 18]]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_text_field_from_jsonl_and_csv(suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        path.write_text('{"body": "w1 w2"}\n\n{"body": "w3"}\n')
    else:
        path.write_text("body,other\nw1 w2,x\nw3,y\n")
    assert read_texts(path, "body") == ["w1 w2", "w3"]
    with pytest.raises(DataError, match=r"d\..*:\d+: no field 'text'.*--text-field"):
        read_texts(path, "text")


def test_classification_labels_mapped_and_padded(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    rows = [("w1 w2 w3", 10), ("w4", 2), ("w5 w6", 10), ("w7", 1)]
    path.write_text("".join(json.dumps({"t": t, "y": y}) + "\n" for t, y in rows))
    data = load_classification(path, encode, max_length=8, text_field="t", label_field="y")
    assert data.labels == ("1", "2", "10")  # integers sort numerically
    assert [e.label for e in data.examples] == [2, 1, 2, 0]
    batch = data.collate([0, 1])
    assert batch["input_ids"].tolist() == [[11, 12, 13], [14, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [2, 1]


def test_long_texts_truncated_with_one_notice(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(
        "".join(json.dumps({"text": "w1 " * n, "label": n % 2}) + "\n" for n in (2, 9, 12))
    )
    with pytest.warns(UserWarning, match="2 of 3 texts are longer than 4 tokens") as record:
        data = load_classification(path, encode, max_length=4)
    assert len(record) == 1
    assert max(len(e.input_ids) for e in data.examples) == 4


def test_hf_tokenizer_encoder() -> None:
    assert hf_encoder(tokenizer())(["w0 w1", "w89 nope"]) == [[10, 11], [99, 1]]


@pytest.mark.parametrize(
    ("content", "name", "match"),
    [
        (None, "missing.txt", "does not exist"),
        ("", "empty.txt", "empty"),
        ("w1 w2", "short.txt", "only 2 tokens, fewer than one block"),
        ("x", "data.parquet", "unsupported data file type"),
        ('{"text": "w1"}\nnot json\n', "bad.jsonl", r"bad.jsonl:2: not valid JSON"),
        ('{"text": "w1"}\n' + "[" * 200_000 + "\n", "deep.jsonl", r"deep.jsonl:2: not valid JSON"),
    ],
)
def test_causal_data_errors(content: str | None, name: str, match: str, tmp_path: Path) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match):
        load_causal_lm(path, encode, max_length=8, eos_id=None)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("latin1.txt", "caf\xe9 w1 w2".encode("latin-1"), r"latin1.txt: not UTF-8 text"),
        ("folder/b.txt", b"w1 \xff w2", r"b.txt: not UTF-8 text"),
        ("latin1.jsonl", b'{"text": "w1"}\n{"text": "caf\xe9"}\n', r"latin1.jsonl: not UTF-8"),
        ("latin1.csv", b"text\nw1\ncaf\xe9\n", r"latin1.csv: not UTF-8 text"),
        ("huge.csv", b"text\n" + b"w" * 200_000 + b"\n", r"huge.csv: not valid CSV"),
    ],
)
def test_undecodable_files_are_data_errors(
    name: str, content: bytes, match: str, tmp_path: Path
) -> None:
    """A file that is not UTF-8 (or a CSV field over csv's size limit) raised
    UnicodeDecodeError (csv.Error): a traceback from `lorakit train`."""
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    if name.startswith("folder/"):
        (path.parent / "a.txt").write_text("w1 w2")
        path = path.parent
    with pytest.raises(DataError, match=match):
        read_texts(path)


def test_empty_folder_and_classification_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no \.txt files"):
        load_causal_lm(tmp_path, encode, max_length=8, eos_id=None)
    one = tmp_path / "one.jsonl"
    one.write_text('{"text": "w1", "label": "a"}\n{"text": "w2", "label": "a"}\n')
    with pytest.raises(DataError, match="single class 'a'"):
        load_classification(one, encode, max_length=8)
    with pytest.raises(DataError, match="no field 'stars'"):
        load_classification(one, encode, max_length=8, label_field="stars")
    txt = tmp_path / "a.txt"
    txt.write_text("w1")
    with pytest.raises(DataError, match=r"needs a \.jsonl or \.csv"):
        load_classification(txt, encode, max_length=8)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".txt"])
def test_utf8_bom_is_not_part_of_the_data(suffix: str, tmp_path: Path) -> None:
    # Spreadsheet exports start with a UTF-8 byte-order mark: the csv's first column was
    # named '\ufefftext' ("no field 'text'"), the jsonl's first line was "not valid JSON",
    # and a .txt's first word became '\ufeffw1' (an unknown token).
    path = tmp_path / f"d{suffix}"
    content = {
        ".csv": "text,label\nw1 w2,a\nw3,b\n",
        ".jsonl": '{"text": "w1 w2", "label": "a"}\n{"text": "w3", "label": "b"}\n',
        ".txt": "w1 w2\nw3",
    }[suffix]
    path.write_bytes(content.encode("utf-8-sig"))
    texts = read_texts(path)
    assert texts[0].startswith("w1 w2")
    if suffix != ".txt":
        data = load_classification(path, encode, max_length=8)
        assert data.labels == ("a", "b")
        assert data.examples[0].input_ids == (11, 12)


def _bert_like_tokenizer():  # type: ignore[no-untyped-def]
    """The test tokenizer with BERT's template: ``[CLS] text [SEP]`` (ids 2 and 3)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    inner = tokenizer().backend_tokenizer
    inner.add_special_tokens(["[CLS]", "[SEP]"])
    inner.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=inner, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]",
    )  # fmt: skip


def test_truncation_keeps_the_closing_special_token_as_the_tokenizer_does(tmp_path: Path) -> None:
    # Texts were cut with ids[:max_length], dropping BERT's closing [SEP]: the classifier
    # trained on inputs unlike those of inference (tokenizer(..., truncation=True)).
    from lora_kit.train.config import TrainConfig
    from lora_kit.train.data import special_suffix
    from lora_kit.train.job import TrainJob, _load_data

    tok = _bert_like_tokenizer()
    assert tok(["w1"])["input_ids"] == [[2, 11, 3]]
    assert special_suffix(tok) == 1
    assert special_suffix(tokenizer()) == 0
    path = tmp_path / "c.jsonl"
    texts = ["w1 w2 w3 w4 w5", "w6"]
    path.write_text(
        "".join(json.dumps({"text": t, "label": i}) + "\n" for i, t in enumerate(texts))
    )
    expected = tok(texts, truncation=True, max_length=4)["input_ids"]
    assert expected == [[2, 11, 12, 3], [2, 16, 3]]
    job = TrainJob(model="unused", data=path, config=TrainConfig(max_length=4))
    with pytest.warns(UserWarning, match="1 of 2 texts"):
        data = _load_data(job, "seq-cls", tok, 4)
    assert [list(e.input_ids) for e in data.examples] == expected
