"""A self-check users can run anywhere: inject -> save -> reload -> compare with PEFT.

It builds tiny GPT-2 (Conv1D) and BERT (Linear + classifier head) models from config, gives each
adapter seeded random weights (so it changes the outputs), saves it in PEFT's format, and
compares logits of the live model, a fresh base with the adapter loaded by lora_kit, and (when
the ``peft`` package is installed) the same files loaded by ``peft.PeftModel``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from .config import LoraConfig
from .layers import LoraAdapter
from .model import LoraModel, inject


@dataclass(frozen=True)
class RoundtripResult:
    """Largest absolute logit differences for one architecture (None: PEFT not installed)."""

    model: str
    adapter_path: str
    adapter_vs_base: float
    reload_vs_live: float
    peft_vs_live: float | None


def _tiny(kind: str) -> tuple[nn.Module, LoraConfig]:
    torch.manual_seed(0)
    if kind == "gpt2":
        config = GPT2Config(
            n_layer=2,
            n_embd=64,
            n_head=4,
            vocab_size=500,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
        return GPT2LMHeadModel(config).eval(), LoraConfig(r=8, alpha=16, targets="gpt2-all")
    bert = BertConfig(
        vocab_size=500,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    )
    bert.num_labels = 3
    return BertForSequenceClassification(bert).eval(), LoraConfig(
        r=8, alpha=16, targets="bert-all", modules_to_save=("classifier",)
    )


def run_roundtrip(
    out_dir: Path, kinds: tuple[str, ...] = ("gpt2", "bert")
) -> list[RoundtripResult]:
    """Run the check for each architecture, writing adapters under ``out_dir``."""
    results = []
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    for kind in kinds:
        base, config = _tiny(kind)
        lm = inject(copy.deepcopy(base), config)
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for module in lm.modules():
                if isinstance(module, LoraAdapter):
                    module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=gen) * 0.1)
        path = lm.save_adapter(out_dir / f"roundtrip-{kind}")
        with torch.no_grad():
            live = lm(input_ids=ids).logits
            plain = base(input_ids=ids).logits
            reloaded = LoraModel.from_pretrained(copy.deepcopy(base), path)(input_ids=ids).logits
            peft_diff = _peft_logits(base, path, ids)
        results.append(
            RoundtripResult(
                kind,
                str(path),
                float((live - plain).abs().max()),
                float((reloaded - live).abs().max()),
                None if peft_diff is None else float((peft_diff - live).abs().max()),
            )
        )
    return results


def _peft_logits(base: nn.Module, path: Path, ids: torch.Tensor) -> torch.Tensor | None:
    try:
        from peft import PeftModel
    except ImportError:
        return None
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    return model(input_ids=ids).logits  # type: ignore[no-any-return]
