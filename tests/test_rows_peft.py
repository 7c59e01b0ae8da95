"""Mixed batches (``adapter_names``) against PEFT's own mixed-batch inference, same files.

The adapters are made and saved by PEFT (different ranks, alphas and targets, rsLoRA on "b";
BERT's "a" and "c" also save their own classifier head), then loaded by both libraries; each
call runs one batch whose rows use different adapters ("__base__" in PEFT, None in lora_kit).

Tolerance: fp32, atol/rtol 1e-5. Both sides compute the same updates with different kernels
(lora_kit stacks the rows' factors and adds with ``baddbmm``; PEFT slices sub-batches and adds
per adapter), so they differ by float rounding only (observed up to ~2e-6 on O(1) logits); a
wrong or missing adapter on any row moves its logits by more than 1e-2 (checked below).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

import lora_kit as lk
from tests.conftest import tiny_bert, tiny_gpt2

ATOL = 1e-5
GPT2_ALL = ["c_attn", "c_proj", "c_fc"]
SPECS: dict[str, dict[str, dict[str, Any]]] = {
    "gpt2": {
        "a": {"r": 4, "lora_alpha": 8, "target_modules": GPT2_ALL},
        "b": {"r": 8, "lora_alpha": 4, "target_modules": ["c_attn"], "use_rslora": True},
        "c": {"r": 2, "lora_alpha": 2, "target_modules": ["c_fc"]},
    },
    "bert": {
        "a": {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["query", "key", "value", "dense"],
            "modules_to_save": ["classifier"],
        },
        "b": {"r": 8, "lora_alpha": 4, "target_modules": ["query", "value"], "use_rslora": True},
        "c": {
            "r": 2,
            "lora_alpha": 2,
            "target_modules": ["intermediate.dense"],
            "modules_to_save": ["classifier"],
        },
    },
}
BUILD: dict[str, Callable[[], nn.Module]] = {"gpt2": tiny_gpt2, "bert": tiny_bert}
# GPT-2: every adapter and the base. BERT: only adapters with a head, see the last test.
ROWS: dict[str, list[str | None]] = {
    "gpt2": ["a", None, "b", "a", "c", None],
    "bert": ["a", None, "c", "a", "c", None],
}
LENGTHS = [7, 4, 6, 3, 7, 5]


def _save_with_peft(kind: str, root: Path) -> Path:
    for i, (name, spec) in enumerate(SPECS[kind].items()):
        fan_in_fan_out = kind == "gpt2"  # GPT-2's Conv1D
        model = get_peft_model(BUILD[kind](), LoraConfig(fan_in_fan_out=fan_in_fan_out, **spec))
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for key, p in model.named_parameters():
                if "lora_B" in key or "modules_to_save" in key:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.5)
        model.save_pretrained(str(root / name))
    return root


Pair = tuple[PeftModel, lk.LoraModel]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Pair]:
    """kind -> (PEFT model, lora_kit model), both holding adapters a, b, c from the same files."""
    made: dict[str, Pair] = {}

    def get(kind: str) -> Pair:
        if kind not in made:
            root = _save_with_peft(kind, tmp_path_factory.mktemp(kind))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                peft_model = PeftModel.from_pretrained(BUILD[kind](), str(root / "a"), "a")
                for name in ("b", "c"):
                    peft_model.load_adapter(str(root / name), adapter_name=name)
            lm = lk.LoraModel.from_pretrained(BUILD[kind](), root / "a", name="a")
            for name in ("b", "c"):
                lm.load_adapter(root / name, name)
            made[kind] = (peft_model.eval(), lm)
        return made[kind]

    return get


def _batch(padding: str) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, 100, (len(LENGTHS), 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for row, length in enumerate(LENGTHS):
        if padding == "right":
            mask[row, length:] = 0
        else:
            mask[row, : 7 - length] = 0
    return ids, mask


def _peft_names(names: list[str | None]) -> list[str]:
    return [name or "__base__" for name in names]


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_mixed_logits_match_peft(pairs: Callable[[str], Pair], kind: str, padding: str) -> None:
    peft_model, lm = pairs(kind)
    ids, mask = _batch(padding)
    names = ROWS[kind]
    with torch.no_grad():
        ours = lm(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        theirs = peft_model(input_ids=ids, attention_mask=mask, adapter_names=_peft_names(names))
        base = lm(input_ids=ids, attention_mask=mask, adapter_names=[None] * len(names)).logits
    torch.testing.assert_close(ours, theirs.logits, atol=ATOL, rtol=ATOL)
    # Every adapter row really differs from the base (the comparison above can fail), and the
    # base rows are the base.
    for row, name in enumerate(names):
        moved = (ours[row] - base[row]).abs().max()
        assert moved > 1e-2 if name else moved < 1e-5, (row, name, moved)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_gpt2_mixed_generate_matches_peft(pairs: Callable[[str], Pair], num_beams: int) -> None:
    peft_model, lm = pairs("gpt2")
    ids, mask = _batch("left")
    names = ROWS["gpt2"]
    kwargs: dict[str, Any] = {
        "max_new_tokens": 5,
        "do_sample": False,
        "pad_token_id": 0,
        "num_beams": num_beams,
    }
    with torch.no_grad():
        ours = lm.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **kwargs)
        theirs = peft_model.generate(
            input_ids=ids, attention_mask=mask, adapter_names=_peft_names(names), **kwargs
        )
        base = lm.generate(input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, base)  # the adapters changed some continuation


def test_bert_row_without_head_matches_peft_alone(pairs: Callable[[str], Pair]) -> None:
    """A row whose adapter ("b") saves no head uses the base classifier, as PEFT does for "b"
    alone. (PEFT 0.22's own mixed batch refuses such a row: KeyError in its head wrapper.)"""
    peft_model, lm = pairs("bert")
    ids, mask = _batch("right")
    names: list[str | None] = ["a", "b", None, "c", "b", "a"]
    alone = []
    with torch.no_grad():
        ours = lm(input_ids=ids, attention_mask=mask, adapter_names=names).logits
        for row, name in enumerate(names):
            one = {"input_ids": ids[row : row + 1], "attention_mask": mask[row : row + 1]}
            if name is None:
                with peft_model.disable_adapter():
                    alone.append(peft_model(**one).logits)
            else:
                peft_model.set_adapter(name)
                alone.append(peft_model(**one).logits)
    peft_model.set_adapter("a")
    torch.testing.assert_close(ours, torch.cat(alone), atol=ATOL, rtol=ATOL)
