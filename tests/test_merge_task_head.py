"""``lorakit merge`` of a classification adapter into a headless base (``lora_kit.task_head``).

The base is a bare backbone checkpoint (``BertModel``/``GPT2Model`` keys, no ``bert.`` or
``transformer.`` prefix, no head); the adapter was trained on the task model built from it and
saved its head. The merged folder must be the task model PEFT's ``merge_and_unload()`` +
``save_pretrained`` gives.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from merge_helpers import ids
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2Model,
)
from typer.testing import CliRunner

import lora_kit as lk
from lora_kit.errors import HeadLayoutError
from lora_kit.history import read_history
from lora_kit.merge_files import METADATA_KEY, merge_files
from lora_kit_cli.app import app
from tests.conftest import randomize

# Merged vs unmerged logits in fp32: W + s*B@A is rounded once per element, while the unmerged
# model computes x@W^T + s*(x@A^T)@B^T; the two differ only by float32 reassociation (~1e-7
# relative per layer) over 2 tiny layers, so 1e-5 on logits of size ~1 is a real check.
ATOL = 1e-5
LABELS = ("neg", "neu", "pos")
HEAD = {"bert": "classifier", "gpt2": "score"}
PREFIX = {"bert": "bert.", "gpt2": "transformer."}


def headless(kind: str, path: Path) -> Path:
    """A tiny bare backbone checkpoint (BertModel / GPT2Model) saved to ``path``."""
    torch.manual_seed(0)
    if kind == "bert":
        config = BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64,
        )  # fmt: skip
        BertModel(config).save_pretrained(path)
    else:
        config = GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, pad_token_id=0,
        )  # fmt: skip
        GPT2Model(config).save_pretrained(path)
    return path


def task_model(base: Path, auto: type = AutoModelForSequenceClassification) -> torch.nn.Module:
    """The task model on ``base`` (its head newly initialised, as when training starts)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return auto.from_pretrained(base, num_labels=len(LABELS)).eval()  # type: ignore[attr-defined]


def head_adapter(
    kind: str,
    base: Path,
    out: Path,
    labels: bool = True,
    auto: type = AutoModelForSequenceClassification,
) -> lk.LoraModel:
    """An adapter trained (seeded random values) on ``base``'s task model, head saved."""
    targets = ("query", "value") if kind == "bert" else ("c_attn",)
    config = lk.LoraConfig(r=4, alpha=8, targets=targets, modules_to_save=(HEAD[kind],))
    lm = lk.inject(task_model(base, auto), config)
    randomize(lm, seed=3, std=0.2)
    lm.save_adapter(out)
    if labels:  # what lorakit train writes beside a classifier's adapter
        id2label = {str(i): name for i, name in enumerate(LABELS)}
        (out / "labels.json").write_text(json.dumps({"id2label": id2label}))
    return lm


