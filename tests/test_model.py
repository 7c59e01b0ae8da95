"""LoraModel: injection, selection, multiple adapters, training touches adapters only."""

from __future__ import annotations

import copy
import dataclasses
from fractions import Fraction
from pathlib import Path

import pytest
import torch

import lora_kit as lk
from lora_kit import LoRALinear
from lora_kit import model as model_module
from lora_kit.layers import LoraAdapter
from lora_kit.saved_modules import SavedModule
from lora_kit.surgery import unwrap_if_empty
from lora_kit.swap import PaddedAdapter
from tests.conftest import (
    Arch,
    fail_on_call,
    logits,
    model_state,
    randomize,
    state_copy,
    tiny_gpt2,
)
from tests.hotswap_helpers import aten_ops, config_for, input_ids, model_with_adapters
from tests.hotswap_helpers import logits as logits_of


def test_fresh_adapter_is_bit_identical_then_changes(arch: Arch, forward_path: str) -> None:
    model = arch.build(0)
    reference = copy.deepcopy(model)
    inputs = arch.inputs()
    lm = lk.inject(model, lk.LoraConfig(r=4, targets=arch.all_preset))
    assert torch.equal(logits(lm, inputs), logits(reference, inputs))  # zero B: exact no-op
    randomize(lm)
    assert not torch.allclose(logits(lm, inputs), logits(reference, inputs), atol=1e-3)


def test_injection_wraps_in_place_and_freezes_the_base(arch: Arch) -> None:
    model = arch.build(0)
    before = state_copy(model)
    lm = lk.inject(model, lk.LoraConfig(r=4, targets=arch.all_preset))
    assert lm.model is model
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == (8 if arch.name == "gpt2" else 12)
    for name, tensor in state_copy(lm.model).items():
        if ".adapters." not in name:
            assert torch.equal(tensor, before[name.replace(".base.", ".")])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters.default.lora_" in n for n in trainable)


def test_one_optimizer_step_changes_only_adapter_and_head(arch: Arch) -> None:
    model = arch.build(0)
    config = lk.LoraConfig(
        r=4, targets=arch.attn_preset, modules_to_save=(arch.head,) if arch.head else ()
    )
    lm = lk.inject(model, config).train()
    randomize(lm)
    before = state_copy(lm)
    optim = torch.optim.AdamW(lm.adapter_parameters("default"), lr=1e-2)
    inputs = arch.inputs()
    labels = inputs["input_ids"] if arch.name == "gpt2" else torch.tensor([0, 2])
    lm(**inputs, labels=labels).loss.backward()
    optim.step()
    changed = {k for k, v in state_copy(lm).items() if not torch.equal(v, before[k])}
    expected_kinds = {".adapters.default.lora_A", ".adapters.default.lora_B"}
    if arch.head:
        expected_kinds.add(".copies.default.")
    assert changed and all(any(kind in k for kind in expected_kinds) for k in changed)
    assert any(".copies.default." in k for k in changed) == bool(arch.head)


def test_second_adapter_reuses_layers_and_selection_switches(arch: Arch) -> None:
    model = arch.build(0)
    inputs = arch.inputs()
    base_out = logits(model, inputs)
    lm = lk.inject(model, lk.LoraConfig(r=4, targets=arch.attn_preset))
    lm.add_adapter("other", lk.LoraConfig(r=2, targets=arch.all_preset))
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == (8 if arch.name == "gpt2" else 12)  # attn layers wrapped once
    randomize(lm)
    assert lm.active_adapter == "default"
    out_default = logits(lm, inputs)
    lm.set_adapter("other")
    out_other = logits(lm, inputs)
    assert not torch.allclose(out_default, out_other)
    lm.set_adapter(None)
    assert torch.equal(logits(lm, inputs), base_out)
    lm.set_adapter({"default": 1.0, "other": 1.0})
    both = logits(lm, inputs)
    assert not torch.allclose(both, out_default) and not torch.allclose(both, out_other)
    assert set(lm.adapters) == {"default", "other"}


def test_disabled_and_using_restore_even_on_error(arch: Arch) -> None:
    lm = lk.inject(arch.build(0), lk.LoraConfig(r=4))
    randomize(lm)
    inputs = arch.inputs()
    with_adapter = logits(lm, inputs)
    with lm.disabled():
        assert torch.equal(logits(lm, inputs), logits(lm.model, inputs))
        assert lm.active.weights == ()
    with pytest.raises(RuntimeError), lm.disabled():
        raise RuntimeError("boom")
    assert lm.active_adapter == "default"
    assert torch.equal(logits(lm, inputs), with_adapter)
    lm.add_adapter("b", lk.LoraConfig(r=2))
    with lm.using("b"):
        assert lm.active_adapter == "b"
    assert lm.active_adapter == "default"


