"""Shared fixtures for the trainer tests: tiny models, a word-level tokenizer, tiny data files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import BertForSequenceClassification, GPT2LMHeadModel, PreTrainedTokenizerFast

from tests.conftest import tiny_bert_config, tiny_gpt2_config

# Tiny models on a shared 2-core machine: extra intra-op threads only oversubscribe (20x slower).
torch.set_num_threads(1)

WORDS = [f"w{i}" for i in range(90)]


def tiny_gpt2(dropout: float = 0.0, seed: int = 0) -> GPT2LMHeadModel:
    """The tests' tiny GPT-2 (`tests.conftest.tiny_gpt2_config`), with ``dropout`` everywhere."""
    torch.manual_seed(seed)
    config = tiny_gpt2_config()
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = dropout
    return GPT2LMHeadModel(config)


def tiny_bert(
    num_labels: int = 3, dropout: float = 0.0, seed: int = 0
) -> BertForSequenceClassification:
    """The tests' tiny BERT (`tests.conftest.tiny_bert_config`) with ``num_labels`` classes and
    ``dropout`` everywhere."""
    torch.manual_seed(seed)
    config = tiny_bert_config()
    config.num_labels = num_labels
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    return BertForSequenceClassification(config)


def tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``w0..w89`` (ids 10..99), built offline."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    vocab = {"[PAD]": 0, "[UNK]": 1}
    vocab.update({w: i + 10 for i, w in enumerate(WORDS)})
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[PAD]"
    )


def encode(texts: list[str]) -> list[list[int]]:
    """The tokenizer above as a plain function (fast, no HF object)."""
    ids = {w: i + 10 for i, w in enumerate(WORDS)}
    return [[ids.get(w, 1) for w in t.split()] for t in texts]


def write_text(path: Path, n_words: int = 600, seed: int = 0) -> Path:
    rng = random.Random(seed)
    # A little structure (repeated phrases) so the loss visibly drops.
    phrases = [" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(8)]
    words: list[str] = []
    while len(words) < n_words:
        words.extend(rng.choice(phrases).split())
    path.write_text(" ".join(words) + "\n")
    return path


def write_cls(path: Path, n: int = 48, seed: int = 0, classes: int = 3) -> Path:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        label = rng.randrange(classes)
        words = [WORDS[label * 10 + rng.randrange(10)] for _ in range(rng.randint(3, 10))]
        lines.append(json.dumps({"text": " ".join(words), "label": f"c{label}"}))
    path.write_text("\n".join(lines) + "\n")
    return path
