"""Registered adapters: lazy loading, LRU eviction under a budget, transparent reload.

A reloaded adapter comes from the same file into the same model, so outputs are compared bit
for bit; mixed batches against per-row references use the atol 1e-5 of test_rows.py.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
from hotswap_helpers import input_ids, logits, make_model, save_adapters

import lora_kit as lk
from tests.conftest import fail_on_call


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_adapters("gpt2", tmp_path_factory.mktemp("lib"))


def _registered(root: Path, budget: int | None = 2) -> lk.LoraModel:
    lm = lk.LoraModel(make_model("gpt2"))
    lm.set_cache_budget(max_resident=budget)
    for name in ("a", "b", "c"):
        lm.register_adapter(name, root / name)
    return lm


def _reference(root: Path, ids: torch.Tensor) -> dict[str | None, torch.Tensor]:
    lm = lk.LoraModel(make_model("gpt2"))
    refs: dict[str | None, torch.Tensor] = {None: logits(lm, ids)}
    for name in ("a", "b", "c"):
        lm.load_adapter(root / name, name)
        with lm.using(name):
            refs[name] = logits(lm, ids)
    return refs


def test_registering_thousands_costs_only_metadata(root: Path) -> None:
    lm = lk.LoraModel(make_model("gpt2"))
    for i in range(2000):
        lm.register_adapter(f"t{i}", root / "abc"[i % 3])
    assert len(lm.cache.registered) == 2000
    assert lm.cache.loads == 0 and not lm.adapters
    assert not any(isinstance(m, lk.LoRALinear) for m in lm.model.modules())
    ids = input_ids(2)
    with lm.using("t1999"):  # loaded on first use only
        assert lm.cache.resident == ("t1999",)
        assert torch.equal(logits(lm, ids), _reference(root, ids)["abc"[1999 % 3]])


def test_lru_eviction_and_transparent_reload(root: Path) -> None:
    lm = _registered(root)
    ids = input_ids(2)
    refs = _reference(root, ids)
    for name in ("a", "b", "c"):
        with lm.using(name):
            assert torch.equal(logits(lm, ids), refs[name])
    assert lm.cache.resident == ("b", "c") and "a" not in lm.adapters
    assert lm.cache.evictions == 1
    with lm.using("a"):  # reloaded from its source, evicting the LRU ("b")
        assert torch.equal(logits(lm, ids), refs["a"])
    assert lm.cache.resident == ("c", "a") and lm.cache.loads == 4
    with lm.using("c"):  # resident: no reload
        assert torch.equal(logits(lm, ids), refs["c"])
    assert lm.cache.loads == 4


def test_mixed_batch_pins_every_adapter_it_uses(root: Path) -> None:
    lm = _registered(root, budget=1)
    ids = input_ids(4)
    names: list[str | None] = ["a", "b", None, "c"]
    refs = _reference(root, ids)
    got = logits(lm, ids, adapter_names=names)
    for row, name in enumerate(names):
        torch.testing.assert_close(got[row], refs[name][row], atol=1e-5, rtol=1e-5)
    assert len(lm.cache.resident) == 1  # back within budget once the call is over


def test_default_adapter_is_never_evicted(root: Path) -> None:
    lm = _registered(root, budget=1)
    ids = input_ids(2)
    refs = _reference(root, ids)
    lm.set_adapter("b")
    with lm.using("a"):
        assert torch.equal(logits(lm, ids), refs["a"])
    assert "b" in lm.adapters and "a" not in lm.adapters
    assert torch.equal(logits(lm, ids), refs["b"])
    lm.set_adapter("c")  # "b" is no longer pinned: evicted
    assert lm.cache.resident == ("c",)


def test_byte_budget(root: Path) -> None:
    lm = _registered(root, budget=None)
    with lm.using("a"):
        size_a = lm.cache.resident_bytes
    lm.set_cache_budget(max_bytes=size_a)
    with lm.using("b"):
        pass
    assert lm.cache.resident_bytes <= size_a and lm.cache.resident == ("b",)
    with pytest.raises(lk.ConfigError):
        lm.set_cache_budget(max_resident=0)


def test_threads_with_eviction_pressure(root: Path) -> None:
    torch.set_num_threads(1)
    lm = _registered(root, budget=1)
    ids = input_ids(2)
    refs = _reference(root, ids)
    barrier = threading.Barrier(3)
    errors: list[str] = []

    def work(name: str) -> None:
        barrier.wait()
        for _ in range(4):
            with lm.using(name):
                if not torch.equal(logits(lm, ids), refs[name]):
                    errors.append(name)

    threads = [threading.Thread(target=work, args=(n,)) for n in ("a", "b", "c")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(lm.cache.resident) == 1


def test_errors(root: Path, tmp_path: Path) -> None:
    lm = _registered(root)
    with pytest.raises(lk.AdapterNameError, match="already registered"):
        lm.register_adapter("a", root / "b")
    lm.register_adapter("gone", tmp_path / "missing")
    with pytest.raises(lk.AdapterFormatError), lm.using("gone"):
        pass
    with pytest.raises(lk.AdapterNameError, match="no adapter named 'zz'"), lm.using("zz"):
        pass
    assert lm.cache.resident == () and lm.active == lk.Selection()
    lm.cache.unregister("gone")
    assert "gone" not in lm.cache.registered


def test_reload_inside_inference_mode(root: Path) -> None:
    """A transparent (re)load inside a torch.inference_mode request keeps serving mixed batches."""
    lm = _registered(root, budget=1)
    ids = input_ids(3)
    refs = _reference(root, ids)
    names: list[str | None] = ["a", "b", "c"]
    for _ in range(2):  # the second round reloads what the first evicted
        with torch.inference_mode():
            got = lm(input_ids=ids, adapter_names=names).logits
        for row, name in enumerate(names):
            torch.testing.assert_close(got[row], refs[name][row], atol=1e-5, rtol=1e-5)


def test_eviction_while_merged_keeps_the_cache_consistent(root: Path) -> None:
    """Adapters cannot be deleted while merged: eviction waits, nothing is half-forgotten."""
    lm = _registered(root, budget=2)
    ids = input_ids(2)
    refs = _reference(root, ids)
    for name in ("a", "b"):
        with lm.using(name):
            pass
    lm.merge("a")
    lm.set_cache_budget(max_resident=1)  # over budget, but nothing can be evicted now
    # (least recently used first: merging used "a")
    assert lm.cache.resident == ("b", "a") and set(lm.adapters) == {"a", "b"}
    with pytest.raises(lk.MergedStateError):
        lm.cache.unregister("b")
    assert lm.cache.resident == ("b", "a") and "b" in lm.cache.registered
    lm.unmerge()
    for name in ("b", "a"):
        with lm.using(name):
            assert torch.equal(logits(lm, ids), refs[name])
    assert lm.cache.resident == ("a",) and set(lm.adapters) == {"a"}  # budget enforced again


def test_swapped_registered_adapter_survives_eviction(root: Path) -> None:
    """An in-place swap into a registered adapter is what it reloads after an eviction."""
    lm = lk.LoraModel(make_model("gpt2"))
    lm.set_cache_budget(max_resident=1)
    lm.register_adapter("live", root / "a", max_rank=8)
    lm.register_adapter("other", root / "b")
    ids = input_ids(2)
    refs = _reference(root, ids)
    with lm.using("live"):
        lm.swap_adapter("live", root / "c")
        assert torch.allclose(logits(lm, ids), refs["c"], atol=1e-5)
        with pytest.raises(lk.AdapterNameError, match="state dict"):  # cannot be reloaded
            lm.swap_adapter("live", {})
    with lm.using("other"):  # evicts "live"
        pass
    assert "live" not in lm.adapters
    with lm.using("live"):  # reloaded: still the swapped-in adapter, not the registered one
        assert torch.allclose(logits(lm, ids), refs["c"], atol=1e-5)


def test_swap_into_a_registered_adapter_the_cache_does_not_hold(root: Path) -> None:
    """A registered adapter that is evicted, or was never selected, is loaded and then swapped
    (it used to be refused as "no adapter named ...")."""
    lm = lk.LoraModel(make_model("gpt2"))
    lm.set_cache_budget(max_resident=1)
    lm.register_adapter("live", root / "a", max_rank=8)
    lm.register_adapter("fresh", root / "a", max_rank=8)
    lm.register_adapter("other", root / "b")
    ids = input_ids(2)
    refs = _reference(root, ids)
    for name, source in (("live", "c"), ("fresh", "b")):
        if name == "live":
            with lm.using(name):  # loaded, then evicted by "other"
                pass
        with lm.using("other"):
            pass
        assert name not in lm.adapters
        lm.swap_adapter(name, root / source)
        with lm.using(name):
            assert torch.allclose(logits(lm, ids), refs[source], atol=1e-5)
        with lm.using("other"):  # evicted again: it reloads what was swapped in
            pass
        with lm.using(name):
            assert torch.allclose(logits(lm, ids), refs[source], atol=1e-5)


def test_a_registered_name_cannot_be_loaded_directly(root: Path) -> None:
    """Loading or adding under a registered name is refused, so the cache can still load it."""
    lm = _registered(root, budget=1)
    ids = input_ids(2)
    refs = _reference(root, ids)
    with pytest.raises(lk.AdapterNameError, match="registered with the adapter cache"):
        lm.load_adapter(root / "b", "a")  # "a" is registered, not resident
    with pytest.raises(lk.AdapterNameError, match="registered with the adapter cache"):
        lm.add_adapter("a", lk.LoraConfig(r=2))
    assert "a" not in lm.adapters
    with lm.using("a"):  # the cache loads it from its own source
        assert torch.equal(logits(lm, ids), refs["a"])
    lm.cache.unregister("a")
    lm.load_adapter(root / "b", "a")  # once unregistered the name is free again
    assert "a" in lm.adapters


def _a_resident_b_not(
    root: Path,
) -> tuple[lk.LoraModel, torch.Tensor, dict[str | None, torch.Tensor]]:
    """Budget 1, "a" resident (the others registered only); input ids and reference logits."""
    lm = _registered(root, budget=1)
    ids = input_ids(2)
    refs = _reference(root, ids)
    with lm.using("a"):
        pass
    return lm, ids, refs


def test_merging_a_registered_adapter_loads_it(root: Path) -> None:
    # merge() looked only at resident adapters: merging a registered, evicted adapter raised
    # AdapterNameError although set_adapter/using load it transparently.
    lm, ids, refs = _a_resident_b_not(root)
    assert lm.cache.resident == ("a",)
    lm.merge("b")
    assert torch.allclose(logits(lm, ids), refs["b"], atol=1e-5)  # merged: rounding only
    with pytest.raises(lk.MergedStateError):
        lm.merge("c")  # refused before anything is loaded
    assert "c" not in lm.adapters
    lm.unmerge()
    with lm.using("c"):  # after unmerge, eviction goes on as usual
        assert torch.equal(logits(lm, ids), refs["c"])
    assert lm.cache.resident == ("c",)


def test_merge_and_unload_loads_a_registered_adapter_too(root: Path) -> None:
    # d39705e made merge() load a registered adapter that is not resident; merge_and_unload()
    # with a selection still raised AdapterNameError ("no adapter named 'b'").
    lm, ids, refs = _a_resident_b_not(root)
    plain = lm.merge_and_unload("b")
    assert not any(isinstance(m, lk.LoRALinear) for m in plain.modules())
    assert torch.allclose(logits(plain, ids), refs["b"], atol=1e-5)  # merged: rounding only


def test_merge_and_unload_forgets_the_registered_adapters(root: Path) -> None:
    """The cache kept listing its adapters as registered and resident after merge_and_unload,
    and selecting one later reloaded it onto the merged base (with check_base=False, adding it a
    second time on top of the merged weights)."""
    lm, ids, _ = _a_resident_b_not(root)
    plain = lm.merge_and_unload("b")
    merged = logits(plain, ids)
    assert lm.cache.registered == () and lm.cache.resident == ()
    with pytest.raises(lk.AdapterNameError, match="'c'"):
        lm.set_adapter("c")  # nothing left to load it from: an unknown name
    assert torch.equal(logits(lm, ids), merged)  # the handle still runs the merged model


def test_an_invalid_selection_loads_and_evicts_nothing(root: Path) -> None:
    """A selection naming a registered adapter beside an unknown name (or with a NaN weight)
    loaded the registered one, evicting another to make room, before it was refused."""
    lm = _registered(root, budget=1)
    with lm.using("a"):
        pass
    loads, resident = lm.cache.loads, lm.cache.resident
    for bad in ({"b": 1.0, "nope": 1.0}, {"b": float("nan")}):
        with pytest.raises(lk.LoraKitError):
            lm.set_adapter(bad)
        with pytest.raises(lk.LoraKitError), lm.using(bad):
            pass
        with pytest.raises(lk.LoraKitError):
            lm.merge(bad)
    with pytest.raises(lk.AdapterNameError):
        logits(lm, input_ids(2), adapter_names=["b", "nope"])
    assert (lm.cache.loads, lm.cache.resident) == (loads, resident)
    assert list(lm.adapters) == ["a"] and lm.active.weights == ()


def test_a_failed_eviction_unpins_what_the_call_pinned(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The adapter a call loads is pinned before idle ones are evicted to make room: when
    evicting raised, it stayed pinned for good, so the cache could never evict it again."""
    lm = _registered(root, budget=1)
    with lm.using("a"):
        pass
    broken = fail_on_call(lk.LoraModel.delete_adapter, 1, RuntimeError("injected"))
    with monkeypatch.context() as patch:
        patch.setattr(lk.LoraModel, "delete_adapter", broken)
        with pytest.raises(RuntimeError, match="injected"), lm.using("b"):
            pass
    assert set(lm.adapters) == set(lm.cache.resident)
    with lm.using("c"):
        assert lm.cache.resident == ("c",) and list(lm.adapters) == ["c"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resident_bytes_are_the_adapter_tensors_bytes(root: Path, dtype: torch.dtype) -> None:
    """``max_bytes`` counts bytes, not elements: the reference is the element count of the
    adapter's file times the loaded dtype's size (exact integers)."""
    from safetensors.torch import load_file

    lm = lk.LoraModel(make_model("gpt2"))
    lm.register_adapter("a", root / "a", adapter_dtype=dtype)
    elements = sum(
        t.numel() for t in load_file(str(root / "a" / "adapter_model.safetensors")).values()
    )
    with lm.using("a"):
        assert lm.cache.resident_bytes == elements * torch.finfo(dtype).bits // 8
    lm.set_cache_budget(max_bytes=elements * torch.finfo(dtype).bits // 8 - 1)  # one byte short
    assert lm.cache.resident == () and lm.cache.evictions == 1


def test_adapter_deleted_behind_the_cache_is_reloaded(root: Path) -> None:
    """``delete_adapter`` on a resident registered adapter: the next use reloads it from its
    source (bit-identical output: same file, same model)."""
    lm = _registered(root, budget=None)
    ids = input_ids(2)
    refs = _reference(root, ids)
    with lm.using("a"):
        pass
    lm.delete_adapter("a")
    assert "a" not in lm.adapters
    with lm.using("a"):
        assert torch.equal(logits(lm, ids), refs["a"])
    assert lm.cache.loads == 2 and lm.cache.resident == ("a",)


def test_an_adapter_in_use_cannot_be_unregistered(root: Path) -> None:
    """Unregistering deletes the adapter: refused while a call pins it, allowed once idle."""
    lm = _registered(root, budget=None)
    with lm.using("a"):
        with pytest.raises(lk.AdapterNameError, match="in use"):
            lm.cache.unregister("a")
        assert "a" in lm.adapters
    lm.cache.unregister("a")
    assert "a" not in lm.adapters and not lm.cache.is_registered("a")


def _fail_in_using(lm: lk.LoraModel) -> None:
    with lm.using("a"):
        raise ValueError("the call failed")


def _fail_in_merge(lm: lk.LoraModel, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_merge(*args: object) -> None:
        raise ValueError("the call failed")

    monkeypatch.setattr("lora_kit.merge.merge", failing_merge)
    lm.merge("a")


def _fail_in_forward(lm: lk.LoraModel) -> None:
    ids = torch.full((2, 4), 10_000)  # past the vocabulary: the embedding raises IndexError
    lm(input_ids=ids, adapter_names=["a", "a"])


@pytest.mark.parametrize(
    ("call", "expected"),
    [("using", ValueError), ("merge", ValueError), ("adapter_names", IndexError)],
)
def test_a_failed_eviction_on_release_does_not_hide_the_calls_error(
    root: Path, monkeypatch: pytest.MonkeyPatch, call: str, expected: type[Exception]
) -> None:
    """A call that raised released its adapters on the way out; when that release evicted and
    the eviction raised too, the eviction's error replaced the call's own."""
    lm = _registered(root, budget=1)
    lm.set_adapter("b")  # pinned as the default: "a" is the one evicted on release
    broken = fail_on_call(lk.LoraModel.delete_adapter, 1, RuntimeError("eviction failed"))
    monkeypatch.setattr(lk.LoraModel, "delete_adapter", broken)
    with pytest.raises(expected) as raised:
        if call == "using":
            _fail_in_using(lm)
        elif call == "merge":
            _fail_in_merge(lm, monkeypatch)
        else:
            _fail_in_forward(lm)
    notes = getattr(raised.value, "__notes__", [])
    assert any("eviction failed" in note for note in notes), notes
    monkeypatch.undo()
    assert lm.cache.resident == ("b", "a")  # the failed eviction kept "a", unpinned:
    with lm.using("c"):  # the next release evicts it
        pass
    assert lm.cache.resident == ("b",)


def test_an_adapter_loaded_for_a_failed_call_stays_resident_and_evictable(root: Path) -> None:
    """Documented: a failed call's adapter is not unloaded (a retry would reload it); it is
    unpinned like any idle one and the budget evicts it as usual."""
    lm = _registered(root, budget=1)
    with pytest.raises(IndexError):
        _fail_in_forward(lm)
    assert lm.cache.resident == ("a",) and lm.cache.loads == 1
    with lm.using("b"):
        pass
    assert lm.cache.resident == ("b",) and list(lm.adapters) == ["b"]


def test_eviction_after_swapping_in_fewer_modules_keeps_the_registered_module_set(
    root: Path,
) -> None:
    """A registered swappable adapter swapped to a file over fewer modules and then evicted
    reloads over the modules it was registered with (it used to reload over the fewer ones
    only, and swapping back to a file over all of them was refused).

    Swapped back, it matches a fresh load of that file at the same ``max_rank`` bit for bit:
    the same padded tensors, values and scale in the same kernels on one CPU.
    """
    lm = lk.LoraModel(make_model("gpt2"))
    lm.set_cache_budget(max_resident=1)
    lm.register_adapter("live", root / "a", max_rank=8)  # "a" adapts every module
    lm.register_adapter("other", root / "b")
    ids = input_ids(2)
    with lm.using("live"):
        modules = lm.adapter_record("live").modules
    lm.swap_adapter("live", root / "b")  # "b" adapts c_attn only
    with lm.using("other"):  # evicts "live"
        pass
    assert "live" not in lm.adapters
    fresh_b = lk.LoraModel(make_model("gpt2"))
    fresh_b.load_adapter(root / "b", "live", max_rank=8)
    with lm.using("live"), fresh_b.using("live"):  # reloaded: still "b", over every module
        assert lm.adapter_record("live").modules == modules
        assert torch.equal(logits(lm, ids), logits(fresh_b, ids))
    lm.swap_adapter("live", root / "a")  # was AdapterMismatchError
    fresh_a = lk.LoraModel(make_model("gpt2"))
    fresh_a.load_adapter(root / "a", "live", max_rank=8)
    with lm.using("live"), fresh_a.using("live"):
        assert torch.equal(logits(lm, ids), logits(fresh_a, ids))
    with lm.using("other"):  # evicts "live" again: back on its registered source, a plain
        pass  # reload follows (it also loaded "a" a second time, to swap it into itself)
    swaps: list[str] = []
    swap = lk.LoraModel._swap

    def counted(self: lk.LoraModel, name: str, *args: object, **kwargs: object) -> None:
        swaps.append(name)
        swap(self, name, *args, **kwargs)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lk.LoraModel, "_swap", counted)
        with lm.using("live"), fresh_a.using("live"):
            assert torch.equal(logits(lm, ids), logits(fresh_a, ids))
    assert swaps == []


def test_a_registered_adapter_made_swappable_reloads_swappable(root: Path) -> None:
    """``make_swappable`` on a resident registered adapter was forgotten at its eviction: it
    reloaded unpadded, and a swap at a rank above its own was then refused."""
    from lora_kit.swap import PaddedAdapter

    lm = lk.LoraModel(make_model("gpt2"))
    lm.set_cache_budget(max_resident=1)
    lm.register_adapter("live", root / "a")  # rank 4, every module
    lm.register_adapter("other", root / "c")
    with lm.using("live"):
        lm.make_swappable("live", 8)
    with lm.using("other"):  # evicts "live"
        pass
    assert "live" not in lm.adapters
    lm.swap_adapter("live", root / "b")  # reloads "live" first; b's rank 8 needs the padding
    layers = [m for m in lm.model.modules() if isinstance(m, lk.LoRALinear)]
    layers = [m for m in layers if "live" in m.adapters]
    assert layers and all(isinstance(m.adapter("live"), PaddedAdapter) for m in layers)
    assert all(m.adapter("live").r == 8 for m in layers)


def test_a_reload_whose_swap_fails_leaves_nothing_loaded(root: Path, tmp_path: Path) -> None:
    """The reload of a swapped registered adapter loads its registered source and swaps the
    swapped-in one into it; when that swap fails (its files are gone) the load is taken back,
    so fixing the files and selecting it again reloads it."""
    moved = tmp_path / "b"
    shutil.copytree(root / "b", moved)
    lm = lk.LoraModel(make_model("gpt2"))
    lm.set_cache_budget(max_resident=1)
    lm.register_adapter("live", root / "a", max_rank=8)
    lm.register_adapter("other", root / "c")
    lm.swap_adapter("live", moved)
    with lm.using("other"):  # evicts "live"
        pass
    shutil.rmtree(moved)
    with pytest.raises(lk.LoraKitError), lm.using("live"):
        pass
    assert "live" not in lm.adapters and "live" not in lm.cache.resident
    shutil.copytree(root / "b", moved)
    ids = input_ids(2)
    fresh = lk.LoraModel(make_model("gpt2"))
    fresh.load_adapter(root / "b", "live", max_rank=8)
    with lm.using("live"), fresh.using("live"):
        assert torch.equal(logits(lm, ids), logits(fresh, ids))
