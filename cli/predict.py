"""`lorakit predict`: classify texts with a sequence classifier, one adapter per text."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import torch
import transformers
import typer
from torch import nn

from lora_kit import LoraModel
from lora_kit.adapter_io import LABELS_NAME, AdapterFiles, read_adapter
from lora_kit.base_model import load_base, load_config, load_tokenizer, resolve_base
from lora_kit.errors import LoraKitError
from lora_kit.resolve import resolve_adapter
from lora_kit.task_head import classifier_labels, read_labels

from ._tooling import errors_to_exit
from .serving import (
    BASE,
    AdapterOption,
    assign_rows,
    check_not_empty,
    emit,
    load_adapters,
    parse_adapter,
    position_limit,
)


def predict(
    base: Annotated[
        str, typer.Argument(help="Base classifier: a transformers folder or a Hub id.")
    ],
    text: Annotated[list[str], typer.Option("--text", "-t", help="Text to classify; repeatable.")],
    adapter: AdapterOption = None,
    text_adapter: Annotated[
        list[str] | None,
        typer.Option(
            "--text-adapter",
            help=f"Adapter name (or '{BASE}') for each --text, in order. Without it every text is "
            f"classified with the base model and with each adapter, side by side.",
        ),
    ] = None,
    check_base: bool = typer.Option(True, help="Verify each adapter's base fingerprint."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """Classify texts with several adapters on one base model, all rows in one batch.

    Each adapter's saved classifier head (modules_to_save) is used for its rows, with the label
    names of its labels.json (as lorakit train writes it), else the base config's. Texts longer
    than the model's positions are truncated, with a notice.

    A base without a sequence-classification head (a bare encoder such as the one lorakit
    train adapted, or a masked-LM checkpoint) gets one as lorakit train built it; its rows
    then come only from the adapters' trained heads ('base' is refused, and left out of the
    side-by-side view).

    Example: lorakit predict bert-base-uncased -a sst -t "A fine film." --json
    """
    with errors_to_exit():
        names = [parse_adapter(spec)[0] for spec in adapter or []]
        texts, rows = assign_rows(text, names, text_adapter or None, "--text-adapter")
        records = _predict(base, adapter or [], texts, rows, check_base, grid=not text_adapter)
    emit(
        records,
        as_json,
        lambda r: f"[{r['adapter'] or BASE}] {r['text']!r} -> {r['label']} ({r['score']:.3f})",
    )


def _predict(
    base: str,
    adapters: list[str],
    texts: list[str],
    rows: list[str | None],
    check_base: bool,
    *,
    grid: bool,
) -> list[dict[str, Any]]:
    tokenizer = load_tokenizer(base)
    if tokenizer is None:
        raise LoraKitError(f"base {base!r} has no tokenizer files; save one next to the model")
    if tokenizer.pad_token is None:  # GPT-2's: pad with EOS, as lorakit train does
        if tokenizer.eos_token is None:
            raise LoraKitError(
                f"base {base!r}: its tokenizer has neither a pad nor an EOS token, so texts "
                f"cannot be batched; set tokenizer.pad_token and save it next to the model"
            )
        tokenizer.pad_token = tokenizer.eos_token
    check_not_empty(tokenizer, texts, "--text")
    read = {source: read_adapter(resolve_adapter(source)) for source in _sources(adapters)}
    model, headless = _load_classifier(base, read)
    if headless:  # its head is untrained: only adapter rows mean anything
        if grid:
            kept = [i for i, row in enumerate(rows) if row is not None]
            texts, rows = [texts[i] for i in kept], [rows[i] for i in kept]
        elif None in rows:
            raise typer.BadParameter(
                f"base {base!r} has no sequence-classification head, so '{BASE}' has nothing "
                f"to classify with; choose an adapter for every text",
                param_hint="--text-adapter",
            )
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "pad_token_id", 0) is None:
        config.pad_token_id = tokenizer.pad_token_id  # heads that read the last real token
    base_labels = getattr(config, "id2label", None) or {}
    lm = LoraModel(model)
    names = load_adapters(lm, adapters, check_base=check_base, read=read)
    labels: dict[str | None, dict[int, str]] = {None: base_labels}
    for name in names:
        source = lm.adapter_record(name).source
        own = read_labels(Path(source) / LABELS_NAME) if source is not None else None
        labels[name] = own if own is not None else base_labels
    limit = position_limit(model, tokenizer)
    if limit is not None:
        longest = max(len(ids) for ids in tokenizer(texts)["input_ids"])
        if longest > limit:
            typer.echo(
                f"notice: texts longer than the model's {limit} tokens are truncated to {limit} "
                f"(as lorakit train truncates them)",
                err=True,
            )
    batch = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=limit)
    with torch.no_grad():
        logits = lm(**batch, adapter_names=rows).logits  # [rows, labels]
    probs = logits.float().softmax(-1)
    scores, best = probs.max(-1)
    return [
        {
            "text": t,
            "adapter": row,
            "label": labels[row].get(int(i), str(int(i))),
            "score": float(s),
            "probs": [round(float(p), 6) for p in prob],
        }
        for t, row, i, s, prob in zip(texts, rows, best, scores, probs, strict=True)
    ]


def _sources(specs: list[str]) -> list[str]:
    """The distinct adapter sources of ``--adapter`` specs, in order."""
    return list(dict.fromkeys(parse_adapter(spec)[1] for spec in specs))


def _load_classifier(base: str, adapters: Mapping[str, AdapterFiles]) -> tuple[nn.Module, bool]:
    """The base as a sequence classifier, and whether its head is new (a headless base).

    A checkpoint without a sequence-classification head (a bare ``BertModel``, or a masked-LM
    checkpoint such as bert-base-uncased) is built as one with as many labels as the adapters'
    heads have, as lorakit train built it; the adapters' trained heads then run their rows.

    Args:
        base: The base model folder or Hub id.
        adapters: Each adapter's files, by source.
    """
    folder = resolve_base(base)
    architectures = getattr(load_config(folder), "architectures", None) or []
    if any(str(name).endswith("ForSequenceClassification") for name in architectures):
        return load_base(folder), False
    if not adapters:
        raise LoraKitError(
            f"base {base!r} ({', '.join(architectures) or 'no architecture listed'}) has no "
            f"sequence-classification head; give the classifier adapters trained on it (-a)"
        )
    counts = {source: len(classifier_labels(folder, files)) for source, files in adapters.items()}
    if len(set(counts.values())) != 1:
        raise LoraKitError(
            f"on a base without a classification head every adapter must bring a head of the "
            f"same size; their label counts differ: {counts}. Run them separately"
        )
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()  # "newly initialized head": expected
    try:
        model = load_base(
            folder,
            model_class="AutoModelForSequenceClassification",
            extra={"num_labels": next(iter(counts.values()))},
        )
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    return model, True
