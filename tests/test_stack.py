"""``lora_kit.stack``: cat (exact), svd (factor route), ties/dare, and input checks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from merge_helpers import broken_copies, config, logits, randomize, tiny, with_adapters

import lora_kit as lk
from lora_kit.adapter_io import read_adapter
from lora_kit.merge import lora_delta
from lora_kit.stack import stack

W = {"a": 0.7, "b": -0.3}


def deltas(path: Path) -> dict[str, torch.Tensor]:
    """Module -> scaling * B @ A (fp32, [out, in]) of an adapter on disk."""
    files = read_adapter(path)
    out = {}
    for key, a in files.tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = files.tensors[key.replace("lora_A", "lora_B")]
            out[module] = lora_delta(a, b, files.config.scaling_for(module))
    return out


@pytest.fixture(params=["gpt2", "bert"])
def saved(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, Path, lk.LoraModel]:
    kind = request.param
    lm = with_adapters(kind, ("a", "b"))  # ranks 4 and 2, alphas 8 and 3
    for name in W:
        lm.save_adapter(tmp_path / name, name)
    return kind, tmp_path, lm


def exact(tmp: Path) -> dict[str, torch.Tensor]:
    da, db = deltas(tmp / "a"), deltas(tmp / "b")
    return {m: W["a"] * da[m] + W["b"] * db[m] for m in da}


def test_cat_is_exact_and_equals_inference_stacking(saved: tuple[str, Path, lk.LoraModel]) -> None:
    kind, tmp, lm = saved
    report = stack([tmp / "a", tmp / "b"], weights=list(W.values()), method="cat", out=tmp / "c")
    got, want = deltas(tmp / "c"), exact(tmp)
    assert got.keys() == want.keys()
    for m in want:  # one fp32 GEMM over concatenated factors vs two: a few ulps of |T|
        torch.testing.assert_close(got[m], want[m], rtol=1e-5, atol=1e-5 * want[m].abs().max())
    assert report.rel_error == 0.0 and all(r.rank == 6 for r in report.modules)
    lm.set_adapter(W)  # inference-time weighted stacking (hot-swap path)
    ref = logits(lm, kind)
    stacked = lk.LoraModel.from_pretrained(tiny(kind), tmp / "c")
    torch.testing.assert_close(logits(stacked, kind), ref, rtol=0, atol=1e-4)


def test_svd_matches_optimal_truncation(saved: tuple[str, Path, lk.LoraModel]) -> None:
    _, tmp, _ = saved
    report = stack([tmp / "a", tmp / "b"], weights=list(W.values()), method="svd", out=tmp / "s",
                   rank=3)  # fmt: skip
    got, want = deltas(tmp / "s"), exact(tmp)
    for res in report.modules:
        t = want[res.module].double()
        s = torch.linalg.svdvals(t)  # dense reference: Eckart-Young optimum
        optimum = float((s[3:] ** 2).sum().sqrt() / s.norm())
        err = float((got[res.module].double() - t).norm() / t.norm())
        assert res.rank == 3
        assert err == pytest.approx(optimum, rel=1e-3, abs=1e-6)
        assert res.rel_error == pytest.approx(optimum, rel=1e-3, abs=1e-6)
        assert res.energy_kept == pytest.approx(1 - optimum**2, rel=1e-4)
    assert 0 < report.energy_kept < 1
    full = stack([tmp / "a", tmp / "b"], weights=list(W.values()), method="svd", out=tmp / "f",
                 rank=6)  # fmt: skip
    assert full.rel_error < 1e-6


def test_ties_and_dare(saved: tuple[str, Path, lk.LoraModel]) -> None:
    _, tmp, _ = saved
    paths = [tmp / "a", tmp / "b"]
    d1 = stack(paths, weights=[0.7, 0.3], method="dare", out=tmp / "d1", density=0.5, seed=3,
               rank=64)  # fmt: skip
    stack(paths, weights=[0.7, 0.3], method="dare", out=tmp / "d2", density=0.5, seed=3, rank=64)
    stack(paths, weights=[0.7, 0.3], method="dare", out=tmp / "d3", density=0.5, seed=4, rank=64)
    x1, x2, x3 = deltas(tmp / "d1"), deltas(tmp / "d2"), deltas(tmp / "d3")
    assert all(torch.equal(x1[m], x2[m]) for m in x1)
    assert any(not torch.equal(x1[m], x3[m]) for m in x1)
    assert d1.seed == 3 and d1.rel_error > 0
    assert read_adapter(tmp / "d1").metadata["history"]["options"]["seed"] == 3
    # density 1: dare keeps everything, so (at full rank) it is the exact weighted sum
    full = stack(paths, weights=list(W.values()), method="dare", out=tmp / "d4", density=1.0,
                 rank=64)  # fmt: skip
    assert full.rel_error < 1e-5
    # ties on a single input with density 1 is the identity
    one = stack(paths[:1], weights=[0.5], method="ties", out=tmp / "t1", density=1.0, rank=64)
    assert one.rel_error < 1e-5
    ties = stack(paths, weights=[0.7, 0.3], method="ties", out=tmp / "t2", density=0.3, rank=4)
    assert 0 < ties.rel_error < 1 and all(0 < r.energy_kept <= 1 for r in ties.modules)


def test_output_loads_in_peft(tmp_path: Path) -> None:
    from peft import PeftModel

    lm = with_adapters("gpt2", ("a", "b"))
    for name in W:
        lm.save_adapter(tmp_path / name, name)
    stack([tmp_path / "a", tmp_path / "b"], weights=list(W.values()), method="svd",
          out=tmp_path / "s", rank=3)  # fmt: skip
    ours = lk.LoraModel.from_pretrained(tiny("gpt2"), tmp_path / "s")
    peft_model = PeftModel.from_pretrained(tiny("gpt2"), tmp_path / "s").eval()
    torch.testing.assert_close(logits(peft_model, "gpt2"), logits(ours, "gpt2"), rtol=0,
                               atol=1e-5)  # fmt: skip


def test_incompatible_inputs(tmp_path: Path) -> None:
    g = with_adapters("gpt2", ("a",))
    g.save_adapter(tmp_path / "g", "a")
    b = with_adapters("bert", ("a",))
    b.save_adapter(tmp_path / "b", "a")
    other = lk.inject(tiny("gpt2", seed=1), g.adapters["a"], "a")
    other.save_adapter(tmp_path / "o", "a")
    with pytest.raises(lk.AdapterMismatchError, match="different"):
        stack([tmp_path / "g", tmp_path / "b"], out=tmp_path / "x")
    with pytest.raises(lk.AdapterMismatchError, match="fingerprint"):
        stack([tmp_path / "g", tmp_path / "o"], out=tmp_path / "x")
    with pytest.raises(lk.ConfigError, match="density"):
        stack([tmp_path / "g"], method="ties", out=tmp_path / "x")
    with pytest.raises(lk.ConfigError, match="weights"):
        stack([tmp_path / "g"], weights=[1.0, 2.0], out=tmp_path / "x")
    with pytest.raises(lk.ConfigError, match="method"):
        stack([tmp_path / "g"], method="avg", out=tmp_path / "x")  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()


def test_factors_that_do_not_pair_up_are_refused(tmp_path: Path) -> None:
    # A lora_B without its lora_A was silently left out of the stack, ranks that disagree
    # raised a bare RuntimeError from torch.cat, and an adapter holding no LoRA tensors a
    # bare ValueError.
    lm = with_adapters("bert", ("a",), heads=True)
    lm.save_adapter(tmp_path / "a", "a")
    broken = broken_copies(tmp_path / "a", tmp_path / "broken")
    cases = {
        "no_A": "has lora_B but no lora_A",
        "no_B": "has lora_A but no lora_B",
        "rank": r"lora_A \[4, 32\] and lora_B \[\d+, 3\]",
        "heads_only": "has no lora_A/lora_B tensors",
    }
    for what, match in cases.items():
        out = tmp_path / f"out-{what}"
        for inputs in ([broken[what]], [tmp_path / "a", broken[what]]):
            with pytest.raises(lk.LoraKitError, match=match):
                stack(inputs, out=out)
            assert not out.exists()


# Full-rank refactoring (rank 64 >= every module's min(out, in)) of an fp32 element-wise result:
# the SVD round trip is exact up to fp32 rounding, ~1e-6 of the largest entry; 1e-4 of it is
# still far below any entry a wrong rule changes (they are O(max) for random factors).
REFACTOR_TOL = 1e-4


def test_dare_rescales_the_kept_entries(saved: tuple[str, Path, lk.LoraModel]) -> None:
    """Each entry of a single input is dropped or kept divided by the density (unbiased)."""
    _, tmp, _ = saved
    stack([tmp / "a"], weights=[1.0], method="dare", out=tmp / "d", density=0.5, seed=0, rank=64)
    got, want = deltas(tmp / "d"), deltas(tmp / "a")
    kept = total = 0
    for m, t in want.items():
        tol = REFACTOR_TOL * float(t.abs().max()) / 0.5
        error = torch.minimum(got[m].abs(), (got[m] - t / 0.5).abs())  # 0 or t / density
        assert float(error.max()) <= tol, m
        kept += int((got[m].abs() > tol).sum())
        total += t.numel()
    assert 0.45 < kept / total < 0.55  # about half the entries survive at density 0.5


def test_ties_elects_a_sign_and_averages_the_agreeing(
    saved: tuple[str, Path, lk.LoraModel],
) -> None:
    """Density 1 (no trimming) on two inputs: where their signs agree the result is the mean;
    where they disagree, the larger magnitude wins the election and is kept alone."""
    _, tmp, _ = saved
    stack([tmp / "a", tmp / "b"], weights=list(W.values()), method="ties", out=tmp / "t",
          density=1.0, rank=64)  # fmt: skip
    got, da, db = deltas(tmp / "t"), deltas(tmp / "a"), deltas(tmp / "b")
    for m in da:
        d1, d2 = W["a"] * da[m], W["b"] * db[m]
        larger = torch.where(d1.abs() >= d2.abs(), d1, d2)
        want = torch.where(d1.sign() == d2.sign(), (d1 + d2) / 2, larger)
        assert (d1.sign() != d2.sign()).any()  # both rules are exercised
        tol = REFACTOR_TOL * float(want.abs().max())
        torch.testing.assert_close(got[m], want, rtol=0, atol=tol)


def test_ties_keeps_the_top_density_magnitudes(saved: tuple[str, Path, lk.LoraModel]) -> None:
    _, tmp, _ = saved
    stack([tmp / "a"], weights=[1.0], method="ties", out=tmp / "t", density=0.5, rank=64)
    got, want = deltas(tmp / "t"), deltas(tmp / "a")
    for m, t in want.items():
        k = round(0.5 * t.numel())
        kth = t.abs().flatten().topk(k).values[-1]  # the k-th largest magnitude is kept
        trimmed = t * (t.abs() >= kth)
        tol = REFACTOR_TOL * float(t.abs().max())
        torch.testing.assert_close(got[m], trimmed, rtol=0, atol=tol)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_cat_of_inputs_with_per_module_ranks(kind: str, tmp_path: Path) -> None:
    """A rank_pattern input gives output modules of different ranks; the output's rank and
    alpha patterns must keep every module's scaling at 1 (tolerances as in the cat test)."""
    fc = "c_fc" if kind == "gpt2" else "intermediate.dense"
    lm = with_adapters(kind, ("a", "b"))  # ranks 4 and 2 everywhere
    lm.add_adapter("p", dataclasses.replace(config(kind), rank_pattern={fc: 1},
                                            alpha_pattern={fc: 5.0}))  # fmt: skip
    randomize(lm, "p", seed=5)
    for name in ("p", "b"):
        lm.save_adapter(tmp_path / name, name)
    weights = {"p": 0.7, "b": -0.3}
    stack([tmp_path / "p", tmp_path / "b"], weights=list(weights.values()), method="cat",
          out=tmp_path / "c")  # fmt: skip
    out = read_adapter(tmp_path / "c")
    assert len({out.config.rank_for(m) for m in deltas(tmp_path / "c")}) == 2  # 3 and 6
    got, dp, db = deltas(tmp_path / "c"), deltas(tmp_path / "p"), deltas(tmp_path / "b")
    for m, d in got.items():
        want = weights["p"] * dp[m] + weights["b"] * db[m]
        torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-5 * want.abs().max())
    lm.set_adapter(weights)
    stacked = lk.LoraModel.from_pretrained(tiny(kind), tmp_path / "c")
    torch.testing.assert_close(logits(stacked, kind), logits(lm, kind), rtol=0, atol=1e-4)


