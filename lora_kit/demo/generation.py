"""Seeded text samples from a causal LM, for before/after and per-adapter comparisons."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..model import LoraModel

__all__ = ["SampleSettings", "one_line", "sample_text"]


@dataclass(frozen=True)
class SampleSettings:
    """How samples are drawn: top-k sampling from a fixed seed (same seed, same draws).

    Attributes:
        seed: ``torch.manual_seed`` right before each generation.
        max_new_tokens: Tokens generated after the prompt.
        top_k: Sample among the ``top_k`` most likely tokens.
        temperature: Softmax temperature.
    """

    seed: int = 0
    max_new_tokens: int = 30
    top_k: int = 20
    temperature: float = 0.7


@torch.no_grad()
def sample_text(
    model: LoraModel, tokenizer: Any, prompt: str, settings: SampleSettings, *, greedy: bool = False
) -> str:
    """Generate a continuation of ``prompt`` (the prompt itself is not included).

    Args:
        model: The model to generate with, under its active selection (``lm.disabled()``: base).
        tokenizer: Its tokenizer.
        prompt: Text to continue.
        settings: Seed and sampling parameters.
        greedy: Take the most likely token at each step instead of sampling.

    Returns:
        The decoded new tokens (special tokens dropped).
    """
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]  # [1, T]
    torch.manual_seed(settings.seed)
    sampling: dict[str, Any] = (
        {"do_sample": False}
        if greedy
        else {"do_sample": True, "top_k": settings.top_k, "temperature": settings.temperature}
    )
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=settings.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        **sampling,
    )  # [1, T + new]
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def one_line(text: str) -> str:
    """``text`` on one line for a summary: its non-blank lines joined by `` / ``."""
    return " / ".join(line.strip() for line in text.strip().splitlines() if line.strip())
