"""Shared builders for the library-tooling tests: tiny bases on disk, adapters, a Hub cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

import lora_kit as lk

KINDS = ("gpt2", "bert")


def tiny_model(kind: str, seed: int = 0) -> nn.Module:
    """The project's tiny GPT-2 / BERT, with deterministic weights for a given seed."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = GPT2Config(
            n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0,
            eos_token_id=0,
        )  # fmt: skip
        return GPT2LMHeadModel(cfg).eval()
    cfg_b = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, num_labels=3,
    )  # fmt: skip
    return BertForSequenceClassification(cfg_b).eval()


def save_base(kind: str, folder: Path, seed: int = 0) -> Path:
    """``save_pretrained`` a tiny base into ``folder``."""
    tiny_model(kind, seed).save_pretrained(folder)
    return folder


def make_adapter(
    kind: str,
    path: Path,
    config: lk.LoraConfig | None = None,
    *,
    seed: int = 1,
    base_seed: int = 0,
    zero_b: bool = False,
) -> Path:
    """Save an adapter with random (non-zero) A and B, trained-looking, for base ``base_seed``."""
    lm = lk.inject(tiny_model(kind, base_seed), config or lk.LoraConfig(r=4, alpha=8))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in lm.adapter_parameters("default"):
            if zero_b and param.shape[-1] == lm.adapters["default"].r:
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    return lm.save_adapter(path)


def tree_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest), plus the file list."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def make_hub_cache(cache: Path, repo_id: str, source: Path, commit: str = "a" * 40) -> Path:
    """Lay ``source``'s files out as huggingface_hub's cache does for model ``repo_id``.

    ``models--ORG--NAME/blobs/<sha256>``, ``snapshots/<commit>/<file>`` as relative symlinks to
    the blobs, and ``refs/main`` holding the commit: what ``snapshot_download`` reads offline.
    """
    storage = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        data = path.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / path.name)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(commit)
    return snapshot


def make_peft_adapter(kind: str, path: Path, *, seed: int = 2, base_seed: int = 0) -> Path:
    """Save an adapter with PEFT itself (the interop reference), with non-zero B."""
    import peft

    targets = ["c_attn"] if kind == "gpt2" else ["query", "value"]
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=kind == "gpt2"
    )
    model = peft.get_peft_model(tiny_model(kind, base_seed), config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    model.save_pretrained(str(path))
    return path
