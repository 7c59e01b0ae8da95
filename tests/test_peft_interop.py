"""Interop with the real `peft` package, both directions, within 1e-5 (fp32).

Tolerance: both sides compute the same low-rank update in fp32 but with different kernels
(lora_kit fuses the B-projection into the base output with addmm; PEFT adds separately), so
results differ by float rounding only, far below 1e-5 for these logit magnitudes.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig as PeftConfig
from peft import PeftModel, get_peft_model

import lora_kit as lk
from tests.conftest import BERT, GPT2, Arch, logits, randomize

TOL = {"rtol": 1e-5, "atol": 1e-5}

CASES: list[tuple[Arch, dict[str, Any]]] = [
    (GPT2, {"targets": ["c_attn"]}),
    (GPT2, {"targets": "gpt2-all", "rank_pattern": {"c_fc": 2}, "alpha_pattern": {"c_proj": 3}}),
    (GPT2, {"targets": "gpt2-all", "use_rslora": True, "layers": (1,)}),
    (
        BERT,
        {
            "targets": "bert-all",
            "modules_to_save": ("classifier",),
            "rank_pattern": {"value": 2},
            "alpha_pattern": {"query": 32},
            "use_rslora": True,
        },
    ),
    (BERT, {"targets": r".*layer\.0\..*(query|key)"}),
]
IDS = ["gpt2-c_attn", "gpt2-all-patterns", "gpt2-rslora-layers", "bert-cls-head", "bert-regex"]


@pytest.mark.parametrize(("arch", "options"), CASES, ids=IDS)
def test_lora_kit_adapter_loads_in_peft(
    arch: Arch, options: dict[str, Any], tmp_path: Path, forward_path: str
) -> None:
    base = arch.build(0)
    lm = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=4, alpha=8, **options))
    randomize(lm)
    path = lm.save_adapter(tmp_path / "a")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    inputs = arch.inputs()
    torch.testing.assert_close(logits(peft_model, inputs), logits(lm, inputs), **TOL)


def _peft_config(options: dict[str, Any], arch: Arch) -> PeftConfig:
    targets = options.get("targets")
    if isinstance(targets, str) and targets in lk.presets():
        targets = list(lk.presets()[targets])
    return PeftConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        init_lora_weights=False,
        rank_pattern=options.get("rank_pattern", {}),
        alpha_pattern=options.get("alpha_pattern", {}),
        use_rslora=options.get("use_rslora", False),
        layers_to_transform=list(options["layers"]) if "layers" in options else None,
        task_type="SEQ_CLS" if arch is BERT else "CAUSAL_LM",
    )


@pytest.mark.parametrize(("arch", "options"), CASES, ids=IDS)
def test_peft_adapter_loads_in_lora_kit(
    arch: Arch, options: dict[str, Any], tmp_path: Path, forward_path: str
) -> None:
    base = arch.build(0)
    peft_model = get_peft_model(copy.deepcopy(base), _peft_config(options, arch)).eval()
    if arch is BERT:  # make the trained head differ from the base's
        with torch.no_grad():
            for p in peft_model.base_model.model.classifier.modules_to_save.parameters():
                p.add_(0.5)
    peft_model.save_pretrained(str(tmp_path / "p"))
    with warnings.catch_warnings():
        # Every key the installed PEFT writes is known (PEFT 0.22 added astra_config, which
        # was warned about as unknown on every file and kept its config out of the parse cache).
        warnings.filterwarnings("error", message=".*unknown adapter_config keys")
        lm = lk.LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "p")
    assert lk.read_adapter(tmp_path / "p").origin == "peft"
    inputs = arch.inputs()
    expected = logits(peft_model, inputs)
    torch.testing.assert_close(logits(lm, inputs), expected, **TOL)
    with lm.disabled():
        assert not torch.allclose(logits(lm, inputs), expected, atol=1e-3)


# Regexes that also match modules lora_kit passes over (the attention container, dropouts,
# the MLP container): PEFT wraps whatever a regex matches and used to raise on these files.
SWEEPING_REGEX = {"gpt2": r".*\.0\.(attn|mlp).*", "bert": r".*layer\.0\.attention\.self.*"}


def test_sweeping_regex_adapter_loads_in_peft(arch: Arch, tmp_path: Path) -> None:
    base = arch.build(0)
    config = lk.LoraConfig(r=4, alpha=8, targets=SWEEPING_REGEX[arch.name])
    lm = lk.inject(copy.deepcopy(base), config)
    randomize(lm)
    path = lm.save_adapter(tmp_path / "a")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    inputs = arch.inputs()
    torch.testing.assert_close(logits(peft_model, inputs), logits(lm, inputs), **TOL)
    reloaded = lk.LoraModel.from_pretrained(copy.deepcopy(base), path)
    assert torch.equal(logits(reloaded, inputs), logits(lm, inputs))


@pytest.mark.parametrize("saved", [("pooler",), ("pooler", "classifier")])
def test_classifier_model_saving_other_modules_loads_in_peft(
    saved: tuple[str, ...], tmp_path: Path
) -> None:
    """BERT only: the task type is what differs for a sequence classifier. PEFT's SEQ_CLS
    loader adds the classifier to modules_to_save and raised KeyError on a file that saved
    only the pooler; such an adapter is written task-less."""
    base = BERT.build(0)
    lm = lk.inject(
        copy.deepcopy(base), lk.LoraConfig(r=4, targets="bert-qv", modules_to_save=saved)
    )
    randomize(lm)
    path = lm.save_adapter(tmp_path / "a")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    inputs = BERT.inputs()
    torch.testing.assert_close(logits(peft_model, inputs), logits(lm, inputs), **TOL)


def test_fractional_alpha_reaches_peft(arch: Arch, tmp_path: Path) -> None:
    """A non-integer alpha is written as it is (``int()`` only for integral values)."""
    base = arch.build(0)
    lm = lk.inject(copy.deepcopy(base), lk.LoraConfig(r=4, alpha=3.5, targets=arch.attn_preset))
    randomize(lm)
    path = lm.save_adapter(tmp_path / "a")
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(path)).eval()
    inputs = arch.inputs()
    torch.testing.assert_close(logits(peft_model, inputs), logits(lm, inputs), **TOL)
    reloaded = lk.LoraModel.from_pretrained(copy.deepcopy(base), path)  # reads the same file
    assert torch.equal(logits(reloaded, inputs), logits(lm, inputs))
