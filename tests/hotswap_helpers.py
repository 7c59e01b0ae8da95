"""Shared fixtures for the hot-swapping tests: tiny GPT-2/BERT and adapters with real weights."""

from __future__ import annotations

from pathlib import Path

import torch

import lora_kit as lk
from lora_kit.layers import LoraAdapter
from lora_kit.saved_modules import SavedModule
from tests.conftest import tiny_bert, tiny_gpt2


def make_model(kind: str) -> torch.nn.Module:
    return tiny_gpt2() if kind == "gpt2" else tiny_bert()


# Adapters with different ranks, alphas and target subsets (BERT's "c" also saves the head).
SPECS: dict[str, dict[str, object]] = {
    "a": {"r": 4, "alpha": 8},
    "b": {"r": 8, "alpha": 4},
    "c": {"r": 2, "alpha": 2},
}
SUBSETS: dict[tuple[str, str], object] = {
    ("gpt2", "a"): "gpt2-all",
    ("bert", "a"): "bert-all",
    ("gpt2", "b"): ("c_attn",),
    ("gpt2", "c"): ("c_fc",),
    ("bert", "b"): ("query", "value"),
    ("bert", "c"): ("intermediate.dense",),
}


def config_for(kind: str, name: str) -> lk.LoraConfig:
    spec = dict(SPECS.get(name, {"r": 4, "alpha": 4}))
    if (kind, name) in SUBSETS:
        spec["targets"] = SUBSETS[kind, name]
    if kind == "bert" and name in ("a", "c"):
        spec["modules_to_save"] = ("classifier",)
    return lk.LoraConfig(**spec)  # type: ignore[arg-type]


def randomize(lm: lk.LoraModel, name: str, seed: int) -> None:
    """Give adapter ``name`` non-zero B (and perturbed head copies) so it changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lm.model.modules():
            if isinstance(module, lk.LoRALinear) and name in module.adapters:
                adapter: LoraAdapter = module.adapter(name)
                adapter.lora_B.copy_(torch.randn(adapter.lora_B.shape, generator=gen) * 0.5)
            if isinstance(module, SavedModule) and name in module.copies:
                for p in module.copies[name].parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.5)


def model_with_adapters(kind: str, names: tuple[str, ...] = ("a", "b", "c")) -> lk.LoraModel:
    lm = lk.LoraModel(make_model(kind))
    for i, name in enumerate(names):
        lm.add_adapter(name, config_for(kind, name))
        randomize(lm, name, seed=100 + i)
    return lm


def save_adapters(kind: str, root: Path, names: tuple[str, ...] = ("a", "b", "c")) -> Path:
    """Save the adapters of :func:`model_with_adapters` under ``root/<name>``."""
    lm = model_with_adapters(kind, names)
    for name in names:
        lm.save_adapter(root / name, name)
    return root


def input_ids(rows: int, seq: int = 7, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 100, (rows, seq), generator=gen)


def logits(lm: lk.LoraModel, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        return lm(input_ids=ids, **kwargs).logits  # type: ignore[no-any-return]
