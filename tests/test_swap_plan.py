"""The remembered layer/adapter resolution behind ``swap_adapter`` (``lora_kit.swap_plan``).

A plan must never be stale: after any change to the model, a swap writes into the adapter
modules the model holds now, or refuses as it did without a plan. Values are compared exactly
(a swap copies bytes; nothing is computed).
"""

from __future__ import annotations

import copy
import gc
import json
import shutil
import weakref
from pathlib import Path

import pytest
import torch
from hotswap_helpers import config_for, make_model, randomize
from safetensors.torch import load_file, save_file

import lora_kit as lk
from lora_kit.adapter_io import CONFIG_NAME, WEIGHTS_NAME
from lora_kit.peft_format import lora_keys
from lora_kit.surgery import set_submodule
from lora_kit.swap_plan import _PLANS, swap_plan
from tests.conftest import tiny_bert, tiny_gpt2


def _assert_holds(lm: lk.LoraModel, name: str, root: Path) -> None:
    """Adapter ``name`` holds exactly the factors of the adapter directory ``root``."""
    tensors = lk.read_adapter(root).tensors
    for module in lm.adapter_record(name).modules:
        adapter = lm._layer(module).adapter(name)
        key_a, key_b = lora_keys(module)
        if key_a not in tensors:  # not adapted by ``root``: zeroed
            assert not adapter.lora_A.any() and not adapter.lora_B.any(), module
            continue
        rank = tensors[key_a].shape[0]
        assert torch.equal(adapter.lora_A[:rank], tensors[key_a]), module
        assert torch.equal(adapter.lora_B[:, :rank], tensors[key_b]), module


def test_plan_is_reused_while_nothing_changes(saved: tuple[str, Path]) -> None:
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live", max_rank=8)
    lm.swap_adapter("live", root / "b")
    plan = _PLANS[lm]["live"]
    lm.swap_adapter("live", root / "a")
    assert _PLANS[lm]["live"] is plan
    _assert_holds(lm, "live", root / "a")


def test_swap_after_delete_and_reload_writes_the_new_tensors(saved: tuple[str, Path]) -> None:
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live", max_rank=8)
    lm.swap_adapter("live", root / "b")
    old = swap_plan(lm, lm.adapter_record("live"))
    old_a = next(iter(old.slots.values())).adapter.lora_A
    lm.delete_adapter("live")
    assert "live" not in _PLANS[lm]
    lm.load_adapter(root / "a", "live", max_rank=8)
    lm.swap_adapter("live", root / "c")
    _assert_holds(lm, "live", root / "c")
    before = old_a.detach().clone()
    lm.swap_adapter("live", root / "b")
    assert torch.equal(old_a, before)  # the deleted adapter's tensor is not written to
    _assert_holds(lm, "live", root / "b")


def test_delete_adapter_frees_the_planned_modules(saved: tuple[str, Path]) -> None:
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "keep")
    lm.load_adapter(root / "a", "live", max_rank=8)
    lm.swap_adapter("live", root / "b")
    module = lm.adapter_record("live").modules[0]
    ref = weakref.ref(lm._layer(module).adapter("live"))
    lm.delete_adapter("live")
    gc.collect()
    assert ref() is None


def test_add_adapter_keeps_the_plan_valid(saved: tuple[str, Path]) -> None:
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "b", "live", max_rank=8)  # a subset of the modules
    lm.swap_adapter("live", root / "b")
    lm.add_adapter("more", lk.LoraConfig(r=2))  # wraps the other modules too
    lm.load_adapter(root / "c", "other")
    lm.swap_adapter("live", root / "b")
    _assert_holds(lm, "live", root / "b")
    lm.delete_adapter("more")
    lm.swap_adapter("live", root / "b")
    _assert_holds(lm, "live", root / "b")


def test_make_swappable_again_replans(saved: tuple[str, Path]) -> None:
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live", max_rank=8)
    lm.swap_adapter("live", root / "c")
    lm.make_swappable("live", 16)  # new PaddedAdapter modules
    lm.swap_adapter("live", root / "b")
    _assert_holds(lm, "live", root / "b")
    assert all(lm._layer(m).adapter("live").r == 16 for m in lm.adapter_record("live").modules)


def test_hand_edited_model_is_refused_not_written_behind(saved: tuple[str, Path]) -> None:
    """A LoRA layer replaced behind lora_kit's back: the swap refuses as it did before."""
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live", max_rank=8)
    lm.swap_adapter("live", root / "b")
    module = lm.adapter_record("live").modules[0]
    set_submodule(lm.model, module, lm._layer(module).base)
    with pytest.raises(lk.LoraKitError, match="was the model edited"):
        lm.swap_adapter("live", root / "a")


@pytest.mark.parametrize("up", [1, 2])
def test_replaced_parent_block_gets_the_swap(saved: tuple[str, Path], up: int) -> None:
    """A block above a planned layer replaced by a copy: the swap writes into the copy."""
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live", max_rank=8)
    lm.swap_adapter("live", root / "b")
    module = lm.adapter_record("live").modules[0]
    block = module.rsplit(".", up)[0]
    old = lm.model.get_submodule(block)
    set_submodule(lm.model, block, copy.deepcopy(old, memo={id(lm.router): lm.router}))
    assert not _PLANS[lm]["live"].is_current(lm)
    lm.swap_adapter("live", root / "a")
    _assert_holds(lm, "live", root / "a")  # walks the model as it is now


