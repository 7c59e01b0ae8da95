"""Before any timing: check that lora_kit and PEFT are set up to compute the same thing.

A side-by-side timing means something only if both sides adapt the same modules with the same
rank and scaling and actually run their adapters. Freshly initialised adapters have ``B = 0``,
so both sides' outputs equal the base model's and an adapter that silently did not run (or ran
with another scaling) would go unnoticed. `tie_adapters` therefore gives lora_kit's adapters
random, non-zero factors and copies them into PEFT's twin layers, and `check_same_outputs`
compares one forward of each side against the other and against the bare base. Both are cheap
(one small forward per side) and raise `SameWorkError` instead of printing a ratio of two
different computations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

import lora_kit as lk

# Where PeftModel keeps the wrapped model's modules.
PEFT_PREFIX = "base_model.model."


class SameWorkError(RuntimeError):
    """lora_kit and PEFT were not set up to compute the same thing (the message says how)."""


def lora_layers(ours: lk.LoraModel) -> dict[str, lk.LoRALinear]:
    """lora_kit's adapted layers by module name (in the wrapped model)."""
    return {n: m for n, m in ours.model.named_modules() if isinstance(m, lk.LoRALinear)}


def peft_layers(theirs: nn.Module) -> dict[str, Any]:
    """PEFT's LoRA layers by module name (in the wrapped model, prefix removed)."""
    from peft.tuners.lora import LoraLayer

    return {
        n.removeprefix(PEFT_PREFIX): m
        for n, m in theirs.named_modules()
        if isinstance(m, LoraLayer)
    }


def check_twins(ours: lk.LoraModel, theirs: nn.Module, adapter: str, peft_adapter: str) -> int:
    """Raise unless both sides adapt the same modules with the same rank, scaling, no dropout.

    Returns:
        The number of adapted modules.
    """
    mine, other = lora_layers(ours), peft_layers(theirs)
    if set(mine) != set(other):
        only_ours, only_theirs = sorted(set(mine) - set(other)), sorted(set(other) - set(mine))
        raise SameWorkError(
            f"adapted modules differ: only lora_kit {only_ours[:3]}, only PEFT {only_theirs[:3]}"
        )
    for name, layer in mine.items():
        twin = other[name]
        ada = layer.adapter(adapter)
        theirs_r, theirs_s = twin.r[peft_adapter], twin.scaling[peft_adapter]
        if ada.r != theirs_r or abs(ada.scaling - theirs_s) > 1e-12 * abs(theirs_s):
            raise SameWorkError(
                f"{name}: lora_kit r={ada.r}, scaling {ada.scaling}; PEFT r={theirs_r}, "
                f"scaling {theirs_s}"
            )
        if ada.dropout != 0.0 or not isinstance(twin.lora_dropout[peft_adapter], nn.Identity):
            raise SameWorkError(f"{name}: adapter dropout is not 0 on both sides")
    return len(mine)


def check_eval(models: Mapping[str, nn.Module]) -> None:
    """Raise if any module of the models (by what they are) is in training mode."""
    for what, model in models.items():
        training = next((n for n, m in model.named_modules() if m.training), None)
        if training is not None:
            raise SameWorkError(f"{what}: module {training or '(root)'!r} is in training mode")


def tie_adapters(
    ours: lk.LoraModel,
    theirs: nn.Module,
    *,
    adapter: str = "default",
    peft_adapter: str = "default",
    seed: int = 0,
    std: float = 0.02,
) -> int:
    """Give lora_kit's adapter random non-zero factors and copy them into PEFT's twin layers.

    Checks the twins first (`check_twins`). The factors stay in place for the timing: values do
    not change the cost of dense fp32 GEMMs, and the timed models are then the checked ones.

    Returns:
        The number of adapted modules.
    """
    count = check_twins(ours, theirs, adapter, peft_adapter)
    other = peft_layers(theirs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            ada, twin = layer.adapter(adapter), other[name]
            a = torch.randn(ada.lora_A.shape, generator=gen) * std  # [r, in]
            b = torch.randn(ada.lora_B.shape, generator=gen) * std  # [out, r]
            ada.lora_A.copy_(a)
            ada.lora_B.copy_(b)
            twin.lora_A[peft_adapter].weight.copy_(a)
            twin.lora_B[peft_adapter].weight.copy_(b)
    return count


def main_tensor(output: object) -> Tensor:
    """A model call's main result: the tensor itself, ``logits`` or ``last_hidden_state``."""
    if isinstance(output, Tensor):
        return output
    for field in ("logits", "last_hidden_state"):
        value = getattr(output, field, None)
        if isinstance(value, Tensor):
            return value
    raise TypeError(f"no logits or last_hidden_state in a {type(output).__name__}")


def check_same_outputs(
    what: str, base: object, ours: object, theirs: object, *, rtol: float = 1e-4
) -> float:
    """Raise unless lora_kit's and PEFT's outputs agree and both differ from the base's.

    Tolerance: ``rtol`` times the largest |output| (fp32; the two sides sum the same products
    in different orders, which moves results by ~1e-6 relative per layer). The adapters'
    effect must be at least 100x that tolerance, so an adapter that did not run is caught.

    Returns:
        The largest |lora_kit - PEFT| difference.
    """
    b, o, t = (main_tensor(v).detach().float() for v in (base, ours, theirs))
    tol = rtol * float(t.abs().max())
    diff = float((o - t).abs().max())
    effect = min(float((o - b).abs().max()), float((t - b).abs().max()))
    if not diff <= tol:
        raise SameWorkError(f"{what}: lora_kit and PEFT differ by {diff:.3g} (tolerance {tol:.3g})")
    if not effect >= 100 * tol:
        raise SameWorkError(
            f"{what}: the adapters change the output by only {effect:.3g} (tolerance {tol:.3g}): "
            "one side's adapter did not run, or both are zero"
        )
    return diff
