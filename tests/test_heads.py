"""Stacking and file-merging adapters that carry a ``modules_to_save`` head (issue 5).

Rule under test (lora_kit.heads): a head is never mixed by weights; one input's copy is kept,
and inputs with different copies need an explicit ``heads=`` choice.

Tolerances: stacked-vs-inference-time logits as in test_stack (one fp32 GEMM over concatenated
factors vs two, so a few ulps: 1e-4 absolute on logits of order 1); lora_kit vs PEFT as in
test_peft_interop (1e-5); merged file vs unmerged model as in test_merge_files (1e-4).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from merge_helpers import config, logits, randomize, tiny
from safetensors import safe_open
from transformers import AutoModelForSequenceClassification, BertConfig
from transformers import BertForSequenceClassification as Bert
from typer.testing import CliRunner

import lora_kit as lk
from lora_kit.adapter_io import read_adapter
from lora_kit.errors import HeadConflictError
from lora_kit.merge_files import merge_files
from lora_kit_cli.app import app

HEAD = "base_model.model.classifier.weight"
W = {"a": 0.7, "b": -0.3}


def bert_pair(tmp: Path, b_head: bool) -> lk.LoraModel:
    """BERT with adapters a (rank 4, trained head) and b (rank 2, a head of its own or none)."""
    lm = lk.inject(tiny("bert"), config("bert", r=4, alpha=8.0, heads=True), "a")
    lm.add_adapter("b", config("bert", r=2, alpha=3.0, heads=b_head))
    randomize(lm, "a", seed=10)
    randomize(lm, "b", seed=11)
    for name in ("a", "b"):
        lm.save_adapter(tmp / name, name)
    return lm


def head_of(path: Path) -> torch.Tensor:
    return read_adapter(path).tensors[HEAD]


@pytest.mark.parametrize("order", ["ab", "ba"])
def test_the_only_head_is_kept_and_matches_inference_stacking(tmp_path: Path, order: str) -> None:
    from peft import PeftModel

    lm = bert_pair(tmp_path, b_head=False)
    paths, weights = [tmp_path / n for n in order], [W[n] for n in order]
    report = lk.stack(paths, weights=weights, out=tmp_path / "s")
    assert report.heads == {"classifier.weight": str(tmp_path / "a"),
                            "classifier.bias": str(tmp_path / "a")}  # fmt: skip
    assert torch.equal(head_of(tmp_path / "s"), head_of(tmp_path / "a"))
    assert not torch.equal(head_of(tmp_path / "a"), tiny("bert").classifier.weight)
    assert read_adapter(tmp_path / "s").config.modules_to_save == ("classifier",)
    lm.set_adapter({n: W[n] for n in order})  # inference time: a's head is the only copy
    ref = logits(lm, "bert")
    stacked = lk.LoraModel.from_pretrained(tiny("bert"), tmp_path / "s")
    torch.testing.assert_close(logits(stacked, "bert"), ref, rtol=0, atol=1e-4)
    peft_model = PeftModel.from_pretrained(tiny("bert"), str(tmp_path / "s")).eval()
    torch.testing.assert_close(logits(peft_model, "bert"), logits(stacked, "bert"), rtol=0,
                               atol=1e-5)  # fmt: skip
    svd = lk.stack(paths, weights=weights, method="svd", rank=2, out=tmp_path / "v")
    assert svd.heads == report.heads  # heads do not depend on the method
    assert torch.equal(head_of(tmp_path / "v"), head_of(tmp_path / "a"))


def test_different_heads_are_refused_unless_one_is_chosen(tmp_path: Path) -> None:
    lm = bert_pair(tmp_path, b_head=True)
    paths = [tmp_path / "a", tmp_path / "b"]
    assert not torch.equal(head_of(paths[0]), head_of(paths[1]))
    with pytest.raises(HeadConflictError, match="classifier") as caught:
        lk.stack(paths, weights=list(W.values()), out=tmp_path / "s")
    assert "heads=" in str(caught.value) and "--heads" in str(caught.value)
    assert not (tmp_path / "s").exists()
    report = lk.stack(paths, weights=list(W.values()), out=tmp_path / "s", heads=paths[1])
    assert set(report.heads.values()) == {str(paths[1])}
    assert torch.equal(head_of(tmp_path / "s"), head_of(paths[1]))
    lm.set_adapter({"b": W["b"], "a": W["a"]})  # b listed first: b's head at inference time
    stacked = lk.LoraModel.from_pretrained(tiny("bert"), tmp_path / "s")
    torch.testing.assert_close(logits(stacked, "bert"), logits(lm, "bert"), rtol=0, atol=1e-4)
    history = lk.read_adapter(tmp_path / "s").metadata["history"]
    assert history["heads"]["classifier.weight"] == str(paths[1])


def test_identical_heads_need_no_choice(tmp_path: Path) -> None:
    bert_pair(tmp_path, b_head=False)
    a = tmp_path / "a"
    report = lk.stack([a, a], weights=[0.5, 0.5], out=tmp_path / "s")
    assert set(report.heads.values()) == {str(a)}
    assert torch.equal(head_of(tmp_path / "s"), head_of(a))


def test_bad_head_choice_is_a_config_error(tmp_path: Path) -> None:
    bert_pair(tmp_path, b_head=False)
    paths = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(lk.ConfigError, match="not one of the inputs"):
        lk.stack(paths, out=tmp_path / "s", heads=tmp_path / "c")
    with pytest.raises(lk.ConfigError, match="carries no modules_to_save head"):
        lk.stack(paths, out=tmp_path / "s", heads=paths[1])
    assert not (tmp_path / "s").exists()


def _merged_head(path: Path) -> torch.Tensor:
    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        return handle.get_tensor("classifier.weight")


def test_file_merge_writes_the_head(tmp_path: Path) -> None:
    lm = bert_pair(tmp_path, b_head=False)
    base = tmp_path / "base"
    tiny("bert").save_pretrained(base)
    paths = [tmp_path / "a", tmp_path / "b"]
    report = merge_files(base, paths, tmp_path / "m", weights=list(W.values()))
    assert report.heads == {"classifier.weight": str(paths[0]), "classifier.bias": str(paths[0])}
    assert torch.equal(_merged_head(tmp_path / "m"), head_of(paths[0]))
    lm.set_adapter(W)
    out = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(logits(out, "bert"), logits(lm, "bert"), rtol=0, atol=1e-4)


def test_file_merge_of_different_heads_needs_a_choice(tmp_path: Path) -> None:
    lm = bert_pair(tmp_path, b_head=True)
    base = tmp_path / "base"
    tiny("bert").save_pretrained(base)
    paths = [tmp_path / "a", tmp_path / "b"]
    with pytest.raises(HeadConflictError):
        merge_files(base, paths, tmp_path / "m", weights=list(W.values()))
    assert not (tmp_path / "m").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m.")]
    args = ["merge", str(base), *map(str, paths), "--weights", "0.7,-0.3", "-o"]
    refused = CliRunner().invoke(app, [*args, str(tmp_path / "m")])
    assert refused.exit_code == 1 and "--heads" in refused.stderr
    done = CliRunner().invoke(app, [*args, str(tmp_path / "m"), "--heads", str(paths[1])])
    assert done.exit_code == 0, done.output
    assert f"head classifier.weight taken from {paths[1]}" in done.stdout
    assert torch.equal(_merged_head(tmp_path / "m"), head_of(paths[1]))
    lm.set_adapter({"b": W["b"], "a": W["a"]})
    out = AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(logits(out, "bert"), logits(lm, "bert"), rtol=0, atol=1e-4)


def test_file_merge_refuses_a_head_of_another_shape(tmp_path: Path) -> None:
    torch.manual_seed(0)  # same encoder as tiny("bert"), a 2-label head
    shape = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    two = Bert(BertConfig(vocab_size=100, hidden_size=32, num_labels=2, **shape)).eval()
    lm = lk.inject(two, config("bert", heads=True), "a")
    randomize(lm, "a", seed=1)
    lm.save_adapter(tmp_path / "a", "a")
    base = tmp_path / "base"
    tiny("bert").save_pretrained(base)
    with pytest.raises(lk.AdapterMismatchError, match="number of labels"):
        merge_files(base, [tmp_path / "a"], tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_stack_cli_heads(tmp_path: Path) -> None:
    bert_pair(tmp_path, b_head=True)
    paths = [str(tmp_path / "a"), str(tmp_path / "b")]
    refused = CliRunner().invoke(app, ["stack", *paths, "-o", str(tmp_path / "s")])
    assert refused.exit_code == 1 and "different trained copies" in refused.stderr
    done = CliRunner().invoke(app, ["stack", *paths, "-o", str(tmp_path / "s"), "--heads",
                                    paths[0]])  # fmt: skip
    assert done.exit_code == 0, done.output
    assert f"head classifier.weight taken from {paths[0]}" in done.stdout
