"""Shared fixtures for the merge/stack tests: tiny GPT-2/BERT bases and random adapters."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

import lora_kit as lk
from lora_kit.layers import LoraAdapter

KINDS = ("gpt2", "bert")


def tiny(kind: str, seed: int = 0) -> nn.Module:
    """A tiny randomly initialised GPT-2 (Conv1D) or BERT (Linear) model in eval mode."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        return GPT2LMHeadModel(cfg).eval()
    bert = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    return BertForSequenceClassification(bert).eval()


def config(kind: str, r: int = 4, alpha: float = 8.0, heads: bool = False) -> lk.LoraConfig:
    """A config targeting all attention/MLP projections (Conv1D for GPT-2, Linear for BERT)."""
    targets = ("c_attn", "c_proj", "c_fc") if kind == "gpt2" else ("query", "value", "dense")
    saved = ("classifier",) if heads and kind == "bert" else ()
    return lk.LoraConfig(r=r, alpha=alpha, targets=targets, modules_to_save=saved)


def randomize(lm: lk.LoraModel, name: str, seed: int, scale: float = 0.5) -> None:
    """Give adapter ``name`` non-zero A and B (B is zero after init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.adapter_parameters(name):
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def with_adapters(
    kind: str, names: tuple[str, ...] = ("a",), dtype: torch.dtype = torch.float32, **cfg: object
) -> lk.LoraModel:
    """A tiny model with random adapters ``names`` (ranks 4, 2, 6, ...; differing alphas)."""
    model = tiny(kind).to(dtype)
    lm: lk.LoraModel | None = None
    for i, name in enumerate(names):
        c = config(kind, r=(4, 2, 6)[i % 3], alpha=(8.0, 3.0, 5.0)[i % 3], **cfg)  # type: ignore[arg-type]
        if lm is None:
            lm = lk.inject(model, c, name)
        else:
            lm.add_adapter(name, c)
        randomize(lm, name, seed=10 + i)
    assert lm is not None
    return lm


def ids(kind: str) -> torch.Tensor:
    """A fixed batch of token ids ``[2, 12]``."""
    return torch.randint(1, 100, (2, 12), generator=torch.Generator().manual_seed(7))


def logits(model: nn.Module, kind: str) -> torch.Tensor:
    """fp32 logits of ``model`` on :func:`ids`."""
    with torch.no_grad():
        return model(input_ids=ids(kind)).logits.float()


def adapters_of(lm: lk.LoraModel) -> list[LoraAdapter]:
    """All adapter objects (to count or inspect)."""
    return [m for m in lm.model.modules() if isinstance(m, LoraAdapter)]


def broken_copies(adapter: Path, root: Path) -> dict[str, Path]:
    """Copies of a saved adapter whose factors do not pair up, by what is wrong with them.

    ``no_A``: one module's lora_A removed; ``no_B``: its lora_B removed; ``rank``: its lora_B
    one rank short; ``heads_only``: every LoRA tensor removed (a BERT adapter with a head keeps
    only the head). The safetensors metadata is kept.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights = adapter / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    key_a = next(k for k in tensors if k.endswith(".lora_A.weight"))
    key_b = key_a.replace(".lora_A.", ".lora_B.")
    edits = {
        "no_A": {k: v for k, v in tensors.items() if k != key_a},
        "no_B": {k: v for k, v in tensors.items() if k != key_b},
        "rank": {**tensors, key_b: tensors[key_b][:, :-1].contiguous()},
        "heads_only": {k: v for k, v in tensors.items() if ".lora_" not in k},
    }
    out = {}
    for what, edited in edits.items():
        folder = root / f"{adapter.name}-{what}"
        shutil.copytree(adapter, folder)
        save_file(edited, str(folder / "adapter_model.safetensors"), metadata=metadata)
        out[what] = folder
    return out
