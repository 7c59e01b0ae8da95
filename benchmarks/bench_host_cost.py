"""Per-call host cost of a LoRA forward: single adapter and mixed batch, lora_kit vs PEFT.

Run: ``python -m benchmarks.bench_host_cost [--models gpt2,bert] [--repeats N] [--compare DIR]``

On a GPU the forward of a small batch is bound by the host (issuing kernels, Python per layer),
and every microsecond a LoRA layer spends outside its GEMMs shows. This stands that case in on a
CPU: 12-layer GPT-2 and BERT with 64-wide layers (the GEMMs cost next to nothing), 8 rows of
1 token, 8 adapters (r=8, every attention and MLP projection). Cases, interleaved, this
thread's CPU time: the bare base; one adapter for every row; 8 rows over 8 adapters
(``adapter_names``); both for PEFT too. Printed per model: medians, and each case's extra per
LoRA layer over the bare base in µs. ``--save-head``: BERT's adapters also save their own
classifier copy (``modules_to_save``, as in ``bench_hotswap``), so a mixed batch runs 8 heads.

``--compare DIR`` loads another checkout's ``lora_kit`` (``DIR/lora_kit``) beside this one in
the same process and adds its two cases, for an A/B of two versions in one interleaved run
(running the other version with ``PYTHONPATH`` and ``python -m`` would import this checkout's
package: ``-m`` puts the working directory first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

import lora_kit as lk
from benchmarks.bench_hotswap import randomize
from benchmarks.harness import CLOCKS, interleaved

ROWS = 8
ADAPTERS = 8


def narrow_model(kind: str) -> tuple[nn.Module, str, tuple[str, ...], dict[str, Any]]:
    """(base model, lora_kit preset, PEFT targets, PEFT extra config): 12 layers, 64 wide."""
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if kind == "gpt2":
        gpt2 = GPT2Config(n_layer=12, n_embd=64, n_head=2, vocab_size=1000, n_positions=64)
        extra = {"fan_in_fan_out": True, "task_type": "CAUSAL_LM"}
        return GPT2LMHeadModel(gpt2).eval(), "gpt2-all", ("c_attn", "c_proj", "c_fc"), extra
    config = BertConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=12,
        num_attention_heads=2,
        intermediate_size=256,
    )
    config.num_labels = 2
    targets = ("query", "key", "value", "dense")
    return (
        BertForSequenceClassification(config).eval(),
        "bert-all",
        targets,
        {"task_type": "SEQ_CLS"},
    )


def load_other(directory: Path) -> ModuleType:
    """The ``lora_kit`` package of another checkout, imported as ``lora_kit_other``."""
    init = directory / "lora_kit" / "__init__.py"
    spec = importlib.util.spec_from_file_location(
        "lora_kit_other", init, submodule_search_locations=[str(init.parent)]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"no lora_kit package under {directory}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lora_kit_other"] = module
    spec.loader.exec_module(module)
    return module


def with_adapters(library: Any, base: nn.Module, preset: str, heads: tuple[str, ...] = ()) -> Any:
    """A copy of ``base`` with 8 adapters a0..a7 (random B, and their own copies of the
    modules ``heads``) from ``library``; a0 active."""
    lm = library.LoraModel(copy.deepcopy(base))
    for i in range(ADAPTERS):
        config = library.LoraConfig(r=8, alpha=16, targets=preset, modules_to_save=heads)
        lm.add_adapter(f"a{i}", config)
        randomize(lm, f"a{i}", seed=i)
    lm.set_adapter("a0")
    return lm


def _call(model: Any, x: dict[str, torch.Tensor], names: list[str] | None = None) -> Any:
    """``model(**x)``, with ``adapter_names=names`` when given, as a timing case."""
    if names is None:
        return lambda: model(**x)
    return lambda: model(**x, adapter_names=names)


def run(kind: str, repeats: int, other: ModuleType | None, save_head: bool) -> dict[str, Any]:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    base, preset, peft_targets, peft_extra = narrow_model(kind)
    heads = ("classifier",) if save_head and kind == "bert" else ()
    names = [f"a{i}" for i in range(ADAPTERS)]
    gen = torch.Generator().manual_seed(1)
    x = {"input_ids": torch.randint(0, 1000, (ROWS, 1), generator=gen)}
    libraries = {"lora_kit": lk} | ({"other lora_kit": other} if other is not None else {})
    cases: dict[str, Callable[[], object]] = {"base": lambda: base(**x)}
    layers = 0
    for label, library in libraries.items():
        lm = with_adapters(library, base, preset, heads)
        cases[f"{label} single"] = _call(lm, x)
        cases[f"{label} mixed"] = _call(lm, x, names)
        layers = sum(isinstance(m, library.LoRALinear) for m in lm.model.modules())
    pcfg = PeftLoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=list(peft_targets),
        modules_to_save=list(heads) or None,
        **peft_extra,
    )
    pm = get_peft_model(copy.deepcopy(base), pcfg, adapter_name="a0")
    for name in names[1:]:
        pm.add_adapter(name, pcfg)
    pm.eval()
    pm.set_adapter("a0")
    cases["PEFT single"] = _call(pm, x)
    cases["PEFT mixed"] = _call(pm, x, names)
    with torch.no_grad():
        stats = interleaved(cases, repeats, warmup=5, clock=CLOCKS["cpu"], best_of=3)
    med = {name: s.median for name, s in stats.items()}
    saved = f", each with its own {heads[0]}" if heads else ""
    print(f"\n# {kind}: {layers} LoRA layers, {ROWS} rows x 1 token, {ADAPTERS} adapters{saved}")
    print(f"  {'case':22s} {'median':>10s} {'extra per layer':>16s}")
    for name, value in med.items():
        extra = "" if name == "base" else f"{(value - med['base']) / layers * 1e6:13.1f} µs"
        print(f"  {name:22s} {value * 1e3:8.2f} ms {extra:>16s}")
    ratios = {
        f"{label} mixed/single": med[f"{label} mixed"] / med[f"{label} single"]
        for label in (*libraries, "PEFT")
    }
    print("  " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    per_layer = {
        name: (v - med["base"]) / layers * 1e6 for name, v in med.items() if name != "base"
    }
    return {"median_ms": {k: v * 1e3 for k, v in med.items()}, "extra_us_per_layer": per_layer}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,bert")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--compare", type=Path, help="another checkout to time beside this one")
    parser.add_argument(
        "--save-head", action="store_true", help="BERT adapters also save their classifier"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    other = load_other(args.compare) if args.compare else None
    kinds = args.models.split(",")
    results = {kind: run(kind, args.repeats, other, args.save_head) for kind in kinds}
    print("\nJSON " + json.dumps(results))


if __name__ == "__main__":
    main()
