"""Does an adapter fit a base model? Keys, shapes, orientation, fingerprint, and coverage.

The checks are the ones `LoraModel.load_adapter` makes (the same `expected_tensors`,
`check_keys` and `check_fingerprint`), collected into a report instead of stopping at the
first exception, and confirmed by actually loading the adapter onto the base when they pass.
Nothing on disk is written.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .adapter_io import AdapterFiles, read_adapter
from .errors import (
    AdapterFormatError,
    AdapterMismatchError,
    LoraKitError,
    NoTargetsError,
    UnsupportedModuleError,
)
from .fingerprint import check_fingerprint, describe
from .loading import check_keys, expected_tensors
from .model import LoraModel


@dataclass(frozen=True)
class FitReport:
    """The verdict of :func:`verify_fit`.

    Attributes:
        adapter: The adapter directory.
        fits: True when every check passed and the adapter loaded onto the base.
        problems: Every misfit found, the first one first; each says what to do.
        tensors: Tensors in the adapter file.
        used: Tensors that land on a module of the base with the right shape.
        coverage: ``used / tensors`` (1.0 expected).
        unused: Keys of the tensors that do not land (at most 20 listed).
        modules: Projections of the base the adapter's config targets.
        fingerprint: ``"match"``, ``"mismatch"``, ``"absent"`` (a PEFT adapter, or one saved
            without it) or ``"skipped"``.
        orientation: ``"ok"``, ``"mismatch"`` or ``"unknown"`` (no ``fan_in_fan_out`` flag).
    """

    adapter: str
    fits: bool
    problems: tuple[str, ...]
    tensors: int
    used: int
    coverage: float
    unused: tuple[str, ...] = field(default_factory=tuple)
    modules: int = 0
    fingerprint: str = "absent"
    orientation: str = "unknown"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def verify_fit(
    adapter: str | os.PathLike[str] | AdapterFiles,
    base: nn.Module,
    *,
    check_base: bool = True,
) -> FitReport:
    """Check whether ``adapter`` fits ``base`` without raising on a misfit.

    ``base`` may receive the adapter (as ``"verify"``) during the final loading check, so
    pass a model you own; an already-injected model is refused by that check.

    Args:
        adapter: Adapter directory, or the result of `read_adapter`.
        base: The transformers model (not injected).
        check_base: Compare the recorded base fingerprint (when present).

    Raises:
        AdapterFormatError: The adapter cannot be read (missing, not an adapter, corrupt).
    """
    files = adapter if isinstance(adapter, AdapterFiles) else read_adapter(adapter)
    source = str(files.path)
    problems: list[str] = []
    try:
        targets, _, expected = expected_tensors(base, files.config, source)
    except (NoTargetsError, UnsupportedModuleError) as exc:
        problems.append(str(exc))
        targets, expected = (), {}
    landed = [
        k for k, t in files.tensors.items() if k in expected and tuple(t.shape) == expected[k]
    ]
    unused = tuple(sorted(set(files.tensors) - set(landed)))
    if expected:
        try:
            files.check_pattern_order(targets)
            check_keys(expected, files.tensors, source, files.config.modules_to_save)
        except (AdapterFormatError, AdapterMismatchError) as exc:
            problems.append(str(exc))
    orientation = _orientation(files, base, targets)
    if orientation == "mismatch":
        flag = files.peft_config.get("fan_in_fan_out")
        problems.append(
            f"{source}: the adapter was saved for {'Conv1D' if flag else 'nn.Linear'} modules "
            f"(fan_in_fan_out={flag}), the targeted modules of this base are "
            f"{'nn.Linear' if flag else 'Conv1D'}; it belongs to another architecture"
        )
    fp_state = _fingerprint_state(files, base, targets, check_base, problems)
    if not problems:
        try:
            LoraModel.from_pretrained(base, files.path, "verify", check_base=check_base)
        except LoraKitError as exc:
            problems.append(str(exc))
    total = len(files.tensors)
    return FitReport(
        adapter=source,
        fits=not problems,
        problems=tuple(problems),
        tensors=total,
        used=len(landed),
        coverage=len(landed) / total if total else 0.0,
        unused=unused[:20],
        modules=len(targets),
        fingerprint=fp_state,
        orientation=orientation,
    )


def _orientation(files: AdapterFiles, base: nn.Module, targets: Sequence[str]) -> str:
    flag = files.peft_config.get("fan_in_fan_out")
    if not isinstance(flag, bool) or not targets:
        return "unknown"
    conv = any(describe(base.get_submodule(t))[2] == "conv1d" for t in targets)
    return "ok" if flag == conv else "mismatch"


def _fingerprint_state(
    files: AdapterFiles, base: nn.Module, targets: Sequence[str], check: bool, problems: list[str]
) -> str:
    expected = files.metadata.get("base_fingerprint")
    if not isinstance(expected, dict):
        return "absent"
    if not check:
        return "skipped"
    layers = {t: base.get_submodule(t) for t in targets}
    try:
        check_fingerprint(expected, base, layers, str(files.path))
    except AdapterMismatchError as exc:
        problems.append(str(exc))
        return "mismatch"
    return "match"