def _nan_copy(src: Path, dst: Path, which: int) -> str:
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / WEIGHTS_NAME))
    key = sorted(tensors)[which]
    tensors[key].view(-1)[-1] = float("nan")
    meta = json.loads(json.dumps({"format": "pt"}))
    save_file(tensors, str(dst / WEIGHTS_NAME), metadata=meta)
    assert (dst / CONFIG_NAME).is_file()
    return key


@pytest.mark.parametrize("which", [0, -1])
def test_nan_swap_changes_nothing(saved: tuple[str, Path], tmp_path: Path, which: int) -> None:
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live", max_rank=8)
    lm.swap_adapter("live", root / "b")  # the plan exists
    key = _nan_copy(root / "a", tmp_path / "nan", which)
    with pytest.raises(lk.NonFiniteError, match=key):
        lm.swap_adapter("live", tmp_path / "nan")
    _assert_holds(lm, "live", root / "b")
    assert lm.adapter_record("live").source == str(root / "b")


def test_merge_and_unload_drops_the_plans(saved: tuple[str, Path]) -> None:
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live", max_rank=8)
    lm.swap_adapter("live", root / "b")
    lm.set_adapter("live")
    lm.merge_and_unload()
    assert not _PLANS[lm]


def test_plans_do_not_keep_the_model_alive(saved: tuple[str, Path]) -> None:
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live", max_rank=8)
    lm.swap_adapter("live", root / "b")
    assert "live" in _PLANS[lm]
    ref = weakref.ref(lm)
    del lm
    gc.collect()
    assert ref() is None


def test_rewrapped_model_is_noticed(saved: tuple[str, Path]) -> None:
    """``lm.model`` itself replaced: the plan is not used."""
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live", max_rank=8)
    lm.swap_adapter("live", root / "b")
    plan = _PLANS[lm]["live"]
    assert plan.is_current(lm)
    lm.model = copy.deepcopy(lm.model, memo={id(lm.router): lm.router})
    assert not plan.is_current(lm)
    lm.swap_adapter("live", root / "a")
    _assert_holds(lm, "live", root / "a")


def test_remembered_fingerprint_still_refuses_another_base(
    saved: tuple[str, Path], tmp_path: Path
) -> None:
    """The plan keeps this base's fingerprint per target set; files are still checked against it."""
    kind, root = saved
    other = lk.LoraModel(tiny_gpt2(seed=1) if kind == "gpt2" else tiny_bert(seed=1))
    other.add_adapter("a", config_for(kind, "a"))  # same targets and ranks, another base
    randomize(other, "a", seed=3)
    other.save_adapter(tmp_path / "other", "a")

    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live", max_rank=8)
    lm.swap_adapter("live", root / "b")  # attention only: one target set
    lm.swap_adapter("live", root / "a")  # every projection: another
    plan = swap_plan(lm, lm.adapter_record("live"))
    assert len(plan._fingerprints) == 2
    with pytest.raises(lk.AdapterMismatchError, match="targeted base weights differ"):
        lm.swap_adapter("live", tmp_path / "other")
    _assert_holds(lm, "live", root / "a")  # unchanged
    lm.swap_adapter("live", tmp_path / "other", check_base=False)
    _assert_holds(lm, "live", tmp_path / "other")


@pytest.mark.parametrize("how", ["replaced parameter", "replaced base module"])
def test_remembered_fingerprint_follows_a_replaced_base_weight(
    saved: tuple[str, Path], tmp_path: Path, how: str
) -> None:
    """A base weight swapped for another tensor (``load_state_dict(assign=True)``, a new
    projection module) is hashed again: the remembered fingerprint is not reused."""
    kind, root = saved
    other = lk.LoraModel(tiny_gpt2(seed=1) if kind == "gpt2" else tiny_bert(seed=1))
    other.add_adapter("a", config_for(kind, "a"))
    randomize(other, "a", seed=3)
    other.save_adapter(tmp_path / "other", "a")  # saved on the seed-1 base

    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live", max_rank=8)
    lm.swap_adapter("live", root / "a")  # the plan remembers the seed-0 fingerprint
    donor = lk.LoraModel(tiny_gpt2(seed=1) if kind == "gpt2" else tiny_bert(seed=1))
    donor.add_adapter("live", config_for(kind, "a"))
    for module in lm.adapter_record("live").modules:
        layer, source = lm._layer(module), donor._layer(module)
        if how == "replaced parameter":
            state = {"weight": source.base.weight.detach().clone()}
            layer.base.load_state_dict(state, strict=False, assign=True)
        else:
            layer.base = copy.deepcopy(source.base)
    lm.swap_adapter("live", tmp_path / "other")  # now the seed-1 base: accepted
    _assert_holds(lm, "live", tmp_path / "other")
    with pytest.raises(lk.AdapterMismatchError, match="targeted base weights differ"):
        lm.swap_adapter("live", root / "a")  # saved on the seed-0 base
