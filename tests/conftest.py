"""Tiny GPT-2 and BERT models built from config (no downloads), shared by every test module."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from lora_kit import layers
from lora_kit.layers import LoRALinear

VOCAB = 100


def tiny_gpt2_config() -> GPT2Config:
    """The tiny GPT-2's config: 2 blocks, n_embd 32, 2 heads."""
    return GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )


def tiny_bert_config() -> BertConfig:
    """The tiny BERT's config: 2 layers, hidden 32, 2 heads, 3 labels."""
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """A 2-block GPT-2 (Conv1D projections, n_embd 32), deterministic for ``seed``."""
    torch.manual_seed(seed)
    return GPT2LMHeadModel(tiny_gpt2_config()).eval()


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    """A 2-layer BERT classifier (Linear projections, hidden 32, 3 labels), deterministic."""
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config()).eval()


@dataclass(frozen=True)
class Arch:
    """One architecture under test."""

    name: str
    build: Callable[[int], nn.Module]
    attn_preset: str
    all_preset: str
    head: str | None  # a head to train as modules_to_save

    def inputs(self, batch: int = 2, seq: int = 10, seed: int = 1) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=gen)}


GPT2 = Arch("gpt2", tiny_gpt2, "gpt2-attn", "gpt2-all", None)
BERT = Arch("bert", tiny_bert, "bert-qv", "bert-all", "classifier")
ARCHS = [GPT2, BERT]


@pytest.fixture(params=ARCHS, ids=lambda a: a.name)
def arch(request: pytest.FixtureRequest) -> Arch:
    """Parametrises a test over GPT-2 (Conv1D) and BERT (Linear)."""
    return request.param  # type: ignore[no-any-return]


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits, without autograd."""
    with torch.no_grad():
        return model(**inputs).logits  # type: ignore[no-any-return]


def randomize(lm: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Give every adapter tensor (and head copy) random values, so adapters change outputs."""
    from lora_kit import LoraAdapter
    from lora_kit.saved_modules import SavedModule

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lm.modules():
            if isinstance(module, LoraAdapter):
                for p in module.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)
            elif isinstance(module, SavedModule):
                for p in module.copies.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * std)


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every parameter and buffer, to compare after an operation."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(params=["fused", "unfused"])
def forward_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Runs the test with `LoRALinear`'s fused forward forced on (any size), or off."""
    fused = request.param == "fused"
    monkeypatch.setattr(layers, "FUSE_MIN_OUTPUTS", 0 if fused else 1 << 62)
    calls: list[int] = []
    original = LoRALinear._fused_forward

    def counted(self: LoRALinear, x: torch.Tensor, active: Any) -> torch.Tensor:
        calls.append(x.shape[0])
        return original(self, x, active)

    monkeypatch.setattr(LoRALinear, "_fused_forward", counted)
    yield str(request.param)
    assert bool(calls) == fused  # the path under test really ran


@pytest.fixture(scope="module", params=["gpt2", "bert"])
def saved(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, Path]:
    """``(kind, root)``: adapters a, b, c saved under ``root`` for a tiny GPT-2 or BERT."""
    from tests.hotswap_helpers import save_adapters  # it imports this module

    kind = str(request.param)
    return kind, save_adapters(kind, tmp_path_factory.mktemp(kind))


def model_state(lm: Any) -> dict[str, Any]:
    """Everything a failed operation must leave as it was: every parameter and buffer (bit for
    bit, with dtype and shape), requires_grad flags, the module tree, the adapter records, the
    default selection and the merge state of a `LoraModel`; compare two with ``==``."""
    tensors = {k: _bits(v) for k, v in lm.model.state_dict().items()}
    return {
        "tensors": tensors,
        "requires_grad": {n: p.requires_grad for n, p in lm.model.named_parameters()},
        "modules": [(n, type(m).__name__) for n, m in lm.model.named_modules()],
        "adapters": dict(lm._adapters),
        "default": lm.router.default,
        "merged": lm.merged,
    }


def _bits(tensor: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    flat = tensor.detach().contiguous().view(-1)
    return str(tensor.dtype), tuple(tensor.shape), flat.view(torch.uint8).numpy().tobytes()


def fail_on_call(function: Callable[..., Any], n: int, error: BaseException) -> Callable[..., Any]:
    """``function``, except that its ``n``-th call (1-based) raises ``error`` instead."""
    calls = [0]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == n:
            raise error
        return function(*args, **kwargs)

    return wrapped


def compile_counted(layer: nn.Module) -> tuple[Callable[..., Any], Any, torch.Tensor]:
    """``(compiled layer, its dynamo frame counter, an input)``, after resetting dynamo.

    One compiled LoRA layer (whole-model compiles take ~15 s here; the guards are per layer).
    """
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(layer, backend=counter)
    width = int(layer.in_features)  # type: ignore[arg-type]
    x = torch.randn(2, 5, width, generator=torch.Generator().manual_seed(0))
    return compiled, counter, x
