"""Packed swappable adapters and the one-copy swap from a fitting file (`lora_kit.swap_packed`).

Tolerances: the one-copy swap and the general path write the same bytes into the same tensors,
so the two are compared bit for bit (tensors, ranks, scalings, head copies and logits).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import lora_kit as lk
import lora_kit.swap_packed as swap_packed
from lora_kit.adapter_io import CONFIG_NAME, WEIGHTS_NAME, read_adapter
from lora_kit.swap import PaddedAdapter, find_packed
from tests.conftest import BERT, Arch, compile_counted, logits, model_state, randomize

RANK = 4


def _save(arch: Arch, root: Path, seed: int, **options: Any) -> Path:
    """An adapter over every projection (and BERT's head), rank 4 unless ``options`` say."""
    spec: dict[str, Any] = {"r": RANK, "alpha": 8, "targets": arch.all_preset}
    if arch.head:
        spec["modules_to_save"] = (arch.head,)
    spec.update(options)
    lm = lk.inject(arch.build(0), lk.LoraConfig(**spec), "x")
    randomize(lm, seed=seed)
    return lm.save_adapter(root / f"adapter-{seed}", "x")


def _live(arch: Arch, path: Path, seed: int = 0) -> lk.LoraModel:
    lm = lk.LoraModel(arch.build(seed))
    lm.load_adapter(path, "live", max_rank=RANK, check_base=seed == 0)
    lm.set_adapter("live")
    return lm


def _adapters(lm: lk.LoraModel) -> dict[str, PaddedAdapter]:
    found = {m: lm._layer(m).adapter("live") for m in lm.adapter_record("live").modules}
    assert all(isinstance(a, PaddedAdapter) for a in found.values())
    return found  # type: ignore[return-value]


def _pointers(lm: lk.LoraModel) -> list[int]:
    return [p.data_ptr() for p in lm.model.parameters()] + [
        b.data_ptr() for b in lm.model.buffers()
    ]


def _general_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the swaps that take the general path (`swap_in`) from a directory."""
    calls: list[int] = []
    real = swap_packed.swap_in

    def counted(*args: Any, **kwargs: Any) -> None:
        calls.append(1)
        real(*args, **kwargs)

    monkeypatch.setattr(swap_packed, "swap_in", counted)
    return calls


def test_make_swappable_packs_every_factor_into_one_buffer(arch: Arch, tmp_path: Path) -> None:
    path = _save(arch, tmp_path, seed=1)
    plain = lk.LoraModel(arch.build(0))
    plain.load_adapter(path, "live")
    plain.set_adapter("live")
    expected = logits(plain, arch.inputs())
    lm = _live(arch, path)
    adapters = _adapters(lm)
    packed = find_packed(adapters)
    assert packed is not None
    storages = {
        t.untyped_storage().data_ptr()
        for a in adapters.values()
        for t in (a.lora_A, a.lora_B)  # every factor views the one buffer
    }
    assert storages == {packed.factors.untyped_storage().data_ptr()}
    assert packed.keys == tuple(sorted(packed.keys))
    assert torch.equal(logits(lm, arch.inputs()), expected)
    before = _pointers(lm)
    lm.make_swappable("live", RANK)  # already packed at this rank: the same tensors
    assert _pointers(lm) == before


def test_one_copy_swap_equals_the_general_path_bit_for_bit(
    arch: Arch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fitting file (same modules and heads, the padded rank) is swapped with one copy; the
    result equals swapping the same adapter through the general path (parsed files)."""
    first = _save(arch, tmp_path, seed=1)
    other = _save(arch, tmp_path, seed=2, alpha=3.0, use_rslora=True)  # other scalings
    fast, general = _live(arch, first), _live(arch, first)
    calls = _general_calls(monkeypatch)
    before = _pointers(fast)
    fast.swap_adapter("live", other)
    assert calls == []  # the one-copy path ran
    assert _pointers(fast) == before  # compile-safe: the same tensors
    general.swap_adapter("live", read_adapter(other))
    assert model_state(fast)["tensors"] == model_state(general)["tensors"]
    for module, adapter in _adapters(fast).items():
        twin = _adapters(general)[module]
        assert adapter.rank == twin.rank == RANK and adapter.scaling == twin.scaling
    assert fast.adapters["live"] == general.adapters["live"]  # the new config, recorded
    assert torch.equal(logits(fast, arch.inputs()), logits(general, arch.inputs()))
    fresh = lk.LoraModel(arch.build(0))
    fresh.load_adapter(other, "live")
    fresh.set_adapter("live")
    torch.testing.assert_close(logits(fast, arch.inputs()), logits(fresh, arch.inputs()))


def _lower_rank(arch: Arch, root: Path) -> Path:
    return _save(arch, root, seed=3, r=2)


def _fewer_modules(arch: Arch, root: Path) -> Path:
    return _save(arch, root, seed=3, targets=arch.attn_preset)


def _half_precision(arch: Arch, root: Path) -> Path:
    path = _save(arch, root, seed=3)
    weights = path / WEIGHTS_NAME
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k).half() for k in handle.keys()}  # noqa: SIM118
    save_file(tensors, str(weights), metadata=metadata)
    return path


