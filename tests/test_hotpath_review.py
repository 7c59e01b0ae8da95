"""The per-call hot path against ways of changing adapters behind its back.

Mixed batches cache each layer's stacked factors across calls (`lora_kit.rows`), validated by a
record of the tensors they were built from; the single-adapter forward reads factors from the
modules' dictionaries. Each test changes adapters one way (swaps of each kind, scalings,
``load_state_dict``, dtype conversions, a write racing a stack's build, ``functional_call``,
``torch.compile``) and checks the next call against each row run alone.

Tolerance: fp32 atol 1e-5 (summation order only, as in test_rows); a stale stack moves a row's
logits by far more, which each test checks (``_moved``).
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import torch
from hotswap_helpers import (
    config_for,
    each_row_alone,
    input_ids,
    logits,
    make_model,
    model_with_adapters,
    randomize,
)
from torch.func import functional_call

import lora_kit as lk
import lora_kit.swap_packed as swap_packed
from lora_kit import rows
from lora_kit.layers import LoraAdapter
from lora_kit.routing import Selection
from lora_kit.rows import RowPlan
from lora_kit.swap import PaddedAdapter
from tests.conftest import compile_counted
from tests.test_layers import _pair

NAMES: list[str | None] = ["live", "b", None]


_alone = each_row_alone


def _check(lm: lk.LoraModel, ids: torch.Tensor, names: list[str | None]) -> torch.Tensor:
    """A mixed call's logits, checked against each row alone."""
    mixed = logits(lm, ids, adapter_names=names)
    torch.testing.assert_close(mixed, _alone(lm, ids, names), atol=1e-5, rtol=1e-5)
    return mixed


def _moved(before: torch.Tensor, after: torch.Tensor) -> bool:
    """Whether a row changed by 10x the tolerance (so a stale stack would have been caught)."""
    return bool((before - after).abs().max() > 1e-4)


def _variant(kind: str, path: Path, seed: int, **changes: object) -> Path:
    """An adapter like "a" (every projection, rank 4) with other weights and ``changes``."""
    lm = lk.LoraModel(make_model(kind))
    lm.add_adapter("v", dataclasses.replace(config_for(kind, "a"), **changes))  # type: ignore[arg-type]
    randomize(lm, "v", seed)
    return lm.save_adapter(path, "v")


def _adapters(lm: lk.LoraModel, name: str) -> list[LoraAdapter]:
    return [
        m.adapter(name)
        for m in lm.model.modules()
        if isinstance(m, lk.LoRALinear) and name in m.adapters
    ]


