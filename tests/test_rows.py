"""Mixed batches: each row's output equals running that row alone with its adapter.

Tolerance: fp32, atol 1e-5. The batched and the one-row runs differ only in floating-point
summation order (GEMM blocking depends on the batch size, and a row group adds ``scale * B A x``
in two steps where the single-adapter path fuses them); on these tiny models the logits are O(1),
so any real routing error (a wrong or missing adapter) is orders of magnitude larger.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hotswap_helpers import (
    aten_ops,
    config_for,
    each_row_alone,
    input_ids,
    logits,
    make_model,
    model_with_adapters,
)

import lora_kit as lk
from lora_kit.routing import Selection
from lora_kit.rows import RowPlan
from tests.conftest import compile_counted
from tests.test_layers import _pair

ROWS = ["a", None, "b", "a", "c", None]


_alone = each_row_alone


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_mixed_batch_equals_each_row_alone(kind: str) -> None:
    lm = model_with_adapters(kind)
    ids = input_ids(len(ROWS))
    mixed = logits(lm, ids, adapter_names=ROWS)
    torch.testing.assert_close(mixed, _alone(lm, ids, ROWS), atol=1e-5, rtol=1e-5)
    # The adapters really change outputs, so the check above can fail.
    assert (mixed[0] - mixed[1]).abs().max() > 1e-2


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_uniform_rows_take_the_single_adapter_path(kind: str) -> None:
    lm = model_with_adapters(kind)
    ids = input_ids(4)
    with lm.using("a"):
        single = logits(lm, ids)
    # Every row on one adapter: no gather at all, so the result is bit-identical.
    assert torch.equal(logits(lm, ids, adapter_names=["a"] * 4), single)


def test_bert_classifier_head_per_row() -> None:
    lm = model_with_adapters("bert")  # "a" and "c" save their own classifier copy
    ids = input_ids(3)
    names: list[str | None] = ["c", "b", "a"]
    mixed = logits(lm, ids, adapter_names=names)
    torch.testing.assert_close(mixed, _alone(lm, ids, names), atol=1e-5, rtol=1e-5)
    assert mixed.shape == (3, 3)


def test_gpt2_generate_mixed_greedy() -> None:
    lm = model_with_adapters("gpt2")
    ids = input_ids(5, seq=5, seed=3)
    names: list[str | None] = ["b", None, "a", "c", "b"]
    kwargs = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        mixed = lm.generate(ids, attention_mask=torch.ones_like(ids), adapter_names=names, **kwargs)
        alone = []
        for row, name in enumerate(names):
            with lm.using(name):
                one = ids[row : row + 1]
                alone.append(lm.generate(one, attention_mask=torch.ones_like(one), **kwargs))
    assert torch.equal(mixed, torch.cat(alone))
    # Different adapters produced different continuations (the test can fail).
    assert len({tuple(r.tolist()) for r in mixed[:, 5:]}) > 1


def test_generate_with_expanded_batch() -> None:
    lm = model_with_adapters("gpt2")
    ids = input_ids(2, seq=4, seed=5)
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "num_beams": 2}
    with torch.no_grad():
        mixed = lm.generate(
            ids, attention_mask=torch.ones_like(ids), adapter_names=["a", None], **kwargs
        )
        with lm.using("a"):
            first = lm.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), **kwargs)
    assert torch.equal(mixed[0], first[0])


def test_default_selection_is_untouched_by_a_mixed_call() -> None:
    lm = model_with_adapters("gpt2")
    lm.set_adapter("b")
    ids = input_ids(2)
    before = logits(lm, ids)
    logits(lm, ids, adapter_names=["a", "c"])
    assert lm.active == lk.Selection((("b", 1.0),))
    assert torch.equal(logits(lm, ids), before)


def test_bad_adapter_names() -> None:
    lm = model_with_adapters("gpt2")
    ids = input_ids(3)
    with pytest.raises(lk.AdapterNameError, match="no adapter named 'zz'"):
        logits(lm, ids, adapter_names=["a", "zz", None])
    with pytest.raises(lk.AdapterNameError, match="3 entries but the input has 2 rows"):
        logits(lm, ids[:2], adapter_names=["a", "b", None])
    with pytest.raises(lk.AdapterNameError, match="one adapter name"):
        logits(lm, ids, adapter_names="a")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_fewer_names_than_input_rows_are_refused(kind: str) -> None:
    """One name per input row: 2 names for 4 rows used to run rows 0-1 / 2-3 as blocks."""
    lm = model_with_adapters(kind)
    ids = input_ids(4)
    with pytest.raises(lk.AdapterNameError, match="2 entries but the input has 4 rows"):
        logits(lm, ids, adapter_names=["a", "b"])
    with torch.no_grad(), pytest.raises(lk.AdapterNameError, match="2 entries but the input has 4"):
        lm(ids, adapter_names=["a", "b"])  # input_ids given by position


def test_generate_with_fewer_names_than_prompts_is_refused() -> None:
    lm = model_with_adapters("gpt2")
    ids = input_ids(4, seq=4, seed=5)
    kwargs = {"max_new_tokens": 2, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad(), pytest.raises(lk.AdapterNameError, match="input has 4 rows"):
        lm.generate(ids, attention_mask=torch.ones_like(ids), adapter_names=["a", "b"], **kwargs)
    with torch.no_grad(), pytest.raises(lk.AdapterNameError, match="input has 4 rows"):
        lm.generate(input_ids=ids, adapter_names=["a", "b"], **kwargs)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_grouped_path_with_autograd(kind: str) -> None:
    """With gradients on, rows are grouped per adapter (index_add_); same outputs, and grads."""
    lm = model_with_adapters(kind)
    ids = input_ids(len(ROWS))
    out = lm(input_ids=ids, adapter_names=ROWS).logits
    torch.testing.assert_close(out.detach(), _alone(lm, ids, ROWS), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert all(p.grad is not None for p in lm.adapter_parameters("b") if p.dim() == 2)


def test_cached_stacks_follow_weight_changes() -> None:
    """Stacked factors are cached across calls; in-place changes must invalidate them."""
    lm = model_with_adapters("gpt2")
    ids = input_ids(4)
    names: list[str | None] = ["a", "b", "c", "a"]
    first = logits(lm, ids, adapter_names=names)
    with torch.no_grad():
        for p in lm.adapter_parameters("b"):
            p.mul_(2.0)  # in place: same tensors, new version
    second = logits(lm, ids, adapter_names=names)
    torch.testing.assert_close(second, _alone(lm, ids, names), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first[1], second[1], atol=1e-3)
    torch.testing.assert_close(first[0], second[0], atol=1e-5, rtol=1e-5)  # "a" rows unchanged


def test_mixed_batch_is_refused_while_merged() -> None:
    import lora_kit as lk
    from lora_kit.errors import MergedStateError
    from tests.conftest import GPT2

    lm = lk.inject(GPT2.build(0), lk.LoraConfig(r=4))
    lm.add_adapter("b", lk.LoraConfig(r=2))
    lm.merge("default")
    ids = GPT2.inputs()["input_ids"]
    with pytest.raises(MergedStateError, match="unmerge"):
        lm(input_ids=ids, adapter_names=["b", None])
    lm.unmerge()
    lm(input_ids=ids, adapter_names=["b", None])


def test_cached_stacks_follow_delete_and_reload(tmp_path: Path) -> None:
    """A deleted and reloaded adapter (new tensors, maybe at recycled addresses) is re-stacked."""
    lm = model_with_adapters("gpt2")
    ids = input_ids(3)
    names: list[str | None] = ["a", "b", "c"]
    before = logits(lm, ids, adapter_names=names)
    path = lm.save_adapter(tmp_path / "b", "b")
    lm.delete_adapter("b")
    lm.add_adapter("b", config_for("gpt2", "b"))  # fresh init: B is zero, "b" adds nothing
    fresh = logits(lm, ids, adapter_names=names)
    torch.testing.assert_close(fresh[1], logits(lm, ids[1:2], adapter_names=[None])[0])
    assert not torch.allclose(fresh[1], before[1], atol=1e-3)  # not the stale stack
    lm.delete_adapter("b")
    lm.load_adapter(path, "b")
    torch.testing.assert_close(logits(lm, ids, adapter_names=names), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rows", [["a", "b", None], ["a", "a", "b", "b"], ["b", "a", "b"]])
def test_runs_and_gathered_rows_with_expansion(rows: list[str | None]) -> None:
    """Distinct names (equal runs, no gather) and repeated names (gathered), each expanded 2x."""
    lm = model_with_adapters("gpt2")
    ids = input_ids(len(rows))
    expanded = ids.repeat_interleave(2, dim=0)  # as generate expands beams
    # Inside generate the wrapped model sees the expanded batch under the caller's names (the
    # count was checked against the prompts); lm(...) itself wants one name per input row.
    with torch.no_grad(), lm._rows(rows, None):
        mixed = lm.model(input_ids=expanded).logits
    alone = _alone(lm, expanded, [n for n in rows for _ in range(2)])
    torch.testing.assert_close(mixed, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_mixed_batch_kernels_do_not_grow_with_distinct_adapters(kind: str) -> None:
    names = ("a", "b", "c", "d", "e", "f", "g")
    lm = model_with_adapters(kind, names)
    ids = input_ids(8)
    two: list[str | None] = ["a", "b"] * 4
    seven: list[str | None] = [*names, "a"]  # "a" twice: its rows are not one run either
    for rows in (two, seven):
        logits(lm, ids, adapter_names=rows)  # builds and caches the stacked factors

    def layer_ops(rows: list[str | None]) -> list[str]:
        return aten_ops(lambda: logits(lm, ids, adapter_names=rows), lora_layers_of=lm.model)

    # The LoRA layers launch the same kernels for 2 or 7 distinct adapters over 8 rows: no
    # loop over adapters or rows. So does the whole model, BERT's per-adapter classifier
    # copies included (stacked per call, see test_saved_rows.py).
    assert layer_ops(seven) == layer_ops(two)
    assert "bmm" in layer_ops(two)  # the gathered path really ran
    assert aten_ops(lambda: logits(lm, ids, adapter_names=seven)) == aten_ops(
        lambda: logits(lm, ids, adapter_names=two)
    )
    # Every row on one adapter: exactly the single-adapter batch's kernels, whole model.
    with lm.using("a"):
        single = aten_ops(lambda: logits(lm, ids))
    assert aten_ops(lambda: logits(lm, ids, adapter_names=["a"] * 8)) == single


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_cached_stacks_follow_a_fused_optimizer_step(kind: str) -> None:
    """Fused optimizers update parameters without bumping their version counters."""
    lm = model_with_adapters(kind)
    ids = input_ids(4)
    names: list[str | None] = ["a", "b", "c", None]
    before = logits(lm, ids, adapter_names=names)  # caches the stacks
    params = lm.adapter_parameters("b")
    optimizer = torch.optim.Adam(params, lr=0.5, fused=True)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    after = logits(lm, ids, adapter_names=names)
    torch.testing.assert_close(after, _alone(lm, ids, names), atol=1e-5, rtol=1e-5)
    # "b" really changed, by 10x the tolerance (BERT's logits without a head copy are ~1e-2).
    assert (after[1] - before[1]).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_mixed_batch_under_autocast(kind: str) -> None:
    """Under autocast the batched GEMMs return bf16 while the stacked B stays fp32.

    Tolerance: both sides compute in bf16 under autocast (8 mantissa bits, relative step
    ~4e-3) with different rounding points, through two blocks; logits are O(1). A wrong or
    missing adapter moves them by > 0.1 (checked).
    """
    lm = model_with_adapters(kind)
    ids = input_ids(len(ROWS))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = logits(lm, ids, adapter_names=ROWS)
        alone = _alone(lm, ids, ROWS)
    torch.testing.assert_close(mixed.float(), alone.float(), atol=3e-2, rtol=0)
    assert (alone[0] - alone[1]).abs().max() > 0.1


def test_adapters_loaded_under_inference_mode(saved: tuple[str, Path]) -> None:
    """Adapters loaded or added inside torch.inference_mode serve mixed batches and swaps.

    Tensors made there are inference tensors: no version counter (which the stack cache reads)
    and no in-place update outside inference mode; loading must not keep such tensors.
    """
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    with torch.inference_mode():
        lm.load_adapter(root / "a", "a", max_rank=8)
        lm.load_adapter(root / "b", "b")
        lm.add_adapter("c", config_for(kind, "c"))
    ids = input_ids(4)
    names: list[str | None] = ["a", "b", "c", None]
    with torch.inference_mode():
        mixed = lm(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(mixed, _alone(lm, ids, names), atol=1e-5, rtol=1e-5)
    lm.swap_adapter("a", root / "c")  # in place, outside inference mode
    torch.testing.assert_close(
        logits(lm, ids, adapter_names=names), _alone(lm, ids, names), atol=1e-5, rtol=1e-5
    )


def test_fp32_rows_keep_fp32_beside_a_bf16_adapter(saved: tuple[str, Path]) -> None:
    """An fp32 adapter's rows do not depend on a bf16 adapter sharing (and leading) the batch.

    Tolerance as for fp32 above; rounding the fp32 factors to bf16 moves these logits by ~1e-3.
    """
    kind, root = saved
    lm = lk.LoraModel(make_model(kind))
    lm.load_adapter(root / "a", "low", adapter_dtype=torch.bfloat16)
    lm.load_adapter(root / "a", "a")
    lm.load_adapter(root / "b", "b")
    ids = input_ids(3)
    names: list[str | None] = ["low", "a", "b"]
    mixed = logits(lm, ids, adapter_names=names)
    torch.testing.assert_close(mixed[1:], _alone(lm, ids[1:], names[1:]), atol=1e-5, rtol=1e-5)


def test_stack_record_goes_stale_for_good_once_a_tensor_dies() -> None:
    """A cached stack is checked by tensor identity; once a tensor it was built from dies, its
    ``id`` may pass to a new tensor, so the record must never match again."""
    import gc

    from lora_kit import rows

    lm = model_with_adapters("gpt2")
    layer = next(
        m for m in lm.model.modules() if isinstance(m, lk.LoRALinear) and "b" in m.adapters
    )
    adapters = rows._adapters(layer, ("a", "b", None))
    seen = rows._Seen(adapters)
    assert seen.still(adapters)
    b = layer.adapter("b")
    old = b.lora_A
    b.lora_A = torch.nn.Parameter(old.detach().clone())  # same values, another tensor
    assert not seen.still(adapters)
    b.lora_A = old  # the very tensor again
    assert seen.still(adapters)
    with torch.no_grad():
        old.add_(1.0)  # in place: a new version
    assert not seen.still(adapters)
    b.lora_A = torch.nn.Parameter(old.detach().clone())
    del old
    gc.collect()
    assert not seen.alive[0]  # the record is dead, whatever ids later tensors get


def test_mixed_batch_with_a_parametrized_factor() -> None:
    """A parametrized factor is a new tensor at each read: its stacks are rebuilt, never stale."""
    from torch.nn.utils import parametrize

    from tests.test_layers import _Doubled

    lm = model_with_adapters("gpt2")
    ids = input_ids(3)
    names: list[str | None] = ["a", "b", None]
    before = logits(lm, ids, adapter_names=names)
    for module in lm.model.modules():
        if isinstance(module, lk.LoRALinear) and "b" in module.adapters:
            parametrize.register_parametrization(module.adapter("b"), "lora_B", _Doubled())
    for _ in range(2):  # the second call finds the stacks built by the first
        mixed = logits(lm, ids, adapter_names=names)
        torch.testing.assert_close(mixed, _alone(lm, ids, names), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(mixed[1], before[1], atol=1e-3)
    torch.testing.assert_close(mixed[0], before[0], atol=1e-5, rtol=1e-5)


def test_cached_stacks_follow_a_conversion_that_keeps_addresses() -> None:
    """A dtype/device conversion re-stores factors through ``.data``: same tensors, same
    versions, and after a round trip possibly the same addresses. Simulated deterministically:
    a conversion function that changes the values in place without a version bump and keeps
    every address. The stacks must be rebuilt."""
    lm = model_with_adapters("gpt2")
    ids = input_ids(3)
    names: list[str | None] = ["a", "b", None]
    before = logits(lm, ids, adapter_names=names)  # caches the stacks

    def rescale(t: torch.Tensor) -> torch.Tensor:
        t.data.mul_(2.0)  # no version bump on t, same storage
        return t

    lm.model._apply(rescale)  # what .to()/.half()/.float() run, with this function
    after = logits(lm, ids, adapter_names=names)
    torch.testing.assert_close(after, _alone(lm, ids, names), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(after[0], before[0], atol=1e-3)


def test_clear_stacks_after_a_data_write() -> None:
    """Writes through ``.data`` bump no version counter; ``clear_stacks`` is the documented fix."""
    from lora_kit.rows import clear_stacks

    lm = model_with_adapters("gpt2")
    ids = input_ids(3)
    names: list[str | None] = ["a", "b", None]
    logits(lm, ids, adapter_names=names)  # caches the stacks
    for p in lm.adapter_parameters("b"):
        p.data.mul_(3.0)
    clear_stacks(lm.model)
    torch.testing.assert_close(
        logits(lm, ids, adapter_names=names), _alone(lm, ids, names), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_expanded_batch_on_the_grouped_path(kind: str) -> None:
    """With autograd on, rows are grouped by `RowPlan.members`, which must map an expanded
    batch (``repeat_interleave``, as generate expands beams) back to its names; BERT's per-row
    classifier copies use the same groups. Tolerance as above."""
    lm = model_with_adapters(kind)
    rows: list[str | None] = ["c", "b", None, "a"]
    ids = input_ids(len(rows)).repeat_interleave(2, dim=0)
    with lm._rows(rows, None):  # as inside generate (see the test above); grad on: grouped
        out = lm.model(input_ids=ids).logits
    expected = _alone(lm, ids, [n for n in rows for _ in range(2)])
    torch.testing.assert_close(out.detach(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_grouped_path_without_autograd(kind: str) -> None:
    """Inference with an adapter's dropout active groups rows too (``index_add_`` in place).

    Dropout p = 1e-12 keeps the training-mode path but is the identity: a drop has probability
    1e-12 per element, and the 1/(1-p) rescale rounds to exactly 1 in fp32. Only the adapters
    are in training mode (the base model's own dropout stays off). Tolerance as above.
    """
    lm = model_with_adapters(kind)
    for module in lm.modules():
        if isinstance(module, lk.LoraAdapter):
            module.dropout = 1e-12
            module.train()
    ids = input_ids(len(ROWS))
    ops = aten_ops(lambda: logits(lm, ids, adapter_names=ROWS), lora_layers_of=lm.model)
    assert "index_add_" in ops and "bmm" not in ops  # the grouped path really ran
    mixed = logits(lm, ids, adapter_names=ROWS)
    torch.testing.assert_close(mixed, _alone(lm, ids, ROWS), atol=1e-5, rtol=1e-5)


def test_compiled_layer_takes_new_mixed_batches_without_recompiling() -> None:
    """Every call brings a new `RowPlan`; its per-call bookkeeping runs outside the compiled
    graph (``torch.compiler.disable``), so new calls reuse the graphs. Traced, it recompiled on
    every call (its guards held the plan's cache sizes) until dynamo gave up at its limit."""
    layer, _, router = _pair()
    compiled, counter, x = compile_counted(layer)
    x = torch.cat([x, x[:2]])  # [4, 5, in]
    plans: list[list[str | None]] = [["a", "b", None, "a"], ["b", "a", "a", None]]  # gathered
    plans += [["a", None, "b", "c"], ["b", "c", "a", None]]  # one run each ("c": not here)
    with torch.no_grad():
        for names in plans[:1] + plans[2:3]:  # one call of each path compiles what it needs
            with router.override(Selection(rows=RowPlan(names))):
                compiled(x)
        frames = counter.frame_count
        for names in plans * 3:
            with router.override(Selection(rows=RowPlan(names))):
                got = compiled(x)
            outs = []
            for row, name in enumerate(names):
                router.default = Selection(((name, 1.0),)) if name else Selection()
                outs.append(layer(x[row : row + 1]))
            router.default = Selection()
            torch.testing.assert_close(got, torch.cat(outs), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == frames
