"""LoRALinear: Linear and Conv1D behave identically; the fused update matches the formula."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lora_kit import LoraAdapter, LoRALinear, UnsupportedModuleError
from lora_kit.layers import TRANSPOSED_DOWN_MAX_ROWS, runs_plain
from lora_kit.routing import Router, Selection


def _pair(in_f: int = 24, out_f: int = 40) -> tuple[LoRALinear, LoRALinear, Router]:
    """A Linear(W) and a Conv1D(W^T) wrapper sharing one router and identical adapters."""
    torch.manual_seed(0)
    linear = nn.Linear(in_f, out_f)
    conv = Conv1D(out_f, in_f)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.t())  # Conv1D stores [in, out]
        conv.bias.copy_(linear.bias)
    router = Router()
    wrapped = LoRALinear(linear, router), LoRALinear(conv, router)
    for layer in wrapped:
        for name, seed in (("a", 1), ("b", 2)):
            adapter = LoraAdapter(in_f, out_f, r=4, scaling=2.0)
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                adapter.lora_A.copy_(torch.randn(4, in_f, generator=gen))
                adapter.lora_B.copy_(torch.randn(out_f, 4, generator=gen))
            layer.add(name, adapter)
    return wrapped[0], wrapped[1], router


@pytest.mark.parametrize("selection", [(("a", 1.0),), (("a", 0.7), ("b", -0.3))])
def test_linear_and_conv1d_give_the_same_output(
    selection: tuple[tuple[str, float], ...], forward_path: str
) -> None:
    linear, conv, router = _pair()
    router.default = Selection(selection)
    x = torch.randn(3, 5, 24)
    # fp32 tolerance: Linear and Conv1D run different GEMM kernels (addmm vs linear) on
    # transposed storage, so sums may be ordered differently: a few ulps of outputs ~10.
    torch.testing.assert_close(linear(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_no_active_adapter_runs_the_base_alone(kind: str) -> None:
    linear, conv, router = _pair()
    layer = linear if kind == "linear" else conv
    x = torch.randn(3, 5, 24)
    for selection in ((), (("missing", 1.0),)):
        router.default = Selection(selection)
        assert torch.equal(layer(x), layer.base(x))


def test_update_matches_the_formula_and_weights(forward_path: str) -> None:
    linear, _, router = _pair()
    x = torch.randn(2, 7, 24)
    a, b = linear.adapter("a"), linear.adapter("b")
    reference = (
        linear.base(x)
        + 0.7 * a.scaling * x @ a.lora_A.t() @ a.lora_B.t()
        - 0.3 * b.scaling * x @ b.lora_A.t() @ b.lora_B.t()
    )
    router.default = Selection((("a", 0.7), ("b", -0.3)))
    torch.testing.assert_close(linear(x), reference, rtol=1e-5, atol=1e-5)
    # delta_weight is the same map in Linear layout [out, in]
    torch.testing.assert_close(
        x @ a.delta_weight().t(), a.scaling * x @ a.lora_A.t() @ a.lora_B.t()
    )


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_three_active_adapters_all_count(kind: str, forward_path: str) -> None:
    """The fused path adds the first adapter into the bias and loops over the others; with two
    adapters a loop that skipped one was caught, with three a loop that skipped only the third
    (or a later one) was not. fp32, 24->40, four ranks: rounding stays below 1e-5."""
    linear, conv, router = _pair()
    layer = linear if kind == "linear" else conv
    c = LoraAdapter(24, 40, r=4, scaling=0.5)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        c.lora_A.copy_(torch.randn(4, 24, generator=gen))
        c.lora_B.copy_(torch.randn(40, 4, generator=gen))
    layer.add("c", c)
    x = torch.randn(2, 7, 24)
    weights = {"a": 0.7, "b": -0.3, "c": 1.5}
    reference = linear.base(x)
    for name, weight in weights.items():
        adapter = layer.adapter(name)
        reference = (
            reference + weight * adapter.scaling * x @ adapter.lora_A.t() @ adapter.lora_B.t()
        )
    router.default = Selection(tuple(weights.items()))
    torch.testing.assert_close(layer(x), reference, rtol=1e-5, atol=1e-5)


# Both layouts of the down-projection (`down_t`): [r, T] GEMM up to the threshold, [T, r] above.
@pytest.mark.parametrize("tokens", [1, 35, TRANSPOSED_DOWN_MAX_ROWS + 1])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_forward_and_gradients_match_a_float64_reference(
    kind: str, tokens: int, forward_path: str
) -> None:
    linear, conv, router = _pair()
    layer = linear if kind == "linear" else conv
    router.default = Selection((("a", 0.7), ("b", -0.3)))
    x = torch.randn(tokens, 24)
    out = layer(x)
    out.square().sum().backward()

    base = linear.base  # Linear layout [out, in]; conv holds the same weight transposed
    w, bias = base.weight.detach().double(), base.bias.detach().double()
    factors = {
        name: (
            layer.adapter(name).lora_A.detach().double().requires_grad_(),
            layer.adapter(name).lora_B.detach().double().requires_grad_(),
        )
        for name in ("a", "b")
    }
    reference = x.double() @ w.t() + bias
    for name, weight in (("a", 0.7), ("b", -0.3)):
        a, b = factors[name]
        reference = reference + weight * layer.adapter(name).scaling * x.double() @ a.t() @ b.t()
    reference.square().sum().backward()
    # fp32 against float64. Outputs (~10) are sums of 24 + 4 products: a few fp32 ulps, so
    # 1e-5 relative. Gradients (~10^2) sum over up to 1025 tokens with cancellation: fp32
    # error up to ~sqrt(tokens) ulps of the summands, hence 1e-4 relative. Both are far below
    # what a wrong layout or transposition gives (O(1) relative).
    torch.testing.assert_close(out.double(), reference.detach(), rtol=1e-5, atol=1e-5)
    for name in ("a", "b"):
        adapter, (a, b) = layer.adapter(name), factors[name]
        assert adapter.lora_A.grad is not None and adapter.lora_B.grad is not None
        torch.testing.assert_close(adapter.lora_A.grad.double(), a.grad, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(adapter.lora_B.grad.double(), b.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_zero_b_is_bit_identical_to_the_base(kind: str, forward_path: str) -> None:
    linear, conv, router = _pair()
    layer = linear if kind == "linear" else conv
    for name in ("a", "b"):
        with torch.no_grad():
            layer.adapter(name).lora_B.zero_()
    router.default = Selection((("a", 0.7), ("b", -0.3)))
    x = torch.randn(3, 5, 24)
    # the fused forward (bias + updates, then the base GEMM) runs the base's own BLAS call
    assert torch.equal(layer(x), layer.base(x))


def _reference(layer: LoRALinear, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
    adapter = layer.adapter("a")
    return base_out + adapter.scaling * x @ adapter.lora_A.t() @ adapter.lora_B.t()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_base_hooks_and_patched_forwards_are_honoured(kind: str, forward_path: str) -> None:
    linear, conv, router = _pair()
    layer = linear if kind == "linear" else conv
    router.default = Selection((("a", 1.0),))
    x = torch.randn(2, 7, 24)
    with torch.no_grad():
        plain = layer(x)
        calls: list[str] = []

        def shift(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
            calls.append("hook")
            return output + 1.0

        handle = layer.base.register_forward_hook(shift)
        try:
            hooked = layer(x)
        finally:
            handle.remove()
        original = layer.base.forward
        layer.base.forward = lambda inputs: original(inputs) * 2.0  # as accelerate patches it
        try:
            patched = layer(x)
        finally:
            del layer.base.forward
        assert calls == ["hook"]
        # fused (plain) and unfused (hook, patch) paths sum in different orders: fp32 ulps
        torch.testing.assert_close(plain, _reference(layer, x, layer.base(x)), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(
            hooked, _reference(layer, x, layer.base(x) + 1.0), rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(
            patched, _reference(layer, x, layer.base(x) * 2.0), rtol=1e-5, atol=1e-5
        )


def test_module_wide_hooks_are_honoured() -> None:
    linear, _, router = _pair()
    router.default = Selection((("a", 1.0),))
    seen: list[nn.Module] = []

    def forward_hook(module: nn.Module, args: object, output: torch.Tensor) -> None:
        seen.append(module)

    handle = nn.modules.module.register_module_forward_hook(forward_hook)
    try:
        with torch.no_grad():
            linear(torch.randn(4, 24))
    finally:
        handle.remove()
    assert seen == [linear.base, linear]


def test_a_base_with_backward_hooks_is_called_as_a_module() -> None:
    linear, _, _ = _pair()
    assert runs_plain(linear.base)
    handle = linear.base.register_full_backward_hook(lambda *args: None)
    try:
        assert not runs_plain(linear.base)  # the fused forward would skip the hook
    finally:
        handle.remove()
    assert not runs_plain(nn.Bilinear(2, 2, 2))


def test_linear_without_bias() -> None:
    router = Router()
    layer = LoRALinear(nn.Linear(24, 40, bias=False), router)
    adapter = LoraAdapter(24, 40, r=4, scaling=2.0)
    with torch.no_grad():
        adapter.lora_A.normal_()
        adapter.lora_B.normal_()
    layer.add("a", adapter)
    router.default = Selection((("a", 1.0),))
    x = torch.randn(5, 24)
    with torch.no_grad():
        torch.testing.assert_close(
            layer(x), _reference(layer, x, layer.base(x)), rtol=1e-5, atol=1e-5
        )


def test_fp32_adapter_beside_bf16_base_rounds_once() -> None:
    linear, _, router = _pair()
    base_bf16 = nn.Linear(24, 40).to(torch.bfloat16)
    with torch.no_grad():
        base_bf16.weight.copy_(linear.base.weight)
        base_bf16.bias.copy_(linear.base.bias)
    layer = LoRALinear(base_bf16, router)
    layer.add("a", linear.adapter("a"))  # fp32 adapter
    router.default = Selection((("a", 1.0),))
    x = torch.randn(4, 24).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    a = linear.adapter("a")
    exact = base_bf16(x).float() + a.scaling * x.float() @ a.lora_A.t() @ a.lora_B.t()
    # one bf16 rounding of the exact fp32 sum: within half a bf16 ulp (2^-8 relative)
    torch.testing.assert_close(out.float(), exact.to(torch.bfloat16).float(), rtol=2**-7, atol=1e-2)


def test_gradients_flow_to_adapters_only() -> None:
    linear, _, router = _pair()
    linear.base.requires_grad_(False)
    router.default = Selection((("a", 1.0),))
    linear(torch.randn(2, 3, 24)).pow(2).sum().backward()
    assert linear.adapter("a").lora_A.grad is not None
    assert linear.adapter("a").lora_B.grad is not None
    assert linear.adapter("b").lora_A.grad is None  # inactive
    assert linear.base.weight.grad is None


def test_only_linear_and_conv1d_can_be_wrapped() -> None:
    with pytest.raises(UnsupportedModuleError, match="Embedding"):
        LoRALinear(nn.Embedding(3, 4), Router())


def _graph_names(t: torch.Tensor) -> set[str]:
    """Names of every autograd node that produced ``t``."""
    seen: set[str] = set()
    stack = [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or type(node).__name__ in seen:
            continue
        seen.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return seen


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_forward_records_no_in_place_update_of_a_view(
    kind: str, dtype: torch.dtype
) -> None:
    """In place on the base's (view) output costs a CopySlices node and its copies in backward."""
    linear, conv, router = _pair()
    layer = linear if kind == "linear" else conv
    layer.base.to(dtype)
    router.default = Selection((("a", 1.0),))
    x = torch.randn(2, 3, 24, dtype=dtype, requires_grad=True)
    out = layer(x)
    assert "CopySlices" not in _graph_names(out)
    out.float().pow(2).sum().backward()
    assert layer.adapter("a").lora_A.grad is not None


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_inference_updates_the_base_output_in_place(kind: str) -> None:
    linear, conv, router = _pair()
    layer = linear if kind == "linear" else conv
    router.default = Selection((("a", 1.0),))
    x = torch.randn(2, 3, 24)
    with torch.no_grad():
        out = layer.base(x)
        a = layer.adapter("a")
        expected = _reference(layer, x, out.clone())
        assert a.add_to(out, x) is out  # no [tokens, out] temporary
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_a_base_with_a_full_backward_hook_trains(kind: str) -> None:
    """The hook makes the base output a view that must not be modified in place."""
    linear, conv, router = _pair()
    layer = linear if kind == "linear" else conv
    router.default = Selection((("a", 1.0),))
    x = torch.randn(2, 3, 24, requires_grad=True)
    layer(x).pow(2).sum().backward()
    expected = layer.adapter("a").lora_B.grad.clone()
    layer.adapter("a").zero_grad()
    grads: list[torch.Tensor] = []
    handle = layer.base.register_full_backward_hook(lambda m, gi, go: grads.append(go[0]))
    try:
        layer(x).pow(2).sum().backward()
    finally:
        handle.remove()
    assert len(grads) == 1
    torch.testing.assert_close(layer.adapter("a").lora_B.grad, expected)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_autocast_adds_the_update_in_the_gemm(kind: str) -> None:
    """Under bf16 autocast the update is one GEMM accumulating into the base output."""
    linear, conv, router = _pair()
    layer = linear if kind == "linear" else conv
    router.default = Selection((("a", 1.0),))
    x = torch.randn(2, 3, 24, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        base = layer.base(x)
    assert out.dtype == torch.bfloat16
    names = _graph_names(out)
    assert "AddmmBackward0" in names and "AddBackward0" not in names
    with torch.no_grad():
        exact = _reference(layer, x, base.float())
    # bf16 inputs (x, A, B, the base GEMM) carry 2^-8 relative error each: bound by the scale
    torch.testing.assert_close(out.float(), exact, rtol=0, atol=2**-6 * exact.abs().max().item())
    out.float().sum().backward()
    assert layer.adapter("a").lora_B.grad is not None
    assert layer.adapter("a").lora_B.grad.dtype == torch.float32


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fp32_adapter_beside_bf16_base_without_autograd(kind: str) -> None:
    """The in-place mixed-dtype path (inference) applies the scaling and the stacking weight."""
    linear, conv, router = _pair()
    layer = linear if kind == "linear" else conv
    layer.base.to(torch.bfloat16)  # the adapters stay fp32
    router.default = Selection((("a", 0.7),))
    x = torch.randn(4, 24).to(torch.bfloat16)
    a = layer.adapter("a")
    with torch.no_grad():
        out = layer(x)
        exact = layer.base(x).float() + 0.7 * a.scaling * x.float() @ a.lora_A.t() @ a.lora_B.t()
    assert out.dtype == torch.bfloat16
    # One bf16 rounding of the fp32 sum: within one bf16 ulp (2^-7 relative) of the rounded
    # exact value. A lost factor (scaling 2 or weight 0.7) moves the O(10) update by > 1.
    torch.testing.assert_close(out.float(), exact.to(torch.bfloat16).float(), rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize("r", [4, 16])
def test_reset_draws_peft_initialisations(r: int) -> None:
    """gaussian: A ~ N(0, (1/r)^2); zero_b: A ~ U(-1/sqrt(in), 1/sqrt(in)); B zero in both."""
    adapter = LoraAdapter(512, 8, r=r, scaling=1.0)
    adapter.reset("gaussian", torch.Generator().manual_seed(0))
    a = adapter.lora_A.detach()
    # r * 512 >= 2048 samples: the sample std is within ~1.6% (one sigma) of the true one, so
    # 10% is > 6 sigma (and the draw is seeded); 1/sqrt(r) instead of 1/r is off by 2-4x.
    assert float(a.std()) == pytest.approx(1.0 / r, rel=0.1)
    assert abs(float(a.mean())) < 0.1 / r
    assert not adapter.lora_B.any()
    adapter.reset("zero_b", torch.Generator().manual_seed(0))
    bound = 1.0 / 512**0.5
    assert float(a.abs().max()) <= bound  # `a` is a view of lora_A: reset writes in place
    # uniform on [-b, b] has std b / sqrt(3)
    assert float(a.std()) == pytest.approx(bound / 3**0.5, rel=0.1)
    assert not adapter.lora_B.any()


class _Doubled(nn.Module):
    """A parametrization: the factor used is twice the one stored."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return 2 * t


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_parametrized_factors_are_read_through_the_parametrization(
    kind: str, forward_path: str
) -> None:
    """The forward reads factors from the parameter dict for speed; a factor under
    ``torch.nn.utils.parametrize`` lives elsewhere and must still be used as parametrized."""
    from torch.nn.utils import parametrize

    linear, conv, router = _pair()
    layer = linear if kind == "linear" else conv
    router.default = Selection((("a", 1.0),))
    x = torch.randn(2, 5, 24)
    a = layer.adapter("a")
    with torch.no_grad():
        expected = layer.base(x) + a.scaling * (x @ (2 * a.lora_A).t()) @ (2 * a.lora_B).t()
    parametrize.register_parametrization(a, "lora_A", _Doubled())
    parametrize.register_parametrization(a, "lora_B", _Doubled())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
