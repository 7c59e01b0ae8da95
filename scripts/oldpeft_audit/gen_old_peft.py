"""Write adapters with an installed (older) PEFT; does not import lora_kit.

Usage: python gen_old_peft.py OUT_ROOT   -> OUT_ROOT/<peftver>/<arch>/{base,<case>}/
"""

import dataclasses
import json
import sys
import traceback
from pathlib import Path

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

ROOT = Path(sys.argv[1]) / peft.__version__
FIELDS = {f.name for f in dataclasses.fields(LoraConfig)}

ARCHS = {
    "gpt2": (
        GPT2LMHeadModel,
        lambda: GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64),
    ),
    "bert": (
        BertForSequenceClassification,
        lambda: BertConfig(
            vocab_size=100,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=3,
        ),
    ),
}

GPT2_ALL = ["c_attn", "c_proj", "c_fc"]
BERT_ALL = ["query", "key", "value", "dense"]
CASES = {
    "gpt2": {
        "c_attn": dict(target_modules=["c_attn"], fan_in_fan_out=True),
        "c_attn_fifo_false": dict(target_modules=["c_attn"], fan_in_fan_out=False),
        "all_patterns": dict(
            target_modules=GPT2_ALL,
            fan_in_fan_out=True,
            r=8,
            lora_alpha=16,
            rank_pattern={"c_fc": 4, "h.1.attn.c_attn": 2},
            alpha_pattern={"c_proj": 32, "h.0.attn.c_attn": 4},
        ),
        "alpha_pattern_full_name": dict(
            target_modules=GPT2_ALL,
            fan_in_fan_out=True,
            alpha_pattern={"transformer.h.0.attn.c_attn": 64},
        ),
        "rank_pattern_full_name": dict(
            target_modules=GPT2_ALL,
            fan_in_fan_out=True,
            rank_pattern={"transformer.h.1.mlp.c_fc": 2},
        ),
        "alpha_pattern_alternation": dict(
            target_modules=GPT2_ALL,
            fan_in_fan_out=True,
            alpha_pattern={r"h\.0\.attn\.c_attn|h\.1\.mlp\.c_fc": 64},
        ),
        "alpha_pattern_overlap": dict(
            target_modules=GPT2_ALL,
            fan_in_fan_out=True,
            alpha_pattern={"c_proj": 2, "mlp.c_proj": 64},
        ),
        "rslora": dict(
            target_modules=GPT2_ALL, fan_in_fan_out=True, use_rslora=True, r=4, lora_alpha=8
        ),
        "layers_pattern": dict(
            target_modules=GPT2_ALL,
            fan_in_fan_out=True,
            layers_to_transform=[1],
            layers_pattern="h",
        ),
        "layers_int": dict(
            target_modules=GPT2_ALL, fan_in_fan_out=True, layers_to_transform=0, layers_pattern="h"
        ),
        "layers_no_pattern": dict(
            target_modules=GPT2_ALL, fan_in_fan_out=True, layers_to_transform=[0]
        ),
        "gaussian": dict(
            target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights="gaussian"
        ),
        "exclude_modules": dict(
            target_modules=GPT2_ALL, fan_in_fan_out=True, exclude_modules=["h.0.attn.c_proj"]
        ),
        "exclude_regex": dict(
            target_modules=GPT2_ALL, fan_in_fan_out=True, exclude_modules=r".*\.1\.mlp\..*"
        ),
        "regex_targets": dict(
            target_modules=r".*\.h\.1\.(attn\.c_attn|mlp\.c_fc)", fan_in_fan_out=True
        ),
        "fractional_alpha_dropout": dict(
            target_modules=["c_attn"], fan_in_fan_out=True, lora_alpha=3.5, lora_dropout=0.1
        ),
        "dora": dict(target_modules=["c_attn"], fan_in_fan_out=True, use_dora=True),
        "lora_bias": dict(target_modules=["c_attn"], fan_in_fan_out=True, lora_bias=True),
        "causal_task": dict(target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"),
    },
    "bert": {
        "qv_classifier": dict(target_modules=["query", "value"], modules_to_save=["classifier"]),
        "seq_cls_task": dict(target_modules=["query", "value"], task_type="SEQ_CLS"),
        "regex_all": dict(
            target_modules=r".*\.(query|key|value|dense)$", modules_to_save=["classifier"]
        ),
        "patterns_overlap": dict(
            target_modules=BERT_ALL,
            r=4,
            rank_pattern={"output.dense": 2, "attention.output.dense": 6},
            alpha_pattern={"dense": 16, "layer.1.attention.self.query": 2},
            modules_to_save=["classifier"],
        ),
        "alpha_pattern_full_name": dict(
            target_modules=BERT_ALL,
            alpha_pattern={"bert.encoder.layer.0.attention.self.query": 64},
            modules_to_save=["classifier"],
        ),
        "rslora_gaussian": dict(
            target_modules=BERT_ALL,
            use_rslora=True,
            init_lora_weights="gaussian",
            modules_to_save=["classifier"],
        ),
        "layers_pattern": dict(
            target_modules=BERT_ALL,
            layers_to_transform=[1],
            layers_pattern="layer",
            modules_to_save=["classifier"],
        ),
        "layers_no_pattern": dict(
            target_modules=BERT_ALL, layers_to_transform=[0], modules_to_save=["classifier"]
        ),
        "exclude_modules": dict(
            target_modules=BERT_ALL,
            exclude_modules=["pooler.dense"],
            modules_to_save=["classifier"],
        ),
        "pooler_and_classifier": dict(
            target_modules=["query"], modules_to_save=["pooler", "classifier"]
        ),
    },
}


def input_ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 100, (2, 7), generator=g)


