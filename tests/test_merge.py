"""In-memory merge/unmerge/merge_and_unload (lora_kit.merge and the LoraModel methods)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from merge_helpers import KINDS, adapters_of, logits, randomize, with_adapters
from torch import nn
from transformers.pytorch_utils import Conv1D

import lora_kit as lk
from lora_kit.adapter_io import read_adapter
from lora_kit.layers import LoRALinear
from lora_kit.merge import lora_delta, merge_update, merged_weight, weighted_delta
from lora_kit.saved_modules import SavedModule
from lora_kit.surgery import set_submodule
from tests.conftest import fail_on_call, model_state

# fp32 tolerance: merged computes (W + s*B@A) x, unmerged W x + s*B(A x): the same sums in a
# different order. Each of the ~2 layers x 4 projections adds a few fp32 ulps relative to the
# activations (|logits| <= ~10 here), so 1e-4 absolute is ~100 ulps of slack and still 1000x
# smaller than the effect of the adapters being applied twice or not at all (checked below).
ATOL = 1e-4


def _base_weights(lm: lk.LoraModel) -> dict[str, torch.Tensor]:
    return {
        n: m.weight.detach().clone()
        for n, m in lm.model.named_modules()
        if isinstance(m, LoRALinear)
    }


def test_lora_delta_layouts() -> None:
    a, b = torch.randn(3, 5), torch.randn(7, 3)
    d = lora_delta(a, b, 0.5)
    torch.testing.assert_close(d, 0.5 * b @ a, rtol=0, atol=0)
    conv = lora_delta(a, b, 0.5, fan_in_fan_out=True)  # Conv1D's [in, out], contiguous
    assert conv.shape == (5, 7) and conv.is_contiguous()
    torch.testing.assert_close(conv, d.t(), rtol=1e-6, atol=1e-6)  # GEMM order may differ
    # weighted_delta equals the explicit weighted sum (one GEMM over concatenated factors).
    a2, b2 = torch.randn(2, 5), torch.randn(7, 2)
    got = weighted_delta([(a, b, 0.7), (a2, b2, -0.3)])
    torch.testing.assert_close(got, 0.7 * b @ a - 0.3 * b2 @ a2, rtol=1e-6, atol=1e-6)


def test_merged_weight_rounds_once_and_refuses_nonfinite() -> None:
    w = torch.randn(4, 4).to(torch.bfloat16)
    delta = torch.randn(4, 4) * 1e-3
    assert torch.equal(merged_weight(w, delta, "m"), (w.float() + delta).to(torch.bfloat16))
    with pytest.raises(lk.NonFiniteError, match="m"):
        merged_weight(torch.ones(2, 2, dtype=torch.float16), torch.full((2, 2), 1e6), "m")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_update_reports_the_change_of_the_rounded_result(dtype: torch.dtype) -> None:
    w = torch.randn(6, 5).to(dtype)
    delta = torch.randn(6, 5) * 1e-2
    expected = (w.float() + delta).to(dtype)
    out, change = merge_update(w, delta.clone(), "m")
    assert torch.equal(out, expected) and out.dtype == dtype
    assert change == float((expected.float() - w.float()).abs().max())
    bad = torch.zeros(6, 5)
    bad[2, 3] = float("nan")
    with pytest.raises(lk.NonFiniteError, match="m"):
        merge_update(w, bad, "m")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("selection", ["a", {"a": 0.7, "b": -0.3}])
def test_merged_equals_unmerged_fp32(kind: str, selection: object) -> None:
    lm = with_adapters(kind, ("a", "b"))
    sel = selection if isinstance(selection, str) else dict(selection)  # type: ignore[call-overload]
    lm.set_adapter(sel)
    ref = logits(lm, kind)
    with lm.disabled():
        base = logits(lm, kind)
    before = _base_weights(lm)
    report = lm.merge(sel)
    assert lm.merged is not None
    merged = logits(lm, kind)
    torch.testing.assert_close(merged, ref, rtol=0, atol=ATOL)
    # The adapters are in the weights, not added a second time, and they do matter.
    assert (ref - base).abs().max() > 100 * ATOL
    assert report.max_change and all(v > 0 for v in report.max_change.values())
    assert report.kept_bytes == sum(t.numel() * 4 for t in before.values())
    lm.unmerge()
    assert lm.merged is None
    after = _base_weights(lm)
    assert all(torch.equal(before[n], after[n]) for n in before)
    torch.testing.assert_close(logits(lm, kind), ref, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_hundred_cycles_bit_identical(kind: str, dtype: torch.dtype) -> None:
    lm = with_adapters(kind, ("a", "b"), dtype=dtype)
    before = _base_weights(lm)
    merged_once: dict[str, torch.Tensor] = {}
    for i in range(100):
        lm.merge({"a": 1.0, "b": -0.5})
        if i == 0:
            merged_once = _base_weights(lm)
        lm.unmerge()
    after = _base_weights(lm)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert any(not torch.equal(before[n], merged_once[n]) for n in before)


@pytest.mark.parametrize("kind", KINDS)
def test_low_precision_merge_is_rounded_once(kind: str) -> None:
    lm = with_adapters(kind, ("a",), dtype=torch.bfloat16)
    layer = next(m for m in lm.model.modules() if isinstance(m, LoRALinear))
    ad = layer.adapter("a")
    expected = (layer.weight.float() + lora_delta(
        ad.lora_A, ad.lora_B, ad.scaling, fan_in_fan_out=layer.fan_in_fan_out
    )).to(torch.bfloat16)  # fmt: skip
    lm.merge("a")
    assert torch.equal(layer.weight, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unload_is_plain_and_equal(kind: str) -> None:
    lm = with_adapters(kind, ("a", "b"), heads=True)
    sel = {"a": 1.0, "b": 0.5}
    if kind == "bert":  # give the head copies distinct values so the choice is visible
        randomize(lm, "a", seed=3)
    lm.set_adapter(sel)
    ref = logits(lm, kind)
    model = lm.merge_and_unload(sel)
    assert not any(isinstance(m, LoRALinear | SavedModule) for m in model.modules())
    assert not adapters_of(lm)
    assert any(isinstance(m, Conv1D) for m in model.modules()) == (kind == "gpt2")
    torch.testing.assert_close(logits(model, kind), ref, rtol=0, atol=ATOL)


def test_nonfinite_merge_leaves_model_unchanged() -> None:
    lm = with_adapters("gpt2", ("a", "b"))
    with torch.no_grad():
        lm.adapter_parameters("b")[-1].fill_(float("inf"))  # last layer's B
    before = _base_weights(lm)
    with pytest.raises(lk.NonFiniteError, match="nothing was changed"):
        lm.merge({"a": 1.0, "b": 1.0})
    assert lm.merged is None
    assert all(torch.equal(before[n], m) for n, m in _base_weights(lm).items())
    lm.set_adapter("a")  # still usable: not left in a merged state


def test_merged_state_refuses_swap_load_and_training(tmp_path: object) -> None:
    lm = with_adapters("gpt2", ("a", "b"))
    lm.merge("a")
    for call in (
        lambda: lm.set_adapter("b"),
        lambda: lm.load_adapter("nowhere", "c"),
        lambda: lm.delete_adapter("b"),
        lambda: lm.merge("b"),
        lambda: lm.swap_adapter("b", {}),
    ):
        with pytest.raises(lk.MergedStateError, match="unmerge"):
            call()
    with pytest.raises(lk.MergedStateError, match="unmerge"), lm.using("b"):
        pass
    lm.train()
    with pytest.raises(lk.MergedStateError, match="unmerge"):
        lm(input_ids=torch.ones(1, 4, dtype=torch.long))
    lm.eval()
    assert lm.merged is not None  # every refused call left the merge in place
    lm.unmerge()
    lm.set_adapter("b")
    assert lm.unmerge() is None  # nothing merged: a no-op


def test_merge_validates_selection() -> None:
    lm = with_adapters("bert", ("a",))
    with pytest.raises(lk.AdapterNameError):
        lm.merge("nope")
    with pytest.raises(lk.ConfigError):
        lm.merge({"a": float("nan")})
    with pytest.raises(lk.ConfigError):
        lm.merge({})
    assert lm.merged is None


def test_save_adapter_while_merged_keeps_the_base_fingerprint(tmp_path: Path) -> None:
    lm = with_adapters("gpt2", ("a",))
    lm.save_adapter(tmp_path / "before", "a")
    fresh = with_adapters("gpt2", ("a",))
    fresh.merge("a")  # digest not cached before this merge: merge must cache it first
    fresh.save_adapter(tmp_path / "during", "a")
    fp = [read_adapter(tmp_path / d).metadata["base_fingerprint"] for d in ("before", "during")]
    assert fp[0] == fp[1]


def _tied_model(kind: str) -> tuple[torch.nn.Module, str]:
    """A tiny model whose output projection is tied to the token embeddings."""
    from transformers import BertConfig, BertForMaskedLM

    from tests.conftest import tiny_gpt2

    if kind == "gpt2":
        return tiny_gpt2(0), "lm_head"
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    return BertForMaskedLM(config).eval(), "decoder"


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_merge_into_a_tied_weight_is_refused(kind: str) -> None:
    """Merging into GPT-2's lm_head (BERT-MLM's decoder) rewrote the shared token embedding
    too: merged logits were off by ~19 from the unmerged ones."""
    model, head = _tied_model(kind)
    lm = lk.inject(model, lk.LoraConfig(r=4, targets=(head,)))
    randomize(lm, "default", 0)
    inputs = {
        "input_ids": torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    }
    with torch.no_grad():
        before = lm(**inputs).logits
    weights = {k: v.clone() for k, v in lm.state_dict().items()}
    with pytest.raises(lk.ConfigError, match="tied to"):
        lm.merge("default")
    with pytest.raises(lk.ConfigError, match="tied to"):
        lm.merge_and_unload("default")
    assert lm.merged is None and lm.active_adapter == "default"
    assert all(torch.equal(v, weights[k]) for k, v in lm.state_dict().items())
    with torch.no_grad():
        assert torch.equal(lm(**inputs).logits, before)


def test_merged_head_ignores_a_using_block() -> None:
    """Merging inside ``lm.using("a")`` / ``lm.disabled()`` merged b's projections but ran (and
    ``merge_and_unload`` kept) the override's head: logits off by ~4.5 from b's."""
    lm = with_adapters("bert", ("a", "b"), heads=True)
    randomize(lm, "a", seed=3)  # distinct head copies, so the choice is visible
    lm.set_adapter("b")
    ref = logits(lm, "bert")
    lm.set_adapter(None)
    with lm.using("a"):
        report = lm.merge("b")
        assert report.heads == {"classifier": "b"}
        torch.testing.assert_close(logits(lm, "bert"), ref, rtol=0, atol=ATOL)
    lm.unmerge()
    with lm.disabled():
        lm.merge("b")
        torch.testing.assert_close(logits(lm, "bert"), ref, rtol=0, atol=ATOL)
    lm.unmerge()
    with lm.using("a"):
        plain = lm.merge_and_unload("b")
    torch.testing.assert_close(logits(plain, "bert"), ref, rtol=0, atol=ATOL)


# ---- interrupted part-way: all or nothing -------------------------------------------------------


def _interrupt_setting(attribute: str, n: int) -> Callable[..., None]:
    """A ``LoRALinear.__setattr__`` whose ``n``-th assignment of ``attribute`` is interrupted."""
    calls = [0]

    def setattr_(self: nn.Module, key: str, value: object) -> None:
        if key == attribute:
            calls[0] += 1
            if calls[0] == n:
                raise KeyboardInterrupt
        nn.Module.__setattr__(self, key, value)

    return setattr_


@pytest.mark.parametrize("kind", KINDS)
def test_merge_and_unmerge_interrupted_part_way_leave_the_model_whole(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """merge() marked and rewrote the layers one by one and recorded the merge last: an interrupt
    at the third layer left two base weights merged with nothing recorded, so unmerge() did
    nothing and the adapters applied twice. unmerge() interrupted left some layers merged and
    others not."""
    lm = with_adapters(kind, ("a", "b"), heads=True)
    lm.set_adapter("a")
    unmerged = model_state(lm)
    with monkeypatch.context() as patch:
        patch.setattr(LoRALinear, "__setattr__", _interrupt_setting("merged", 3))
        with pytest.raises(KeyboardInterrupt):
            lm.merge({"a": 1.0, "b": -0.5})
    assert model_state(lm) == unmerged
    lm.merge({"a": 1.0, "b": -0.5})
    merged = model_state(lm)
    with monkeypatch.context() as patch:
        patch.setattr(LoRALinear, "__setattr__", _interrupt_setting("merged", 3))
        with pytest.raises(KeyboardInterrupt):
            lm.unmerge()
    assert model_state(lm) == merged
    lm.unmerge()
    assert model_state(lm) == unmerged


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_merge_and_unload_interrupted_part_way_leaves_the_handle_working(
    kind: str, merged: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupt while unwrapping left the model half unwrapped, merged for good (no weights
    kept) yet still recording the merge: unmerge() then dropped the record and the adapters
    applied on top of their merged deltas; retrying with the selection raised."""
    lm = with_adapters(kind, ("a", "b"), heads=True)
    lm.set_adapter("a")
    if merged:
        lm.merge("b")
    selection = None if merged else "a"
    before = model_state(lm)
    broken = fail_on_call(set_submodule, 3, KeyboardInterrupt())
    with monkeypatch.context() as patch:
        patch.setattr("lora_kit.surgery.set_submodule", broken)
        with pytest.raises(KeyboardInterrupt):
            lm.merge_and_unload(selection)
    assert model_state(lm) == before
    reference = logits(lm, kind)
    model = lm.merge_and_unload(selection)
    assert not any(isinstance(m, LoRALinear | SavedModule) for m in model.modules())
    torch.testing.assert_close(logits(model, kind), reference, rtol=0, atol=ATOL)
