"""The training loop: adapters-only AdamW, accumulation, clipping, AMP, eval, checkpoints, resume.

Read top to bottom, :func:`train` is the whole algorithm; helpers below it do one thing each.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data.distributed import DistributedSampler
from transformers import get_scheduler

from ..adapter_io import LABELS_NAME, AdapterFiles
from ..errors import ConfigError, DataError, TrainingDivergedError
from ..layers import LoRALinear
from ..model import LoraModel
from ..saved_modules import SavedModule
from .checkpoint import (
    STATE_FILE,
    Checkpoint,
    CheckpointError,
    publish_adapter,
    read_checkpoint,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from .config import TrainConfig, check_out_dir
from .data import Dataset
from .distributed import (
    DistContext,
    all_reduce_sum,
    barrier,
    full_params,
    grad_norm,
    is_fsdp1,
    is_fsdp2,
    unwrap,
    wrap,
)
from .logging import RunLogger
from .precision import PrecisionPlan, resolve_precision


@dataclass(frozen=True)
class StepInfo:
    """What a callback sees after each optimizer step."""

    step: int
    total_steps: int
    loss: float
    lr: float
    skipped: bool


@dataclass(frozen=True)
class TrainResult:
    """The outcome of :func:`train`.

    Attributes:
        adapter_path: The final adapter directory (``config.out``).
        steps: Optimizer steps taken in total (including any before a resume).
        metrics: Final evaluation metrics (empty without an eval split).
        checkpoint: The final checkpoint directory.
    """

    adapter_path: Path
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None


def train(
    model: nn.Module,
    train_data: Dataset,
    config: TrainConfig,
    *,
    eval_data: Dataset | None = None,
    resume: bool = False,
    logger: RunLogger | None = None,
    callbacks: Sequence[Callable[[StepInfo], None]] = (),
    ctx: DistContext | None = None,
) -> TrainResult:
    """Train adapter ``config.adapter_name`` of ``model`` (and its ``modules_to_save``) only.

    The model's modules are returned to the train/eval modes they were in.

    Args:
        model: A `LoraModel`, or one a user wrapped in DDP, FSDP1 (``use_orig_params=True``)
            or sharded with FSDP2; with ``config.strategy`` ddp/fsdp an unwrapped model is
            wrapped here.
        train_data: Training examples (see :mod:`lora_kit.train.data`).
        config: Hyper-parameters.
        eval_data: Held-out examples evaluated every ``eval_every`` steps and at the end
            (an empty one is as None: no eval records or metrics).
        resume: Continue from ``<config.out>/checkpoint`` (same config required).
        logger: Where to report; default a `RunLogger` on ``config.out`` (rank 0 only).
        callbacks: Called after every optimizer step (after any checkpoint).
        ctx: Process placement; default derived from ``torch.distributed`` and the model.

    Returns:
        The adapter path, step count and final eval metrics.

    Raises:
        DataError: Empty training data, or eval data of another task or label list.
        ConfigError: Bad precision for the device, a resume with a different config, or
            adapter ``config.adapter_name`` is not the (single, unmerged) active adapter.
        TrainingDivergedError: ``config.max_bad_steps`` NaN/inf steps in a row.
        AdapterMismatchError: A resume onto another base model than the checkpoint's.
    """
    lm = unwrap(model)
    name = config.adapter_name
    _check_active(lm, name)
    check_out_dir(config.out)
    ctx = ctx or _context(lm)
    # Every rank checks --out before the main one writes into it (its first files would make
    # a fresh folder look like someone else's to a rank checking later).
    barrier(ctx)
    plan = resolve_precision(config.precision, ctx.device)
    log = logger or RunLogger(config.out, enabled=ctx.is_main)
    if len(train_data) == 0:
        raise DataError("the training data set is empty")
    _check_predicts_something(train_data, "training")
    if eval_data is not None and len(eval_data) == 0:
        eval_data = None  # nothing to measure: no eval records or metrics, as without one
    if eval_data is not None:
        _check_eval_data(train_data, eval_data)
    _check_labels(lm, train_data)

    data_id = _data_id(train_data)
    checkpoint = read_checkpoint(config.out) if resume else None
    undo_resume: Callable[[], None] | None = None  # puts the adapter back until training starts
    if checkpoint is not None:
        _check_resume(config, checkpoint, data_id)
        if is_fsdp1(model) or is_fsdp2(model):
            raise ConfigError(
                "resume=True needs the unsharded model: pass the LoraModel with "
                "strategy='fsdp' (lora_kit shards it after loading the checkpoint) instead of "
                "one you wrapped in FSDP yourself"
            )
        undo_resume = _load_adapter_tensors(lm, name, checkpoint.adapter)
    else:
        _seed(config.seed)
    # Modes and gradient checkpointing are the caller's: put back on every way out (the
    # modes of the model as passed: a caller's DDP/FSDP wrapper too, and the LoraModel in it).
    modes = [(module, module.training) for module in model.modules()]
    switched_checkpointing = False
    # Other adapters take no part in the forward pass: while they require grad, DDP waits for
    # their gradients and fails in the second step. Frozen until the end (only as passed
    # unwrapped: a caller's wrapper has already taken its parameters' flags).
    thaw = _freeze_other_adapters(lm, name) if model is lm else None
    try:
        if config.gradient_checkpointing and not checkpointing_on(lm.model):
            _set_checkpointing(lm, True)
            switched_checkpointing = True
        if model is lm and config.strategy != "none":
            model = wrap(lm, config.strategy, ctx)

        params = lm.adapter_parameters(name)  # after wrapping: FSDP2 replaces them with DTensors
        for p in params:
            p.requires_grad_(True)
        optimizer = _optimizer(params, config)
        # The sampler only needs len(); it yields example indices, sharded by rank.
        sampler: DistributedSampler[int] = DistributedSampler(
            cast(Any, train_data),
            num_replicas=ctx.world_size,
            rank=ctx.rank,
            shuffle=True,
            seed=config.seed,
        )
        windows_per_epoch = math.ceil(
            math.ceil(len(sampler) / config.batch_size) / config.grad_accum
        )
        total = config.steps or config.epochs * windows_per_epoch
        scheduler = _scheduler(optimizer, config, total)
        scaler = plan.scaler()

        step, epoch, window_start, bad_run = 0, 0, 0, 0
        metrics: dict[str, float] = {}
        evaluated = -1  # the step ``metrics`` were measured at
        if checkpoint is not None:
            step, epoch, window_start, bad_run, metrics, evaluated = _restore_state(
                model, optimizer, scheduler, scaler, params, checkpoint, total
            )
            log.notice(f"resuming from {checkpoint.path} at step {step}/{total}")
            _warn_if_world_changed(checkpoint, ctx.world_size)

        extra = _label_files(train_data)
        log.rewind(step)  # records of steps this run will (re)do go
        log.start(total, initial=step)
        model.train()
        last_checkpoint: Path | None = checkpoint.path if checkpoint is not None else None
        position = {"epoch": epoch, "window": window_start}  # where the next step starts
        windows = _windows(sampler, config.batch_size, config.grad_accum, epoch, window_start)
        undo_resume = None  # training starts: from here on the adapter is the run's
        while step < total:
            epoch, w, window = next(windows)
            started = time.perf_counter()
            loss, tokens = _accumulate(model, train_data, window, plan, scaler, ctx)
            scaler.unscale_(optimizer)
            norm = grad_norm(model, params, config.clip_norm)
            bad = not (math.isfinite(loss) and math.isfinite(norm))
            skipped = bad
            if scaler.is_enabled():
                scale = scaler.get_scale()
                scaler.step(optimizer)  # skips by itself on inf gradients (fp16 overflow)
                scaler.update()
                bad = not math.isfinite(loss)  # an overflow is no divergence: only reported
                skipped = bad or scaler.get_scale() < scale  # the scaler backs off on a skip
            elif not bad:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            if not skipped:  # the schedule follows the updates made (as accelerate/HF Trainer)
                scheduler.step()
            step += 1
            bad_run = bad_run + 1 if bad else 0
            elapsed = max(time.perf_counter() - started, 1e-9)
            log.log(
                {
                    "event": "train",
                    "step": step,
                    "epoch": epoch,
                    "loss": loss,
                    "grad_norm": norm,
                    "lr": lr,
                    "tokens": tokens,
                    "tokens_per_s": tokens / elapsed,
                    "skipped": skipped,
                }
            )
            if bad:
                where = last_checkpoint or "none yet"
                warnings.warn(
                    f"step {step}: non-finite loss ({loss}) or gradient norm ({norm}); the "
                    f"update was skipped ({bad_run} in a row, limit {config.max_bad_steps})",
                    stacklevel=2,
                )
                if bad_run >= config.max_bad_steps:
                    raise TrainingDivergedError(
                        f"training diverged: {bad_run} steps in a row had a NaN/inf loss or "
                        f"gradient (last at step {step}). The last good checkpoint is {where}. "
                        f"Lower --lr, raise --warmup-steps, keep --clip-norm on, or use fp32"
                    )
            position = {"epoch": epoch, "window": w + 1}
            if eval_data is not None and config.eval_every and step % config.eval_every == 0:
                metrics = _evaluate_and_log(model, eval_data, config, plan, step, log)
                evaluated = step
            if config.save_every and step % config.save_every == 0 and step < total and not bad:
                last_checkpoint = _save_checkpoint(
                    model,
                    lm,
                    config,
                    optimizer,
                    scheduler,
                    scaler,
                    step,
                    bad_run,
                    {**position, "metrics": metrics, "evaluated": evaluated},
                    extra,
                    data_id,
                )
            info = StepInfo(step, total, loss, lr, skipped)
            for callback in callbacks:
                callback(info)

        if eval_data is not None and evaluated != step:
            # (a resumed finished run has its final metrics from the checkpoint)
            metrics = _evaluate_and_log(model, eval_data, config, plan, step, log)
            evaluated = step
        progress = {**position, "metrics": metrics, "evaluated": evaluated}
        last_checkpoint = _save_checkpoint(
            model, lm, config, optimizer, scheduler, scaler, step, bad_run, progress, extra, data_id
        )
        with full_params(model):
            if ctx.is_main:
                publish_adapter(config.out, lm, name, extra)
        barrier(ctx)
        log.log({"event": "end", "step": step, **metrics})
        return TrainResult(Path(config.out), step, metrics, last_checkpoint)
    except BaseException:
        if undo_resume is not None:  # a resume that failed before its first step changes nothing
            undo_resume()
        raise
    finally:
        log.close()  # the progress bar and TensorBoard writer, on every way out
        _restore_modes(modes)
        if switched_checkpointing:
            _set_checkpointing(lm, False)
        if thaw is not None:
            thaw()


def _freeze_other_adapters(lm: LoraModel, name: str) -> Callable[[], None]:
    """Stop the other adapters' parameters requiring grad; returns what puts them back.

    They are put back by position in ``adapter_parameters``, not as the objects frozen:
    FSDP2 (``strategy="fsdp"``) replaces every parameter with a sharded one.
    """
    ours = {id(p) for p in lm.adapter_parameters(name)}
    frozen: dict[str, list[int]] = {}
    for other in lm.adapters:
        if other == name:
            continue
        for i, param in enumerate(lm.adapter_parameters(other)):
            if param.requires_grad and id(param) not in ours:
                param.requires_grad_(False)
                frozen.setdefault(other, []).append(i)

    def thaw() -> None:
        for other, positions in frozen.items():
            if other in lm.adapters:  # (not deleted meanwhile)
                params = lm.adapter_parameters(other)
                for i in positions:
                    if i < len(params):  # (not reloaded meanwhile over fewer modules)
                        params[i].requires_grad_(True)

    return thaw


def _restore_modes(modes: Sequence[tuple[nn.Module, bool]]) -> None:
    """Put every module back in the train/eval mode the caller left it in."""
    for module, training in modes:
        module.training = training


# ---- one optimizer step ------------------------------------------------------------------


def _windows(
    sampler: DistributedSampler[int], batch_size: int, accum: int, epoch: int, start: int
) -> Iterator[tuple[int, int, list[list[int]]]]:
    """``(epoch, window index, micro-batches)`` forever, from ``epoch``'s window ``start``.

    A window is the ``accum`` micro-batches of one optimizer step; each epoch reshuffles
    (seeded by ``seed + epoch``, so a resumed run sees the very same order).
    """
    while True:
        sampler.set_epoch(epoch)
        order = list(sampler)
        micro = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        windows = [micro[i : i + accum] for i in range(0, len(micro), accum)]
        for w in range(start, len(windows)):
            yield epoch, w, windows[w]
        epoch, start = epoch + 1, 0


def _accumulate(
    model: nn.Module,
    data: Dataset,
    window: Sequence[Sequence[int]],
    plan: PrecisionPlan,
    scaler: torch.amp.GradScaler,
    ctx: DistContext,
) -> tuple[float, int]:
    """Forward/backward over one accumulation window; returns the global mean loss and tokens.

    The model's loss is a mean over a micro-batch's loss terms (examples; causal LM: predicted
    tokens). Each is weighted by its micro-batch's share of the terms of the whole window on
    all ranks (times the world size: DDP/FSDP average gradients over ranks), so the gradient
    equals that of one batch holding the window whatever ``grad_accum``, the last, possibly
    smaller, micro-batch and, for causal LM, the examples' lengths are (as HF Trainer's
    ``num_items_in_batch``).
    """
    device = ctx.device
    counts = [_loss_terms(data, indices) for indices in window]
    n_window = float(all_reduce_sum(torch.tensor([float(sum(counts))]), ctx)[0])
    loss_sum = torch.zeros((), dtype=torch.float64)
    tokens = 0
    for indices, count in zip(window, counts, strict=True):
        batch = {k: v.to(device) for k, v in data.collate(indices).items()}
        with plan.autocast():
            out = model(**batch)
        loss = out.loss.float() * (count * ctx.world_size / max(n_window, 1.0))
        scaler.scale(loss).backward()
        loss_sum += loss.detach().double().cpu()
        tokens += int(batch["attention_mask"].sum())
    totals = all_reduce_sum(torch.tensor([float(loss_sum), float(tokens)]), ctx)
    return float(totals[0]) / ctx.world_size, int(totals[1])


def _loss_terms(data: Dataset, indices: Sequence[int]) -> int:
    """How many terms the model's mean loss over micro-batch ``indices`` averages: examples,
    or for causal LM the predicted tokens (each example's but its first, none of an empty
    one's; padding is -100)."""
    if data.task == "causal-lm":
        return sum(max(len(data.examples[i].input_ids) - 1, 0) for i in indices)
    return len(indices)


# ---- evaluation --------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: nn.Module, data: Dataset, *, batch_size: int, plan: PrecisionPlan, device: torch.device
) -> dict[str, float]:
    """Loss and perplexity (causal LM) or loss, accuracy and macro-F1 (classification).

    Every rank evaluates the whole set (sharded models need every rank in each forward).
    """
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    preds: list[int] = []
    golds: list[int] = []
    for start in range(0, len(data), batch_size):
        batch = {
            k: v.to(device)
            for k, v in data.collate(range(start, min(start + batch_size, len(data)))).items()
        }
        with plan.autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[
                "logits"
            ].float()
        labels = batch["labels"]
        if data.task == "causal-lm":
            shifted = labels[:, 1:]  # [B, T-1]: token t+1 is predicted from position t
            loss_sum += float(
                F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    shifted.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
            )
            count += int((shifted != -100).sum())
        else:
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))  # logits [B, C]
            count += len(labels)
            preds.extend(logits.argmax(-1).tolist())
            golds.extend(labels.tolist())
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    if data.task == "causal-lm":
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}
    accuracy = sum(p == g for p, g in zip(preds, golds, strict=True)) / max(len(golds), 1)
    return {"eval_loss": loss, "eval_accuracy": accuracy, "eval_macro_f1": macro_f1(preds, golds)}