@pytest.mark.parametrize(
    "make", [_lower_rank, _fewer_modules, _half_precision], ids=["rank", "subset", "fp16"]
)
def test_files_that_do_not_fit_take_the_general_path(
    arch: Arch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make: Callable[[Arch, Path], Path]
) -> None:
    path = make(arch, tmp_path)
    lm = _live(arch, _save(arch, tmp_path, seed=1))
    calls = _general_calls(monkeypatch)
    lm.swap_adapter("live", path)
    assert calls == [1]
    fresh = lk.LoraModel(arch.build(0))
    fresh.load_adapter(path, "live", max_rank=RANK)
    fresh.set_adapter("live")
    assert torch.equal(logits(lm, arch.inputs()), logits(fresh, arch.inputs()))


def test_a_repacked_base_loses_the_packing_and_swaps_through_the_general_path(
    arch: Arch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``.to(dtype)`` re-stores every tensor: the packing is no longer there, and a swap must
    not write into the old buffer."""
    lm = _live(arch, _save(arch, tmp_path, seed=1))
    other = _save(arch, tmp_path, seed=2)
    lm.swap_adapter("live", other)  # the packing is remembered here
    lm.model.double()
    assert find_packed(_adapters(lm)) is None
    calls = _general_calls(monkeypatch)
    lm.swap_adapter("live", _save(arch, tmp_path, seed=3))
    assert calls == [1]
    fresh = lk.LoraModel(arch.build(0).double())
    fresh.load_adapter(tmp_path / "adapter-3", "live")
    fresh.set_adapter("live")
    # fresh keeps the file's fp32 factors, lm converted them to fp64: fp32 rounding apart
    torch.testing.assert_close(
        logits(lm, arch.inputs()), logits(fresh, arch.inputs()), rtol=1e-5, atol=1e-5
    )
    lm.make_swappable("live", RANK)  # packs again
    assert find_packed(_adapters(lm)) is not None


def _nan(path: Path) -> None:
    weights = path / WEIGHTS_NAME
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    key = sorted(k for k in tensors if "lora_B" in k)[-1]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(weights), metadata=metadata)


def _truncated(path: Path) -> None:
    weights = path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:-8])


def _bad_fingerprint(path: Path) -> None:
    weights = path / WEIGHTS_NAME
    with safe_open(str(weights), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    metadata["lora_kit.base_fingerprint"] = json.dumps({"model_type": 3})
    save_file(tensors, str(weights), metadata=metadata)


def _bad_config(path: Path) -> None:
    data = json.loads((path / CONFIG_NAME).read_text())
    data["use_dora"] = True
    (path / CONFIG_NAME).write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("spoil", "error", "match"),
    [
        (_nan, lk.NonFiniteError, "lora_B.weight' contains NaN"),
        (_truncated, lk.AdapterFormatError, "truncated"),
        (_bad_fingerprint, lk.AdapterFormatError, "base_fingerprint is malformed"),
        (_bad_config, lk.AdapterFormatError, "use_dora"),
    ],
    ids=["nan", "truncated", "fingerprint", "config"],
)
def test_a_spoilt_fitting_file_is_refused_and_changes_nothing(
    arch: Arch,
    tmp_path: Path,
    spoil: Callable[[Path], None],
    error: type[Exception],
    match: str,
) -> None:
    lm = _live(arch, _save(arch, tmp_path, seed=1))
    good = _save(arch, tmp_path, seed=2)
    lm.swap_adapter("live", good)  # memos warm: the spoilt file must still be checked
    bad = _save(arch, tmp_path, seed=3)
    spoil(bad)
    before = model_state(lm)
    with pytest.raises(error, match=match):
        lm.swap_adapter("live", bad)
    assert model_state(lm) == before


def test_another_base_is_refused_even_after_a_swap_from_the_same_fingerprint(
    arch: Arch, tmp_path: Path
) -> None:
    """The fingerprint check is remembered per base state: changing the base weights makes
    the next swap of a file recorded on the old weights fail."""
    lm = _live(arch, _save(arch, tmp_path, seed=1))
    other = _save(arch, tmp_path, seed=2)
    lm.swap_adapter("live", other)
    layer = lm._layer(lm.adapter_record("live").modules[0])
    with torch.no_grad():
        layer.base.weight.add_(1.0)
    before = model_state(lm)
    with pytest.raises(lk.AdapterMismatchError, match="targeted base weights differ"):
        lm.swap_adapter("live", other)
    assert model_state(lm) == before
    lm.swap_adapter("live", other, check_base=False)


def test_a_packed_adapter_saves_and_reloads_exactly(arch: Arch, tmp_path: Path) -> None:
    lm = _live(arch, _save(arch, tmp_path, seed=1))
    lm.swap_adapter("live", _save(arch, tmp_path, seed=2))
    path = lm.save_adapter(tmp_path / "again", "live")
    fresh = lk.LoraModel(arch.build(0))
    fresh.load_adapter(path, "live")
    fresh.set_adapter("live")
    assert torch.equal(logits(lm, arch.inputs()), logits(fresh, arch.inputs()))


def test_a_file_missing_a_tensor_of_the_original_head_is_refused(tmp_path: Path) -> None:
    """The one-copy layout is built from the adapter's head copy; a file must still hold every
    tensor of the original head, as the general path requires (BERT: GPT-2 saves no head).
    Here the copy lost its bias by hand, so a file saved from it has no head bias."""
    lm = _live(BERT, _save(BERT, tmp_path, seed=1))
    lm._saved("classifier").copies["live"].bias = None
    lm.swap_adapter("live", _save(BERT, tmp_path, seed=2))  # memos warm
    spoilt = lm.save_adapter(tmp_path / "no-bias", "live")
    with pytest.raises(lk.AdapterMismatchError, match="missing tensor"):
        lm.swap_adapter("live", read_adapter(spoilt))  # the general path
    before = model_state(lm)
    with pytest.raises(lk.AdapterMismatchError, match="missing tensor"):
        lm.swap_adapter("live", spoilt)
    assert model_state(lm) == before


def test_a_head_copy_changed_after_a_swap_is_not_written_from_a_stale_fit(
    tmp_path: Path,
) -> None:
    """The fit of a config is remembered per plan, which the head copies are not part of: a
    copy edited since (its bias removed by hand) must not fail a later one-copy swap half-way;
    the swap gives what the general path gives (BERT: GPT-2 saves no head)."""
    first, second = _save(BERT, tmp_path, seed=1), _save(BERT, tmp_path, seed=2)
    fast, general = _live(BERT, first), _live(BERT, first)
    fast.swap_adapter("live", second)  # the fit of this config, with the head's bias
    for lm in (fast, general):
        lm._saved("classifier").copies["live"].bias = None
    third = _save(BERT, tmp_path, seed=3)
    fast.swap_adapter("live", third)
    general.swap_adapter("live", read_adapter(third))
    assert model_state(fast)["tensors"] == model_state(general)["tensors"]


def test_one_copy_swaps_do_not_recompile(
    arch: Arch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tests/test_swap.py` compiles through general-path swaps only (other ranks, fewer
    modules); here every swap is a one-copy swap. One compiled layer (the guards are per layer)."""
    files = [_save(arch, tmp_path, seed=s, alpha=a) for s, a in ((2, 3.0), (3, 8), (4, 1.5))]
    lm = _live(arch, _save(arch, tmp_path, seed=1))
    layer = lm._layer(lm.adapter_record("live").modules[-1])
    calls = _general_calls(monkeypatch)
    compiled, counter, x = compile_counted(layer)
    with torch.no_grad():
        compiled(x)
        frames = counter.frame_count
        for path in files:
            lm.swap_adapter("live", path)
            out = compiled(x)
            assert counter.frame_count == frames, "a one-copy swap triggered a recompile"
            assert torch.equal(out, layer(x))  # the compiled layer sees the new weights
    assert calls == []
    torch._dynamo.reset()