@pytest.mark.parametrize("how", ["packed", "general", "make_swappable"])
def test_cached_stacks_follow_every_kind_of_swap(
    saved: tuple[str, Path], tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one-copy swap writes every factor through one flat view of the packed buffer (the
    parameters share its version counter); the general path copies tensor by tensor;
    make_swappable replaces the adapter modules. Each is seen by the stacks cached before."""
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live", max_rank=None if how == "make_swappable" else 4)
    lm.load_adapter(root / "b", "b")
    ids = input_ids(len(NAMES))
    before = _check(lm, ids, NAMES)  # caches the stacks
    if how == "make_swappable":
        lm.make_swappable("live", 8)
        assert all(isinstance(a, PaddedAdapter) for a in _adapters(lm, "live"))
        with torch.no_grad():
            for adapter in _adapters(lm, "live"):
                adapter.lora_B.mul_(-1.0)
    elif how == "packed":
        general: list[object] = []
        monkeypatch.setattr(swap_packed, "swap_in", lambda *a, **k: general.append(a))
        lm.swap_adapter("live", _variant(kind, tmp_path / "v", seed=9, alpha=3.0))
        assert general == []  # the one-copy path ran
    else:  # a lower rank than the padded one: the general path
        lm.swap_adapter("live", _variant(kind, tmp_path / "v", seed=9, r=2, alpha=3.0))
    assert _moved(before[0], _check(lm, ids, NAMES)[0])


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "padded"])
def test_cached_stacks_follow_a_scaling_change(saved: tuple[str, Path], padded: bool) -> None:
    """Only the scaling changes: a Python float for a plain adapter (no tensor state at all),
    the ``scale`` buffer (written in place) for a padded one."""
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live", max_rank=8 if padded else None)
    lm.load_adapter(root / "b", "b")
    ids = input_ids(len(NAMES))
    before = _check(lm, ids, NAMES)
    for adapter in _adapters(lm, "live"):
        assert isinstance(adapter, PaddedAdapter) == padded
        adapter.scaling = -2.0 * adapter.scaling
    assert _moved(before[0], _check(lm, ids, NAMES)[0])


@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
def test_cached_stacks_follow_load_state_dict(assign: bool) -> None:
    """``load_state_dict`` copies in place, or (``assign=True``) puts new parameters in place of
    the old ones, which die: their records must never match again."""
    lm = model_with_adapters("gpt2")
    names: list[str | None] = ["a", "b", "c", None]
    ids = input_ids(len(names))
    before = _check(lm, ids, names)
    state = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    for key in state:
        if ".b.lora_" in key:
            state[key].mul_(-3.0)
    lm.model.load_state_dict(state, assign=assign)
    assert _moved(before[1], _check(lm, ids, names)[1])


def test_cached_stacks_follow_dtype_conversions() -> None:
    """``model.double()``/``.float()`` re-store every parameter through ``.data``: the same
    parameter objects and version counters, new storage. The fp64 call is another cache key;
    an in-place edit between the conversions must be seen in fp32 again."""
    lm = model_with_adapters("gpt2")
    names: list[str | None] = ["a", "b", "c", None]
    ids = input_ids(len(names))
    before = _check(lm, ids, names)  # fp32 stacks cached
    lm.model.double()
    _check(lm, ids, names)
    with torch.no_grad():
        for adapter in _adapters(lm, "b"):
            adapter.lora_B.mul_(-3.0)
    lm.model.float()
    assert _moved(before[1], _check(lm, ids, names)[1])


def test_a_write_while_a_stack_is_being_built_is_not_lost(
    saved: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another thread writes an adapter in place while a mixed call builds a stack. Whatever
    that call saw, the record must not claim a newer state than the values stacked (the record
    is taken before the factors are read), or the next calls serve the old values for good.

    The interleaving is forced: the builder pauses as it takes its record."""
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "live")
    lm.load_adapter(root / "b", "b")
    ids = input_ids(len(NAMES))
    before = _check(lm, ids, NAMES)
    rows.clear_stacks(lm.model)
    paused, resume = threading.Event(), threading.Event()
    record = rows._Seen.__init__

    def slow_record(self: rows._Seen, adapters: list[LoraAdapter | None]) -> None:
        if threading.current_thread().name == "builder" and not paused.is_set():
            paused.set()
            resume.wait(10)
        record(self, adapters)

    monkeypatch.setattr(rows._Seen, "__init__", slow_record)
    builder = threading.Thread(target=lambda: logits(lm, ids, adapter_names=NAMES), name="builder")
    builder.start()
    assert paused.wait(10)
    with torch.no_grad():
        for adapter in _adapters(lm, "live"):
            adapter.lora_B.mul_(-1.0)
    resume.set()
    builder.join()
    assert _moved(before[0], _check(lm, ids, NAMES)[0])


