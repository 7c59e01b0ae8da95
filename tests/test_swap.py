"""Compile-safe in-place swapping (``max_rank`` padding, tensor scaling, ``swap_adapter``).

Tolerances: a swapped adapter and a freshly loaded one at the same ``max_rank`` run the very same
operations on the same values, so they are compared bit for bit. Against a plain (unpadded)
load, the padded GEMM has a longer inner dimension whose extra terms are exact zeros; only the
blocking/summation order may change, so fp32 atol 1e-5 (logits are O(1)).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from hotswap_helpers import config_for, input_ids, logits, make_model, randomize

import lora_kit as lk
from lora_kit.layers import TRANSPOSED_DOWN_MAX_ROWS
from lora_kit.swap import PaddedAdapter
from tests.conftest import compile_counted, fail_on_call, model_state


@functools.cache  # references are never mutated; saves model builds
def _fresh(kind: str, path: Path, max_rank: int | None) -> torch.Tensor:
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(path, "x", max_rank=max_rank)
    lm.set_adapter("x")
    return logits(lm, input_ids(3))


def _pointers(lm: lk.LoraModel) -> list[int]:
    return [p.data_ptr() for p in lm.model.parameters()] + [
        b.data_ptr() for b in lm.model.buffers()
    ]


def test_swap_in_place_equals_fresh_load(saved: tuple[str, Path]) -> None:
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live", max_rank=8)
    lm.set_adapter("live")
    before = _pointers(lm)
    for other in ("b", "c", "a"):
        lm.swap_adapter("live", root / other)
        assert _pointers(lm) == before  # same tensors, same storage
        got = logits(lm, input_ids(3))
        assert torch.equal(got, _fresh(kind, root / other, max_rank=8))
        torch.testing.assert_close(got, _fresh(kind, root / other, None), atol=1e-5, rtol=1e-5)
        assert lm.adapter_record("live").source == str(root / other)


def test_padding_leaves_outputs_unchanged(saved: tuple[str, Path]) -> None:
    kind, root = saved
    plain = _fresh(kind, root / "a", None)
    padded = _fresh(kind, root / "a", max_rank=32)
    torch.testing.assert_close(padded, plain, atol=1e-5, rtol=1e-5)
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "x")
    lm.make_swappable("x", 16)
    lm.set_adapter("x")
    assert all(isinstance(m, PaddedAdapter) and m.r == 16 for m in _adapters(lm, "x"))
    torch.testing.assert_close(logits(lm, input_ids(3)), plain, atol=1e-5, rtol=1e-5)


def _adapters(lm: lk.LoraModel, name: str) -> list[lk.LoraAdapter]:
    return [m.adapter(name) for m in lm.model.modules() if isinstance(m, lk.LoRALinear)]


@pytest.mark.parametrize("tokens", [3, TRANSPOSED_DOWN_MAX_ROWS + 1])  # both down_t layouts
def test_padded_adapter_adds_what_the_plain_one_adds(tokens: int) -> None:
    gen = torch.Generator().manual_seed(0)
    plain = lk.LoraAdapter(24, 40, r=4, scaling=2.0)
    with torch.no_grad():
        plain.lora_A.copy_(torch.randn(4, 24, generator=gen))
        plain.lora_B.copy_(torch.randn(40, 4, generator=gen))
    padded = PaddedAdapter(24, 40, max_rank=8, scaling=1.0)
    padded.assign(plain.lora_A.detach(), plain.lora_B.detach(), 2.0)
    x, out = torch.randn(tokens, 24, generator=gen), torch.randn(tokens, 40, generator=gen)
    with torch.no_grad():
        expected = plain.add_to(out.clone(), x, -0.5)
        got = padded.add_to(out.clone(), x, -0.5)
    # Same products; the padded one scales h instead of the GEMM's alpha: fp32 rounding only
    # (updates are O(10)).
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_swap_does_not_recompile(saved: tuple[str, Path]) -> None:
    """One compiled LoRA layer (whole-model compiles take ~15 s here; the guards are per layer)."""
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live", max_rank=8)
    lm.set_adapter("live")
    # A module "a" and "c" adapt but "b" does not (so swapping "b" in must zero it).
    module = {"gpt2": "transformer.h.0.mlp.c_fc", "bert": "bert.encoder.layer.0.intermediate.dense"}
    layer = lm._layer(module[kind])
    compiled, counter, x = compile_counted(layer)
    with torch.no_grad():
        compiled(x)
        frames = counter.frame_count
        assert frames > 0
        for other in ("b", "c", "a"):  # other ranks (8, 2, 4) and alphas
            lm.swap_adapter("live", root / other)
            out = compiled(x)
            assert counter.frame_count == frames, "swap_adapter triggered a recompile"
            assert torch.equal(out, layer(x))  # the compiled layer sees the new weights
            fresh = lk.LoraModel(make_model(kind))
            fresh.load_adapter(root / other, "x")
            fresh.set_adapter("x")
            want = fresh.model.get_submodule(module[kind])(x)  # bare base where "b" has none
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


def test_swap_from_state_dict(saved: tuple[str, Path]) -> None:
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live", max_rank=8)
    lm.set_adapter("live")
    files = lk.read_adapter(root / "a")
    doubled = {k: v * 2 if "lora_B" in k else v for k, v in files.tensors.items()}
    ids = input_ids(3)
    lm.swap_adapter("live", doubled)
    assert not torch.allclose(logits(lm, ids), _fresh(kind, root / "a", 8), atol=1e-3)
    lm.swap_adapter("live", files.tensors)
    assert torch.equal(logits(lm, ids), _fresh(kind, root / "a", 8))


def test_bad_swaps_change_nothing(saved: tuple[str, Path]) -> None:
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "b", "narrow", max_rank=8)  # attention only
    lm.set_adapter("narrow")
    ids = input_ids(3)
    before = logits(lm, ids)
    with pytest.raises(lk.AdapterMismatchError, match="does not adapt"):
        lm.swap_adapter("narrow", root / "a")  # targets more modules
    small = lk.LoraModel(make_model(kind))
    small.load_adapter(root / "c", "c", max_rank=2)
    with pytest.raises(lk.AdapterMismatchError, match="rank"):
        lm.load_adapter(root / "b", "too_big", max_rank=4)  # b has rank 8
    plain = lk.LoraModel(make_model(kind))
    plain.load_adapter(root / "a", "p")
    with pytest.raises(lk.AdapterMismatchError, match=r"needs .p. loaded with max_rank"):
        plain.swap_adapter("p", root / "b")
    assert "too_big" not in lm.adapters
    assert torch.equal(logits(lm, ids), before)
    assert lm.adapter_record("narrow").source == str(root / "b")


def test_save_after_swap_writes_the_unpadded_adapter(
    saved: tuple[str, Path], tmp_path: Path
) -> None:
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live", max_rank=8)
    lm.swap_adapter("live", root / "c")  # rank 2, MLP only (+ BERT head)
    lm.set_adapter("live")
    lm.save_adapter(tmp_path / "out", "live")
    files = lk.read_adapter(tmp_path / "out")
    original = lk.read_adapter(root / "c")
    assert files.tensors.keys() == original.tensors.keys()
    assert all(torch.equal(files.tensors[k], original.tensors[k]) for k in files.tensors)
    reloaded = lk.LoraModel.from_pretrained(make_model(kind), tmp_path / "out", "x")
    ids = input_ids(3)
    torch.testing.assert_close(logits(reloaded, ids), logits(lm, ids), atol=1e-5, rtol=1e-5)


def test_plain_adapter_rejects_a_subset_swap(saved: tuple[str, Path]) -> None:
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "p")  # plain, rank 4 everywhere
    gen = torch.Generator().manual_seed(0)
    state = {
        k: torch.randn(v.shape, generator=gen)
        for k, v in lk.read_adapter(root / "a").tensors.items()
        if "lora_" not in k or ".0." in k  # only layer 0's factors
    }
    with pytest.raises(lk.AdapterMismatchError):
        lm.swap_adapter("p", state)


def test_swap_converts_to_the_resident_dtype(saved: tuple[str, Path]) -> None:
    """A bf16-resident adapter swapped from fp32 files equals a fresh bf16 load, bit for bit."""
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live", max_rank=8, adapter_dtype=torch.bfloat16)
    lm.swap_adapter("live", root / "b")  # "b" adapts a subset of "a"'s modules
    fresh = lk.LoraModel(make_model(kind))
    fresh.load_adapter(root / "b", "x", max_rank=8, adapter_dtype=torch.bfloat16)
    live = _by_module(lm, "live")
    for module, want in _by_module(fresh, "x").items():
        got = live.pop(module)
        assert got.lora_A.dtype == torch.bfloat16
        assert torch.equal(got.lora_A, want.lora_A) and torch.equal(got.lora_B, want.lora_B)
        assert got.scaling == want.scaling
    assert live and all(not a.lora_A.any() and not a.lora_B.any() for a in live.values())


def _by_module(lm: lk.LoraModel, name: str) -> dict[str, lk.LoraAdapter]:
    return {
        n: m.adapter(name)
        for n, m in lm.model.named_modules()
        if isinstance(m, lk.LoRALinear) and name in m.adapters
    }


def test_a_failed_copy_leaves_ranks_and_scalings_as_they_were(
    saved: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranks and scalings are set only after the batched copies have written the tensors."""
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live", max_rank=8)  # every projection, rank 4
    padded = [lm._layer(m).adapter("live") for m in lm.adapter_record("live").modules]
    before = [(p.rank, p.scaling) for p in padded if isinstance(p, PaddedAdapter)]

    def broken(*_: object) -> None:
        raise RuntimeError("copy failed")

    monkeypatch.setattr(torch, "_foreach_copy_", broken)
    with pytest.raises(RuntimeError, match="copy failed"):
        lm.swap_adapter("live", root / "c")  # a subset at rank 2: would zero and re-rank
    assert [(p.rank, p.scaling) for p in padded if isinstance(p, PaddedAdapter)] == before
    assert len(before) == len(padded)


