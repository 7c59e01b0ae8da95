"""Adapter selection under concurrency, and ``using``/weighted selections.

Threads run real forwards at the same time (the GIL switches between them inside the model), all
released together by a barrier. Each checks its output against a reference computed alone, with
atol 1e-5 (fp32 summation-order differences only; a leaked adapter changes logits by > 1e-2).
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from hotswap_helpers import input_ids, logits, model_with_adapters

import lora_kit as lk
from lora_kit import rows
from lora_kit.layers import LoraAdapter

NAMES: list[str | None] = ["a", "b", "c", None]


def _run_threads(work: list[object], rounds: int) -> list[str]:
    barrier = threading.Barrier(len(work))
    errors: list[str] = []

    def body(task: object) -> None:
        barrier.wait()
        for _ in range(rounds):
            problem = task()  # type: ignore[operator]
            if problem:
                errors.append(problem)

    threads = [threading.Thread(target=body, args=(task,)) for task in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


@pytest.mark.parametrize("mode", ["using", "adapter_names"])
def test_threads_never_see_each_others_adapter(mode: str) -> None:
    torch.set_num_threads(1)
    lm = model_with_adapters("gpt2")
    ids = input_ids(2, seq=6)
    refs = {}
    for name in NAMES:
        with lm.using(name):
            refs[name] = logits(lm, ids)
    lm.set_adapter("b")  # a global default the threads must not pick up

    def task_for(name: str | None) -> object:
        def task() -> str | None:
            if mode == "using":
                with lm.using(name):
                    out = logits(lm, ids)
            else:
                out = logits(lm, ids, adapter_names=[name, name])
            ok = torch.allclose(out, refs[name], atol=1e-5, rtol=1e-5)
            return None if ok else f"thread for {name!r} saw another adapter"

        return task

    def flipper() -> str | None:  # changes the global default while the others run
        lm.set_adapter("c")
        lm.set_adapter("a")
        return None

    errors = _run_threads([task_for(n) for n in NAMES] + [flipper], rounds=5)
    assert errors == []


def test_using_restores_on_exit_and_error() -> None:
    lm = model_with_adapters("gpt2")
    lm.set_adapter("a")
    with lm.using("b"):
        assert lm.active_adapter == "b"
        with lm.using({"a": 1.0, "c": 0.5}):
            assert lm.active.names == ("a", "c")
        assert lm.active_adapter == "b"
    assert lm.active_adapter == "a"
    with pytest.raises(RuntimeError), lm.using(None):
        assert lm.active_adapter is None
        raise RuntimeError("boom")
    assert lm.active_adapter == "a"
    with pytest.raises(lk.AdapterNameError), lm.using("nope"):  # bad: nothing changes
        pass
    assert lm.active_adapter == "a"


def test_using_is_local_to_the_thread() -> None:
    lm = model_with_adapters("gpt2")
    seen: list[str | None] = []
    with lm.using("b"):
        worker = threading.Thread(target=lambda: seen.append(lm.active_adapter))
        worker.start()
        worker.join()
    assert seen == [None]  # the other thread sees the default (nothing set)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_weighted_selection_equals_merged_weights(kind: str) -> None:
    """``{"a": 1.0, "b": -0.5}`` equals a copy of the base with ``dA - 0.5 dB`` merged in."""
    lm = model_with_adapters(kind, names=("a", "b"))
    reference = copy.deepcopy(lm.model)
    with torch.no_grad():
        for name, module in list(reference.named_modules()):
            if isinstance(module, lk.LoRALinear):
                delta = torch.zeros(module.out_features, module.in_features)
                for adapter, w in (("a", 1.0), ("b", -0.5)):
                    if adapter in module.adapters:
                        delta += w * module.adapter(adapter).delta_weight()
                weight = module.base.weight
                weight += delta.t() if module.fan_in_fan_out else delta
                parent, _, child = name.rpartition(".")
                setattr(reference.get_submodule(parent), child, module.base)
    # modules_to_save: the first active adapter with a copy ("a") provides the head.
    if kind == "bert":
        reference.classifier = copy.deepcopy(lm.model.classifier.copies["a"])
    ids = input_ids(3)
    with lm.using({"a": 1.0, "b": -0.5}):
        got = logits(lm, ids)
    with torch.no_grad():
        want = reference(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_stack_cache_entry_evicted_by_another_thread(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A thread validating a cached stack while another thread evicts it from the per-layer LRU.

    The interleaving is forced (the reader pauses inside the validation) because the GIL makes
    it rare; mixed batches with many distinct name combinations hit it in serving.
    """
    lm = model_with_adapters(kind)
    layer = next(m for m in lm.model.modules() if isinstance(m, lk.LoRALinear))
    x = torch.zeros(1, layer.in_features)
    combos = [("a", "b"), ("b", "a"), ("a", None), ("b", None), (None, "a")]
    for names in combos[:4]:  # fills the layer's cache; ("a", "b") is least recently used
        rows.stacked_factors(layer, names, x)
    paused, resume = threading.Event(), threading.Event()
    validate = rows._Seen.still

    def slow_still(self: rows._Seen, adapters: list[LoraAdapter | None]) -> bool:
        if threading.current_thread().name == "reader":
            paused.set()
            resume.wait(10)
        return validate(self, adapters)

    monkeypatch.setattr(rows._Seen, "still", slow_still)
    errors: list[BaseException] = []

    def read() -> None:
        try:
            rows.stacked_factors(layer, combos[0], x)
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    reader = threading.Thread(target=read, name="reader")
    reader.start()
    assert paused.wait(10)
    rows.stacked_factors(layer, combos[4], x)  # a fifth combination evicts ("a", "b")
    resume.set()
    reader.join()
    assert errors == []
