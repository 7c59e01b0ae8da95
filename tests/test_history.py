"""Stacking/merge history (issue 7): the record, what stack and merge write, what inspect shows."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from merge_helpers import logits, tiny, with_adapters
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

import lora_kit as lk
from lora_kit.adapter_io import CONFIG_NAME, WEIGHTS_NAME, file_sha256, write_adapter
from lora_kit.errors import HistoryError
from lora_kit.history import History, HistorySource, HistoryWarning, read_history
from lora_kit.inspection import inspect_adapter
from lora_kit.merge_files import merge_files
from lora_kit.model_inspection import inspect_model
from lora_kit_cli.app import app

SHA_A, SHA_B = "a" * 64, "b" * 64


def _record(nested: History | None = None) -> History:
    return History(
        operation="stack",
        method="svd",
        sources=(
            HistorySource("adapters/a", 0.7, SHA_A, SHA_B, history=nested),
            HistorySource("adapters/b", -0.3, SHA_B, SHA_A),
        ),
        heads={"classifier.weight": "adapters/a"},
        options={"rank": 4, "density": None, "seed": None},
        metrics={"energy_kept": 0.9, "rel_error": 0.3},
    )


def test_round_trip_through_json_keeps_everything() -> None:
    inner = History(
        "merge",
        "linear",
        (HistorySource("x", 1.0, SHA_A, SHA_A, fingerprint="match"),),
        base="./gpt2",
        options={"dtype": "bfloat16", "force": False},
    )
    record = _record(nested=inner)
    again = History.from_dict(json.loads(json.dumps(record.to_dict())))
    assert again == record
    assert again.sources[0].history == inner and again.sources[0].history.base == "./gpt2"


def _garbage() -> list[tuple[str, Any, str]]:
    good = _record().to_dict()

    def changed(**fields: Any) -> dict[str, Any]:
        return {**copy.deepcopy(good), **fields}

    source = good["sources"][0]
    return [
        ("not an object", [1, 2], "expected a JSON object"),
        ("not JSON", "{'schema': 1", "not valid JSON"),
        ("newer schema", changed(schema=2), "schema 2"),
        ("bool schema", changed(schema=True), "schema True"),
        ("missing field", {k: v for k, v in good.items() if k != "method"}, "missing"),
        ("unknown field", changed(extra=1), "unknown field"),
        ("operation", changed(operation="blend"), "operation"),
        ("no sources", changed(sources=[]), "non-empty list"),
        ("created", changed(created="yesterday"), "ISO-8601"),
        ("bad sha", changed(sources=[{**source, "weights_sha256": "xyz"}]), "sha256"),
        ("nan weight", changed(sources=[{**source, "weight": float("nan")}]), "finite"),
        ("weight as text", changed(sources=[{**source, "weight": "0.7"}]), "finite"),
        ("options", changed(options={"rank": [4]}), "options"),
        ("metrics", changed(metrics={"rel_error": "low"}), "metrics"),
        ("nested garbage", changed(sources=[{**source, "history": {"schema": 1}}]), "missing"),
    ]


@pytest.mark.parametrize(("what", "data", "message"), _garbage(), ids=lambda x: str(x)[:20])
def test_garbage_is_refused_never_accepted(what: str, data: Any, message: str) -> None:
    del what
    with pytest.raises(HistoryError, match=message):
        read_history({"history": data})


def test_too_deep_nesting_is_refused() -> None:
    record = _record()
    for _ in range(70):
        record = History("stack", "cat", (HistorySource("x", 1.0, SHA_A, SHA_A, history=record),))
    with pytest.raises(HistoryError, match="nested deeper"):
        History.from_dict(json.loads(json.dumps(record.to_dict())))


@pytest.fixture(params=["gpt2", "bert"])
def inputs(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path]:
    kind = request.param
    lm = with_adapters(kind, ("a", "b", "c"))
    for name in ("a", "b", "c"):
        lm.save_adapter(tmp_path / name, name)
    return kind, tmp_path


def test_stack_records_sources_weights_method_and_inspect_shows_them(
    inputs: tuple[str, Path],
) -> None:
    _, tmp = inputs
    lk.stack([tmp / "a", tmp / "b"], weights=[0.7, -0.3], method="svd", rank=3, out=tmp / "ab")
    report = inspect_adapter(tmp / "ab")
    history = report.history
    assert history is not None and report.history_error is None
    assert (history.operation, history.method) == ("stack", "svd")
    assert history.lora_kit_version == lk.__version__ and history.options["rank"] == 3
    assert [(s.path, s.weight) for s in history.sources] == [(str(tmp / "a"), 0.7),
                                                             (str(tmp / "b"), -0.3)]  # fmt: skip
    for source, name in zip(history.sources, "ab", strict=True):
        assert source.weights_sha256 == file_sha256(tmp / name / WEIGHTS_NAME)
        assert source.config_sha256 == file_sha256(tmp / name / CONFIG_NAME)
        assert source.history is None  # plain trained adapters
    assert 0 < history.metrics["energy_kept"] < 1
    assert "history" not in report.provenance  # shown once, as the typed record
    data = report.to_dict()
    assert data["history"]["sources"][1]["weight"] == -0.3
    json.dumps(data)  # JSON-ready


def test_stack_of_stacks_and_merge_of_a_stack_show_nested_history(
    inputs: tuple[str, Path],
) -> None:
    kind, tmp = inputs
    lk.stack([tmp / "a", tmp / "b"], weights=[0.7, -0.3], out=tmp / "ab")
    lk.stack([tmp / "ab", tmp / "c"], weights=[1.0, 0.5], out=tmp / "abc")
    outer = inspect_adapter(tmp / "abc").history
    assert outer is not None and outer.method == "cat"
    inner = outer.sources[0].history
    assert inner is not None and [s.weight for s in inner.sources] == [0.7, -0.3]
    assert outer.sources[1].history is None
    base = tmp / "base"
    tiny(kind).save_pretrained(base)
    merge_files(base, [tmp / "abc"], tmp / "merged", weights=[0.5])
    merged = inspect_model(tmp / "merged").history
    assert merged is not None and merged.operation == "merge" and merged.base == str(base)
    two_down = merged.sources[0].history
    assert two_down is not None and two_down.sources[0].history == inner
    result = CliRunner().invoke(app, ["inspect", str(tmp / "merged")])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(line.startswith("history   merge (linear) onto base") for line in lines)
    assert sum("stack (cat)" in line for line in lines) == 2  # abc, then ab inside it
    assert any(line.strip().startswith("-0.3 x") for line in lines)


def test_merge_then_inspect_shows_base_and_adapters(tmp_path: Path) -> None:
    lm = with_adapters("gpt2", ("a", "b"))
    for name in ("a", "b"):
        lm.save_adapter(tmp_path / name, name)
    tiny("gpt2").save_pretrained(tmp_path / "base")
    args = ["merge", str(tmp_path / "base"), str(tmp_path / "a"), str(tmp_path / "b")]
    done = CliRunner().invoke(app, [*args, "--weights", "0.7,-0.3", "-o", str(tmp_path / "m")])
    assert done.exit_code == 0, done.output
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"onto base {tmp_path / 'base'}" in out and "model     " in out
    assert f"+0.7 x {tmp_path / 'a'}" in out and f"-0.3 x {tmp_path / 'b'}" in out
    assert "base fingerprint match" in out
    data = json.loads(CliRunner().invoke(app, ["inspect", str(tmp_path / "m"), "--json"]).stdout)
    assert data["kind"] == "model" and data["history"]["base"] == str(tmp_path / "base")
    sources = data["history"]["sources"]
    assert [s["weight"] for s in sources] == [0.7, -0.3]
    assert sources[0]["weights_sha256"] == file_sha256(tmp_path / "a" / WEIGHTS_NAME)
    assert data["history"]["options"] == {"dtype": "as stored", "force": False}
    with safe_open(str(tmp_path / "m" / "model.safetensors"), framework="pt") as handle:
        want = [handle.get_tensor(k) for k in handle.keys()]  # noqa: SIM118
    assert (data["tensors"], data["parameters"]) == (len(want), sum(t.numel() for t in want))
    plain = CliRunner().invoke(app, ["inspect", str(tmp_path / "base")])
    assert plain.exit_code == 0 and "none recorded" in plain.stdout


def test_stacked_adapter_with_history_still_loads_in_peft(tmp_path: Path) -> None:
    from peft import PeftModel

    lm = with_adapters("gpt2", ("a", "b"))
    for name in ("a", "b"):
        lm.save_adapter(tmp_path / name, name)
    lk.stack([tmp_path / "a", tmp_path / "b"], weights=[0.7, -0.3], out=tmp_path / "ab")
    lk.stack([tmp_path / "ab", tmp_path / "b"], weights=[1.0, 0.3], out=tmp_path / "abb")
    assert inspect_adapter(tmp_path / "abb").history is not None
    ours = lk.LoraModel.from_pretrained(tiny("gpt2"), tmp_path / "abb")
    peft_model = PeftModel.from_pretrained(tiny("gpt2"), str(tmp_path / "abb")).eval()
    # fp32, the same update through different kernels: rounding only (as test_peft_interop).
    torch.testing.assert_close(logits(peft_model, "gpt2"), logits(ours, "gpt2"), rtol=0, atol=1e-5)


def _with_history(tmp: Path, value: Any) -> Path:
    """Copy adapter ``a`` with its header's history replaced by ``value``."""
    files = lk.read_adapter(tmp / "a")
    metadata = {k: v for k, v in files.metadata.items() if k not in ("format_version", "version")}
    metadata["history"] = value
    return write_adapter(tmp / "odd", files.peft_config, files.tensors, metadata)


