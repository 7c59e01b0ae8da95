"""Mixed batches through saved modules (BERT's classifier copies): batched and grouped paths.

Each test compares a mixed batch with each row run alone under its adapter. Tolerance: fp32,
atol 1e-5, as in test_rows.py (the two differ only in summation order; the logits are O(1) and
a head copy perturbed by N(0, 0.5) moves them by far more).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hotswap_helpers import aten_ops, each_row_alone, input_ids, logits, model_with_adapters
from torch._dynamo.testing import CompileCounter

import lora_kit as lk
from lora_kit import saved_rows
from lora_kit.errors import AdapterNameError
from lora_kit.routing import Router, Selection
from lora_kit.rows import RowPlan
from lora_kit.saved_modules import SavedModule

NAMES = ("a", "b", "c", "d", "e")  # "a" and "c" save their own classifier copy


def _head(lm: lk.LoraModel) -> SavedModule:
    return next(m for m in lm.model.modules() if isinstance(m, SavedModule))


def _head_ops(lm: lk.LoraModel, ids: torch.Tensor, names: list[str | None]) -> list[str]:
    """The ATen operators of a mixed call, whole model minus the LoRA layers' own."""
    everything = aten_ops(lambda: logits(lm, ids, adapter_names=names))
    in_layers = aten_ops(lambda: logits(lm, ids, adapter_names=names), lora_layers_of=lm.model)
    rest = list(everything)
    for op in in_layers:
        rest.remove(op)
    return rest


@pytest.mark.parametrize(
    "names",
    [
        ["a", None, "c", "b"],  # each row its own name: reshaped, no gather
        ["c", "a", "c", None, "a"],  # repeated names: gathered per row
    ],
)
def test_batched_heads_equal_each_row_alone(names: list[str | None]) -> None:
    lm = model_with_adapters("bert", NAMES)
    ids = input_ids(len(names))
    ops = _head_ops(lm, ids, names)
    assert "baddbmm" in ops and "index_copy_" not in ops  # the batched path ran
    mixed = logits(lm, ids, adapter_names=names)
    torch.testing.assert_close(mixed, each_row_alone(lm, ids, names), atol=1e-5, rtol=1e-5)
    # The heads really differ per row (the test can fail): the copies move the logits.
    with lm.using("b"):  # "b" has no copy: the original head
        plain = logits(lm, ids)
    assert (mixed[names.index("a")] - plain[names.index("a")]).abs().max() > 1e-2


def test_head_kernels_do_not_grow_with_distinct_heads() -> None:
    lm = model_with_adapters("bert", NAMES)
    ids = input_ids(8)
    two: list[str | None] = ["a", "b"] * 4  # the copy of "a" and the original
    three: list[str | None] = ["a", "c", "b", "d", "e", "a", "c", None]  # two copies + original
    for rows in (two, three):
        logits(lm, ids, adapter_names=rows)  # builds the LoRA layers' cached stacks
    # The whole model, heads included, runs the same kernels for 2 or 3 distinct heads.
    assert aten_ops(lambda: logits(lm, ids, adapter_names=three)) == aten_ops(
        lambda: logits(lm, ids, adapter_names=two)
    )


