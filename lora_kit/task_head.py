"""Where an adapter's trained head goes when the base checkpoint has none.

A classification adapter is trained on a task model (``BertForSequenceClassification``) built
from a headless checkpoint (``BertModel``, the usual way encoders are shipped): the model's
``classifier`` is new and the adapter saves it (``modules_to_save``). Merging it back into that
checkpoint must write the task model, which is what PEFT's ``merge_and_unload()`` followed by
``save_pretrained`` gives: the base's tensors under the task model's names (a bare ``BertModel``
checkpoint lacks the ``bert.`` prefix, ``base_model_prefix``), the head, and a config naming the
task architecture and its labels.

`task_layout` works that out from transformers itself: the task class for the adapter's PEFT
``task_type`` and the base's ``model_type``, built on the meta device (no memory, no weights), is
the list of tensors the output must hold, with their shapes. Every one must come from the head
or from the base (as named, or without the prefix); base tensors the task model has no place
for (a non-persistent buffer such as ``embeddings.position_ids``, a pre-training head) are left
out, as ``save_pretrained`` would. Anything else (a task transformers has no class for, a head
of other names or shapes, labels that do not fit the head) is refused with `HeadLayoutError`.

The number of labels is the length of ``labels.json`` beside the adapter (written by
``lorakit train``) when there is one, else read off the head's shape: the dimension that changes
with ``num_labels`` in the task model.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor

from .adapter_io import LABELS_NAME, AdapterFiles
from .errors import AdapterFormatError, HeadLayoutError
from .heads import head_keys
from .peft_format import PREFIX

# PEFT task type -> the transformers auto class whose model carries that head.
TASK_CLASSES = {
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "TOKEN_CLS": "AutoModelForTokenClassification",
}
_BUILD_ERRORS = (ValueError, KeyError, TypeError, ImportError, OSError, AttributeError)

Shapes = Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class TaskLayout:
    """The task model a headless base plus a head becomes.

    Attributes:
        architecture: The task class name, e.g. ``BertForSequenceClassification``.
        base_keys: Output tensor -> the base tensor it is (in the base's order).
        head_keys: Output tensor -> the adapter head tensor it is (without PEFT's prefix).
        dropped: Base tensors the task model has no place for (not written).
        prefix_added: ``"bert."`` when base tensors were renamed under the task model's
            ``base_model_prefix``, else ``""``.
        id2label: Label names by class index.
        labels_from: ``"labels.json"`` or ``"head shape"`` (generic ``LABEL_i`` names).
    """

    architecture: str
    base_keys: dict[str, str]
    head_keys: dict[str, str]
    dropped: tuple[str, ...]
    prefix_added: str
    id2label: dict[int, str]
    labels_from: str

    def config(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """The output's ``config.json``: ``base``'s with the architecture and labels set.

        transformers derives ``num_labels`` from ``id2label`` (it does not store it); a base
        config that names ``num_labels`` gets the new count.
        """
        out = dict(base)
        out["architectures"] = [self.architecture]
        out["id2label"] = {str(i): name for i, name in self.id2label.items()}
        out["label2id"] = {name: i for i, name in self.id2label.items()}
        if "num_labels" in out:
            out["num_labels"] = len(self.id2label)
        return out

    def record(self) -> dict[str, str | int | None]:
        """What the history records about the added head (JSON scalars)."""
        return {
            "task_model": self.architecture,
            "num_labels": len(self.id2label),
            "labels": self.labels_from,
            "base_prefix_added": self.prefix_added or None,
            "dropped_base_tensors": ", ".join(self.dropped) or None,
        }


def read_labels(path: Path) -> dict[int, str] | None:
    """``id2label`` from a ``labels.json`` (``{"id2label": {"0": "neg", ...}}``), if it exists.

    Raises:
        AdapterFormatError: The file exists but is not such a mapping of 0..N-1 to names.
    """
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))["id2label"]
        labels = {int(k): v for k, v in raw.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise AdapterFormatError(
            f"{path}: unreadable ({type(exc).__name__}: {exc}); expected "
            f'{{"id2label": {{"0": "name", ...}}}} as lorakit train writes it'
        ) from None
    if sorted(labels) != list(range(len(labels))) or not all(
        isinstance(v, str) and v for v in labels.values()
    ):
        raise AdapterFormatError(
            f"{path}: id2label must map 0..N-1 to non-empty names, got {raw!r}"
        )
    return dict(sorted(labels.items()))


def classifier_labels(base_dir: Path, files: AdapterFiles) -> dict[int, str]:
    """``id2label`` of a classifier adapter to run on headless base ``base_dir``.

    From the adapter's ``labels.json``, else ``LABEL_i`` for as many labels as its saved head
    has outputs.

    Raises:
        HeadLayoutError: The adapter saves no head, or its label count cannot be told.
    """
    heads = {k.removeprefix(PREFIX): files.tensors[k] for k in head_keys(files)}
    if not heads:  # (a labels.json alone would run the new, untrained head)
        raise HeadLayoutError(
            f"{files.path}: saves no classifier head (modules_to_save), and the base "
            f"{base_dir} has none: there is nothing to classify with; use a base saved with "
            f"its head, or an adapter trained with one (lorakit train)"
        )
    labels = read_labels(files.path / LABELS_NAME)
    if labels is not None:
        return labels
    auto = transformers.AutoModelForSequenceClassification
    count = _labels_from_head(auto, base_dir, heads, str(files.path))
    return {i: f"LABEL_{i}" for i in range(count)}


def task_layout(
    base_dir: Path,
    base_shapes: Shapes,
    heads: Mapping[str, Tensor],
    task_type: str | None,
    labels: Mapping[int, str] | None,
    source: str,
) -> TaskLayout:
    """How to write base ``base_dir`` (tensors ``base_shapes``) plus ``heads`` as a task model.

    Args:
        base_dir: The base model folder (its ``config.json`` gives the model type).
        base_shapes: Every base tensor's shape, in the base's order.
        heads: The adapter's head tensors, by name without PEFT's prefix.
        task_type: The adapter's PEFT ``task_type``.
        labels: ``id2label`` from the adapter's ``labels.json``, if it had one.
        source: The adapter directory (for messages).

    Raises:
        HeadLayoutError: The task, the head or the labels do not fit (see module doc).
    """
    if task_type not in TASK_CLASSES:
        raise HeadLayoutError(
            f"{source}: carries head tensors {sorted(heads)} that the base {base_dir} lacks, "
            f"and its task_type is {task_type!r}; lorakit merge can add a head only for "
            f"task_type {' or '.join(TASK_CLASSES)}. Merge onto a base saved with the head "
            f"(the task model's save_pretrained) instead"
        )
    auto = getattr(transformers, TASK_CLASSES[task_type])
    if labels is None:
        count, labels_from = _labels_from_head(auto, base_dir, heads, source), "head shape"
        labels = {i: f"LABEL_{i}" for i in range(count)}
    else:
        labels_from = "labels.json"
    model = _meta_model(auto, base_dir, len(labels), source)
    architecture = type(model).__name__
    expected = _saved_shapes(model)
    prefix = f"{model.base_model_prefix}." if model.base_model_prefix else ""
    base_keys: dict[str, str] = {}
    head_keys: dict[str, str] = {}
    missing: list[str] = []
    wrong: list[str] = []
    for key, shape in expected.items():
        if key in heads:
            head_keys[key] = key
            got = tuple(heads[key].shape)
        else:
            found = _base_name(key, prefix, base_shapes)
            if found is None:
                missing.append(key)
                continue
            base_keys[key] = found
            got = base_shapes[found]
        if got != shape:
            wrong.append(f"{key} is {list(got)}, {architecture} needs {list(shape)}")
    extra = sorted(heads.keys() - expected.keys())
    _refuse_misfits(architecture, source, base_dir, labels_from, extra, missing, wrong)
    order = {k: i for i, k in enumerate(base_shapes)}
    used = set(base_keys.values())
    return TaskLayout(
        architecture=architecture,
        base_keys=dict(sorted(base_keys.items(), key=lambda kv: order[kv[1]])),
        head_keys=head_keys,
        dropped=tuple(k for k in base_shapes if k not in used),
        prefix_added=prefix if any(k != v for k, v in base_keys.items()) else "",
        id2label=dict(labels),
        labels_from=labels_from,
    )


def _base_name(key: str, prefix: str, base_shapes: Shapes) -> str | None:
    if key in base_shapes:
        return key
    if prefix and key.startswith(prefix) and key[len(prefix) :] in base_shapes:
        return key[len(prefix) :]  # a bare backbone checkpoint: no "bert." in its names
    return None


def _refuse_misfits(
    architecture: str,
    source: str,
    base_dir: Path,
    labels_from: str,
    extra: list[str],
    missing: list[str],
    wrong: list[str],
) -> None:
    problems = []
    if extra:
        problems.append(f"the adapter's head tensors {extra} are not part of {architecture}")
    if missing:
        problems.append(f"neither the base nor the adapter has {missing}")
    if wrong:
        why = " (labels.json and the head disagree?)" if labels_from == "labels.json" else ""
        problems.append("shapes differ: " + "; ".join(wrong) + why)
    if problems:
        raise HeadLayoutError(
            f"{source}: cannot write base {base_dir} plus this adapter's head as "
            f"{architecture}: {'; '.join(problems)}. Was the adapter trained on another "
            f"model type, or with another head? Merge onto a base saved with the head instead"
        )


def _meta_model(auto: Any, base_dir: Path, num_labels: int, source: str) -> Any:
    """The task model for ``base_dir``'s config with ``num_labels``, on the meta device."""
    quiet = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity(logging.ERROR)
    try:
        config = transformers.AutoConfig.from_pretrained(base_dir, num_labels=num_labels)
        with torch.device("meta"):
            return auto.from_config(config)
    except _BUILD_ERRORS as exc:
        raise HeadLayoutError(
            f"{source}: transformers cannot build a {auto.__name__.removeprefix('AutoModel')} "
            f"model for the base {base_dir} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}); lorakit merge cannot tell where the head goes"
        ) from None
    finally:
        transformers.utils.logging.set_verbosity(quiet)


def _saved_shapes(model: Any) -> dict[str, tuple[int, ...]]:
    """The tensors ``save_pretrained`` writes for ``model``: its state dict less tied copies."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    skip = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_save", None) or ()]
    return {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if k not in tied and not any(p.search(k) for p in skip)
    }


def _labels_from_head(auto: Any, base_dir: Path, heads: Mapping[str, Tensor], source: str) -> int:
    """The label count the head was trained for: build with 2 and 3 labels, see what moves."""
    model = _meta_model(auto, base_dir, 2, source)
    two, three = _saved_shapes(model), _saved_shapes(_meta_model(auto, base_dir, 3, source))
    if not heads.keys() & two.keys():
        return 2  # not this model's head at all: task_layout refuses it by name
    counts = set()
    for key, tensor in heads.items():
        if key not in two or two[key] == three[key] or tensor.dim() != len(two[key]):
            continue
        moved = [d for d, (x, y) in enumerate(zip(two[key], three[key], strict=True)) if x != y]
        counts |= {int(tensor.shape[d]) for d in moved}
    if len(counts) != 1:
        raise HeadLayoutError(
            f"{source}: cannot tell the number of labels from the head tensors "
            f"{ {k: list(v.shape) for k, v in heads.items()} } for {type(model).__name__} "
            f"(found {sorted(counts) or 'none'}); put a labels.json beside the adapter "
            f'({{"id2label": {{"0": "name", ...}}}})'
        )
    return counts.pop()
