"""What is inside an adapter directory: per-module shapes, ranks, scalings, norms, effective rank.

Everything is computed from the low-rank factors, never from a dense ``[out, in]`` delta:

* ``||s B A||_F`` through the ``r x r`` Gram matrices: ``s^2 * sum((B^T B) * (A A^T))``.
* The singular values of ``s B A`` through thin QR of the factors: with ``B = Q_b R_b`` and
  ``A^T = Q_a R_a``, ``s B A = Q_b (s R_b R_a^T) Q_a^T`` and the small core ``s R_b R_a^T`` has
  the same singular values. Effective rank = how many exceed ``threshold * sigma_max``.

All of it runs in float64, so the figures do not depend on the dtype the adapter was saved in.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .adapter_io import WEIGHTS_NAME, AdapterFiles, read_adapter
from .errors import AdapterFormatError, ConfigError, HistoryError
from .history import METADATA_NAME, History, read_history
from .peft_format import PREFIX

# Singular values at or below this fraction of the largest one do not count towards the
# effective rank (float64 SVD of an r x r core is accurate far below this).
DEFAULT_RANK_THRESHOLD = 1e-3
_A_SUFFIX, _B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class ModuleReport:
    """One adapted module.

    Attributes:
        name: Module path in the base model (``transformer.h.0.attn.c_attn``).
        in_features: Input width (A is ``[rank, in_features]``).
        out_features: Output width (B is ``[out_features, rank]``).
        rank: The stored rank (rows of A).
        alpha: The config's alpha for this module.
        scaling: The config's ``scaling_for`` this module (``alpha / r``, or ``alpha / sqrt(r)``
            with rsLoRA, r from the config's ``rank_pattern``/``r``).
        parameters: Elements of A and B.
        delta_norm: Frobenius norm of ``scaling * B @ A``.
        effective_rank: Singular values of the delta above ``threshold * sigma_max``.
        singular_values: All singular values of the delta, largest first.
    """

    name: str
    in_features: int
    out_features: int
    rank: int
    alpha: float
    scaling: float
    parameters: int
    delta_norm: float
    effective_rank: int
    singular_values: tuple[float, ...]


@dataclass(frozen=True)
class AdapterReport:
    """The full inspection of one adapter directory (see :func:`inspect_adapter`).

    Attributes:
        path: The directory.
        origin: ``"lora_kit"`` or ``"peft"``.
        config: The lora_kit config as a dict.
        peft_config: The raw ``adapter_config.json``.
        modules: One report per adapted module, in file order.
        saved_modules: ``modules_to_save`` tensors: key -> shape.
        parameters: All elements in the file.
        file_bytes: Size of ``adapter_model.safetensors``.
        threshold: The relative singular-value threshold used for effective ranks.
        provenance: lora_kit's header metadata except the config and the history
            (fingerprint, name, version, created, ...).
        history: How the adapter was made, if ``lorakit stack`` made it (see `history`).
        history_error: Why a recorded history could not be read (then ``history`` is None).
    """

    path: str
    origin: str
    config: dict[str, Any]
    peft_config: dict[str, Any]
    modules: tuple[ModuleReport, ...]
    saved_modules: dict[str, list[int]] = field(default_factory=dict)
    parameters: int = 0
    file_bytes: int = 0
    threshold: float = DEFAULT_RANK_THRESHOLD
    provenance: dict[str, Any] = field(default_factory=dict)
    history: History | None = None
    history_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        out = {k: v for k, v in asdict(self).items() if k not in ("history", "history_error")}
        out["history"] = self.history.to_dict() if self.history is not None else None
        out["history_error"] = self.history_error
        return out


def lora_modules(tensors: dict[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Module name -> ``(A, B)`` for every LoRA pair in a PEFT tensor dict.

    Raises:
        AdapterFormatError: An A without its B (or the reverse), or factors whose ranks differ.
    """
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    for key, a in tensors.items():
        if not key.endswith(_A_SUFFIX):
            continue
        module = key[: -len(_A_SUFFIX)].removeprefix(PREFIX)
        b = tensors.get(key[: -len(_A_SUFFIX)] + _B_SUFFIX)
        if b is None:
            raise AdapterFormatError(f"tensor {key!r} has no matching lora_B tensor")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterFormatError(
                f"module {module!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} are not "
                f"[r, in] and [out, r] with the same r"
            )
        pairs[module] = (a, b)
    orphans = [
        k
        for k in tensors
        if k.endswith(_B_SUFFIX) and k[: -len(_B_SUFFIX)] + _A_SUFFIX not in tensors
    ]
    if orphans:
        raise AdapterFormatError(f"tensor {orphans[0]!r} has no matching lora_A tensor")
    return pairs