def test_expanded_batch_is_mapped_back_to_its_names() -> None:
    # generate-style expansion (repeat_interleave): runs of 2 rows per name, no autograd.
    lm = model_with_adapters("bert", NAMES)
    names: list[str | None] = ["c", "b", None, "a"]
    ids = input_ids(len(names)).repeat_interleave(2, dim=0)
    with torch.no_grad(), lm._rows(names, None):
        out = lm.model(input_ids=ids).logits
    expected = each_row_alone(lm, ids, [n for n in names for _ in range(2)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_an_in_place_edit_of_a_copy_is_seen_at_once() -> None:
    # Nothing is cached between calls: an edited head copy serves its new weights.
    lm = model_with_adapters("bert", NAMES)
    names: list[str | None] = ["a", "c", None]
    ids = input_ids(len(names))
    before = logits(lm, ids, adapter_names=names)
    with torch.no_grad():
        _head(lm).copies["c"].weight.mul_(-1.0)
    after = logits(lm, ids, adapter_names=names)
    assert (after[1] - before[1]).abs().max() > 1e-2
    torch.testing.assert_close(after, each_row_alone(lm, ids, names), atol=1e-5, rtol=1e-5)


def _hook(module: torch.nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
    return output + 1.0


@pytest.mark.parametrize("case", ["grad", "hook", "large"])
def test_grouped_fallback_gives_the_same_rows(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the batched path does not apply, rows are grouped by head (and still right)."""
    lm = model_with_adapters("bert", NAMES)
    names: list[str | None] = ["a", None, "c", "a"]
    ids = input_ids(len(names))
    head = _head(lm)
    if case == "hook":  # a hook the stacked weights would skip
        head.copies["c"].register_forward_hook(_hook)
    if case == "large":
        monkeypatch.setattr(saved_rows, "BATCHED_MAX_ELEMENTS", 0)
    grad = case == "grad"
    with torch.set_grad_enabled(grad):
        ops = aten_ops(lambda: lm(input_ids=ids, adapter_names=names))
        mixed = lm(input_ids=ids, adapter_names=names).logits.detach()
    assert "index_copy_" in ops  # the grouped path ran
    torch.testing.assert_close(mixed, each_row_alone(lm, ids, names), atol=1e-5, rtol=1e-5)


def test_a_dtype_mismatch_alone_takes_the_grouped_path() -> None:
    lm = model_with_adapters("bert", NAMES)
    head = _head(lm)
    x = torch.randn(3, head.original.in_features, dtype=torch.float64)
    rows = lm._rows(["a", None, "c"], None)
    with torch.no_grad(), rows, pytest.raises(RuntimeError, match="dtype"):
        head(x)  # nn.Linear's own error, not a silent cast by the stacked path


def test_a_batch_that_does_not_fit_the_names_is_refused() -> None:
    lm = model_with_adapters("bert", NAMES)
    head = _head(lm)
    x = torch.randn(5, head.original.in_features)
    rows = lm._rows(["a", None, "c"], None)
    with torch.no_grad(), rows, pytest.raises(AdapterNameError, match="3 entries but the batch"):
        head(x)


def test_a_meta_model_runs_a_mixed_batch() -> None:
    # Shape inference on the meta device: no autocast there, so asking for it must not raise.
    lm = model_with_adapters("bert", NAMES)
    lm.model.to("meta")
    names: list[str | None] = ["a", None, "c", "b"]
    with torch.no_grad():
        out = lm(input_ids=input_ids(len(names)).to("meta"), adapter_names=names).logits
    assert out.shape == (len(names), _head(lm).original.out_features)
    assert out.device.type == "meta"


def test_the_size_cap_counts_the_weights_gathered_per_row(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Repeated names gather one weight matrix per row ([batch, in, out]): the cap must bound
    # that, not only the distinct copies, or a large batch copies the head once per row.
    lm = model_with_adapters("bert", NAMES)
    numel = _head(lm).original.weight.numel()
    gathered: list[str | None] = ["c", "a", "c", None, "a"]  # 3 distinct heads, 5 rows
    in_runs: list[str | None] = ["a", None, "c", "b"]  # 4 distinct, no gather
    monkeypatch.setattr(saved_rows, "BATCHED_MAX_ELEMENTS", 4 * numel)
    for names, path in ((gathered, "index_copy_"), (in_runs, "baddbmm")):
        ids = input_ids(len(names))
        assert path in _head_ops(lm, ids, names)
        mixed = logits(lm, ids, adapter_names=names)
        torch.testing.assert_close(mixed, each_row_alone(lm, ids, names), atol=1e-5, rtol=1e-5)


# ---- one saved head alone: inputs and modules the batched path must take or leave ---------

HEAD_ROWS: list[str | None] = ["a", None, "c", "b", "a"]  # "a", "c" have copies; "b" has none


def _saved_head(out_features: int = 3, bias: bool = True) -> SavedModule:
    """A saved nn.Linear(16, out_features) with perturbed copies for "a" and "c"."""
    gen = torch.Generator().manual_seed(0)
    head = SavedModule(torch.nn.Linear(16, out_features, bias=bias), Router())
    for name in ("a", "c"):
        with torch.no_grad():
            for p in head.add(name).parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    return head


def _head_rows(
    head: SavedModule, x: torch.Tensor, names: list[str | None]
) -> tuple[torch.Tensor, list[str]]:
    """``head(x)`` as a mixed batch (no autograd), and the ATen operators it ran."""
    with torch.no_grad(), head.router.override(Selection(rows=RowPlan(names))):
        ops = aten_ops(lambda: head(x))
        return head(x), ops


def _head_alone(head: SavedModule, x: torch.Tensor, names: list[str | None]) -> torch.Tensor:
    """Each row of ``x`` through its name's module on its own (batch expansion mapped back)."""
    per_name = x.shape[0] // len(names)
    with torch.no_grad():
        rows = []
        for row in range(x.shape[0]):
            name = names[row // per_name]
            has_copy = name in head.copies  # (an nn.ModuleDict has no .get)
            module = head.copies[name] if has_copy else head.original
            rows.append(module(x[row : row + 1]))
        return torch.cat(rows)


@pytest.mark.parametrize(
    ("shape", "names"),
    [
        ((5, 4, 16), HEAD_ROWS),  # tokens: gathered per row
        ((6, 2, 3, 16), ["a", "b", "c"]),  # two extra dims, expanded x2: runs
        ((10, 16), HEAD_ROWS),  # expanded x2 with repeated names: gathered
        ((5, 0, 16), HEAD_ROWS),  # no tokens
    ],
)
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_batched_head_inputs_of_any_layout(
    shape: tuple[int, ...], names: list[str | None], layout: str
) -> None:
    head = _saved_head()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen)
    if layout == "transposed" and x.dim() > 2:  # same values, non-contiguous batch/token dims
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    out, ops = _head_rows(head, x, names)
    assert "bmm" in ops or "baddbmm" in ops
    torch.testing.assert_close(out, _head_alone(head, x, names), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("out_features", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_batched_head_with_and_without_bias(out_features: int, bias: bool) -> None:
    head = _saved_head(out_features, bias)  # num_labels=1 too
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    out, ops = _head_rows(head, x, HEAD_ROWS)
    assert ("baddbmm" if bias else "bmm") in ops
    torch.testing.assert_close(out, _head_alone(head, x, HEAD_ROWS), atol=1e-5, rtol=1e-5)


def _no_bias(head: SavedModule) -> None:
    head.copies["c"].bias = None


def _negated(head: SavedModule) -> None:
    class Negate(torch.nn.Module):
        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            return -weight

    torch.nn.utils.parametrize.register_parametrization(head.copies["c"], "weight", Negate())


def _subclassed(head: SavedModule) -> None:
    class Doubled(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2.0

    copy = Doubled(16, 3)
    copy.load_state_dict(head.copies["c"].state_dict())
    head.copies["c"] = copy


def _patched_forward(head: SavedModule) -> None:
    copy = head.copies["c"]
    copy.forward = lambda x: torch.nn.Linear.forward(copy, x) + 1.0  # type: ignore[method-assign]


@pytest.mark.parametrize("change", [_no_bias, _negated, _subclassed, _patched_forward])
def test_heads_the_stack_cannot_stand_for_are_grouped(
    change: Callable[[SavedModule], None],
) -> None:
    """A copy without bias beside ones with, or whose call is not nn.Linear's own forward."""
    head = _saved_head()
    change(head)
    x = torch.randn(5, 2, 16, generator=torch.Generator().manual_seed(1))
    out, ops = _head_rows(head, x, HEAD_ROWS)
    assert "index_copy_" in ops and "baddbmm" not in ops
    torch.testing.assert_close(out, _head_alone(head, x, HEAD_ROWS), atol=1e-5, rtol=1e-5)


def test_batched_head_under_inference_mode() -> None:
    head = _saved_head()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out, ops = _head_rows(head, x, HEAD_ROWS)
    assert "baddbmm" in ops
    torch.testing.assert_close(out, _head_alone(head, x, HEAD_ROWS), atol=1e-5, rtol=1e-5)


def test_head_under_autocast_is_grouped_and_cast() -> None:
    """Tolerance: both sides run bf16 GEMMs (autocast) on different row subsets; ~1 bf16 ulp
    of O(1) outputs."""
    head = _saved_head()
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, ops = _head_rows(head, x, HEAD_ROWS)
        alone = _head_alone(head, x, HEAD_ROWS)
    assert "baddbmm" not in ops and out.dtype == torch.bfloat16  # as nn.Linear under autocast
    torch.testing.assert_close(out, alone, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_batched_head_in_the_module_dtype(dtype: torch.dtype) -> None:
    """Tolerance: the batched and per-row GEMMs round in ``dtype`` at different points: a few
    ulps of O(1) outputs (fp16 ~1e-3, bf16 ~8e-3 each); a wrong head moves them by > 0.1."""
    head = _saved_head().to(dtype)
    x = torch.randn(5, 3, 16, generator=torch.Generator().manual_seed(1)).to(dtype)
    out, ops = _head_rows(head, x, HEAD_ROWS)
    assert "baddbmm" in ops and out.dtype == dtype
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(out, _head_alone(head, x, HEAD_ROWS), atol=tol, rtol=tol)


def test_rows_on_heads_without_copies_run_the_original_once() -> None:
    head = _saved_head()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    names: list[str | None] = ["b", None, "d", "b"]  # none of them saves this head
    out, ops = _head_rows(head, x, names)
    assert "index_copy_" not in ops and "baddbmm" not in ops and "addmm" in ops
    torch.testing.assert_close(out, head.original(x), atol=0, rtol=0)


def test_a_compiled_head_takes_new_names_without_recompiling() -> None:
    """Under torch.compile the per-row head runs outside the graph: traced, its choice of
    copies was guarded on and a call with other names compiled again."""
    lm = model_with_adapters("bert", NAMES)
    head = _head(lm)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(head, backend=counter)
    x = torch.randn(4, head.original.in_features, generator=torch.Generator().manual_seed(0))
    plans: list[list[str | None]] = [["a", None, "c", "b"], ["c", "a", "b", "e"]]
    plans += [["a", "a", "c", None], ["c", "c", "b", "a"]]

    def alone(names: list[str | None]) -> torch.Tensor:
        def module(name: str | None) -> torch.nn.Module:
            copy = head.copies._modules.get(name) if name is not None else None
            return head.original if copy is None else copy

        return torch.cat([module(n)(x[i : i + 1]) for i, n in enumerate(names)])

    with torch.no_grad():
        with lm._rows(plans[0], None):
            compiled(x)
        frames = counter.frame_count
        for names in plans * 2:
            with lm._rows(names, None):
                got = compiled(x)
            torch.testing.assert_close(got, alone(names), atol=1e-5, rtol=1e-5)
    assert counter.frame_count == frames