def macro_f1(preds: Sequence[int], golds: Sequence[int]) -> float:
    """Unweighted mean F1 over the classes that occur in ``golds`` or ``preds``."""
    classes = sorted(set(golds) | set(preds))
    scores = []
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(preds, golds, strict=True))
        fp = sum(p == c and g != c for p, g in zip(preds, golds, strict=True))
        fn = sum(p != c and g == c for p, g in zip(preds, golds, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / max(len(scores), 1)


def _evaluate_and_log(
    model: nn.Module,
    data: Dataset,
    config: TrainConfig,
    plan: PrecisionPlan,
    step: int,
    log: RunLogger,
) -> dict[str, float]:
    device = next(unwrap(model).parameters()).device
    metrics = evaluate(model, data, batch_size=config.batch_size, plan=plan, device=device)
    log.log({"event": "eval", "step": step, **metrics})
    log.notice(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    return metrics


# ---- setup helpers -----------------------------------------------------------------------


def _context(lm: LoraModel) -> DistContext:
    import torch.distributed as dist

    device = next(lm.parameters()).device
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), device)
    return DistContext(0, 1, device)


def _seed(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def _optimizer(params: Sequence[nn.Parameter], config: TrainConfig) -> Any:
    """AdamW over ``params`` only; no weight decay on 1-D tensors (biases, norm weights)."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)


def _scheduler(optimizer: Any, config: TrainConfig, total: int) -> Any:
    kind: str = config.schedule
    if kind == "constant" and config.warmup_steps:
        kind = "constant_with_warmup"
    return get_scheduler(
        kind, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total
    )


def checkpointing_on(model: nn.Module) -> bool:
    """Whether activation (gradient) checkpointing is on in a transformers model."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _set_checkpointing(lm: LoraModel, on: bool) -> None:
    """Switch activation checkpointing (non-reentrant) on or off.

    transformers 5 names it ``activation_checkpointing_*`` (the ``gradient_checkpointing_*``
    names warn that they go in v6); 4.x has only the old names.
    """
    model: Any = lm.model
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
        return
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ConfigError(
            f"{type(model).__name__} has no gradient_checkpointing_enable(); "
            f"drop --gradient-checkpointing"
        )
    if on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _check_active(lm: LoraModel, name: str) -> None:
    """Refuse to train an adapter the forward pass does not use (every step would be a no-op)."""
    lm.adapter_record(name)  # AdapterNameError for an unknown name
    merged = lm.merged
    if merged is not None:
        raise ConfigError(
            f"adapters {list(merged.names)} are merged into the base weights; call lm.unmerge() "
            f"before training {name!r}"
        )
    if lm.active_adapter != name:
        active = list(lm.active.names) or "none, the base model alone"
        raise ConfigError(
            f"adapter {name!r} is not the active adapter (active: {active}), so training "
            f"would not update it; call lm.set_adapter({name!r}) first"
        )


def _check_predicts_something(data: Dataset, what: str) -> None:
    """Refuse causal-LM data of examples of at most one token: there is no next token to
    predict, so its mean loss is 0/0 (training: NaN steps; evaluation: a made-up 0)."""
    if len(data) and _loss_terms(data, range(len(data))) == 0:
        raise DataError(
            f"the {what} data has no token to predict: each of its {len(data)} causal-LM "
            f"examples has at most one token; give examples of two tokens or more"
        )


def _check_eval_data(train_data: Dataset, eval_data: Dataset) -> None:
    """Refuse an eval set whose task or label ids mean something else than the training set's,
    or that has nothing to predict."""
    _check_predicts_something(eval_data, "eval")
    if eval_data.task != train_data.task:
        raise DataError(
            f"the eval data is {eval_data.task} but the training data is {train_data.task}; "
            f"load both with the same loader"
        )
    if eval_data.labels != train_data.labels:
        raise DataError(
            f"the eval data's labels {list(eval_data.labels)} differ from the training data's "
            f"{list(train_data.labels)}, so label ids would name different classes; load it "
            f"with load_classification(..., labels=train_data.labels)"
        )


def _check_labels(lm: LoraModel, data: Dataset) -> None:
    if data.task != "seq-cls":
        return
    config = getattr(lm.model, "config", None)
    n = getattr(config, "num_labels", None)
    if n is not None and n != len(data.labels):
        raise DataError(
            f"the data has {len(data.labels)} classes {list(data.labels)} but the model's head "
            f"has {n} outputs; load the base with num_labels={len(data.labels)}"
        )
    if config is not None:
        config.id2label = dict(enumerate(data.labels))
        config.label2id = {label: i for i, label in enumerate(data.labels)}


def _label_files(data: Dataset) -> dict[str, str]:
    if data.task != "seq-cls":
        return {}
    id2label = {str(i): label for i, label in enumerate(data.labels)}
    label2id = {label: i for i, label in enumerate(data.labels)}
    return {LABELS_NAME: json.dumps({"id2label": id2label, "label2id": label2id}, indent=2) + "\n"}


# ---- checkpoints -------------------------------------------------------------------------


def _data_id(data: Dataset) -> dict[str, Any]:
    """The training set's size and content hash, to refuse a resume on other data."""
    digest = hashlib.sha256(f"{data.task}|{data.labels!r}|{data.pad_id}".encode())
    for example in data.examples:
        digest.update(f"{example.label}:{','.join(map(str, example.input_ids))};".encode())
    return {"examples": len(data), "sha256": digest.hexdigest()}


def _check_resume(config: TrainConfig, checkpoint: Checkpoint, data_id: dict[str, Any]) -> None:
    """Refuse a resume whose settings or data differ from the checkpoint's.

    Raises:
        ConfigError: They differ (the run's arguments are the thing to change).
        CheckpointError: The saved config or data record is unreadable (edited or damaged).
    """
    state, where = checkpoint.state, checkpoint.path / STATE_FILE
    try:
        saved = TrainConfig.from_json(state["config"])
    except (ConfigError, TypeError) as exc:  # TypeError: not text at all
        raise CheckpointError(
            f"{where}: its saved run config is unreadable ({exc}); {_FRESH}"
        ) from exc
    before = state.get("data")  # absent from checkpoints written before it was recorded
    if before is not None and not (
        isinstance(before, dict)
        and isinstance(before.get("examples"), int)
        and isinstance(before.get("sha256"), str)
    ):
        raise CheckpointError(f"{where}: its record of the training data is damaged; {_FRESH}")
    changed = config.resume_mismatch(saved)
    if before is not None and before != data_id:
        changed.append(
            f"the training data differs (checkpoint {before['examples']} examples, now "
            f"{data_id['examples']}; or their tokens or labels)"
        )
    if changed:
        raise ConfigError(
            "cannot --resume with different settings (the data order or schedule would "
            "differ): " + "; ".join(changed) + ". Use the original values or start a new --out"
        )


def _load_adapter_tensors(lm: LoraModel, name: str, files: AdapterFiles) -> Callable[[], None]:
    """Copy a checkpoint's adapter tensors into adapter ``name`` (strict, before wrapping).

    Returns:
        A function that copies the values the adapter held before back into it (the resume
        calls it when it fails before training starts).

    Raises:
        ConfigError: The checkpoint's targets, ranks, scalings or dropout differ from the
            adapter's (the resumed run would train something else).
        AdapterMismatchError: The checkpoint was trained on another base model.
    """
    from ..fingerprint import check_fingerprint
    from ..peft_format import head_key, lora_keys

    record = lm.adapter_record(name)
    before_cfg, now_cfg = files.config, record.config
    changed = [
        f"{m}: {what} {before} -> {after}"
        for m in record.modules
        for what, before, after in (
            ("rank", before_cfg.rank_for(m), now_cfg.rank_for(m)),
            ("scaling", before_cfg.scaling_for(m), now_cfg.scaling_for(m)),
        )
        if before != after
    ]
    if before_cfg.dropout != now_cfg.dropout:
        changed.insert(0, f"dropout {before_cfg.dropout} -> {now_cfg.dropout}")
    if changed:
        raise ConfigError(
            "the checkpoint's adapter was trained with other LoRA settings (checkpoint -> "
            "now): "
            + "; ".join(changed[:4])
            + ("; ..." if len(changed) > 4 else "")
            + ". Resume with the original --rank/--alpha/--dropout or start a new --out"
        )
    tensors = files.tensors
    targets: dict[str, Tensor] = {}
    for module_name in record.modules:
        layer = lm.model.get_submodule(module_name)
        if not isinstance(layer, LoRALinear):
            raise ConfigError(f"{module_name!r} is no longer a LoRA layer; was the model edited?")
        adapter = layer.adapter(name)
        key_a, key_b = lora_keys(module_name)
        targets[key_a], targets[key_b] = adapter.lora_A, adapter.lora_B
    for module_name in record.saved_modules:
        saved = lm.model.get_submodule(module_name)
        if not isinstance(saved, SavedModule):
            raise ConfigError(f"{module_name!r} is no longer a saved module; was it edited?")
        for key, value in saved.copies[name].state_dict(keep_vars=True).items():
            targets[head_key(module_name, key)] = value
    if set(targets) != set(tensors) or any(
        tensors[key].shape != param.shape for key, param in targets.items()
    ):
        raise ConfigError(
            "the checkpoint's adapter does not match this model's adapter (different targets, "
            "rank or model size); resume with the same model and LoRA settings"
        )
    base = files.metadata.get("base_fingerprint")
    if isinstance(base, dict):  # AdapterMismatchError when resumed onto another base
        layers = {m: lm.model.get_submodule(m) for m in record.modules}
        check_fingerprint(base, lm.model, layers, str(files.path), _RESUME_HINT)
    previous = {key: param.detach().clone() for key, param in targets.items()}

    @torch.no_grad()
    def put_back() -> None:
        for key, param in targets.items():
            param.copy_(previous[key])

    try:
        with torch.no_grad():
            for key, param in targets.items():
                param.copy_(tensors[key])
    except BaseException:
        put_back()
        raise
    return put_back


_RESUME_HINT = (
    "resume with the base model the run started from, or start a new run (another --out, "
    "without --resume)"
)


def _optimizer_state(model: nn.Module, optimizer: Any) -> dict[str, Any]:
    if is_fsdp1(model) or is_fsdp2(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state: dict[str, Any] = get_optimizer_state_dict(model, optimizer, options=options)
        return state
    plain: dict[str, Any] = optimizer.state_dict()
    return plain


def _load_optimizer(model: nn.Module, optimizer: Any, state: dict[str, Any]) -> None:
    if is_fsdp1(model) or is_fsdp2(model):
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_optimizer_state_dict(model, optimizer, state, options=options)
        return
    optimizer.load_state_dict(state)


def _restore_state(
    model: nn.Module,
    optimizer: Any,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    params: Sequence[nn.Parameter],
    checkpoint: Checkpoint,
    total: int,
) -> tuple[int, int, int, int, dict[str, float], int]:
    """Load a checkpoint's optimizer, scheduler, scaler and RNG states; return its position.

    Returns:
        ``(step, epoch, window, bad_run, metrics, evaluated)``.

    Raises:
        CheckpointError: The trainer state does not fit this run (edited, damaged or foreign):
            a bad counter, an optimizer state of other shapes or with NaN/inf, or a
            scheduler/scaler/RNG state torch cannot load.
    """
    state = checkpoint.state
    where = checkpoint.path / STATE_FILE
    counters = {key: state[key] for key in ("step", "epoch", "window", "bad_run")}
    counters["evaluated"] = state.get("evaluated", -1)
    for key, value in counters.items():
        low = -1 if key == "evaluated" else 0
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= 2**62:
            raise CheckpointError(f"{where}: {key} is {value!r}, not a count; {_FRESH}")
    if counters["step"] > total:
        raise CheckpointError(
            f"{where}: step {counters['step']} is past this run's {total} steps; {_FRESH}"
        )
    metrics = state.get("metrics", {})
    if not isinstance(metrics, dict) or not all(
        isinstance(k, str) and isinstance(v, int | float) for k, v in metrics.items()
    ):
        raise CheckpointError(f"{where}: metrics is not a dict of numbers; {_FRESH}")
    try:
        _load_optimizer(model, optimizer, state["optimizer"])
        for p in params:
            for key, value in optimizer.state.get(p, {}).items():
                if type(value) is not Tensor or value.ndim == 0:  # a step count, or sharded
                    continue
                if value.shape != p.shape:
                    raise ValueError(f"{key} has shape {list(value.shape)}, not {list(p.shape)}")
                if not torch.isfinite(value).all():
                    raise ValueError(f"{key} holds NaN or inf")
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(_own_rng(state))
    except torch.OutOfMemoryError:
        raise  # the machine's, not the checkpoint's
    except Exception as exc:  # torch raises KeyError/ValueError/RuntimeError/TypeError here
        raise CheckpointError(
            f"{where}: its optimizer, scheduler, scaler or RNG state does not fit this run "
            f"({type(exc).__name__}: {exc}); {_FRESH}"
        ) from exc
    return (
        counters["step"],
        counters["epoch"],
        counters["window"],
        counters["bad_run"],
        {k: float(v) for k, v in metrics.items()},
        counters["evaluated"],
    )


def _own_rng(state: dict[str, Any]) -> Any:
    """This rank's RNG state: its own when the checkpoint has one per rank of as many ranks
    (``rng_ranks``), else the one ``rng`` (rank 0's; one process, or another world size)."""
    import torch.distributed as dist

    ranks = state.get("rng_ranks")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if isinstance(ranks, list) and len(ranks) == world > 1:
        return ranks[dist.get_rank()]
    return state["rng"]


_FRESH = "it was edited or damaged. Delete the checkpoint folder to start fresh"


def _warn_if_world_changed(checkpoint: Checkpoint, world_size: int) -> None:
    """Warn when a run resumes with another number of processes than wrote its checkpoint.

    Allowed (a job may come back on fewer GPUs), but the sampler shards each epoch by rank, so
    the examples each later step sees differ from the uninterrupted run's.
    """
    saved = checkpoint.state.get("world_size")  # absent from checkpoints written before it
    if isinstance(saved, int) and saved != world_size:
        message = (
            f"resuming a run written by {saved} process(es) with {world_size}: the data order "
            f"from here on (and, with epochs, the number of steps) differs from an "
            f"uninterrupted run's; resume with {saved} to reproduce it"
        )
        warnings.warn(message, stacklevel=3)


def _save_checkpoint(
    model: nn.Module,
    lm: LoraModel,
    config: TrainConfig,
    optimizer: Any,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    step: int,
    bad_run: int,
    position: dict[str, Any],
    extra: dict[str, str],
    data_id: dict[str, Any],
) -> Path:
    """Gather (collective) and write the checkpoint on rank 0.

    ``position`` holds where the next step starts and the last evaluation (its metrics and
    step), so a resumed run neither repeats nor loses it.
    """
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    optimizer_state = _optimizer_state(model, optimizer)
    state = {
        "step": step,
        "bad_run": bad_run,
        **position,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "config": config.to_json(),
        "data": data_id,
        "world_size": world,
    }
    if world > 1:
        # Every rank's own: each GPU's dropout generator is advanced by its rank alone.
        ranks: list[Any] = [None] * world
        dist.all_gather_object(ranks, state["rng"])
        state["rng_ranks"] = ranks
    path = Path(config.out) / "checkpoint"
    main = not dist.is_initialized() or dist.get_rank() == 0
    with full_params(model):
        if main:
            path = write_checkpoint(config.out, lm, config.adapter_name, state, extra)
    if dist.is_initialized():
        dist.barrier()
    return path
