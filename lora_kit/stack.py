"""Stacking: combine several adapters of one base into a single PEFT-format adapter.

Every method targets the weighted sum ``T = sum_k w_k * scaling_k * B_k @ A_k`` per module and
says how close it gets:

- ``cat``: the factors concatenated along the rank, weights and scalings folded into B. Exact:
  its update *is* ``T`` (rank = sum of the input ranks).
- ``svd``: ``T`` truncated to ``rank`` singular values, computed on the factors: QR of the
  stacked ``A`` and ``B`` (``[in, R]`` and ``[out, R]``), then the SVD of the small ``R x R``
  core. No dense ``out x in`` matrix is formed. Truncation is optimal (Eckart-Young), and the
  energy kept is reported.
- ``ties`` / ``dare``: element-wise methods on the dense per-input updates (trim + sign election
  + disjoint mean; random drop with ``1/density`` rescale, seeded), re-factored to ``rank`` by
  SVD. Their result is not ``T`` by design: the report gives the distance to ``T``.

The output's scaling is 1 (``alpha = r`` per module), so its factors hold the whole update.
``modules_to_save`` heads are not combined by weight: see `heads` for which copy is kept. A
`history.History` (inputs with their sha256 and own history, weights, method, settings) goes
into the output's safetensors header as ``lora_kit.history``.
"""

from __future__ import annotations

import math
import numbers
import os
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from .adapter_io import (
    CONFIG_NAME,
    LABELS_NAME,
    WEIGHTS_NAME,
    AdapterFiles,
    file_sha256,
    read_adapter,
    write_adapter,
)
from .config import LoraConfig, as_number, as_numbers
from .errors import AdapterMismatchError, ConfigError
from .heads import choose_heads, saved_module_names
from .history import METADATA_NAME, History, source_record
from .peft_format import PREFIX, lora_pairs, to_peft_dict

StackMethod = Literal["cat", "svd", "ties", "dare"]
METHODS: tuple[str, ...] = get_args(StackMethod)
_PEFT_FORMAT_VERSION = "0.21.2"  # as model.PEFT_FORMAT_VERSION


@dataclass(frozen=True)
class ModuleResult:
    """One module of a stack.

    Attributes:
        module: Module name.
        rank: Rank written.
        energy_kept: ``||kept||_F^2 / ||before truncation||_F^2`` (1.0 for ``cat``).
        rel_error: ``||written update - T||_F / ||T||_F`` against the exact weighted sum.
    """

    module: str
    rank: int
    energy_kept: float
    rel_error: float


@dataclass(frozen=True)
class StackReport:
    """What :func:`stack` wrote and how close it is to the exact weighted sum.

    Attributes:
        out: The adapter directory written.
        method: ``cat``/``svd``/``ties``/``dare``.
        weights: One per input.
        modules: Per-module results.
        energy_kept: Over all modules, ``sum kept energy / sum energy``.
        rel_error: Over all modules, ``sqrt(sum ||err||^2) / sqrt(sum ||T||^2)``.
        density: ``ties``/``dare`` density (None otherwise).
        seed: ``dare``'s seed (recorded, also when drawn at random).
        heads: ``modules_to_save`` tensor (PEFT prefix removed) -> input whose copy was kept.
    """

    out: Path
    method: str
    weights: tuple[float, ...]
    modules: tuple[ModuleResult, ...]
    energy_kept: float
    rel_error: float
    density: float | None = None
    seed: int | None = None
    heads: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return {
            "out": str(self.out),
            "method": self.method,
            "weights": list(self.weights),
            "energy_kept": self.energy_kept,
            "rel_error": self.rel_error,
            "density": self.density,
            "seed": self.seed,
            "heads": dict(self.heads),
            "modules": [vars(m) for m in self.modules],
        }

    def __str__(self) -> str:
        return (
            f"{self.method} stack of {len(self.weights)} adapters -> {self.out}: "
            f"{len(self.modules)} modules, energy kept {self.energy_kept:.6f}, "
            f"relative error vs exact weighted sum {self.rel_error:.3g}"
        )


@dataclass
class _Terms:
    a: list[Tensor]  # [r_k, in], fp32
    b: list[Tensor]  # [out, r_k], fp32, already times w_k * scaling_k