def test_delete_adapter_unwraps_and_frees(arch: Arch) -> None:
    model = arch.build(0)
    reference = copy.deepcopy(model)
    lm = lk.inject(model, lk.LoraConfig(r=4, targets=arch.attn_preset))
    lm.add_adapter(
        "wide",
        lk.LoraConfig(
            r=2, targets=arch.all_preset, modules_to_save=(arch.head,) if arch.head else ()
        ),
    )
    lm.set_adapter("wide")
    lm.delete_adapter("wide")
    assert lm.active.weights == () and set(lm.adapters) == {"default"}
    assert not any(".adapters.wide." in k or ".copies." in k for k in lm.state_dict())
    lm.delete_adapter("default")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert list(state_copy(model)) == list(state_copy(reference))  # original structure back


def test_name_errors(arch: Arch) -> None:
    lm = lk.inject(arch.build(0), lk.LoraConfig(r=4))
    with pytest.raises(lk.AdapterNameError, match="already exists"):
        lm.add_adapter("default", lk.LoraConfig(r=2))
    with pytest.raises(lk.AdapterNameError, match="invalid"):
        lm.add_adapter("a.b", lk.LoraConfig(r=2))
    with pytest.raises(lk.AdapterNameError, match="no adapter named 'nope'.*default"):
        lm.set_adapter("nope")
    with pytest.raises(lk.ConfigError, match="finite"):
        lm.set_adapter({"default": float("inf")})
    with pytest.raises(lk.LoraKitError, match="already has lora_kit layers"):
        lk.inject(lm.model, lk.LoraConfig())


def test_failed_injection_leaves_the_model_untouched(arch: Arch) -> None:
    model = arch.build(0)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(lk.NoTargetsError):
        lk.inject(model, lk.LoraConfig(targets=["nothing_here"]))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_trainable_parameters_summary(arch: Arch) -> None:
    lm = lk.inject(arch.build(0), lk.LoraConfig(r=4, targets=arch.attn_preset))
    summary = lm.trainable_parameters()
    per_layer = {"gpt2": 4 * 32 + 96 * 4, "bert": 4 * 32 + 32 * 4}[arch.name]
    assert summary.adapter == summary.trainable == per_layer * (2 if arch.name == "gpt2" else 4)
    assert "trainable:" in str(summary) and f"{summary.total:,}" in str(summary)


def test_generate_runs_with_the_adapter() -> None:
    from tests.conftest import GPT2

    lm = lk.inject(GPT2.build(0), lk.LoraConfig(r=4))
    randomize(lm)
    ids = GPT2.inputs(batch=1, seq=4)["input_ids"]
    out = lm.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("rows", [None, ["a", "b", None, "a"]], ids=["single", "mixed"])
def test_forward_kernels_do_not_grow_with_resident_adapters(
    kind: str, rows: list[str | None] | None
) -> None:
    lm = model_with_adapters(kind)
    ids = input_ids(4)

    def forward() -> object:
        return logits_of(lm, ids, adapter_names=rows) if rows else logits_of(lm, ids)

    lm.set_adapter("a")
    forward()  # a mixed call caches its stacked factors
    few = aten_ops(forward)
    for i in range(40):
        lm.add_adapter(f"extra{i}", config_for(kind, "a"))
    lm.set_adapter("a")
    forward()
    # The same kernels with 3 or 43 adapters resident: nothing runs per resident adapter.
    assert aten_ops(forward) == few
    assert few.count("mm") + few.count("addmm") > 0


@pytest.mark.parametrize("how", ["inject", "add_adapter", "load_adapter", "from_pretrained"])
def test_new_adapters_take_the_models_eval_mode(arch: Arch, how: str, tmp_path: Path) -> None:
    """Adapters put into an eval-mode model run without dropout (a fresh module starts in
    train mode: they used to drop activations at inference, and a merged forward outside
    no_grad raised 'cannot train while merged')."""
    config = lk.LoraConfig(
        r=4,
        dropout=0.5,
        targets=arch.attn_preset,
        modules_to_save=(arch.head,) if arch.head else (),
    )
    donor = lk.inject(arch.build(0), config)
    randomize(donor)
    path = donor.save_adapter(tmp_path / "a")
    model = arch.build(0)  # eval mode, as transformers' from_pretrained returns it
    if how == "inject":
        lm = lk.inject(model, config)
        randomize(lm)
    elif how == "add_adapter":
        lm = lk.inject(model, lk.LoraConfig(r=2, targets=arch.all_preset), name="other")
        lm.add_adapter("default", config)
        randomize(lm)
    elif how == "load_adapter":
        lm = lk.inject(model, lk.LoraConfig(r=2, targets=arch.all_preset), name="other")
        lm.load_adapter(path, "default")
    else:
        lm = lk.LoraModel.from_pretrained(model, path)
    lm.set_adapter("default")
    assert not lm.training
    assert [n for n, m in lm.named_modules() if m.training] == []
    inputs = arch.inputs()
    assert torch.equal(logits(lm, inputs), logits(lm, inputs))  # no dropout
    lm.merge("default")
    lm(**inputs)  # grad enabled, eval mode: no "cannot train while merged"
    lm.unmerge()
    lm.train()
    assert all(m.training for m in lm.modules())


