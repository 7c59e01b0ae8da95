"""Adapters-only training: a readable loop with AMP, accumulation, eval, checkpoints and resume.

Quick start::

    import lora_kit as lk
    from lora_kit.train import TrainConfig, train, load_causal_lm, hf_encoder

    lm = lk.inject(model, lk.LoraConfig(r=8, alpha=16))
    data = load_causal_lm("corpus.txt", hf_encoder(tokenizer), max_length=128,
                          eos_id=tokenizer.eos_token_id)
    train_set, eval_set = data.split(0.1, seed=0)
    result = train(lm, train_set, TrainConfig(out="adapters/mine", steps=200),
                   eval_data=eval_set)
"""

from .checkpoint import Checkpoint, CheckpointError, read_checkpoint
from .config import TrainConfig
from .data import (
    Dataset,
    Example,
    hf_encoder,
    load_causal_lm,
    load_classification,
    read_texts,
    special_suffix,
)
from .distributed import DistContext, full_params, init_distributed, unwrap, wrap
from .logging import RunLogger
from .loop import StepInfo, TrainResult, evaluate, macro_f1, train
from .precision import PrecisionPlan, resolve_precision

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "Dataset",
    "DistContext",
    "Example",
    "PrecisionPlan",
    "RunLogger",
    "StepInfo",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "full_params",
    "hf_encoder",
    "init_distributed",
    "load_causal_lm",
    "load_classification",
    "macro_f1",
    "read_checkpoint",
    "read_texts",
    "resolve_precision",
    "special_suffix",
    "train",
    "unwrap",
    "wrap",
]
