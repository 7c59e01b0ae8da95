"""Which input's ``modules_to_save`` head a stack or file merge keeps.

A head (a BERT classifier, say) is saved whole, not as a low-rank update of a shared base, so it
cannot be combined by the stack weights: ``0.7 * head_a - 0.3 * head_b`` is not a head either
adapter was trained with. The rule, per head tensor:

- one input has a copy: it is kept;
- several inputs have copies and they are bitwise equal: that copy is kept;
- they differ: the one of the input the caller chose (``heads=``) is kept; with no choice, a
  `HeadConflictError` names the tensor and the inputs and says how to choose.

Nothing is kept silently from an arbitrary input (PEFT's ``add_weighted_adapter`` refuses any
two adapters that save the same module, and with one it does not carry the trained copy over).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .adapter_io import AdapterFiles
from .errors import ConfigError, HeadConflictError
from .peft_format import PREFIX

_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def head_keys(files: AdapterFiles) -> list[str]:
    """The PEFT keys of ``files``' ``modules_to_save`` tensors (everything but LoRA factors)."""
    return [k for k in files.tensors if not k.endswith(_LORA_SUFFIXES)]


def choose_heads(
    inputs: Sequence[AdapterFiles], choice: str | os.PathLike[str] | None = None
) -> dict[str, int]:
    """PEFT key of every head tensor -> index of the input whose copy is kept (see module doc).

    Args:
        inputs: The adapters being stacked or merged, in order.
        choice: One of the inputs' directories: its copies win wherever it has one.

    Raises:
        ConfigError: ``choice`` is not one of the inputs, or it carries no head.
        HeadConflictError: Two inputs carry different copies of a head and ``choice`` does not
            settle it.
    """
    chosen = _index_of(inputs, choice) if choice is not None else None
    holders: dict[str, list[int]] = {}
    for index, files in enumerate(inputs):
        for key in head_keys(files):
            holders.setdefault(key, []).append(index)
    if chosen is not None and not head_keys(inputs[chosen]):
        raise ConfigError(
            f"heads={str(choice)!r}: that adapter carries no modules_to_save head; name one "
            f"that does, or leave the choice out"
        )
    kept: dict[str, int] = {}
    for key, indices in holders.items():
        if chosen in indices:
            kept[key] = chosen
            continue
        first = indices[0]
        other = next((i for i in indices[1:] if not _same(inputs[first], inputs[i], key)), None)
        if other is not None:
            raise HeadConflictError(
                f"{inputs[first].path} and {inputs[other].path} carry different trained copies "
                f"of head tensor {key.removeprefix(PREFIX)!r}. A head is a whole module, not a "
                f"low-rank update, so it cannot be combined by weights: choose whose head to "
                f"keep with heads=<that adapter's directory> (--heads DIR on the command line)"
            )
        kept[key] = first
    return kept


def saved_module_names(inputs: Sequence[AdapterFiles], kept: dict[str, int]) -> tuple[str, ...]:
    """``modules_to_save`` for the result: those of the inputs that supply a head, in order."""
    names: list[str] = []
    for index in sorted(set(kept.values())):
        names += [n for n in inputs[index].config.modules_to_save if n not in names]
    return tuple(names)


def _index_of(inputs: Sequence[AdapterFiles], choice: str | os.PathLike[str]) -> int:
    wanted = Path(choice).resolve()
    for index, files in enumerate(inputs):
        if files.path.resolve() == wanted:
            return index
    raise ConfigError(
        f"heads={str(choice)!r} is not one of the inputs "
        f"({', '.join(str(f.path) for f in inputs)}); name one of them"
    )


def _same(a: AdapterFiles, b: AdapterFiles, key: str) -> bool:
    x, y = a.tensors[key], b.tensors[key]
    return x.shape == y.shape and x.dtype == y.dtype and bool(torch.equal(x, y))
