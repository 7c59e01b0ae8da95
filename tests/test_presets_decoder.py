"""The Llama/Mistral/Qwen2 presets (`lora_kit.targets`) on tiny models built from config.

"Another architecture is a preset away": these presets were listed by ``lk.presets()`` and
chosen from ``model_type`` but never run. Llama and Mistral projections have no bias (the
unfused forward), Qwen2's q/k/v have one (the fused fp32 CPU forward, forced on here at any
size). Checked against the real PEFT both ways within 1e-5 (fp32; the same rounding argument
as ``test_peft_interop``), merged against unmerged within 1e-5, and a save/load round trip bit
for bit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig as PeftConfig
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import lora_kit as lk
from lora_kit import layers
from lora_kit.layers import LoRALinear
from tests.conftest import VOCAB, logits, randomize

TOL = {"rtol": 1e-5, "atol": 1e-5}
_SIZES = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention: k/v narrower than q
    "max_position_embeddings": 64,
}
MODELS: dict[str, Callable[[], nn.Module]] = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_SIZES)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_SIZES)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_SIZES)),
}


@pytest.fixture(params=list(MODELS))
def kind(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


def _base(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[kind]().eval()


def _inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"input_ids": torch.randint(0, VOCAB, (2, 9), generator=gen)}


def _suffixes(lm: lk.LoraModel) -> set[str]:
    return {m.rsplit(".", 1)[-1] for m in lm.adapter_record("default").modules}


def test_the_model_type_picks_the_query_value_preset(kind: str) -> None:
    lm = lk.inject(_base(kind), lk.LoraConfig(r=4))
    assert _suffixes(lm) == {"q_proj", "v_proj"}
    assert len(lm.adapter_record("default").modules) == 4  # two blocks
    every = lk.inject(_base(kind), lk.LoraConfig(r=4, targets="llama-all"))
    assert _suffixes(every) == set(lk.presets()["llama-all"])


@pytest.mark.parametrize("preset", ["llama-qv", "llama-all"])
def test_adapters_move_between_lora_kit_and_peft(
    kind: str, preset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fused forward at any size: Qwen2's biased q/k/v take it, bias-free layers cannot.
    monkeypatch.setattr(layers, "FUSE_MIN_OUTPUTS", 0)
    fused: list[str] = []
    original = LoRALinear._fused_forward

    def counted(self: LoRALinear, x: torch.Tensor, active: Any) -> torch.Tensor:
        fused.append(type(self.base).__name__)
        return original(self, x, active)

    monkeypatch.setattr(LoRALinear, "_fused_forward", counted)
    base, inputs = _base(kind), _inputs()
    lm = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=4, alpha=8, targets=preset))
    randomize(lm)
    ours = logits(lm, inputs)
    assert not torch.allclose(ours, logits(base, inputs), atol=1e-3)  # the adapter acts
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), lm.save_adapter(tmp_path / "lk"))
    torch.testing.assert_close(logits(peft_model.eval(), inputs), ours, **TOL)

    config = PeftConfig(
        r=4,
        lora_alpha=8,
        target_modules=list(lk.presets()[preset]),
        init_lora_weights=False,  # random B: the adapter changes the outputs
        task_type="CAUSAL_LM",
    )
    theirs = get_peft_model(copy.deepcopy(base), config).eval()
    theirs.save_pretrained(str(tmp_path / "peft"))
    loaded = lk.LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(loaded, inputs), logits(theirs, inputs), **TOL)
    assert bool(fused) == (kind == "qwen2")


def test_merge_and_round_trip(kind: str, tmp_path: Path) -> None:
    base, inputs = _base(kind), _inputs()
    lm = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=4, alpha=8, targets="llama-all"))
    randomize(lm)
    unmerged = logits(lm, inputs)
    path = lm.save_adapter(tmp_path / "a")
    reloaded = lk.LoraModel.from_pretrained(copy.deepcopy(base), path)
    assert torch.equal(logits(reloaded, inputs), unmerged)
    plain = lm.merge_and_unload()
    torch.testing.assert_close(logits(plain, inputs), unmerged, **TOL)
    assert not any(isinstance(m, lk.LoRALinear) for m in plain.modules())