HEADS = {"gpt2": "lm_head", "bert": "classifier"}


@pytest.mark.parametrize("how", ["add_adapter", "load_adapter"])
def test_modules_to_save_on_an_adapted_module_is_refused(
    arch: Arch, how: str, tmp_path: Path
) -> None:
    """It used to wrap the LoRALinear whole (copying adapter 'a' into the head), after which
    delete_adapter('a') and save_adapter('a') raised 'is not a LoRA layer'."""
    head = HEADS[arch.name]
    config = lk.LoraConfig(r=2, targets=arch.attn_preset, modules_to_save=(head,))
    path = lk.inject(arch.build(0), config).save_adapter(tmp_path / "b")
    lm = lk.inject(
        arch.build(0), lk.LoraConfig(r=2, targets=(*lk.presets()[arch.attn_preset], head)), name="a"
    )
    randomize(lm)
    before, tree = state_copy(lm), [(n, type(m)) for n, m in lm.named_modules()]
    with pytest.raises(lk.ConfigError, match=f"modules_to_save '{head}' carries LoRA"):
        if how == "add_adapter":
            lm.add_adapter("b", config)
        else:
            lm.load_adapter(path, "b")
    assert [(n, type(m)) for n, m in lm.named_modules()] == tree
    assert all(torch.equal(v, before[k]) for k, v in state_copy(lm).items())
    lm.save_adapter(tmp_path / "a", "a")
    lm.delete_adapter("a")


# ---- failures part-way: the model is left as it was, and the call can be made again ------------