def test_a_swap_failing_part_way_is_made_whole_by_the_next_swap(
    saved: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copies are not undone (the documented window): the next swap rewrites all of it."""
    kind, root = saved
    lm, reference = (lk.LoraModel(make_model(kind)) for _ in range(2))
    for model in (lm, reference):
        model.load_adapter(root / "a", "live", max_rank=8)
    reference.swap_adapter("live", root / "c")
    broken = fail_on_call(torch._foreach_zero_, 1, RuntimeError("injected"))
    with monkeypatch.context() as patch:
        patch.setattr(torch, "_foreach_zero_", broken)  # after the factors are copied
        with pytest.raises(RuntimeError, match="injected"):
            lm.swap_adapter("live", root / "c")
    assert lm.adapter_record("live").source == str(root / "a")  # the record is the old one
    lm.swap_adapter("live", root / "c")
    assert model_state(lm) == model_state(reference)


def test_make_swappable_failing_part_way_leaves_the_adapter_as_it_was(
    saved: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layers were re-stored padded one at a time: a failure at the second left the first padded
    and the rest not (the same outputs, but other tensors than either state)."""
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "a")
    before = model_state(lm)
    broken = fail_on_call(PaddedAdapter.assign, 2, RuntimeError("injected"))
    monkeypatch.setattr(PaddedAdapter, "assign", broken)
    with pytest.raises(RuntimeError, match="injected"):
        lm.make_swappable("a", 8)
    assert model_state(lm) == before
    monkeypatch.undo()
    lm.make_swappable("a", 8)
    assert all(isinstance(a, PaddedAdapter) for a in _by_module(lm, "a").values())


