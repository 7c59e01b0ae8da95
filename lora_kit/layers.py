"""The LoRA layer: a frozen base projection plus any number of named low-rank adapters.

Both ``nn.Linear`` (weight ``[out, in]``) and GPT-2's ``Conv1D`` (weight stored transposed,
``[in, out]``) are wrapped the same way: the adapter path always runs in Linear layout
(``A: [r, in]``, ``B: [out, r]``, exactly PEFT's tensors); only a merged delta is transposed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from .config import InitMethod
from .errors import AdapterMismatchError, MergedStateError, UnsupportedModuleError
from .routing import Router, Selection
from .rows import add_rows

if TYPE_CHECKING:
    from .fingerprint import WeightsSeen

# Rows up to which ``A @ x^T`` beats ``x @ A^T`` (see `down_t`).
TRANSPOSED_DOWN_MAX_ROWS = 1024


def down_t(x: Tensor, a: Tensor) -> Tensor:
    """The down-projection ``h = x @ A^T``, returned transposed: ``h^T``, ``[r, tokens]``.

    Both forms compute the same products; only the GEMM's layout differs. With ``r`` as small
    as LoRA's, CPU BLAS (MKL 2024, measured on AVX2) runs ``A @ x^T`` 1.2-1.6x faster up to about
    a thousand rows and ``x @ A^T`` faster beyond; the up-projection in `add_low_rank_` is also
    faster reading ``h`` from a contiguous ``[r, tokens]`` block. ``benchmarks/bench_layer.py``
    measures both.

    Args:
        x: Layer input ``[..., in]`` (already in the adapter's dtype).
        a: ``lora_A``, ``[r, in]``.

    Returns:
        ``h^T``, ``[r, tokens]`` where ``tokens`` is the product of ``x``'s leading dimensions.
    """
    x2 = x.reshape(-1, x.shape[-1])  # [tokens, in] (a view for contiguous x)
    if x2.shape[0] <= TRANSPOSED_DOWN_MAX_ROWS:
        return torch.mm(a, x2.t())  # [r, in] @ [in, tokens] -> contiguous [r, tokens]
    return F.linear(x2, a).t()  # [tokens, r] contiguous, viewed as [r, tokens]


def add_low_rank_(out: Tensor, h_t: Tensor, b: Tensor, scale: float = 1.0) -> Tensor:
    """``out + scale * h @ B^T``, written into ``out`` in place when autograd is not recording.

    Under autograd the sum is a new tensor made by the same single fused GEMM: the base
    projection's output is usually a view (``nn.Linear`` on 3-D input and ``Conv1D`` both
    reshape a 2-D product), and an in-place update of a view makes autograd record a
    ``CopySlices`` node whose backward adds a clone and copies per layer (measured on an H200:
    about 190 more kernel launches per GPT-2 small training step). The base output is not
    saved for backward either way, so both forms hold the same memory between layers.

    Args:
        out: Base output ``[..., out]``.
        h_t: The down-projection transposed (`down_t`), ``[r, tokens]``.
        b: ``lora_B``, ``[out, r]``.
        scale: Factor on the product (scaling times any stacking weight).

    Returns:
        The sum, ``[..., out]``: ``out`` itself when updated in place.
    """
    recording = torch.is_grad_enabled() and (
        out.requires_grad or h_t.requires_grad or b.requires_grad
    )
    if b.dtype != out.dtype == h_t.dtype and torch.is_autocast_enabled(out.device.type):
        b = b.to(out.dtype)  # what autocast does for a GEMM; it still accumulates in fp32
    if h_t.dtype == b.dtype == out.dtype and out.is_contiguous():
        out2 = out.view(-1, out.shape[-1])  # [T, o]
        if recording:  # [T, o] + scale * h[T, r] @ B^T[r, o], one GEMM
            return torch.addmm(out2, h_t.t(), b.t(), alpha=scale).view(out.shape)
        out2.addmm_(h_t.t(), b.t(), alpha=scale)  # in place: no [T, o] temporary
        return out
    # Mixed dtypes without autocast (an fp32 adapter beside a bf16 base): the sum is computed
    # in the wider type and rounded once into out's dtype.
    delta = F.linear(h_t.t(), b).view(out.shape)  # [..., o]
    if recording:
        return torch.add(out, delta, alpha=scale).to(out.dtype)  # [..., o]
    return out.add_(delta, alpha=scale)


# Outputs per call (tokens x out_features) from which `LoRALinear` fuses its forward. Smaller
# calls (decoding) are dominated by per-call overhead: there the checks would cost more than the
# pass over the output that fusing saves (measured on CPU: no gain up to ~10^5 outputs).
FUSE_MIN_OUTPUTS = 1 << 16

# Base modules whose forward `LoRALinear._fused_forward` reproduces (not their subclasses).
_PLAIN_BASES = (nn.Linear, Conv1D)
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def runs_plain(module: nn.Module) -> bool:
    """Whether calling ``module`` is just its class's ``forward``: no hooks, no patched forward.

    Checks the module's own hooks, module-wide ones (``register_module_forward_hook`` etc.) and
    an instance-level ``forward`` such as accelerate's device-placement wrapper.
    """
    if type(module) not in _PLAIN_BASES or "forward" in module.__dict__:
        return False
    everywhere = torch.nn.modules.module
    for hooks in _MODULE_HOOKS:
        if getattr(module, hooks, None) or getattr(everywhere, "_global" + hooks, None):
            return False
    return True


class LoraAdapter(nn.Module):
    """One adapter's weights in one layer: ``delta(x) = scaling * B(A(dropout(x)))``.

    Attributes:
        lora_A: ``[r, in_features]``.
        lora_B: ``[out_features, r]``.
        scaling: ``alpha / r`` (or ``alpha / sqrt(r)`` with rsLoRA).
        dropout: Dropout probability on the adapter's input.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        r: int,
        scaling: float,
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        factors: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Zero factors of rank ``r``, or ``factors`` (``(A, B)``) held as they are.

        Args:
            in_features: Input size of the adapted layer.
            out_features: Output size of the adapted layer.
            r: Rank.
            scaling: The update's factor.
            dropout: Dropout probability on the adapter's input.
            dtype: dtype of zero factors (ignored with ``factors``).
            device: Device of zero factors (ignored with ``factors``).
            factors: ``A [r, in_features]`` and ``B [out_features, r]`` to become the
                parameters themselves (no copy: pass tensors this adapter may own); loading
                uses it to skip allocating zero factors that would be replaced at once.

        Raises:
            AdapterMismatchError: ``factors`` do not have those shapes.
        """
        super().__init__()
        if factors is None:
            self.lora_A = nn.Parameter(torch.zeros(r, in_features, dtype=dtype, device=device))
            self.lora_B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))
        else:
            factor_a, factor_b = factors
            if factor_a.shape != (r, in_features) or factor_b.shape != (out_features, r):
                raise AdapterMismatchError(
                    f"factors of shapes {list(factor_a.shape)} and {list(factor_b.shape)} do not "
                    f"fit a rank-{r} adapter of a {in_features}->{out_features} layer (need "
                    f"[{r}, {in_features}] and [{out_features}, {r}])"
                )
            self.lora_A = nn.Parameter(factor_a)
            self.lora_B = nn.Parameter(factor_b)
        self.scaling = scaling
        self.dropout = dropout
        # Conversions so far (see `_apply`): part of what a cached mixed-batch stack checks.
        self.conversions = 0

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> LoraAdapter:
        """`nn.Module._apply` (every dtype/device conversion: ``.to()``, ``.half()``...), counted.

        A conversion may re-store a factor through ``.data``, which keeps the tensor and its
        version counter; a round trip (``.half()`` then ``.float()``) can even land at the old
        address. The count is what lets the mixed-batch stack cache (`lora_kit.rows`) notice.
        """
        super()._apply(fn, recurse)
        self.conversions += 1
        return self

    @property
    def r(self) -> int:
        """The adapter's rank."""
        return self.lora_A.shape[0]

    @torch.no_grad()
    def reset(self, init: InitMethod, generator: torch.Generator | None = None) -> None:
        """Initialise A (Kaiming-uniform like ``nn.Linear``, or normal std ``1/r``); zero B."""
        if init == "gaussian":
            self.lora_A.normal_(0.0, 1.0 / self.r, generator=generator)
        else:
            bound = 1.0 / math.sqrt(self.lora_A.shape[1])  # kaiming_uniform_(a=sqrt(5))
            self.lora_A.uniform_(-bound, bound, generator=generator)
        self.lora_B.zero_()

    def delta_weight(self) -> Tensor:
        """The dense update ``scaling * B @ A`` in fp32, Linear layout ``[out, in]``."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def project(self, x: Tensor, weight: float = 1.0) -> tuple[Tensor, float]:
        """The down-projection of ``x`` and the factor for the up-projection.

        This adapter's contribution is ``alpha * h @ B^T`` with ``(h^T, alpha)`` returned here.

        Args:
            x: Layer input ``[..., in_features]``.
            weight: Extra factor (weighted stacking; negative subtracts).

        Returns:
            ``h^T`` (``[r, tokens]``, after dropout, see `down_t`) and ``alpha``.
        """
        # Per layer and call: read from the parameter dict, not through nn.Module's attribute
        # lookup (microseconds); a parametrized factor (torch.nn.utils.parametrize) is only an
        # attribute.
        a = self._parameters.get("lora_A")
        if a is None:
            a = self.lora_A
        if x.dtype != a.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)
        if self.dropout > 0.0:
            x = F.dropout(x, self.dropout, self.training)
        return down_t(x, a), self.scaling * weight

    def add_to(self, out: Tensor, x: Tensor, weight: float = 1.0) -> Tensor:
        """Add this adapter's contribution for input ``x`` to the base output ``out``.

        ``out`` is updated in place when autograd is not recording (see `add_low_rank_`),
        which saves one ``[tokens, out]`` temporary per layer.

        Args:
            out: Base output ``[..., out_features]``.
            x: Layer input ``[..., in_features]``.
            weight: Extra factor (weighted stacking; negative subtracts).
        """
        h_t, alpha = self.project(x, weight)  # [r, tokens]
        b = self._parameters.get("lora_B")  # as in `project`
        return add_low_rank_(out, h_t, self.lora_B if b is None else b, alpha)

    def delta(self, x: Tensor) -> Tensor:
        """This adapter's contribution ``scaling * B(A(dropout(x)))`` alone, ``[..., out]``."""
        if x.dtype != self.lora_A.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)
        if self.dropout > 0.0:
            x = F.dropout(x, self.dropout, self.training)
        h = F.linear(x, self.lora_A)  # [..., r]
        return F.linear(h, self.lora_B).mul_(self.scaling)  # [..., out]


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear``/``Conv1D`` plus named adapters, routed by a shared `Router`.

    Attributes:
        base: The wrapped projection; its parameters are never modified by injection.
        adapters: Adapter name -> :class:`LoraAdapter`.
        fan_in_fan_out: True for ``Conv1D`` (weight stored ``[in, out]``).
    """

    def __init__(self, base: nn.Module, router: Router) -> None:
        super().__init__()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
            self.fan_in_fan_out = False
        elif isinstance(base, Conv1D):
            self.in_features, self.out_features = base.weight.shape  # stored [in, out]
            self.fan_in_fan_out = True
        else:
            raise UnsupportedModuleError(
                f"LoRALinear wraps nn.Linear or transformers Conv1D, got {type(base).__name__}"
            )
        self.base = base
        self.adapters = nn.ModuleDict()
        self.router = router
        # fingerprint cache: the base weight's digest, see fingerprint.weight_digest
        self._base_digest: WeightsSeen | None = None
        # ---- merged state (managed by merge.py only) ----
        # While `merged` is set, base.weight already holds those adapters: forward adds nothing.
        self.merged: Selection | None = None
        # The bit-exact pre-merge weight tensor, kept for unmerge() (None if nothing to restore).
        self.unmerged_weight: Tensor | None = None
        # Take the wrapped module's train/eval mode: a wrapper put into an eval-mode model must
        # not run its adapters' dropout (nor refuse a merged forward as "training").
        self.train(base.training)

    @property
    def weight(self) -> Tensor:
        """The base weight as stored (``[out, in]`` for Linear, ``[in, out]`` for Conv1D)."""
        weight = self.base.weight
        if not isinstance(weight, Tensor):  # unreachable for Linear/Conv1D
            raise UnsupportedModuleError(f"{type(self.base).__name__} has no weight tensor")
        return weight

    def add(self, name: str, adapter: LoraAdapter) -> None:
        """Attach ``adapter`` under ``name`` (the caller checked the name is free).

        The adapter takes this layer's train/eval mode (a new module starts in train mode).
        """
        adapter.train(self.training)
        self.adapters[name] = adapter

    def forward(self, x: Tensor) -> Tensor:
        """``base(x) + sum_k w_k * scaling_k * B_k A_k x`` over the active adapters here.

        Args:
            x: ``[..., in_features]``.

        Returns:
            ``[..., out_features]``.
        """
        if self.merged is not None:  # the merged adapters are already in base.weight
            if self.training and torch.is_grad_enabled():
                raise MergedStateError(
                    "cannot train while adapters are merged into the base weights: call "
                    "lm.unmerge() first (or lm.eval() / torch.no_grad() for inference)"
                )
            return self.base(x)  # type: ignore[no-any-return]
        # This runs per layer and call: the submodules are read from the module dictionaries
        # directly (nn.Module attribute lookups cost a few microseconds each, as much as a
        # small GPU kernel's launch).
        modules = self._modules
        base = cast(nn.Module, modules["base"])
        selection = self.router.current
        if selection.rows is not None:  # mixed batch: one adapter per row
            return add_rows(self, base(x), x, selection.rows)
        adapters = cast(nn.Module, modules["adapters"])._modules
        active = [
            (cast(LoraAdapter, adapters[n]), w) for n, w in selection.weights if n in adapters
        ]
        if not active:
            return base(x)  # type: ignore[no-any-return]
        tokens = x.numel() // self.in_features
        if tokens * self.out_features >= FUSE_MIN_OUTPUTS and self._fusable(x, active):
            return self._fused_forward(x, active)
        out: Tensor = base(x)  # [..., out]
        for adapter, weight in active:
            out = adapter.add_to(out, x, weight)
        return out

    def _fusable(self, x: Tensor, active: list[tuple[LoraAdapter, float]]) -> bool:
        """Whether `_fused_forward` may stand in for ``base(x)`` plus `add_to`.

        It runs the base projection itself, so only for a plain ``nn.Linear``/``Conv1D`` with a
        bias (`runs_plain`), and only where it was checked to give ``base(x)`` bit for bit when
        B is zero: fp32 on CPU, autocast off, fp32 adapters.
        """
        base = self.base
        fp32 = torch.float32
        if x.device.type != "cpu" or x.dtype != fp32 or torch.is_autocast_enabled("cpu"):
            return False  # the cheap checks first: this runs on every call
        if not runs_plain(base) or base.bias is None or base.weight.dtype != fp32:
            return False
        return all(a.lora_A.dtype == fp32 == a.lora_B.dtype for a, _ in active)

    def _fused_forward(self, x: Tensor, active: list[tuple[LoraAdapter, float]]) -> Tensor:
        """``bias + sum_k alpha_k h_k @ B_k^T`` first, then the base GEMM accumulated into it.

        The same sum as ``base(x)`` plus `add_to`, ordered so that the large base GEMM adds into
        the updates (BLAS ``beta = 1``, as ``base(x)`` itself adds into its bias) instead of the
        updates making one more pass over its output once it has left the cache (measured on CPU
        at GPT-2/BERT shapes, 512 tokens: 1-5% of the layer's time saved). With zero B the result
        is bit-identical to ``base(x)``.
        """
        base = self.base
        x2 = x.reshape(-1, self.in_features)  # [T, in]
        (adapter, weight), *others = active
        h_t, alpha = adapter.project(x2, weight)  # [r, T]
        # out[T, o] = bias + alpha * h[T, r] @ B^T[r, o]
        out = torch.addmm(base.bias, h_t.t(), adapter.lora_B.t(), alpha=alpha)
        for adapter, weight in others:
            h_t, alpha = adapter.project(x2, weight)  # [r, T]
            out.addmm_(h_t.t(), adapter.lora_B.t(), alpha=alpha)  # out += alpha * h @ B^T
        w = base.weight if self.fan_in_fan_out else base.weight.t()  # [in, o], a view
        out.addmm_(x2, w)  # [T, o] += [T, in] @ [in, o]
        return out.view(*x.shape[:-1], self.out_features)  # [..., o]

    def adapter(self, name: str) -> LoraAdapter:
        """The adapter ``name`` (typed access to :attr:`adapters`)."""
        return cast(LoraAdapter, self.adapters[name])

    def extra_repr(self) -> str:
        kind = "Conv1D" if self.fan_in_fan_out else "Linear"
        names = ", ".join(f"{n}(r={self.adapter(n).r})" for n in self.adapters)
        return f"{kind} {self.in_features}->{self.out_features}, adapters=[{names}]"
