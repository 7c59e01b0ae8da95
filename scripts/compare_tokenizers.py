"""Compares tokenizers for the Shakespeare GPT-2 base under a fixed CPU-time budget.

Each candidate trains the same architecture (``PretrainSettings`` defaults, constant learning
rate after a short warmup) for ``--seconds`` of CPU time on one thread, then reports held-out
bits per character, which unlike per-token perplexity is comparable across vocabularies.

Usage (lora_kit importable, e.g. installed or PYTHONPATH=.):
    python scripts/compare_tokenizers.py --seconds 120
"""

from __future__ import annotations

import argparse
import math

import torch
from transformers import GPT2LMHeadModel, GPT2Tokenizer

from lora_kit.demo.corpora import load_shakespeare
from lora_kit.demo.evaluation import mean_token_nll
from lora_kit.demo.pretrain import PretrainSettings, encode, make_config, train_causal_lm
from lora_kit.demo.tokenizer import gpt2_bpe_tokenizer, train_byte_level_bpe


def _run(name: str, tokenizer: GPT2Tokenizer, seconds: float, eval_chars: int) -> None:
    corpus = load_shakespeare()
    train_ids = encode(tokenizer, corpus.pretrain.train)
    eval_text = corpus.pretrain.eval[:eval_chars]
    eval_ids = encode(tokenizer, eval_text)
    config = make_config(PretrainSettings(), len(tokenizer))
    settings = PretrainSettings(steps=1_000_000, warmup_steps=30)  # Constant LR after warmup.
    torch.manual_seed(settings.seed)
    model = GPT2LMHeadModel(config)
    taken = train_causal_lm(model, train_ids, settings, log=lambda _: None, max_cpu_seconds=seconds)
    nll = mean_token_nll(model, eval_ids, settings.n_positions)
    fp32_mb = model.num_parameters() * 4 / 1e6
    bpc = nll * len(eval_ids) / len(eval_text) / math.log(2)
    print(
        f"{name}: vocab {len(tokenizer)}, params {model.num_parameters()} ({fp32_mb:.1f} MB fp32), "
        f"train tokens {len(train_ids)}, chars/token {len(eval_text) / len(eval_ids):.2f}, "
        f"steps {taken}, eval loss/token {nll:.3f} (ppl {math.exp(nll):.1f}), "
        f"bits/char {bpc:.3f}",
        flush=True,
    )


def main() -> None:
    """Runs the comparison and prints one line per tokenizer."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--eval-chars", type=int, default=100_000)
    parser.add_argument("--vocab-sizes", type=int, nargs="*", default=[2048, 4096, 8192])
    args = parser.parse_args()
    torch.set_num_threads(1)
    text = load_shakespeare().pretrain.train
    print(f"threads {torch.get_num_threads()}, {args.seconds:.0f} CPU s per tokenizer", flush=True)
    for size in args.vocab_sizes:
        _run(f"bpe-{size}", train_byte_level_bpe([text], size), args.seconds, args.eval_chars)
    _run("gpt2-bpe", gpt2_bpe_tokenizer(), args.seconds, args.eval_chars)


if __name__ == "__main__":
    main()