def test_generate_after_an_in_place_swap(tmp_path: Path) -> None:
    """generate reuses one row plan (and its stacks) for all its steps; the next call sees the
    swap. Greedy tokens are compared with each prompt generated alone."""
    lm = model_with_adapters("gpt2")
    lm.make_swappable("a", 4)
    names: list[str | None] = ["a", "b", None]
    ids = input_ids(len(names), seq=4, seed=3)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}

    def generate(prompts: torch.Tensor, names: list[str | None]) -> torch.Tensor:
        mask = torch.ones_like(prompts)
        with torch.no_grad():
            out = lm.generate(prompts, attention_mask=mask, adapter_names=names, **kwargs)
        return out  # type: ignore[no-any-return]

    first = generate(ids, names)
    lm.swap_adapter("a", _variant("gpt2", tmp_path / "v", seed=11, alpha=40.0))
    second = generate(ids, names)
    alone = torch.cat([generate(ids[row : row + 1], [n]) for row, n in enumerate(names)])
    assert torch.equal(second, alone)
    assert not torch.equal(first[0], second[0])  # the swap changed the "a" row's tokens


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("partial", [False, True], ids=["both", "only-A"])
def test_functional_call_replaces_the_factors(kind: str, partial: bool, forward_path: str) -> None:
    """``torch.func.functional_call`` swaps plain tensors in for the parameters for one call; the
    forward, which reads factors from the modules' dictionaries for speed, must use them, give
    the same gradients as the module itself, and use the parameters again afterwards."""
    linear, conv, router = _pair()
    layer = linear if kind == "linear" else conv
    router.default = Selection((("a", 1.0),))
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(3))
    a = layer.adapter("a")
    new_a, new_b = -2 * a.lora_A.detach(), 3 * a.lora_B.detach()
    used_b = a.lora_B.detach() if partial else new_b
    values = {"adapters.a.lora_A": new_a} if partial else {
        "adapters.a.lora_A": new_a, "adapters.a.lora_B": new_b,
    }  # fmt: skip
    with torch.no_grad():
        expected = layer.base(x) + a.scaling * (x @ new_a.t()) @ used_b.t()
        original = layer(x)
        torch.testing.assert_close(
            functional_call(layer, values, (x,)), expected, rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(layer(x), original, rtol=0, atol=0)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    grads = torch.func.grad(lambda p: functional_call(layer, p, (x,)).square().sum())(params)
    layer(x).square().sum().backward()
    for name, param in layer.named_parameters():  # inactive adapter "b": no grad / zeros
        expected_grad = torch.zeros_like(param) if param.grad is None else param.grad
        torch.testing.assert_close(grads[name], expected_grad, rtol=1e-5, atol=1e-5)
    assert a.lora_B.grad is not None and a.lora_B.grad.abs().max() > 0


def test_functional_call_with_a_mixed_batch() -> None:
    """Mixed rows under ``functional_call`` stack the tensors passed in, follow in-place edits
    of them, and once the call is over the parameters' stacks serve again."""
    lm = model_with_adapters("gpt2")
    names: list[str | None] = ["a", "b", "c", None]
    ids = input_ids(len(names))
    before = _check(lm, ids, names)
    values = {k: -2.0 * v.detach() for k, v in lm.model.named_parameters() if ".b.lora_B" in k}
    twin = model_with_adapters("gpt2")  # the same adapters, with those values stored
    twin.model.load_state_dict(values, strict=False)

    def called() -> torch.Tensor:
        with torch.no_grad(), lm._rows(names, None):
            return functional_call(lm.model, values, (), {"input_ids": ids}).logits  # type: ignore[no-any-return]

    torch.testing.assert_close(called(), _alone(twin, ids, names), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for key, value in values.items():
            value.mul_(0.5)
            twin.model.get_parameter(key).mul_(0.5)
    torch.testing.assert_close(called(), _alone(twin, ids, names), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(lm, ids, adapter_names=names), before, atol=1e-5, rtol=1e-5)
    assert _moved(before[1], called()[1])


def test_mixed_rows_under_torch_compile_follow_in_place_updates() -> None:
    """A compiled layer's mixed rows see in-place updates: nothing in the stack cache's
    validation may be traced into constants."""
    layer, _, router = _pair()
    compiled, _counter, x = compile_counted(layer)
    x = torch.cat([x, x[:1]])  # [3, 5, in]
    names: list[str | None] = ["a", "b", None]

    def expected() -> torch.Tensor:
        outs = []
        for row, name in enumerate(names):
            router.default = Selection(((name, 1.0),)) if name else Selection()
            outs.append(layer(x[row : row + 1]))
        router.default = Selection()
        return torch.cat(outs)

    previous: torch.Tensor | None = None
    with torch.no_grad():
        for _ in range(3):
            with router.override(Selection(rows=RowPlan(names))):
                got = compiled(x)
            torch.testing.assert_close(got, expected(), rtol=1e-5, atol=1e-5)
            assert previous is None or _moved(previous[1], got[1])
            previous = got
            layer.adapter("b").lora_B.mul_(-2.0)
