"""A whole training job from paths: resolve the base, read the data, inject, train, summarise.

This is what ``lorakit train`` runs; Python scripts launched by ``torchrun`` can call
:func:`run_job` directly.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from ..base_model import (
    BaseModelError,
    load_base,
    load_config,
    load_tokenizer,
    model_positions,
    resolve_base,
)
from ..config import LoraConfig
from ..errors import ConfigError
from ..model import inject
from .config import TrainConfig
from .data import Dataset, hf_encoder, load_causal_lm, load_classification, special_suffix
from .distributed import init_distributed
from .logging import RunLogger
from .loop import train

HEAD_NAMES = ("classifier", "score")  # BERT-style and GPT-2/Llama-style classification heads


@dataclass(frozen=True)
class TrainJob:
    """Everything ``lorakit train`` was asked to do.

    Attributes:
        model: Base model folder or Hub id.
        data: Data file or folder.
        config: Training hyper-parameters.
        targets: Preset name or module suffixes (None: the model type's preset).
        r: LoRA rank.
        alpha: LoRA alpha.
        dropout: LoRA dropout.
        task: ``auto``, ``causal-lm`` or ``seq-cls``.
        text_field: Text column of .jsonl/.csv data.
        label_field: Label column (classification).
        resume: Continue from the checkpoint in ``config.out``.
        quiet: No progress bar or notices.
    """

    model: str
    data: Path
    config: TrainConfig
    targets: tuple[str, ...] | None = None
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    task: str = "auto"
    text_field: str = "text"
    label_field: str = "label"
    resume: bool = False
    quiet: bool = False


def infer_task(architectures: list[str] | None, requested: str = "auto") -> str:
    """``causal-lm`` or ``seq-cls`` from the checkpoint's architectures (or ``requested``).

    Raises:
        ConfigError: ``auto`` and the architecture is neither.
    """
    if requested != "auto":
        return requested
    for name in architectures or []:
        if name.endswith("ForSequenceClassification"):
            return "seq-cls"
        if name.endswith(("LMHeadModel", "ForCausalLM")):
            return "causal-lm"
    raise ConfigError(
        f"cannot tell the task from the model's architectures {architectures}; pass "
        f"--task causal-lm or --task seq-cls"
    )


def run_job(job: TrainJob) -> dict[str, Any] | None:
    """Run ``job``; returns the summary on rank 0 (None on other ranks).

    The summary has ``adapter``, ``steps``, ``metrics``, ``task`` and ``merge_command``.

    Raises:
        BaseModelError, DataError, ConfigError, TrainingDivergedError: As their names say;
            data problems are found before the base model is loaded.
    """
    ctx = init_distributed()
    if job.quiet:
        transformers.utils.logging.disable_progress_bar()
    log = RunLogger(job.config.out, enabled=ctx.is_main, quiet=job.quiet)
    folder = resolve_base(job.model)
    base_config = load_config(folder)  # an unreadable or too-new config: BaseModelError
    task = infer_task(getattr(base_config, "architectures", None), job.task)
    tokenizer = load_tokenizer(folder)
    if tokenizer is None:
        raise BaseModelError(
            f"{folder}: no tokenizer found beside the model; save one there "
            f"(tokenizer.save_pretrained) so the data can be tokenised"
        )
    limit = model_positions(base_config)
    max_length = job.config.max_length
    if limit is not None and max_length > limit:
        log.notice(
            f"--max-length {max_length} exceeds the model's {limit} positions; using {limit}"
        )
        max_length = limit
    config = job.config.replace(max_length=max_length)
    data = _load_data(job, task, tokenizer, max_length)
    train_set, eval_set = data.split(config.eval_fraction, config.seed)

    extra: dict[str, Any] = {}
    model_class = "AutoModelForCausalLM"
    if task == "seq-cls":
        model_class = "AutoModelForSequenceClassification"
        extra = {
            "num_labels": len(data.labels),
            "id2label": dict(enumerate(data.labels)),
            "label2id": {label: i for i, label in enumerate(data.labels)},
            "ignore_mismatched_sizes": True,
        }
    torch.manual_seed(config.seed)  # a head rebuilt for the data's labels is initialised here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "newly initialized head" is expected here
        base = load_base(folder, model_class=model_class, dtype=torch.float32, extra=extra)
    base_cfg = getattr(base, "config", None)
    if task == "seq-cls" and base_cfg is not None and base_cfg.pad_token_id is None:
        base_cfg.pad_token_id = data.pad_id  # GPT-2-style heads find the last real token
    base.to(ctx.device)
    torch.manual_seed(config.seed)  # reproducible adapter initialisation
    heads = tuple(n for n in HEAD_NAMES if task == "seq-cls" and hasattr(base, n))
    targets: str | tuple[str, ...] | None = job.targets
    if targets is not None and len(targets) == 1:
        targets = targets[0]  # a preset name or a regex
    lora = LoraConfig(
        r=job.r, alpha=job.alpha, dropout=job.dropout, targets=targets, modules_to_save=heads
    )
    lm = inject(base, lora, config.adapter_name)
    if ctx.is_main and not job.quiet:
        log.notice(
            f"{task}: {len(train_set)} train / {len(eval_set)} eval examples; "
            f"{lm.trainable_parameters()}"
        )
    result = train(
        lm,
        train_set,
        config,
        eval_data=eval_set if len(eval_set) else None,
        resume=job.resume,
        logger=log,
        ctx=ctx,
    )
    if not ctx.is_main:
        return None
    merged = f"{result.adapter_path}-merged"
    return {
        "adapter": str(result.adapter_path),
        "steps": result.steps,
        "metrics": result.metrics,
        "task": task,
        "merge_command": f"lorakit merge {job.model} {result.adapter_path} -o {merged}",
    }


def _load_data(job: TrainJob, task: str, tokenizer: Any, max_length: int) -> Dataset:
    encode = hf_encoder(tokenizer)
    if task == "causal-lm":
        return load_causal_lm(
            job.data,
            encode,
            max_length=max_length,
            eos_id=tokenizer.eos_token_id,
            text_field=job.text_field,
        )
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return load_classification(
        job.data,
        encode,
        max_length=max_length,
        text_field=job.text_field,
        label_field=job.label_field,
        pad_id=pad,
        keep_last=special_suffix(tokenizer),
    )