def fresh_base(arch: str, base_dir: Path):
    cls, _ = ARCHS[arch]
    m = cls.from_pretrained(base_dir)
    m.eval()
    return m


def randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def main() -> None:
    for arch, (cls, cfg) in ARCHS.items():
        adir = ROOT / arch
        base_dir = adir / "base"
        torch.manual_seed(0)
        base = cls(cfg()).eval()
        base.save_pretrained(base_dir, safe_serialization=True)
        with torch.no_grad():
            save_file(
                {"logits": base(input_ids()).logits.contiguous()},
                base_dir / "expected_base.safetensors",
            )
        for i, (case, opts) in enumerate(CASES[arch].items()):
            out = adir / case
            out.mkdir(parents=True, exist_ok=True)
            record = {
                "options": opts,
                "peft": peft.__version__,
                "transformers": transformers.__version__,
            }
            missing = [k for k in opts if k not in FIELDS]
            if missing:
                record["skipped"] = f"LoraConfig of this PEFT has no {missing}"
                (out / "case.json").write_text(json.dumps(record, indent=1))
                print(arch, case, "SKIP", missing)
                continue
            try:
                model = fresh_base(arch, base_dir)
                pm = get_peft_model(model, LoraConfig(**opts))
                randomize(pm, 100 + i)
                pm.eval()
                with torch.no_grad():
                    logits = pm(input_ids()).logits.contiguous()
                pm.save_pretrained(out, safe_serialization=True)
                save_file({"logits": logits}, out / "expected.safetensors")
                record["adapted"] = sorted(n for n, _ in pm.named_modules() if n.endswith("lora_A"))
                record["ranks"] = {
                    n: m.weight.shape[0]
                    for n, m in pm.named_modules()
                    if n.endswith("lora_A.default")
                }
                print(arch, case, "ok")
            except Exception as exc:
                record["error"] = f"{type(exc).__name__}: {exc}"
                print(arch, case, "ERROR", record["error"])
                traceback.print_exc()
            (out / "case.json").write_text(json.dumps(record, indent=1))


main()