def stack_arguments(
    count: int,
    weights: Sequence[float] | None,
    method: str,
    rank: int | None,
    density: float | None,
) -> list[float]:
    """Check `stack`'s arguments before any file is read; returns one weight per adapter.

    Raises:
        ConfigError: No adapters, a weight count other than ``count``, a weight that is not a
            finite number, an unknown method, a rank below 1, or ties/dare without a density in
            (0, 1].
    """
    if method not in METHODS:
        raise ConfigError(f"unknown stacking method {method!r}; use one of {METHODS}")
    if count < 1:
        raise ConfigError("give at least one adapter directory to stack")
    coeffs = [1.0] * count if weights is None else as_numbers(weights)
    if coeffs is None:
        raise ConfigError(f"stack weights must be a list of numbers, got {weights!r}")
    if len(coeffs) != count:
        raise ConfigError(f"got {len(coeffs)} weights for {count} adapters: one per adapter")
    if not all(math.isfinite(c) for c in coeffs):
        raise ConfigError(f"stack weights must be finite, got {coeffs}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ConfigError(f"rank must be a positive integer, got {rank!r}")
    dense = None if density is None else as_number(density)
    if method in ("ties", "dare") and (dense is None or not 0.0 < dense <= 1.0):
        raise ConfigError(f"{method} needs --density in (0, 1], got {density!r}")
    return coeffs


def stack(
    paths: Sequence[str | os.PathLike[str]],
    *,
    weights: Sequence[float] | None = None,
    method: StackMethod = "cat",
    out: str | os.PathLike[str],
    rank: int | None = None,
    density: float | None = None,
    seed: int | None = None,
    heads: str | os.PathLike[str] | None = None,
) -> StackReport:
    """Combine adapters ``paths`` into one adapter at ``out``.

    Args:
        paths: Adapter directories (lora_kit's or PEFT's) of the same base.
        weights: One finite weight per input (default 1 each); negative subtracts.
        method: ``cat`` (exact), ``svd``, ``ties`` or ``dare`` (see the module docstring).
        out: Directory to write (PEFT format; atomic).
        rank: Target rank for ``svd``/``ties``/``dare`` (default: the largest input rank of
            each module). Ignored by ``cat``.
        density: Fraction of entries kept by ``ties``/``dare``, in (0, 1] (required there).
        seed: ``dare``'s random seed (default: drawn and recorded in the report and file).
        heads: The input whose ``modules_to_save`` head to keep when several inputs carry
            different copies (see `lora_kit.heads`); not needed when at most one has a head.

    Returns:
        A `StackReport` (per-module energy kept and error against the exact weighted sum).

    Raises:
        ConfigError: Bad weights, method, rank, density, seed or ``heads`` choice, or
            ``paths`` that is one path instead of a list.
        AdapterFormatError: An unreadable input.
        AdapterMismatchError: Inputs of different bases, or the same module with other shapes.
        HeadConflictError: Inputs carry different copies of a head and ``heads`` is not given.
    """
    if isinstance(paths, str | os.PathLike):
        raise ConfigError(f"paths must be a list of adapter directories, got one path {paths!r}")
    coeffs = stack_arguments(len(paths), weights, method, rank, density)
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        if not -(2**63) <= seed < 2**63:
            raise ConfigError(f"seed must be a 64-bit integer, got {seed!r}")
        seed = int(seed)  # a NumPy integer is not a torch seed (nor JSON)
    if method == "dare" and seed is None:
        seed = secrets.randbelow(2**31)
    inputs = [read_adapter(p) for p in paths]
    fingerprint = _check_compatible(inputs)
    kept = choose_heads(inputs, heads)
    terms = _collect(inputs, coeffs)
    tensors: dict[str, Tensor] = {}
    results = []
    for index, (module, t) in enumerate(sorted(terms.items())):
        target_rank = rank if rank is not None else max(a.shape[0] for a in t.a)
        if method == "cat":
            a, b, result = _cat(module, t)
        elif method == "svd":
            a, b, result = _svd(module, t, target_rank)
        else:
            gen = torch.Generator().manual_seed((seed or 0) + index)
            a, b, result = _elementwise(module, t, method, float(density or 1.0), target_rank, gen)
        key = f"{PREFIX}{module}"
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = a, b
        results.append(result)
    for key, index in kept.items():
        tensors[key] = inputs[index].tensors[key]
    energy, error = _overall(terms, results)
    report = StackReport(
        out=Path(out),
        method=method,
        weights=tuple(coeffs),
        modules=tuple(results),
        energy_kept=energy,
        rel_error=error,
        density=float(density) if method in ("ties", "dare") and density is not None else None,
        seed=seed if method == "dare" else None,
        heads={k.removeprefix(PREFIX): str(inputs[i].path) for k, i in kept.items()},
    )
    config = _config(results, inputs[0], saved_module_names(inputs, kept))
    first = inputs[0].peft_config
    # The task type goes with the head (PEFT's SEQ_CLS/TOKEN_CLS mean "the file has the head").
    owner = inputs[min(kept.values())].peft_config if kept else first
    peft_config = to_peft_dict(
        config,
        target_modules=[r.module for r in results],
        fan_in_fan_out=bool(first.get("fan_in_fan_out", False)),
        task_type=owner.get("task_type"),
        base_model_name_or_path=first.get("base_model_name_or_path"),
        peft_version=_PEFT_FORMAT_VERSION,
    )
    history = History(
        operation="stack",
        method=method,
        sources=tuple(
            source_record(f.path, f.metadata, w, _hashes(f))
            for f, w in zip(inputs, coeffs, strict=True)
        ),
        heads=dict(report.heads),
        options={"rank": rank, "density": report.density, "seed": report.seed},
        metrics={"energy_kept": energy, "rel_error": error},
    )
    metadata: dict[str, Any] = {"config": config.to_json(), METADATA_NAME: history.to_dict()}
    if fingerprint is not None:
        metadata["base_fingerprint"] = fingerprint
    write_adapter(out, peft_config, tensors, metadata, extra_files=_labels(inputs, kept))
    return report


def _labels(inputs: Sequence[AdapterFiles], kept: dict[str, int]) -> dict[str, str]:
    """The ``labels.json`` of the first input whose head is kept (the head's class names)."""
    for index in sorted(set(kept.values())):
        path = inputs[index].path / LABELS_NAME
        if path.is_file():
            return {LABELS_NAME: path.read_text(encoding="utf-8")}
    return {}


def _hashes(files: AdapterFiles) -> tuple[str, str]:
    return file_sha256(files.path / WEIGHTS_NAME), file_sha256(files.path / CONFIG_NAME)


def _check_compatible(inputs: Sequence[AdapterFiles]) -> dict[str, Any] | None:
    """Raise if the inputs are for different bases; return a shared fingerprint if any."""
    first = inputs[0]
    shapes: dict[str, tuple[tuple[int, int], str]] = {}
    fans = {bool(f.peft_config.get("fan_in_fan_out", False)) for f in inputs}
    if len(fans) > 1:
        raise AdapterMismatchError(
            "inputs disagree on fan_in_fan_out (Conv1D vs Linear layers): they were trained on "
            "different architectures; stack adapters of one base only"
        )
    prints = [f.metadata.get("base_fingerprint") for f in inputs]
    types = {p.get("model_type") for p in prints if isinstance(p, dict)}
    if len(types) > 1:
        raise AdapterMismatchError(
            f"inputs were trained on different model types {sorted(map(str, types))}; "
            f"stack adapters of one base only"
        )
    names: list[set[str]] = []
    for files in inputs:
        pairs = lora_pairs(files.tensors, str(files.path))
        names.append({module for module, _, _ in pairs})
        for module, a, b in pairs:
            shape = (b.shape[0], a.shape[1])
            seen = shapes.setdefault(module, (shape, str(files.path)))
            if seen[0] != shape:
                raise AdapterMismatchError(
                    f"module {module!r} is [out, in] = {list(seen[0])} in {seen[1]} but "
                    f"{list(shape)} in {files.path}: the adapters belong to different bases"
                )
    for files, mods in zip(inputs[1:], names[1:], strict=True):
        if not mods & names[0]:
            raise AdapterMismatchError(
                f"{files.path} and {first.path} adapt no module in common: they are not "
                f"adapters of the same base (or target disjoint modules; stack them separately)"
            )
    full = [p for p in prints if isinstance(p, dict)]
    same_modules = len({tuple(sorted(p.get("modules", {}))) for p in full}) == 1
    hashes = {p.get("weights_sha256") for p in full}
    if full and same_modules and len(hashes) > 1:
        raise AdapterMismatchError(
            "the inputs' recorded base fingerprints differ (same modules, different base "
            "weights): they were trained on different checkpoints; stack adapters of one base"
        )
    if len(full) == len(inputs) and same_modules and len(hashes) == 1:
        return full[0]
    return None


def _collect(inputs: Sequence[AdapterFiles], coeffs: Sequence[float]) -> dict[str, _Terms]:
    terms: dict[str, _Terms] = {}
    for files, coeff in zip(inputs, coeffs, strict=True):
        pairs = lora_pairs(files.tensors, str(files.path))
        files.check_pattern_order(module for module, _, _ in pairs)
        for module, a, b in pairs:
            t = terms.setdefault(module, _Terms([], []))
            t.a.append(a.float())
            t.b.append(b.float() * (coeff * files.config.scaling_for(module)))
    return terms


def _cat(module: str, t: _Terms) -> tuple[Tensor, Tensor, ModuleResult]:
    a, b = torch.cat(t.a), torch.cat(t.b, dim=1)  # [R, in], [out, R]
    return a, b, ModuleResult(module, a.shape[0], 1.0, 0.0)


def _svd(module: str, t: _Terms, rank: int) -> tuple[Tensor, Tensor, ModuleResult]:
    a, b = torch.cat(t.a).double(), torch.cat(t.b, dim=1).double()  # [R, in], [out, R]
    q_b, r_b = torch.linalg.qr(b)  # [out, R], [R, R]
    q_a, r_a = torch.linalg.qr(a.t())  # [in, R], [R, R]
    u, s, vh = torch.linalg.svd(r_b @ r_a.t())  # core [R, R]: T = q_b u diag(s) vh q_a^T
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    new_b = (q_b @ u[:, :k]) * root  # [out, k]
    new_a = root[:, None] * (vh[:k] @ q_a.t())  # [k, in]
    total = float((s**2).sum())
    kept = float((s[:k] ** 2).sum())
    energy = kept / total if total > 0 else 1.0
    error = (max(total - kept, 0.0) / total) ** 0.5 if total > 0 else 0.0
    return new_a.float(), new_b.float(), ModuleResult(module, k, energy, error)


def _elementwise(
    module: str, t: _Terms, method: str, density: float, rank: int, gen: torch.Generator
) -> tuple[Tensor, Tensor, ModuleResult]:
    deltas = torch.stack([b @ a for a, b in zip(t.a, t.b, strict=True)])  # [K, out, in]
    exact = deltas.sum(0)  # T, [out, in]
    if method == "dare":
        keep = torch.rand(deltas.shape, generator=gen) < density
        combined = (deltas * keep / density).sum(0)
    else:  # ties: trim to the top-density magnitudes, elect a sign, average the agreeing
        flat = deltas.abs().flatten(1)  # [K, out*in]
        k = max(1, round(density * flat.shape[1]))
        threshold = flat.kthvalue(flat.shape[1] - k + 1, dim=1).values  # [K]
        trimmed = deltas * (deltas.abs() >= threshold[:, None, None])
        sign = torch.sign(trimmed.sum(0))  # [out, in]
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        combined = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    u, s, vh = torch.linalg.svd(combined, full_matrices=False)
    k = min(rank, s.shape[0])
    root = s[:k].sqrt()
    new_b, new_a = u[:, :k] * root, root[:, None] * vh[:k]  # [out, k], [k, in]
    total = float((s.double() ** 2).sum())
    energy = float((s[:k].double() ** 2).sum()) / total if total > 0 else 1.0
    norm = float(exact.norm())
    error = float((new_b @ new_a - exact).norm()) / norm if norm > 0 else 0.0
    return new_a.contiguous(), new_b.contiguous(), ModuleResult(module, k, energy, error)


def _overall(terms: dict[str, _Terms], results: Sequence[ModuleResult]) -> tuple[float, float]:
    """Energy kept and relative error over all modules, weighting each by ``||T||^2``."""
    kept = total = err = 0.0
    for r in results:
        t = terms[r.module]
        # ||T||_F^2 from the factors: trace((B^T B)(A A^T)), never forming T.
        a, b = torch.cat(t.a).double(), torch.cat(t.b, dim=1).double()
        norm2 = float(((b.t() @ b) * (a @ a.t())).sum())
        total += norm2
        kept += r.energy_kept * norm2
        err += (r.rel_error**2) * norm2
    if total <= 0:
        return 1.0, 0.0
    return kept / total, (err / total) ** 0.5


def _config(
    results: Sequence[ModuleResult], first: AdapterFiles, saved: tuple[str, ...]
) -> LoraConfig:
    r = max(res.rank for res in results)
    # Exact module names, escaped: PEFT and lora_kit read pattern keys as regexes.
    other = {re.escape(res.module): res.rank for res in results if res.rank != r}
    return LoraConfig(
        r=r,
        alpha=float(r),
        dropout=first.config.dropout,
        targets=tuple(res.module for res in results),
        rank_pattern=other,
        alpha_pattern={k: float(v) for k, v in other.items()},
        modules_to_save=saved,
    )