def loading_info(folder: Path, auto: type = AutoModelForSequenceClassification) -> tuple:
    model, info = auto.from_pretrained(folder, output_loading_info=True)  # type: ignore[attr-defined]
    return model.eval(), info


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_headless_base_becomes_the_task_model(tmp_path: Path, kind: str) -> None:
    base = headless(kind, tmp_path / "base")
    lm = head_adapter(kind, base, tmp_path / "ad")
    report = merge_files(base, [tmp_path / "ad"], tmp_path / "out")

    merged, info = loading_info(tmp_path / "out")
    assert info == {
        "missing_keys": set(),
        "unexpected_keys": set(),
        "mismatched_keys": set(),
        "error_msgs": [],
    }
    # The unmerged reference: base + adapter loaded back with lora_kit onto the headless base.
    ref = lk.LoraModel.from_pretrained(task_model(base), tmp_path / "ad").eval()
    with torch.no_grad():
        want = ref(input_ids=ids(kind)).logits
        got = merged(input_ids=ids(kind)).logits
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert merged.config.id2label == dict(enumerate(LABELS))
    assert merged.config.label2id == {n: i for i, n in enumerate(LABELS)}
    assert type(merged).__name__ == report.task.architecture  # type: ignore[union-attr]

    # Exactly what merge_and_unload() + save_pretrained writes: same names, same bits.
    lm.merge_and_unload().save_pretrained(tmp_path / "in-memory")
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    theirs = load_file(str(tmp_path / "in-memory" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert all(k.startswith(PREFIX[kind]) or k.startswith(HEAD[kind]) for k in ours)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [report.task.architecture]  # type: ignore[union-attr]

    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        history = read_history({"history": f.metadata()[METADATA_KEY]})
    assert history is not None
    assert history.options["task_model"] == type(merged).__name__
    assert history.options["base_prefix_added"] == PREFIX[kind]
    assert history.options["labels"] == "labels.json" and history.options["num_labels"] == 3
    assert set(history.heads) == {k for k in ours if k.startswith(HEAD[kind])}


def test_generic_labels_from_the_head_shape(tmp_path: Path) -> None:
    base = headless("bert", tmp_path / "base")
    head_adapter("bert", base, tmp_path / "ad", labels=False)
    report = merge_files(base, [tmp_path / "ad"], tmp_path / "out")
    merged, info = loading_info(tmp_path / "out")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert merged.config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    assert report.task is not None and report.task.labels_from == "head shape"


def test_token_classifier_leaves_out_the_unused_pooler(tmp_path: Path) -> None:
    """BertForTokenClassification has no pooler: the base's is left out, as save_pretrained does."""
    base = headless("bert", tmp_path / "base")
    head_adapter("bert", base, tmp_path / "ad", auto=AutoModelForTokenClassification)
    report = merge_files(base, [tmp_path / "ad"], tmp_path / "out")
    assert report.task is not None
    assert report.task.architecture == "BertForTokenClassification"
    assert report.task.dropped == ("pooler.dense.bias", "pooler.dense.weight")
    _, info = loading_info(tmp_path / "out", AutoModelForTokenClassification)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def _rename_head(adapter: Path, new: str) -> None:
    path = adapter / "adapter_model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    renamed = {k.replace(".classifier.", f".{new}."): v for k, v in tensors.items()}
    save_file(renamed, str(path), metadata=metadata)


def _edit_config(adapter: Path, **changes: object) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("no task_type", "task_type is None"),
        ("causal task_type", "task_type is 'CAUSAL_LM'"),
        ("unknown head name", r"\['head.bias', 'head.weight'\] are not part of BertFor"),
        ("unknown head name, no labels.json", "are not part of BertForSequenceClassification"),
        ("labels.json disagrees with the head", "labels.json and the head disagree"),
        ("labels.json malformed", "id2label must map 0..N-1"),
    ],
)
def test_refused_when_the_head_cannot_be_placed(tmp_path: Path, case: str, match: str) -> None:
    base = headless("bert", tmp_path / "base")
    adapter = tmp_path / "ad"
    head_adapter("bert", base, adapter, labels="no labels.json" not in case)
    if case == "no task_type":
        _edit_config(adapter, task_type=None)
    elif case == "causal task_type":
        _edit_config(adapter, task_type="CAUSAL_LM")
    elif case.startswith("unknown head name"):
        _rename_head(adapter, "head")
    elif case == "labels.json disagrees with the head":
        (adapter / "labels.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b"}}))
    else:
        (adapter / "labels.json").write_text(json.dumps({"id2label": {"0": "a", "2": "b"}}))
    error = lk.AdapterFormatError if "malformed" in case else HeadLayoutError
    with pytest.raises(error, match=match):
        merge_files(base, [adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_refused_when_an_adapted_module_has_no_place_in_the_task_model(tmp_path: Path) -> None:
    """LoRA on the pooler, declared TOKEN_CLS: BertForTokenClassification has no pooler."""
    base = headless("bert", tmp_path / "base")
    config = lk.LoraConfig(r=4, alpha=8, targets=("pooler.dense",), modules_to_save=("classifier",))
    lm = lk.inject(task_model(base), config)
    randomize(lm, seed=3)
    lm.save_adapter(tmp_path / "ad")
    _edit_config(tmp_path / "ad", task_type="TOKEN_CLS")
    with pytest.raises(HeadLayoutError, match=r"\['bert.pooler.dense'\] are not part of BertFor"):
        merge_files(base, [tmp_path / "ad"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_says_what_it_wrote_and_refuses_with_exit_1(tmp_path: Path) -> None:
    base = headless("bert", tmp_path / "base")
    head_adapter("bert", base, tmp_path / "ad")
    runner = CliRunner()
    result = runner.invoke(
        app, ["merge", str(base), str(tmp_path / "ad"), "-o", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    assert "wrote BertForSequenceClassification with 3 labels (neg, neu, pos" in result.stdout
    assert "renamed under 'bert.'" in result.stdout
    _edit_config(tmp_path / "ad", task_type=None)
    bad = runner.invoke(app, ["merge", str(base), str(tmp_path / "ad"), "-o", str(tmp_path / "o2")])
    assert bad.exit_code == 1 and "task_type" in bad.stderr and "Traceback" not in bad.output
    assert not (tmp_path / "o2").exists()


def test_stacked_classifier_keeps_its_label_names(tmp_path: Path) -> None:
    """``lk.stack`` kept a classifier's head but not the labels.json beside it, so merging the
    stack onto the headless base named the classes LABEL_0.. instead of neg/neu/pos."""
    base = headless("bert", tmp_path / "base")
    head_adapter("bert", base, tmp_path / "ad")
    plain = lk.LoraModel.from_pretrained(task_model(base), tmp_path / "ad", name="p")
    plain.add_adapter("q", lk.LoraConfig(r=2, targets=("query",)))
    randomize(plain, seed=5, std=0.2)
    plain.save_adapter(tmp_path / "q", "q")  # no head, no labels.json
    lk.stack([tmp_path / "ad", tmp_path / "q"], weights=[1.0, 0.5], out=tmp_path / "st")
    assert json.loads((tmp_path / "st" / "labels.json").read_text()) == json.loads(
        (tmp_path / "ad" / "labels.json").read_text()
    )
    report = merge_files(base, [tmp_path / "st"], tmp_path / "out")
    assert report.task is not None and report.task.labels_from == "labels.json"
    merged, _ = loading_info(tmp_path / "out")
    assert merged.config.id2label == dict(enumerate(LABELS))


def test_stack_takes_the_task_type_of_the_input_whose_head_it_keeps(tmp_path: Path) -> None:
    """The stack's task_type came from the first input: listing a head-less adapter first wrote
    a classifier head under task_type null, and merging that stack onto the headless base was
    refused (HeadLayoutError: "its task_type is None")."""
    base = headless("bert", tmp_path / "base")
    head_adapter("bert", base, tmp_path / "ad")
    plain = lk.LoraModel.from_pretrained(task_model(base), tmp_path / "ad", name="p")
    plain.add_adapter("q", lk.LoraConfig(r=2, targets=("query",)))
    randomize(plain, seed=5, std=0.2)
    plain.save_adapter(tmp_path / "q", "q")  # no head: saved with task_type null
    assert json.loads((tmp_path / "q" / "adapter_config.json").read_text())["task_type"] is None
    lk.stack([tmp_path / "q", tmp_path / "ad"], weights=[0.5, 1.0], out=tmp_path / "st")
    config = json.loads((tmp_path / "st" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    stacked = lk.LoraModel.from_pretrained(task_model(base), tmp_path / "st").eval()
    report = merge_files(base, [tmp_path / "st"], tmp_path / "out")
    assert report.task is not None
    merged, _ = loading_info(tmp_path / "out")
    with torch.no_grad():
        want = stacked(input_ids=ids("bert")).logits
        got = merged(input_ids=ids("bert")).logits
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_a_base_config_naming_num_labels_gets_the_heads_count(tmp_path: Path, kind: str) -> None:
    """transformers does not write ``num_labels``, but a hand-written base config may: the
    output's must then be the head's count (3), not the base's stale 2, and the task model
    must load with every tensor in place."""
    base = headless(kind, tmp_path / "base")
    head_adapter(kind, base, tmp_path / "ad")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "num_labels": 2}))
    merge_files(base, [tmp_path / "ad"], tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["num_labels"] == len(LABELS) == len(written["id2label"])
    merged, info = loading_info(tmp_path / "out")
    assert merged.config.num_labels == len(LABELS)
    assert not info["missing_keys"] and not info["mismatched_keys"]
