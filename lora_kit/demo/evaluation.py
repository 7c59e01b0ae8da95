"""Held-out language-model metrics for causal LMs."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["mean_token_nll", "perplexity"]


@torch.no_grad()
def mean_token_nll(
    model: nn.Module, ids: torch.Tensor, block_size: int, max_tokens: int | None = None
) -> float:
    """Mean next-token negative log-likelihood (nats) over non-overlapping blocks.

    Args:
        model: A causal LM returning ``.loss`` when given ``labels`` (or a `LoraModel` over one).
        ids: 1-D tensor of token ids.
        block_size: Tokens per block (at most the model's context length).
        max_tokens: If set, only the first ``max_tokens`` ids are scored.

    Returns:
        The token-weighted mean loss over all predicted positions.
    """
    ids = ids[:max_tokens] if max_tokens is not None else ids
    was_training = model.training
    model.train(False)
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, block_size):
        block = ids[start : start + block_size].unsqueeze(0)
        if block.shape[1] < 2:
            break
        mask = torch.ones_like(block)
        loss = model(input_ids=block, attention_mask=mask, labels=block).loss
        total += float(loss) * (block.shape[1] - 1)
        count += block.shape[1] - 1
    model.train(was_training)
    return total / count


def perplexity(
    model: nn.Module, ids: torch.Tensor, block_size: int, max_tokens: int | None = None
) -> float:
    """Per-token perplexity, ``exp(mean_token_nll(...))``; see ``mean_token_nll``."""
    return math.exp(mean_token_nll(model, ids, block_size, max_tokens))
