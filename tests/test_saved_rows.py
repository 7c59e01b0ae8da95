"""Mixed batches through saved modules (BERT's classifier copies): batched and grouped paths.

Each test compares a mixed batch with each row run alone under its adapter. Tolerance: fp32,
atol 1e-5, as in test_rows.py (the two differ only in summation order; the logits are O(1) and
a head copy perturbed by N(0, 0.5) moves them by far more).
"""

from __future__ import annotations

import pytest
import torch
from hotswap_helpers import aten_ops, each_row_alone, input_ids, logits, model_with_adapters

import lora_kit as lk
from lora_kit import saved_rows
from lora_kit.errors import AdapterNameError
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