def test_overall_metrics_weight_modules_by_their_update(
    saved: tuple[str, Path, lk.LoraModel],
) -> None:
    """The report's energy and error are those of all modules' updates taken as one."""
    _, tmp, _ = saved
    report = stack([tmp / "a", tmp / "b"], weights=list(W.values()), method="svd",
                   out=tmp / "s", rank=2)  # fmt: skip
    got, want = deltas(tmp / "s"), exact(tmp)
    norm2 = sum(float(want[m].double().norm() ** 2) for m in want)
    err2 = sum(float((got[m].double() - want[m].double()).norm() ** 2) for m in want)
    kept2 = sum(float(got[m].double().norm() ** 2) for m in want)  # truncated SVD: ||T_k||^2
    # float64 references of fp32 factors: agreement to ~1e-6; 1e-3 allows for the per-module
    # values being computed on the factors, not on dense matrices.
    assert report.rel_error == pytest.approx((err2 / norm2) ** 0.5, rel=1e-3)
    assert report.energy_kept == pytest.approx(kept2 / norm2, rel=1e-3)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"weights": [1, "x"]}, "weights must be a list of numbers"),
        ({"weights": [1, None]}, "weights must be a list of numbers"),
        ({"weights": [1, True]}, "weights must be a list of numbers"),
        ({"weights": [1, np.bool_(True)]}, "weights must be a list of numbers"),  # was 1.0
        ({"weights": [1, torch.tensor(True)]}, "weights must be a list of numbers"),  # was 1.0
        ({"weights": "12"}, "weights must be a list of numbers"),  # was read as [1.0, 2.0]
        ({"method": "dare", "density": "x"}, "needs --density"),
        ({"method": "dare", "density": 0.5, "seed": "x"}, "seed must be an integer"),
        ({"weights": 0.5}, "weights must be a list of numbers"),  # was a bare TypeError
        ({"weights": [10**400, 1]}, "weights must be finite"),  # was a bare OverflowError
        ({"method": "dare", "density": 0.5, "seed": 2**64}, "seed must be a 64-bit integer"),
    ],
)
def test_arguments_of_the_wrong_type_are_config_errors(
    tmp_path: Path, arguments: dict[str, object], message: str
) -> None:
    """They were bare ValueError/TypeError tracebacks (or, for a string of digits, weights)."""
    with pytest.raises(lk.ConfigError, match=message):
        stack([tmp_path / "a", tmp_path / "b"], out=tmp_path / "out", **arguments)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()