FC = {"gpt2": "c_fc", "bert": "intermediate.dense"}


def _save_variant(kind: str, path: Path, seed: int, **changes: object) -> Path:
    """Save an adapter like "a" (every projection, rank 4, alpha 8) with ``changes``."""
    lm = lk.LoraModel(make_model(kind))
    lm.add_adapter("v", dataclasses.replace(config_for(kind, "a"), **changes))  # type: ignore[arg-type]
    randomize(lm, "v", seed)
    return lm.save_adapter(path, "v")


def test_swap_takes_the_new_adapters_rslora_and_pattern_scalings(
    saved: tuple[str, Path], tmp_path: Path
) -> None:
    kind, root = saved
    path = _save_variant(kind, tmp_path / "rs", seed=7, use_rslora=True,
                         rank_pattern={FC[kind]: 2}, alpha_pattern={FC[kind]: 3.0})  # fmt: skip
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live", max_rank=8)
    lm.set_adapter("live")
    lm.swap_adapter("live", path)
    got = logits(lm, input_ids(3))
    assert torch.equal(got, _fresh(kind, path, max_rank=8))
    torch.testing.assert_close(got, _fresh(kind, path, None), atol=1e-5, rtol=1e-5)


def test_plain_adapter_swap_takes_the_new_scaling(saved: tuple[str, Path], tmp_path: Path) -> None:
    """A plain (unpadded) adapter accepts the same rank with another alpha."""
    kind, root = saved
    path = _save_variant(kind, tmp_path / "v", seed=8, alpha=2.0)  # "a" has alpha 8
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "p")
    lm.set_adapter("p")
    lm.swap_adapter("p", path)
    torch.testing.assert_close(
        logits(lm, input_ids(3)), _fresh(kind, path, None), atol=1e-5, rtol=1e-5
    )


