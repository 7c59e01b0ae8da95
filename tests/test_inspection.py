"""Tests of lora_kit.inspection: factor-based norms, singular values and effective ranks.

Reference: the dense delta ``scaling * B @ A`` in float64 and ``torch.linalg`` on it. The
factor-based figures are computed in float64 too, so they agree to ~1e-12 relative; 1e-9 is
used to leave room for the different summation orders of QR vs. dense SVD.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tooling_helpers import KINDS, make_adapter

import lora_kit as lk
from lora_kit.errors import AdapterFormatError, ConfigError
from lora_kit.inspection import (
    delta_norm,
    effective_rank,
    inspect_adapter,
    lora_modules,
    singular_values,
)

REL = 1e-9


def _dense(a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    return s * b.double() @ a.double()  # [out, in]


@pytest.mark.parametrize("shape", [(4, 32, 96), (8, 64, 16), (3, 5, 7), (6, 4, 4)])
def test_norm_and_singular_values_match_dense_reference(shape: tuple[int, int, int]) -> None:
    r, in_f, out_f = shape  # includes r > min(in, out) and square cases
    gen = torch.Generator().manual_seed(r * 100 + in_f)
    a, b = torch.randn(r, in_f, generator=gen), torch.randn(out_f, r, generator=gen)
    dense = _dense(a, b, 0.7)
    want_norm = float(torch.linalg.matrix_norm(dense))
    assert abs(delta_norm(a, b, 0.7) - want_norm) <= REL * want_norm
    want_sv = torch.linalg.svdvals(dense)[: min(r, in_f, out_f)]
    got_sv = singular_values(a, b, 0.7)
    assert got_sv.shape[0] >= want_sv.shape[0]
    assert torch.allclose(got_sv[: want_sv.shape[0]], want_sv, rtol=0, atol=REL * want_norm)
    rest = got_sv[want_sv.shape[0] :]  # the core can be larger than the true rank
    assert all(float(v) <= REL * want_norm for v in rest)


def test_effective_rank_counts_only_values_above_the_threshold() -> None:
    gen = torch.Generator().manual_seed(0)
    # Rank-2 update stored with r=6: B's columns span 2 directions.
    b = torch.randn(40, 2, generator=gen) @ torch.randn(2, 6, generator=gen)
    a = torch.randn(6, 30, generator=gen)
    values = singular_values(a, b, 1.0)
    assert effective_rank(values) == 2
    # The dense reference at the same relative threshold agrees (float32 inputs carry ~1e-7
    # noise in the "zero" directions, which the threshold is there to ignore).
    assert int(torch.linalg.matrix_rank(_dense(a, b, 1.0), rtol=1e-3)) == 2
    # A third direction at 1e-4 of the largest counts only below the threshold.
    b3 = b + 1e-4 * float(values[0]) * torch.randn(40, 6, generator=gen) / 40
    assert effective_rank(singular_values(a, b3, 1.0), threshold=1e-3) == 2
    assert effective_rank(singular_values(a, b3, 1.0), threshold=1e-8) == 6
    assert effective_rank(torch.zeros(4)) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_inspect_adapter_reports_each_module(kind: str, tmp_path: Path) -> None:
    config = lk.LoraConfig(
        r=4, alpha=8, rank_pattern={"h.1.attn.c_attn": 2, r"layer\.1\..*value": 2}
    )
    path = make_adapter(kind, tmp_path / "ad", config)
    files = lk.read_adapter(path)
    report = inspect_adapter(path)
    assert report.origin == "lora_kit"
    assert len(report.modules) == len(lora_modules(files.tensors)) == (2 if kind == "gpt2" else 4)
    assert {m.rank for m in report.modules} == {2, 4}  # rank_pattern is honoured
    assert report.parameters == sum(t.numel() for t in files.tensors.values())
    assert report.file_bytes == (path / "adapter_model.safetensors").stat().st_size
    assert "base_fingerprint" in report.provenance and "created" in report.provenance
    assert "config" not in report.provenance
    for module in report.modules:
        key = f"base_model.model.{module.name}"
        a, b = files.tensors[key + ".lora_A.weight"], files.tensors[key + ".lora_B.weight"]
        assert module.rank == config.rank_for(module.name) == a.shape[0]
        assert module.scaling == pytest.approx(config.scaling_for(module.name), rel=1e-15)
        assert (module.out_features, module.in_features) == (b.shape[0], a.shape[1])
        dense = _dense(a, b, module.scaling)
        assert module.delta_norm == pytest.approx(float(torch.linalg.matrix_norm(dense)), rel=REL)
        assert module.effective_rank == module.rank  # random factors are full rank
        assert module.parameters == a.numel() + b.numel()


def test_zero_b_adapter_has_zero_norm_and_rank(tmp_path: Path) -> None:
    path = make_adapter("gpt2", tmp_path / "fresh", zero_b=True)
    report = inspect_adapter(path)
    assert all(m.delta_norm == 0.0 and m.effective_rank == 0 for m in report.modules)


def test_bad_threshold_and_unpaired_factors_are_refused(tmp_path: Path) -> None:
    path = make_adapter("gpt2", tmp_path / "ad")
    with pytest.raises(ConfigError, match="threshold"):
        inspect_adapter(path, threshold=1.5)
    with pytest.raises(AdapterFormatError, match="no matching lora_B"):
        lora_modules({"base_model.model.x.lora_A.weight": torch.zeros(2, 3)})
    with pytest.raises(AdapterFormatError, match="no matching lora_A"):
        lora_modules({"base_model.model.x.lora_B.weight": torch.zeros(2, 3)})
    bad = {
        "base_model.model.x.lora_A.weight": torch.zeros(2, 3),
        "base_model.model.x.lora_B.weight": torch.zeros(4, 5),
    }
    with pytest.raises(AdapterFormatError, match="same r"):
        lora_modules(bad)


def test_saved_modules_are_named_as_in_the_model_with_their_shapes(tmp_path: Path) -> None:
    """``modules_to_save`` tensors are reported by their model name (PEFT's
    ``base_model.model.`` prefix removed), with their shapes. BERT only: the tiny GPT-2 has no
    head of its own to save (its lm_head is tied to the embeddings)."""
    config = lk.LoraConfig(r=4, alpha=8, modules_to_save=("classifier",))
    report = inspect_adapter(make_adapter("bert", tmp_path / "ad", config))
    heads = {k: v for k, v in report.saved_modules.items() if k.startswith("classifier")}
    assert heads and heads == report.saved_modules
    assert [v for k, v in sorted(heads.items()) if k.endswith(".weight")] == [[3, 32]]
