"""Reproducible pretraining of the small Shakespeare GPT-2 base shipped with ``lora_kit``."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from lora_kit.demo.corpora import load_shakespeare
from lora_kit.demo.evaluation import mean_token_nll
from lora_kit.demo.tokenizer import train_byte_level_bpe

__all__ = [
    "BuildReport",
    "PretrainSettings",
    "build_shakespeare_gpt2",
    "encode",
    "make_config",
    "train_causal_lm",
]


@dataclass(frozen=True)
class PretrainSettings:
    """Hyperparameters of the base model and its pretraining run.

    Attributes:
        seed: Seed for weight init and batch sampling.
        vocab_size: Size of the trained byte-level BPE vocabulary.
        n_layer: Transformer blocks.
        n_head: Attention heads.
        n_embd: Hidden size.
        n_positions: Context length (also the training block size).
        batch_size: Sequences per optimizer step.
        steps: Optimizer steps.
        learning_rate: Peak AdamW learning rate.
        warmup_steps: Linear warmup steps before cosine decay to 10% of the peak.
        weight_decay: AdamW weight decay.
        eval_tokens: Held-out tokens scored after training.
    """

    seed: int = 0
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    n_positions: int = 256
    batch_size: int = 8
    steps: int = 600
    learning_rate: float = 2e-3
    warmup_steps: int = 30
    weight_decay: float = 0.01
    eval_tokens: int = 32768


@dataclass(frozen=True)
class BuildReport:
    """What ``build_shakespeare_gpt2`` produced (losses in nats per token, times in seconds)."""

    out_dir: Path
    seconds: float
    cpu_seconds: float
    threads: int
    num_parameters: int
    pretrain_eval_loss: float
    adapt_eval_loss: float
    random_init_adapt_eval_loss: float


def make_config(settings: PretrainSettings, vocab_size: int) -> GPT2Config:
    """Builds the GPT-2 config of the base (dropout off: the run is far from overfitting).

    Args:
        settings: Model hyperparameters.
        vocab_size: Tokenizer vocabulary size.

    Returns:
        A ``GPT2Config`` with tied input/output embeddings.
    """
    return GPT2Config(
        vocab_size=vocab_size,
        n_positions=settings.n_positions,
        n_embd=settings.n_embd,
        n_layer=settings.n_layer,
        n_head=settings.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=True,
    )


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Tokenizes a long text into one 1-D tensor of ids (paragraph by paragraph, same result).

    Args:
        tokenizer: A byte-level BPE tokenizer.
        text: The text.

    Returns:
        The token ids.
    """
    chunks = [c + "\n\n" for c in text.split("\n\n")]
    chunks[-1] = chunks[-1][:-2]
    encoded = tokenizer(chunks, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor([i for chunk in encoded for i in chunk], dtype=torch.long)


def _lr_factor(step: int, settings: PretrainSettings) -> float:
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_causal_lm(
    model: GPT2LMHeadModel,
    ids: torch.Tensor,
    settings: PretrainSettings,
    log: Callable[[str], None] = print,
    max_cpu_seconds: float | None = None,
) -> int:
    """Trains on random windows of ``ids`` drawn from a seeded generator (fixed data order).

    Args:
        model: The model to train in place.
        ids: 1-D training token ids.
        settings: Optimizer and schedule settings.
        log: Progress callback (about 20 lines per run).
        max_cpu_seconds: Optional cap on this process's CPU time (``time.process_time``, robust
            to other load on the machine); training stops early when it is reached.

    Returns:
        The number of optimizer steps taken.
    """
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, settings)
    )
    block = settings.n_positions
    offsets = torch.arange(block)
    model.train()
    start, cpu_start = time.monotonic(), time.process_time()
    for step in range(settings.steps):
        starts = torch.randint(0, len(ids) - block, (settings.batch_size,), generator=generator)
        batch = ids[starts[:, None] + offsets]
        loss = model(input_ids=batch, attention_mask=torch.ones_like(batch), labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.monotonic() - start
        if step % max(1, settings.steps // 20) == 0 or step == settings.steps - 1:
            log(f"step {step + 1}/{settings.steps} loss {loss.item():.3f} ({elapsed:.0f}s)")
        if max_cpu_seconds is not None and time.process_time() - cpu_start >= max_cpu_seconds:
            log(f"CPU-time budget reached at step {step + 1} loss {loss.item():.3f}")
            return step + 1
    return settings.steps


def build_shakespeare_gpt2(
    out_dir: Path,
    settings: PretrainSettings | None = None,
    log: Callable[[str], None] = print,
) -> BuildReport:
    """Trains the tokenizer and the GPT-2 base on the pretraining plays and saves both.

    The folder gets ``model.safetensors`` (fp32), ``config.json``, ``generation_config.json``,
    ``tokenizer.json``, ``tokenizer_config.json`` and ``build_info.json`` (settings and held-out
    losses), loadable with plain
    ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.

    Args:
        out_dir: Destination folder (created or overwritten).
        settings: Hyperparameters; the defaults rebuild the shipped asset.
        log: Progress callback.

    Returns:
        Timings and held-out losses of the build.
    """
    settings = settings or PretrainSettings()
    begin, cpu_begin = time.monotonic(), time.process_time()
    corpus = load_shakespeare()
    tokenizer = train_byte_level_bpe(
        [corpus.pretrain.train], settings.vocab_size, settings.n_positions
    )
    train_ids = encode(tokenizer, corpus.pretrain.train)
    log(f"tokenizer: {len(tokenizer)} tokens; {len(train_ids)} training tokens")
    config = make_config(settings, len(tokenizer))
    torch.manual_seed(settings.seed)
    random_model = GPT2LMHeadModel(config)
    torch.manual_seed(settings.seed)
    model = GPT2LMHeadModel(config)
    train_causal_lm(model, train_ids, settings, log)

    def held_out(m: GPT2LMHeadModel, text: str) -> float:
        ids = encode(tokenizer, text)
        return mean_token_nll(m, ids, settings.n_positions, settings.eval_tokens)

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    pretrain_loss = held_out(model, corpus.pretrain.eval)
    adapt_loss = held_out(model, corpus.adapt.eval)
    random_loss = held_out(random_model, corpus.adapt.eval)
    report = BuildReport(
        out_dir=out_dir,
        seconds=time.monotonic() - begin,
        cpu_seconds=time.process_time() - cpu_begin,
        threads=torch.get_num_threads(),
        num_parameters=model.num_parameters(),
        pretrain_eval_loss=pretrain_loss,
        adapt_eval_loss=adapt_loss,
        random_init_adapt_eval_loss=random_loss,
    )
    info = {"settings": asdict(settings), **asdict(report)}
    del info["out_dir"]
    (out_dir / "build_info.json").write_text(json.dumps(info, indent=2) + "\n")
    log(f"done: {asdict(report)}")
    return report