@pytest.mark.parametrize(
    "value", ["{not json", {"schema": 99, "operation": "stack"}], ids=["corrupt", "unknown"]
)
def test_unreadable_history_warns_but_inspect_works(inputs: tuple[str, Path], value: Any) -> None:
    _, tmp = inputs
    odd = _with_history(tmp, value)
    report = inspect_adapter(odd)
    assert report.history is None and report.history_error is not None
    assert "history" not in report.provenance  # the garbage is not shown as provenance
    result = CliRunner().invoke(app, ["inspect", str(odd)])
    assert result.exit_code == 0, result.output
    assert "history   unreadable history:" in result.stdout
    assert result.stderr.startswith("warning:")
    data = json.loads(CliRunner().invoke(app, ["inspect", str(odd), "--json"]).stdout)
    assert data["history"] is None and data["history_error"] == report.history_error
    # Stacking it records why its history is missing instead of copying the garbage.
    with pytest.warns(HistoryWarning, match="unreadable history"):
        lk.stack([odd, tmp / "b"], out=tmp / "s")
    source = inspect_adapter(tmp / "s").history.sources[0]  # type: ignore[union-attr]
    assert source.history is None and source.history_error == report.history_error


def test_unreadable_history_in_a_model_folder(tmp_path: Path) -> None:
    model = tiny("gpt2")
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(weights), metadata={"format": "pt", "lora_kit.history": "[]"})
    report = inspect_model(tmp_path / "m")
    assert report.history is None and "expected a JSON object" in str(report.history_error)
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "m")])
    assert result.exit_code == 0 and "unreadable history" in result.stdout
    weights.write_bytes(weights.read_bytes()[:100])  # truncated weights: a real error
    broken = CliRunner().invoke(app, ["inspect", str(tmp_path / "m")])
    assert broken.exit_code == 1 and "unreadable safetensors" in broken.stderr


def test_saving_over_a_stacked_adapter_drops_its_history(tmp_path: Path) -> None:
    """The record lives in the weights file, so new weights never inherit a stale history."""
    lm = with_adapters("gpt2", ("a", "b"))
    for name in ("a", "b"):
        lm.save_adapter(tmp_path / name, name)
    lk.stack([tmp_path / "a", tmp_path / "b"], out=tmp_path / "ab")
    assert inspect_adapter(tmp_path / "ab").history is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm.save_adapter(tmp_path / "ab", "a")
    assert inspect_adapter(tmp_path / "ab").history is None
