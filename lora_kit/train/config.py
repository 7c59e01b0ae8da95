"""`TrainConfig`: the typed, validated hyper-parameters of one training run (JSON round-trip)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

from ..config import is_finite_number, json_object, reject_unknown_fields
from ..errors import ConfigError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
Schedule = Literal["constant", "linear", "cosine"]
Strategy = Literal["none", "ddp", "fsdp"]
Task = Literal["auto", "causal-lm", "seq-cls"]

PRECISIONS: tuple[str, ...] = get_args(Precision)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
STRATEGIES: tuple[str, ...] = get_args(Strategy)
TASKS: tuple[str, ...] = get_args(Task)

# Fields that must not change between a run and its ``--resume``: they decide the data order,
# the schedule or the meaning of a step, so a changed value would silently train something else.
RESUME_FIELDS: tuple[str, ...] = (
    "lr",
    "epochs",
    "steps",
    "batch_size",
    "grad_accum",
    "max_length",
    "schedule",
    "warmup_steps",
    "weight_decay",
    "seed",
    "eval_fraction",
    "clip_norm",  # clipping changes every update after it first applies
    "precision",  # so does the arithmetic of every step
)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one adapter training run.

    Attributes:
        lr: Peak learning rate of AdamW.
        epochs: Passes over the training data (ignored when ``steps`` is set).
        steps: Optimizer steps to run; overrides ``epochs`` when set.
        batch_size: Examples per micro-batch on each process.
        grad_accum: Micro-batches accumulated per optimizer step. The effective batch is
            ``batch_size * grad_accum * world_size``.
        max_length: Tokens per packed block (causal LM) or per example (truncation limit).
        precision: ``fp32``, ``bf16`` (autocast), ``fp16`` (autocast + GradScaler, CUDA) or
            ``auto`` (fp32 on CPU; bf16 on a GPU that supports it, else fp16). Adapters and
            optimizer state stay fp32 in every mode.
        schedule: Learning-rate schedule after warm-up: ``constant``, ``linear`` or ``cosine``.
        warmup_steps: Linear warm-up steps from 0 to ``lr``.
        weight_decay: AdamW decoupled weight decay (never applied to biases and norms).
        clip_norm: Clip the global gradient norm to this; 0 disables clipping.
        seed: Seeds Python and torch RNGs and the data order.
        save_every: Write a resumable checkpoint every N optimizer steps (0: only at the end).
        eval_every: Evaluate every N optimizer steps (0: only at the end).
        eval_fraction: Share of the data held out for evaluation (0 disables evaluation).
        out: Output directory: the final adapter, ``metrics.jsonl`` and ``checkpoint/``.
        gradient_checkpointing: Recompute the base's activations in backward to save memory.
        strategy: ``none``, ``ddp`` or ``fsdp`` (FSDP2 ``fully_shard``) under ``torchrun``.
        max_bad_steps: Consecutive steps with a NaN/inf loss or gradient that stop training.
        adapter_name: Name of the adapter being trained.
    """

    lr: float = 2e-4
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 128
    precision: Precision = "auto"
    schedule: Schedule = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    seed: int = 0
    save_every: int = 0
    eval_every: int = 0
    eval_fraction: float = 0.1
    out: str = "adapters/default"
    gradient_checkpointing: bool = False
    strategy: Strategy = "none"
    max_bad_steps: int = 5
    adapter_name: str = "default"

    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        if not is_finite_number(self.lr) or self.lr <= 0:
            raise ConfigError(f"TrainConfig.lr must be a positive number, got {self.lr!r}")
        _positive_int("epochs", self.epochs)
        if self.steps is not None:
            _positive_int("steps", self.steps)
        _positive_int("batch_size", self.batch_size)
        _positive_int("grad_accum", self.grad_accum)
        _positive_int("max_length", self.max_length)
        if self.max_length < 2:
            raise ConfigError("TrainConfig.max_length must be at least 2 tokens")
        _choice("precision", self.precision, PRECISIONS)
        _choice("schedule", self.schedule, SCHEDULES)
        _choice("strategy", self.strategy, STRATEGIES)
        for name in ("warmup_steps", "save_every", "eval_every", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"TrainConfig.{name} must be an integer >= 0, got {value!r}")
        _positive_int("max_bad_steps", self.max_bad_steps)
        if not is_finite_number(self.weight_decay) or self.weight_decay < 0:
            raise ConfigError(
                f"TrainConfig.weight_decay must be a number >= 0, got {self.weight_decay!r}"
            )
        if not is_finite_number(self.clip_norm) or self.clip_norm < 0:
            raise ConfigError(
                f"TrainConfig.clip_norm must be a number >= 0 (0 disables), got {self.clip_norm!r}"
            )
        if not is_finite_number(self.eval_fraction) or not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(
                f"TrainConfig.eval_fraction must be in [0, 1), got {self.eval_fraction!r}"
            )
        if not isinstance(self.out, str) or not self.out:
            raise ConfigError(f"TrainConfig.out must be a directory path, got {self.out!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ConfigError("TrainConfig.gradient_checkpointing must be a bool")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return asdict(self)

    def to_json(self) -> str:
        """The config as a JSON string (keys sorted, stable)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build a config from :meth:`to_dict` output.

        Raises:
            ConfigError: Unknown keys or invalid values.
        """
        reject_unknown_fields(cls, data)
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        """Parse :meth:`to_json` output.

        Raises:
            ConfigError: Not a JSON object of valid fields.
        """
        return cls.from_dict(json_object(text, cls.__name__))

    def resume_mismatch(self, saved: TrainConfig) -> list[str]:
        """Fields in :data:`RESUME_FIELDS` whose value differs from the checkpoint's."""
        return [
            f"{name}: checkpoint {getattr(saved, name)!r}, now {getattr(self, name)!r}"
            for name in RESUME_FIELDS
            if getattr(saved, name) != getattr(self, name)
        ]


def check_out_dir(out: str) -> None:
    """Refuse an output path a run would damage (before any work is done).

    A run writes the adapter files, ``metrics.jsonl`` (rewritten when a fresh run starts) and
    ``checkpoint/`` (replaced whole) into ``out``. So ``out`` must be new, empty, or hold an
    earlier run or adapter of lora_kit's: a folder holding none of a run's files (a project
    folder, ``.``), a ``checkpoint`` that is not a lora_kit checkpoint, or a ``metrics.jsonl``
    that is not a lora_kit log is refused; nothing in it is touched.

    Raises:
        ConfigError: ``out``, or the nearest of its parents that exists, is a file; or ``out``
            is a folder holding files a run would delete or overwrite, as above.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(
            f"--out {out!r} is a file, not a directory; pass a new or existing directory"
        )
    if path.is_dir():
        _check_run_dir(path, out)
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ConfigError(
            f"--out {out!r} is under {str(parent)!r}, which is a file, not a directory; pass "
            f"a new or existing directory"
        )


def _check_run_dir(path: Path, out: str) -> None:
    """Refuse an existing folder that is not (or holds parts that are not) a lora_kit run."""
    from ..adapter_io import CONFIG_NAME
    from .checkpoint import CHECKPOINT_DIR, STATE_FILE
    from .logging import METRICS_FILE, is_run_log

    fix = "pass a new or empty --out directory (or move those files away)"
    checkpoint, metrics = path / CHECKPOINT_DIR, path / METRICS_FILE
    if (checkpoint.exists() or checkpoint.is_symlink()) and not (
        checkpoint.is_dir() and not checkpoint.is_symlink() and (checkpoint / STATE_FILE).is_file()
    ):
        raise ConfigError(
            f"--out {out!r} holds {CHECKPOINT_DIR!r}, which is not a lora_kit checkpoint (no "
            f"{STATE_FILE}); a run would replace it; {fix}"
        )
    if (metrics.exists() or metrics.is_symlink()) and not is_run_log(metrics):
        raise ConfigError(
            f"--out {out!r} holds {METRICS_FILE!r}, which is not a lora_kit training log; a "
            f"run would rewrite it; {fix}"
        )
    ours = (CONFIG_NAME, CHECKPOINT_DIR, METRICS_FILE)
    if not any((path / name).exists() for name in ours) and any(path.iterdir()):
        raise ConfigError(
            f"--out {out!r} is a folder that is not empty and holds no lora_kit run or "
            f"adapter ({', '.join(ours)}); a run would write its files among yours; {fix}"
        )


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"TrainConfig.{name} must be a positive integer, got {value!r}")


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"TrainConfig.{name} must be one of {choices}, got {value!r}")