def delta_norm(a: Tensor, b: Tensor, scaling: float) -> float:
    """``||scaling * B @ A||_F`` from the ``r x r`` Gram matrices (float64, no dense delta)."""
    a64, b64 = a.detach().double(), b.detach().double()
    gram_b = b64.T @ b64  # [r, r]
    gram_a = a64 @ a64.T  # [r, r]
    squared = float((gram_b * gram_a).sum().clamp_min(0.0))
    return float(abs(scaling) * squared**0.5)


def factored_core(left: Tensor, right: Tensor) -> Tensor:
    """A small matrix with the same singular values as ``left @ right`` (float64).

    Args:
        left: ``[out, k]``.
        right: ``[k, in]``.

    Returns:
        ``R_l @ R_r^T`` where ``left = Q_l R_l`` and ``right^T = Q_r R_r`` (thin QR), at most
        ``k x k``.
    """
    _, r_left = torch.linalg.qr(left.detach().double())  # [min(out,k), k]
    _, r_right = torch.linalg.qr(right.detach().double().T)  # [min(in,k), k]
    core: Tensor = r_left @ r_right.T  # [min(out,k), min(in,k)]
    return core


def singular_values(a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """Singular values of ``scaling * B @ A``, largest first (float64, via QR of the factors)."""
    core = factored_core(b, a) * abs(scaling)
    values: Tensor = torch.linalg.svdvals(core)  # descending
    return values


def effective_rank(values: Tensor, threshold: float = DEFAULT_RANK_THRESHOLD) -> int:
    """How many of ``values`` exceed ``threshold`` times the largest (0 for an all-zero delta)."""
    if values.numel() == 0 or float(values.max()) == 0.0:
        return 0
    return int((values > threshold * values.max()).sum())


def module_report(
    name: str, a: Tensor, b: Tensor, alpha: float, scaling: float, threshold: float
) -> ModuleReport:
    """The `ModuleReport` of one A/B pair."""
    values = singular_values(a, b, scaling)
    return ModuleReport(
        name=name,
        in_features=int(a.shape[1]),
        out_features=int(b.shape[0]),
        rank=int(a.shape[0]),
        alpha=float(alpha),
        scaling=float(scaling),
        parameters=a.numel() + b.numel(),
        delta_norm=delta_norm(a, b, scaling),
        effective_rank=effective_rank(values, threshold),
        singular_values=tuple(float(v) for v in values),
    )


def inspect_files(files: AdapterFiles, threshold: float = DEFAULT_RANK_THRESHOLD) -> AdapterReport:
    """Inspect an already-read adapter (see :func:`inspect_adapter`)."""
    if not 0.0 <= threshold < 1.0:
        raise ConfigError(
            f"effective-rank threshold must be in [0, 1) (relative to the largest singular "
            f"value), got {threshold}"
        )
    config = files.config
    modules = tuple(
        module_report(name, a, b, config.alpha_for(name), config.scaling_for(name), threshold)
        for name, (a, b) in lora_modules(files.tensors).items()
    )
    lora_keys = {k for k in files.tensors if k.endswith((_A_SUFFIX, _B_SUFFIX))}
    saved = {
        k.removeprefix(PREFIX): list(v.shape)
        for k, v in files.tensors.items()
        if k not in lora_keys
    }
    weights = files.path / WEIGHTS_NAME
    provenance = {k: v for k, v in files.metadata.items() if k not in ("config", METADATA_NAME)}
    history, history_error = checked_history(files.metadata, str(files.path))
    return AdapterReport(
        path=str(files.path),
        origin=files.origin,
        config=config.to_dict(),
        peft_config=dict(files.peft_config),
        modules=modules,
        saved_modules=saved,
        parameters=sum(t.numel() for t in files.tensors.values()),
        file_bytes=weights.stat().st_size,
        threshold=threshold,
        provenance=provenance,
        history=history,
        history_error=history_error,
    )


def checked_history(metadata: dict[str, Any], where: str) -> tuple[History | None, str | None]:
    """``(history, None)``, ``(None, None)`` without one, or ``(None, why)`` if unreadable."""
    try:
        return read_history(metadata, f"{where}: history"), None
    except HistoryError as exc:
        return None, str(exc)


def inspect_adapter(
    path: str | os.PathLike[str], threshold: float = DEFAULT_RANK_THRESHOLD
) -> AdapterReport:
    """Read and inspect an adapter directory; nothing is written.

    Args:
        path: The adapter directory (lora_kit's or PEFT's).
        threshold: Relative singular-value threshold for the effective rank, in ``[0, 1)``.

    Raises:
        AdapterFormatError: Missing, unreadable, corrupt or inconsistent files.
    """
    return inspect_files(read_adapter(Path(path)), threshold)
