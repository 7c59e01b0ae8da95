"""Training data: read text, tokenise, and pack (causal LM) or label (sequence classification).

Everything is checked before training starts: a missing file or field, an empty data set and a
label column with a single class are `DataError`\\ s that say how to fix them; texts longer than
``max_length`` are truncated with one notice.
"""

from __future__ import annotations

import csv
import json
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from ..errors import DataError

TaskName = Literal["causal-lm", "seq-cls"]
Encoder = Callable[[Sequence[str]], list[list[int]]]
TEXT_SUFFIXES = (".txt",)
TABLE_SUFFIXES = (".jsonl", ".csv")
ENCODING = "utf-8-sig"  # UTF-8; a leading byte-order mark (spreadsheet exports) is dropped


@dataclass(frozen=True)
class Example:
    """One training example: token ids and, for classification, a label id."""

    input_ids: tuple[int, ...]
    label: int | None = None


@dataclass(frozen=True)
class Dataset:
    """A tokenised data set.

    Attributes:
        task: ``"causal-lm"`` or ``"seq-cls"``.
        examples: The examples (packed blocks of equal length for causal LM).
        labels: Label names by id (classification only).
        pad_id: Token id used to pad a micro-batch.
    """

    task: TaskName
    examples: tuple[Example, ...]
    labels: tuple[str, ...] = ()
    pad_id: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    def split(self, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
        """``(train, eval)``: a seeded random ``fraction`` held out (at least one example)."""
        if fraction <= 0 or len(self.examples) < 2:
            return self, Dataset(self.task, (), self.labels, self.pad_id)
        order = list(range(len(self.examples)))
        random.Random(seed).shuffle(order)
        n_eval = min(max(1, round(fraction * len(order))), len(order) - 1)
        held = set(order[:n_eval])
        train = tuple(e for i, e in enumerate(self.examples) if i not in held)
        ev = tuple(e for i, e in enumerate(self.examples) if i in held)
        return (
            Dataset(self.task, train, self.labels, self.pad_id),
            Dataset(self.task, ev, self.labels, self.pad_id),
        )

    def collate(self, indices: Sequence[int]) -> dict[str, Tensor]:
        """A padded micro-batch: ``input_ids``/``attention_mask`` ``[B, T]`` and ``labels``."""
        rows = [self.examples[i] for i in indices]
        width = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)  # [B, T]
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
        for i, row in enumerate(rows):
            ids[i, : len(row.input_ids)] = torch.tensor(row.input_ids, dtype=torch.long)
            mask[i, : len(row.input_ids)] = 1
        if self.task == "causal-lm":
            labels = ids.masked_fill(mask == 0, -100)  # [B, T]; the model shifts internally
        else:
            labels = torch.tensor([r.label for r in rows], dtype=torch.long)  # [B]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def hf_encoder(tokenizer: Any) -> Encoder:
    """Wrap a Hugging Face tokenizer as an `Encoder` (no truncation: the caller handles it)."""

    def encode(texts: Sequence[str]) -> list[list[int]]:
        out = tokenizer(list(texts), truncation=False, verbose=False)["input_ids"]
        return [list(ids) for ids in out]

    return encode


def special_suffix(tokenizer: Any) -> int:
    """How many special tokens a Hugging Face tokenizer appends after a text (BERT's [SEP]: 1).

    Truncation keeps these, as ``tokenizer(..., truncation=True)`` does; see
    :func:`load_classification`'s ``keep_last``.
    """
    probe = "a"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return len(full) - start - len(plain)
    return 0


def read_texts(path: str | Path, text_field: str | None = None) -> list[str]:
    """Texts from a ``.txt`` file, a folder of them, or a ``.jsonl``/``.csv`` column.

    Raises:
        DataError: Missing path, unsupported file type, missing field, or no text at all.
    """
    return [t for t, _ in _read_rows(Path(path), text_field, None)]


def load_causal_lm(
    path: str | Path,
    encode: Encoder,
    *,
    max_length: int,
    eos_id: int | None,
    text_field: str | None = None,
) -> Dataset:
    """Tokenise the texts at ``path`` and pack them into blocks of ``max_length`` tokens.

    Texts are joined with ``eos_id`` between them (when the tokenizer has one); the tail that
    does not fill a block is dropped.

    Raises:
        DataError: Unreadable or empty data, or fewer than ``max_length`` tokens in all.
    """
    texts = read_texts(path, text_field)
    stream: list[int] = []
    for ids in encode(texts):
        stream.extend(ids)
        if eos_id is not None:
            stream.append(eos_id)
    n_blocks = len(stream) // max_length
    if n_blocks == 0:
        raise DataError(
            f"{path}: only {len(stream)} tokens, fewer than one block of --max-length "
            f"{max_length}; add text or lower --max-length"
        )
    blocks = tuple(
        Example(tuple(stream[i * max_length : (i + 1) * max_length])) for i in range(n_blocks)
    )
    return Dataset("causal-lm", blocks, (), eos_id if eos_id is not None else 0)


