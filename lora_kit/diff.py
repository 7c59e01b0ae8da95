"""Compare two adapters: config fields, module sets, ranks, and how far apart their deltas are.

For a module both adapt, the relative difference is
``||D_a - D_b||_F / max(||D_a||_F, ||D_b||_F)`` with ``D = scaling * B @ A`` (0 when both
deltas are zero; 1.0 means "as different as one of them is large"). It is computed from the
stacked factors ``D_a - D_b = [s_a B_a, -s_b B_b] @ [A_a; A_b]`` through QR in float64, so no
dense ``[out, in]`` matrix is formed and identical adapters give 0 up to rounding (~1e-16), not
the cancellation error of subtracting two squared norms.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .adapter_io import AdapterFiles, read_adapter
from .config import ordered
from .inspection import delta_norm, factored_core, lora_modules


@dataclass(frozen=True)
class ModuleDiff:
    """One module present in both adapters.

    Attributes:
        name: Module path.
        rank_a: Rank in A (the first adapter).
        rank_b: Rank in B.
        scaling_a: Scaling in A.
        scaling_b: Scaling in B.
        norm_a: ``||D_a||_F``.
        norm_b: ``||D_b||_F``.
        relative_difference: See the module docstring; None when the shapes differ.
    """

    name: str
    rank_a: int
    rank_b: int
    scaling_a: float
    scaling_b: float
    norm_a: float
    norm_b: float
    relative_difference: float | None


@dataclass(frozen=True)
class AdapterDiff:
    """The result of :func:`diff_adapters`.

    Attributes:
        a: First adapter's directory.
        b: Second adapter's directory.
        config: Config fields that differ: field -> ``[value in a, value in b]``.
        only_in_a: Modules only A adapts.
        only_in_b: Modules only B adapts.
        modules: Per common module, in A's order.
        saved_modules_differ: Whether their ``modules_to_save`` tensors differ (keys, shapes
            or values).
    """

    a: str
    b: str
    config: dict[str, list[Any]]
    only_in_a: tuple[str, ...]
    only_in_b: tuple[str, ...]
    modules: tuple[ModuleDiff, ...]
    saved_modules_differ: bool

    @property
    def identical(self) -> bool:
        """No config, module or saved-module difference, and every delta equal within 1e-12."""
        return (
            not self.config
            and not self.only_in_a
            and not self.only_in_b
            and not self.saved_modules_differ
            and all(
                m.relative_difference is not None and m.relative_difference <= 1e-12
                for m in self.modules
            )
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (with ``identical``)."""
        out = asdict(self)
        out["identical"] = self.identical
        return out


def relative_difference(
    a_pair: tuple[torch.Tensor, torch.Tensor],
    scaling_a: float,
    b_pair: tuple[torch.Tensor, torch.Tensor],
    scaling_b: float,
) -> float:
    """``||s_a B_a A_a - s_b B_b A_b||_F / max(norms)`` from the factors (0 if both are zero).

    Args:
        a_pair: ``(A [r_a, in], B [out, r_a])`` of the first adapter.
        scaling_a: Its scaling.
        b_pair: ``(A [r_b, in], B [out, r_b])`` of the second.
        scaling_b: Its scaling.
    """
    (a_a, b_a), (a_b, b_b) = a_pair, b_pair
    scale = max(delta_norm(a_a, b_a, scaling_a), delta_norm(a_b, b_b, scaling_b))
    if scale == 0.0:
        return 0.0
    left = torch.cat([scaling_a * b_a.double(), -scaling_b * b_b.double()], dim=1)  # [out, ra+rb]
    right = torch.cat([a_a.double(), a_b.double()], dim=0)  # [ra+rb, in]
    difference = float(torch.linalg.matrix_norm(factored_core(left, right)))
    return difference / scale


def diff_files(first: AdapterFiles, second: AdapterFiles) -> AdapterDiff:
    """Compare two adapters that have been read (see :func:`diff_adapters`)."""
    config_a, config_b = first.config.to_dict(), second.config.to_dict()
    config = {
        k: [config_a.get(k), config_b.get(k)]
        for k in sorted(set(config_a) | set(config_b))
        if ordered(config_a.get(k)) != ordered(config_b.get(k))  # pattern order counts
    }
    pairs_a, pairs_b = lora_modules(first.tensors), lora_modules(second.tensors)
    modules = []
    for name, pair_a in pairs_a.items():
        if name not in pairs_b:
            continue
        pair_b = pairs_b[name]
        s_a, s_b = first.config.scaling_for(name), second.config.scaling_for(name)
        same_shape = (pair_a[0].shape[1], pair_a[1].shape[0]) == (
            pair_b[0].shape[1],
            pair_b[1].shape[0],
        )
        modules.append(
            ModuleDiff(
                name=name,
                rank_a=int(pair_a[0].shape[0]),
                rank_b=int(pair_b[0].shape[0]),
                scaling_a=s_a,
                scaling_b=s_b,
                norm_a=delta_norm(*pair_a, s_a),
                norm_b=delta_norm(*pair_b, s_b),
                relative_difference=relative_difference(pair_a, s_a, pair_b, s_b)
                if same_shape
                else None,
            )
        )
    return AdapterDiff(
        a=str(first.path),
        b=str(second.path),
        config=config,
        only_in_a=tuple(n for n in pairs_a if n not in pairs_b),
        only_in_b=tuple(n for n in pairs_b if n not in pairs_a),
        modules=tuple(modules),
        saved_modules_differ=_saved_differ(first, second),
    )


def diff_adapters(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> AdapterDiff:
    """Read two adapter directories and compare them; nothing is written.

    Raises:
        AdapterFormatError: Either cannot be read.
    """
    return diff_files(read_adapter(a), read_adapter(b))


def _saved_differ(first: AdapterFiles, second: AdapterFiles) -> bool:
    def heads(files: AdapterFiles) -> dict[str, torch.Tensor]:
        lora = (".lora_A.weight", ".lora_B.weight")
        return {k: v for k, v in files.tensors.items() if not k.endswith(lora)}

    heads_a, heads_b = heads(first), heads(second)
    if set(heads_a) != set(heads_b):
        return True
    return any(
        heads_a[k].shape != heads_b[k].shape or not torch.equal(heads_a[k], heads_b[k])
        for k in heads_a
    )
