"""Tests of lora_kit.verify: does an adapter fit a base, and how much of it lands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tooling_helpers import KINDS, make_adapter, make_peft_adapter, tiny_model, tree_hashes

import lora_kit as lk
from lora_kit.verify import verify_fit

WEIGHTS = "adapter_model.safetensors"


def _add_tensor(path: Path, key: str, value: torch.Tensor) -> None:
    """Rewrite the weights file with one more tensor, keeping lora_kit's metadata."""
    from safetensors import safe_open

    with safe_open(str(path / WEIGHTS), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(path / WEIGHTS))
    tensors[key] = value
    save_file(tensors, str(path / WEIGHTS), metadata=metadata)


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_fits_its_own_base(kind: str, tmp_path: Path) -> None:
    path = make_adapter(kind, tmp_path / "ad")
    before = tree_hashes(path)
    report = verify_fit(path, tiny_model(kind))
    assert report.fits, report.problems
    assert (report.coverage, report.used, report.tensors) == (1.0, report.tensors, report.tensors)
    assert (report.fingerprint, report.orientation) == ("match", "ok")
    assert report.modules == (2 if kind == "gpt2" else 4)
    assert tree_hashes(path) == before


@pytest.mark.parametrize("kind", KINDS)
def test_peft_adapter_fits_without_fingerprint(kind: str, tmp_path: Path) -> None:
    path = make_peft_adapter(kind, tmp_path / "peft")
    report = verify_fit(path, tiny_model(kind))
    assert report.fits, report.problems
    assert (report.fingerprint, report.orientation, report.coverage) == ("absent", "ok", 1.0)


def test_other_architecture_does_not_fit(tmp_path: Path) -> None:
    report = verify_fit(make_adapter("gpt2", tmp_path / "ad"), tiny_model("bert"))
    assert not report.fits
    assert (report.coverage, report.modules, report.fingerprint) == (0.0, 0, "mismatch")
    assert "matched no Linear/Conv1D module" in report.problems[0]
    assert len(report.unused) == 4


def test_same_architecture_other_weights_fails_on_fingerprint_only(tmp_path: Path) -> None:
    path = make_adapter("bert", tmp_path / "ad")
    report = verify_fit(path, tiny_model("bert", seed=7))
    assert not report.fits and report.coverage == 1.0
    assert report.fingerprint == "mismatch"
    assert "targeted base weights differ" in report.problems[0]
    assert verify_fit(path, tiny_model("bert", seed=7), check_base=False).fits


def test_extra_tensor_lowers_coverage_and_is_named(tmp_path: Path) -> None:
    path = make_adapter("gpt2", tmp_path / "ad")
    extra = "base_model.model.transformer.h.0.mlp.c_fc.lora_A.weight"
    _add_tensor(path, extra, torch.zeros(4, 32))
    report = verify_fit(path, tiny_model("gpt2"))
    assert not report.fits
    assert report.coverage == pytest.approx(4 / 5, abs=1e-12)
    assert report.unused == (extra,)
    assert "unexpected tensor" in report.problems[0] and extra in report.problems[0]


def test_shape_misfit_is_named(tmp_path: Path) -> None:
    path = make_adapter("gpt2", tmp_path / "ad")
    tensors = load_file(str(path / WEIGHTS))
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"
    tensors[key] = torch.zeros(64, 4)  # a [96, 4] B for a wider model
    save_file(tensors, str(path / WEIGHTS))  # (drops the metadata: a PEFT-like file)
    report = verify_fit(path, tiny_model("gpt2"))
    assert not report.fits and report.fingerprint == "absent"
    assert report.coverage == pytest.approx(3 / 4, abs=1e-12)
    assert "has shape [64, 4] in the file, this model needs [96, 4]" in report.problems[0]


def test_orientation_flag_must_match_the_base(tmp_path: Path) -> None:
    path = make_peft_adapter("bert", tmp_path / "peft")
    config = json.loads((path / "adapter_config.json").read_text())
    config["fan_in_fan_out"] = True  # claims Conv1D modules; BERT's are nn.Linear
    (path / "adapter_config.json").write_text(json.dumps(config))
    report = verify_fit(path, tiny_model("bert"))
    assert not report.fits and report.orientation == "mismatch"
    assert "fan_in_fan_out=True" in report.problems[0]


def test_a_fitting_adapter_really_loads(tmp_path: Path) -> None:
    path = make_adapter("gpt2", tmp_path / "ad")
    base = tiny_model("gpt2")
    assert verify_fit(path, base).fits
    # verify loaded it onto ``base`` as its last check: the model now carries the adapter.
    assert any(isinstance(m, lk.LoRALinear) for m in base.modules())


def test_unreadable_adapter_raises(tmp_path: Path) -> None:
    path = make_adapter("gpt2", tmp_path / "ad")
    (path / WEIGHTS).unlink()
    with pytest.raises(lk.AdapterFormatError, match=r"adapter_model\.safetensors is missing"):
        verify_fit(path, tiny_model("gpt2"))


def test_modules_to_save_tensors_count_towards_coverage(tmp_path: Path) -> None:
    config = lk.LoraConfig(r=4, alpha=8, modules_to_save=("classifier",))
    report = verify_fit(make_adapter("bert", tmp_path / "ad", config), tiny_model("bert"))
    assert report.fits and report.tensors == 8 + 2 and report.coverage == 1.0
    # A base with another number of labels: the head's shapes do not fit.
    other = tiny_model("bert")
    other.classifier = torch.nn.Linear(32, 5)
    report = verify_fit(tmp_path / "ad", other, check_base=False)
    assert not report.fits and report.coverage == pytest.approx(8 / 10, abs=1e-12)
    assert (
        "classifier.weight has shape [3, 32] in the file, this model needs [5, 32]"
        in (report.problems[0])
    )
