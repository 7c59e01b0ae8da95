"""Shared fixtures for the hot-swapping tests: tiny GPT-2/BERT and adapters with real weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


def each_row_alone(lm: lk.LoraModel, ids: torch.Tensor, names: list[str | None]) -> torch.Tensor:
    """Logits of each row of ``ids`` run alone under its adapter (None: base), concatenated."""
    outs = []
    for row, name in enumerate(names):
        with lm.using(name):
            outs.append(logits(lm, ids[row : row + 1]))
    return torch.cat(outs)


class _OpRecorder(TorchDispatchMode):
    """Records the name of every ATen operator dispatched while it is active and ``on``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.on = True

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if self.on:
            self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def aten_ops(fn: Callable[[], object], lora_layers_of: torch.nn.Module | None = None) -> list[str]:
    """The ATen operators ``fn`` runs, in order: the kernels a call launches, whatever their
    timing (a structural check that noise on a shared machine cannot blur).

    With ``lora_layers_of``, only operators run inside that model's `LoRALinear` forwards count.
    """
    recorder = _OpRecorder()
    handles = []
    if lora_layers_of is not None:
        recorder.on = False

        def start(*_: object) -> None:
            recorder.on = True

        def stop(*_: object) -> None:
            recorder.on = False

        for module in lora_layers_of.modules():
            if isinstance(module, lk.LoRALinear):
                handles.append(module.register_forward_pre_hook(start))
                handles.append(module.register_forward_hook(stop))
    try:
        with recorder:
            fn()
    finally:
        for handle in handles:
            handle.remove()
    return recorder.ops