def test_padded_adapters_in_a_mixed_batch_with_autograd(saved: tuple[str, Path]) -> None:
    """With autograd on, mixed batches add each padded adapter's own `delta` (the tensor scale);
    each row equals that row alone (fp32 summation order only, as in test_rows)."""
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    for name in ("a", "b", "c"):
        lm.load_adapter(root / name, name, max_rank=8)
    names: list[str | None] = ["a", "b", None, "c"]
    ids = input_ids(len(names))
    out = lm(input_ids=ids, adapter_names=names).logits  # grad on: rows grouped per adapter
    alone = []
    for row, name in enumerate(names):
        with lm.using(name):
            alone.append(logits(lm, ids[row : row + 1]))
    torch.testing.assert_close(out.detach(), torch.cat(alone), atol=1e-5, rtol=1e-5)


def test_swap_above_the_padded_rank_is_refused_and_changes_nothing(
    saved: tuple[str, Path],
) -> None:
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live", max_rank=4)
    lm.set_adapter("live")
    ids = input_ids(3)
    before = logits(lm, ids)
    tensors = [p.detach().clone() for p in lm.adapter_parameters("live")]
    with pytest.raises(
        lk.AdapterMismatchError, match="has rank 8; adapter 'live' holds its padded"
    ):
        lm.swap_adapter("live", root / "b")  # rank 8, on a subset of "a"'s modules
    assert all(
        torch.equal(p, t) for p, t in zip(lm.adapter_parameters("live"), tensors, strict=True)
    )
    assert torch.equal(logits(lm, ids), before)
    assert lm.adapter_record("live").source == str(root / "a")


def test_bad_state_dicts_are_refused_before_anything_changes(saved: tuple[str, Path]) -> None:
    """A state dict with NaN weights was swapped in silently (files are refused for it), and one
    holding non-tensors failed with a bare AttributeError."""
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live", max_rank=8)
    before = model_state(lm)
    tensors = lk.read_adapter(root / "a").tensors
    key = next(iter(tensors))
    cases: list[tuple[dict[object, object], type[Exception], str]] = [
        ({**tensors, key: tensors[key] * float("nan")}, lk.NonFiniteError, "NaN or infinity"),
        ({**tensors, key: tensors[key].int()}, lk.AdapterFormatError, "not float"),
        ({**tensors, key: 1.0}, lk.AdapterFormatError, "maps PEFT tensor names to tensors"),
    ]
    for state, error, message in cases:
        with pytest.raises(error, match=message):
            lm.swap_adapter("live", state)  # type: ignore[arg-type]
        assert model_state(lm) == before


@pytest.mark.parametrize("cast", ["half", "to"])
def test_scale_stays_fp32_through_dtype_casts(cast: str) -> None:
    """``.half()``/``.to(float16)`` converts floating buffers; a swappable adapter's scale is
    kept fp32 (its documented dtype). In fp16, a scaling of 0.6 (alpha 4.8, r 8) would become
    0.60009765625, and stay so after casting back to fp32."""
    lm = lk.LoraModel(make_model("gpt2"))
    lm.add_adapter("x", lk.LoraConfig(r=8, alpha=4.8))
    lm.make_swappable("x", 8)
    if cast == "half":
        lm.half()
    else:
        lm.to(torch.float16)
    padded = [m for m in lm.modules() if isinstance(m, PaddedAdapter)]
    assert padded and all(m.lora_A.dtype == torch.float16 for m in padded)
    for adapter in padded:
        assert adapter.scale.dtype == torch.float32
        assert torch.equal(adapter.scale, torch.tensor(0.6))  # fp32 0.6, not fp16's
    lm.float()
    assert all(torch.equal(m.scale, torch.tensor(0.6)) for m in padded)


def test_a_swappable_adapter_moves_to_and_from_meta() -> None:
    """Keeping ``scale`` fp32 re-reads the scale before the move, which a meta tensor has no
    value for: ``to_empty`` after ``.to("meta")`` raised NotImplementedError (Cannot copy out
    of meta tensor). It gives an uninitialised fp32 scale, as every other tensor is."""
    lm = lk.LoraModel(make_model("gpt2"))
    lm.add_adapter("x", lk.LoraConfig(r=8, alpha=4.8))
    lm.make_swappable("x", 8)
    lm.to("meta")
    lm.to_empty(device="cpu")
    padded = [m for m in lm.modules() if isinstance(m, PaddedAdapter)]
    assert padded
    for adapter in padded:
        assert adapter.scale.device.type == "cpu" and adapter.scale.dtype == torch.float32