def test_one_path_instead_of_a_list_is_refused(tmp_path: Path) -> None:
    """Each character was read as an adapter directory ("'/' is not an adapter directory")."""
    with pytest.raises(lk.ConfigError, match="list of adapter directories, got one path"):
        stack(str(tmp_path / "a"), out=tmp_path / "out")  # type: ignore[arg-type]


def test_numbers_of_other_types_are_weights_density_and_seed(tmp_path: Path) -> None:
    """As set_adapter reads weights: NumPy, Decimal and one-element tensors are numbers (the
    type checks refused Decimal and tensors, and a NumPy seed passed them, then failed in
    torch with a bare TypeError)."""
    import decimal

    import numpy as np

    lm = with_adapters("gpt2", ("a", "b"))
    for name in W:
        lm.save_adapter(tmp_path / name, name)
    paths = [tmp_path / "a", tmp_path / "b"]
    expected = stack(paths, weights=[0.5, 0.25], method="dare", out=tmp_path / "ref",
                     density=0.5, seed=3, rank=64)  # fmt: skip
    weights = [decimal.Decimal("0.5"), torch.tensor(0.25)]
    for out, density in (("d", np.float32(0.5)), ("t", torch.tensor(0.5))):
        arguments: dict[str, object] = {"weights": weights, "density": density, "seed": np.int64(3)}
        report = stack(paths, method="dare", out=tmp_path / out, rank=64, **arguments)  # type: ignore[arg-type]
        assert report.weights == expected.weights and report.seed == 3
        assert type(report.seed) is int
        assert report.rel_error == expected.rel_error
        assert read_adapter(tmp_path / out).metadata["history"]["options"]["seed"] == 3