def load_classification(
    path: str | Path,
    encode: Encoder,
    *,
    max_length: int,
    text_field: str = "text",
    label_field: str = "label",
    pad_id: int = 0,
    labels: Sequence[str] | None = None,
    keep_last: int = 0,
) -> Dataset:
    """Tokenise a ``.jsonl``/``.csv`` of texts and labels; labels become ids.

    Args:
        labels: A fixed label list (id order); by default the sorted distinct labels
            (numerically when all are integers).
        keep_last: Tokens at the end of each encoding that truncation keeps: the closing
            special tokens of the encoder (:func:`special_suffix`), so a long text ends as it
            would at inference, e.g. with BERT's ``[SEP]``.

    Raises:
        DataError: Missing file/field, empty data, one class only, or a label not in ``labels``.
    """
    source = Path(path)
    if source.suffix not in TABLE_SUFFIXES and source.exists():
        raise DataError(
            f"{source}: sequence classification needs a .jsonl or .csv file with "
            f"--text-field and --label-field columns"
        )
    rows = _read_rows(source, text_field, label_field)
    names = [str(label) for _, label in rows]
    classes = tuple(labels) if labels is not None else _sorted_labels(names)
    if len(set(classes)) < 2:
        raise DataError(
            f"{source}: column {label_field!r} has a single class {classes[0]!r}; a classifier "
            f"needs at least two (check --label-field)"
        )
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise DataError(f"{source}: labels {unknown[:5]} are not in the label list {classes}")
    encoded = encode([t for t, _ in rows])
    too_long = sum(len(ids) > max_length for ids in encoded)
    if too_long:
        warnings.warn(
            f"{source}: {too_long} of {len(rows)} texts are longer than {max_length} tokens and "
            f"were truncated (raise --max-length up to the model's limit to keep more)",
            stacklevel=2,
        )
    keep = min(max(keep_last, 0), max_length - 1)
    examples = tuple(
        Example(_truncate(ids, max_length, keep), index[name])
        for ids, name in zip(encoded, names, strict=True)
    )
    return Dataset("seq-cls", examples, classes, pad_id)


def _truncate(ids: Sequence[int], max_length: int, keep_last: int) -> tuple[int, ...]:
    """The first ``max_length`` ids, but with the last ``keep_last`` ids of the text kept."""
    if len(ids) <= max_length:
        return tuple(ids)
    tail = list(ids[len(ids) - keep_last :]) if keep_last else []
    return tuple(list(ids[: max_length - keep_last]) + tail)


def _sorted_labels(names: Sequence[str]) -> tuple[str, ...]:
    distinct = set(names)
    try:
        return tuple(sorted(distinct, key=int))
    except ValueError:
        return tuple(sorted(distinct))


def _read_rows(
    path: Path, text_field: str | None, label_field: str | None
) -> list[tuple[str, str | None]]:
    if not path.exists():
        raise DataError(f"data path {str(path)!r} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"folder {str(path)!r} has no .txt files")
        rows: list[tuple[str, str | None]] = [(_read_text(p), None) for p in files]
    elif path.suffix in TEXT_SUFFIXES:
        rows = [(_read_text(path), None)]
    elif path.suffix in TABLE_SUFFIXES:
        try:
            rows = list(_table_rows(path, text_field or "text", label_field))
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, exc) from exc
        except csv.Error as exc:  # e.g. a NUL byte, or a field over csv's size limit
            raise DataError(f"{path}: not valid CSV ({exc})") from exc
    else:
        raise DataError(
            f"{path}: unsupported data file type {path.suffix!r}; use .txt (or a folder of "
            f"them), .jsonl or .csv"
        )
    rows = [(t, label) for t, label in rows if t.strip()]
    if not rows:
        raise DataError(f"{path}: the data set is empty (no non-blank text)")
    return rows


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding=ENCODING)
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, exc) from exc


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> DataError:
    return DataError(f"{path}: not UTF-8 text ({exc.reason}); save the file as UTF-8")


def _table_rows(
    path: Path, text_field: str, label_field: str | None
) -> Iterator[tuple[str, str | None]]:
    records: Iterator[tuple[int, dict[str, Any]]]
    if path.suffix == ".jsonl":
        records = _jsonl_records(path)
    else:
        with path.open(newline="", encoding=ENCODING) as handle:
            records = iter(list(enumerate(csv.DictReader(handle), start=2)))
    for line, record in records:
        for name in (text_field, label_field):
            if name is not None and (name not in record or record[name] is None):
                raise DataError(
                    f"{path}:{line}: no field {name!r} (fields there: {sorted(record)}); "
                    f"pick the column with --text-field / --label-field"
                )
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{line}: field {text_field!r} must be a string, got {text!r}")
        yield text, (str(record[label_field]) if label_field is not None else None)


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding=ENCODING) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, RecursionError) as exc:
                raise DataError(f"{path}:{line_no}: not valid JSON ({exc})") from exc
            if not isinstance(record, dict):
                raise DataError(f"{path}:{line_no}: each line must be a JSON object")
            yield line_no, record