@pytest.mark.parametrize("first", [True, False], ids=["first", "second"])
@pytest.mark.parametrize("fault", ["adapter", "head"])
def test_add_adapter_failing_part_way_leaves_the_model_as_it_was(
    arch: Arch, first: bool, fault: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure after the first layers were wrapped (an interrupt while initialising the third
    adapter module, or while copying the head) left those layers wrapped and holding a
    half-made adapter that has no record, and a first adapter's base frozen."""
    lm = lk.LoraModel(arch.build(0))
    if not first:
        lm.add_adapter("a", lk.LoraConfig(r=2, targets=arch.attn_preset))
        randomize(lm)
    config = lk.LoraConfig(r=4, targets=arch.all_preset, modules_to_save=(HEADS[arch.name],))
    before = model_state(lm)
    owner, method, call = (
        (LoraAdapter, "reset", 3) if fault == "adapter" else (SavedModule, "add", 1)
    )
    monkeypatch.setattr(
        owner, method, fail_on_call(getattr(owner, method), call, KeyboardInterrupt())
    )
    with pytest.raises(KeyboardInterrupt):
        lm.add_adapter("b", config)
    assert model_state(lm) == before
    monkeypatch.undo()
    lm.add_adapter("b", config)
    assert list(lm.adapters) == ([] if first else ["a"]) + ["b"]


def test_delete_adapter_failing_part_way_leaves_the_model_as_it_was(
    arch: Arch, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deleting went layer by layer: an interrupt part-way left the adapter gone from some layers
    but still recorded (silently partial when selected), and deleting again raised KeyError."""
    lm = lk.inject(arch.build(0), lk.LoraConfig(r=2, targets=arch.attn_preset), name="a")
    head = (HEADS[arch.name],)
    lm.add_adapter("b", lk.LoraConfig(r=4, targets=arch.all_preset, modules_to_save=head))
    lm.add_adapter("c", lk.LoraConfig(r=2, targets=arch.attn_preset))  # "b" is not last there
    randomize(lm)
    before = model_state(lm)
    broken = fail_on_call(unwrap_if_empty, 3, KeyboardInterrupt())
    monkeypatch.setattr(model_module, "unwrap_if_empty", broken)
    with pytest.raises(KeyboardInterrupt):
        lm.delete_adapter("b")
    assert model_state(lm) == before  # the same modules, in the same order, holding the same
    monkeypatch.undo()
    lm.delete_adapter("b")
    assert list(lm.adapters) == ["a", "c"]


def test_load_adapter_failing_to_pad_leaves_nothing_and_can_be_retried(
    arch: Arch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """load_adapter(max_rank=) loads, then re-stores the adapter padded: a failure in the second
    step left it loaded unpadded, and loading it again (as the adapter cache does on its next
    use) raised 'already exists'."""
    config = lk.LoraConfig(r=2, targets=arch.all_preset, modules_to_save=(HEADS[arch.name],))
    path = lk.inject(arch.build(0), config).save_adapter(tmp_path / "x")
    lm = lk.LoraModel(arch.build(0))
    before = model_state(lm)
    broken = fail_on_call(PaddedAdapter.assign, 2, RuntimeError("injected"))
    monkeypatch.setattr(PaddedAdapter, "assign", broken)
    with pytest.raises(RuntimeError, match="injected"):
        lm.load_adapter(path, "x", max_rank=8)
    assert model_state(lm) == before
    monkeypatch.undo()
    lm.load_adapter(path, "x", max_rank=8)
    assert lm._layer(lm.adapter_record("x").modules[0]).adapter("x").r == 8


# ---- bad input to the public API (review) ------------------------------------------------------

BLOCKS = {"gpt2": "h.0.attn", "bert": "layer.0.attention"}


def test_modules_to_save_on_a_block_holding_adapted_projections_is_refused(
    arch: Arch, tmp_path: Path
) -> None:
    """A block (not the projection itself) carrying adapter 'a' was copied whole, LoRA layers
    and all: the save held lora_kit-internal keys ('...c_attn.adapters.a.lora_A') and
    delete_adapter('a') then raised a bare AttributeError."""
    lm = lk.inject(arch.build(0), lk.LoraConfig(r=2, targets=arch.attn_preset), name="a")
    randomize(lm)
    before = model_state(lm)
    config = lk.LoraConfig(r=2, targets=("intermediate.dense", "c_fc"))
    with pytest.raises(lk.ConfigError, match=r"modules_to_save '.*' carries LoRA adapters \['a'\]"):
        lm.add_adapter("b", dataclasses.replace(config, modules_to_save=(BLOCKS[arch.name],)))
    assert model_state(lm) == before
    lm.save_adapter(tmp_path / "a", "a")
    lm.delete_adapter("a")


def test_adapter_name_with_a_final_newline_is_refused(arch: Arch) -> None:
    lm = lk.inject(arch.build(0), lk.LoraConfig(r=2))
    before = model_state(lm)
    with pytest.raises(lk.AdapterNameError, match="invalid"):
        lm.add_adapter("b\n", lk.LoraConfig(r=2))  # "$" in the name pattern let it through
    assert model_state(lm) == before


@pytest.mark.parametrize("weight", ["x", "0.5", None, True, torch.ones(2)])
def test_selection_weights_must_be_numbers(weight: object) -> None:
    """Text was parsed ('0.5' worked, 'x' was a bare ValueError), None a bare TypeError."""
    lm = lk.inject(tiny_gpt2(), lk.LoraConfig(r=2), name="a")
    before = model_state(lm)
    selection = {"a": weight}
    with pytest.raises(lk.ConfigError, match="weight of adapter 'a' must be a number"):
        lm.set_adapter(selection)  # type: ignore[dict-item]
    with pytest.raises(lk.ConfigError, match="must be a number"):
        lm.using(selection).__enter__()  # type: ignore[arg-type]
    with pytest.raises(lk.ConfigError, match="must be a number"):
        lm.merge(selection)  # type: ignore[arg-type]
    assert model_state(lm) == before
    lm.set_adapter({"a": torch.tensor(0.5)})  # a one-element tensor is a number
    assert lm.active.weights == (("a", 0.5),)


@pytest.mark.parametrize("weight", [10**400, Fraction(10**400, 3)], ids=["int", "fraction"])
def test_selection_weights_past_floats_range_are_not_finite(weight: object) -> None:
    """They were a bare OverflowError from float()."""
    lm = lk.inject(tiny_gpt2(), lk.LoraConfig(r=2), name="a")
    with pytest.raises(lk.ConfigError, match="weight of adapter 'a' must be finite"):
        lm.set_adapter({"a": weight})  # type: ignore[dict-item]
    with pytest.raises(lk.ConfigError, match="must be finite"):
        lm.merge({"a": weight})  # type: ignore[dict-item]
    assert lm.active.weights == (("a", 1.0),)


def test_adapter_names_entries_must_be_names_or_none() -> None:
    """An unhashable entry was a bare TypeError ('unhashable type: list')."""
    lm = lk.inject(tiny_gpt2(), lk.LoraConfig(r=2), name="a")
    ids = torch.zeros(2, 3, dtype=torch.long)
    for names in ([["a"], None], [0, "a"]):
        with pytest.raises(lk.AdapterNameError, match="entries must be adapter names"):
            lm(ids, adapter_names=names)
