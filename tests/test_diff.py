"""Tests of lora_kit.diff.

Reference: dense float64 deltas ``s * B @ A`` and their Frobenius norms; the factor-based
relative difference is float64 too and agrees to ~1e-12, checked at 1e-9.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tooling_helpers import KINDS, make_adapter, tree_hashes

import lora_kit as lk
from lora_kit.diff import diff_adapters, relative_difference


def _dense(pair: tuple[torch.Tensor, torch.Tensor], s: float) -> torch.Tensor:
    a, b = pair
    return s * b.double() @ a.double()  # [out, in]


@pytest.mark.parametrize(("ra", "rb"), [(4, 4), (2, 6), (8, 1)])
def test_relative_difference_matches_dense_reference(ra: int, rb: int) -> None:
    gen = torch.Generator().manual_seed(ra * 10 + rb)
    pa = (torch.randn(ra, 24, generator=gen), torch.randn(40, ra, generator=gen))
    pb = (torch.randn(rb, 24, generator=gen), torch.randn(40, rb, generator=gen))
    da, db = _dense(pa, 2.0), _dense(pb, 0.5)
    want = float(torch.linalg.matrix_norm(da - db)) / max(
        float(torch.linalg.matrix_norm(da)), float(torch.linalg.matrix_norm(db))
    )
    assert relative_difference(pa, 2.0, pb, 0.5) == pytest.approx(want, rel=1e-9)


def test_equal_deltas_from_different_factors_differ_by_zero() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 16, generator=gen), torch.randn(8, 4, generator=gen)
    # (2B)(A/2) * s is the same update as B A * s; so is B A * 2s vs B (2A) * s.
    assert relative_difference((a, b), 1.0, (a / 2, 2 * b), 1.0) < 1e-12
    assert relative_difference((a, b), 2.0, (2 * a, b), 1.0) < 1e-12
    zero = (torch.zeros(4, 16), torch.zeros(8, 4))
    assert relative_difference(zero, 1.0, zero, 1.0) == 0.0
    assert relative_difference((a, b), 1.0, zero, 1.0) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_same_adapter_is_identical(kind: str, tmp_path: Path) -> None:
    path = make_adapter(kind, tmp_path / "a")
    shutil.copytree(path, tmp_path / "b")
    before = tree_hashes(tmp_path)
    result = diff_adapters(path, tmp_path / "b")
    assert tree_hashes(tmp_path) == before
    assert result.identical and not result.config
    assert all(m.relative_difference is not None and m.relative_difference < 1e-12
               for m in result.modules)  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
def test_differences_are_reported(kind: str, tmp_path: Path) -> None:
    a = make_adapter(kind, tmp_path / "a", lk.LoraConfig(r=4, alpha=8), seed=1)
    b = make_adapter(kind, tmp_path / "b", lk.LoraConfig(r=2, alpha=8, layers=(1,)), seed=2)
    result = diff_adapters(a, b)
    assert not result.identical
    # (layers=... is saved as the exact module names, PEFT's portable form)
    assert result.config["r"] == [4, 2] and "targets" in result.config
    assert result.only_in_b == ()
    assert result.only_in_a and all(".0." in name for name in result.only_in_a)
    assert result.modules and all(".1." in m.name for m in result.modules)
    files_a, files_b = lk.read_adapter(a), lk.read_adapter(b)
    for module in result.modules:
        key = f"base_model.model.{module.name}"
        pa = (files_a.tensors[key + ".lora_A.weight"], files_a.tensors[key + ".lora_B.weight"])
        pb = (files_b.tensors[key + ".lora_A.weight"], files_b.tensors[key + ".lora_B.weight"])
        da, db = _dense(pa, module.scaling_a), _dense(pb, module.scaling_b)
        assert (module.rank_a, module.rank_b, module.scaling_a, module.scaling_b) == (4, 2, 2, 4)
        assert module.norm_a == pytest.approx(float(torch.linalg.matrix_norm(da)), rel=1e-9)
        want = float(torch.linalg.matrix_norm(da - db)) / max(module.norm_a, module.norm_b)
        assert module.relative_difference == pytest.approx(want, rel=1e-9)


def test_saved_module_differences_are_flagged(tmp_path: Path) -> None:
    config = lk.LoraConfig(r=4, alpha=8, modules_to_save=("classifier",))
    a = make_adapter("bert", tmp_path / "a", config, seed=1)
    b = make_adapter("bert", tmp_path / "b", config, seed=2)
    result = diff_adapters(a, b)
    assert result.saved_modules_differ and not result.config
    assert diff_adapters(a, a).identical


def test_modules_of_different_shapes_are_not_compared(tmp_path: Path) -> None:
    a = make_adapter("gpt2", tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    tensors = load_file(str(b / "adapter_model.safetensors"))
    key = "base_model.model.transformer.h.0.attn.c_attn"
    tensors[key + ".lora_A.weight"] = torch.ones(4, 16)  # [r, in] of a narrower module
    save_file(tensors, str(b / "adapter_model.safetensors"))
    by_name = {m.name: m for m in diff_adapters(a, b).modules}
    assert by_name["transformer.h.0.attn.c_attn"].relative_difference is None
    assert by_name["transformer.h.1.attn.c_attn"].relative_difference < 1e-12  # rounding only


@pytest.mark.parametrize("kind", KINDS)
def test_a_slightly_different_update_is_not_identical(kind: str, tmp_path: Path) -> None:
    """``identical`` means equal within 1e-12 (float64 rounding), not "close": one B element
    nudged by 1e-6 of the largest gives a relative difference far below 1e-3 yet not equal."""
    a = make_adapter(kind, tmp_path / "a")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    tensors = load_file(str(b / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith(".lora_B.weight"))
    tensors[key][0, 0] += 1e-6 * float(tensors[key].abs().max())
    save_file(tensors, str(b / "adapter_model.safetensors"))
    result = diff_adapters(a, b)
    assert not result.identical and not result.config
    worst = max(m.relative_difference or 0.0 for m in result.modules)
    assert 1e-12 < worst < 1e-4


def test_pattern_order_is_a_config_difference(tmp_path: Path) -> None:
    """Overlapping patterns in another order give a module another alpha (the first match
    wins); diff compared the pattern dicts ignoring order and called the configs the same."""
    patterns = {"c_attn": 4.0, "h\\.0\\..*c_attn": 32.0}
    config = lk.LoraConfig(r=4, alpha=8, targets=["c_attn"], alpha_pattern=patterns)
    first = make_adapter("gpt2", tmp_path / "a", config)
    reverse = dict(reversed(list(patterns.items())))
    other = lk.LoraConfig(r=4, alpha=8, targets=["c_attn"], alpha_pattern=reverse)
    second = make_adapter("gpt2", tmp_path / "b", other)  # same seed: same factors
    result = diff_adapters(first, second)
    assert "alpha_pattern" in result.config
    assert not result.identical
