"""Load every adapter under OUT_ROOT with lora_kit and PEFT (current env); compare to expected."""

import json
import sys
import warnings
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import BertForSequenceClassification, GPT2LMHeadModel

import lora_kit as lk

warnings.simplefilter("ignore")
CLS = {"gpt2": GPT2LMHeadModel, "bert": BertForSequenceClassification}
ROOT = Path(sys.argv[1])


def ids():
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, 100, (2, 7), generator=g)


def base(arch, d):
    return CLS[arch].from_pretrained(d).eval()


def diff(a, b):
    return float((a - b).abs().max())


rows = []
for ver in sorted(p.name for p in ROOT.iterdir()):
    for arch in ("gpt2", "bert"):
        adir = ROOT / ver / arch
        with torch.no_grad():
            bl = base(arch, adir / "base")(ids()).logits
        bd = diff(bl, load_file(adir / "base" / "expected_base.safetensors")["logits"])
        print(f"{ver} {arch} base: max|diff| old-env vs new-env bare logits = {bd:.2e}")
        for case in sorted(p.name for p in adir.iterdir() if p.name != "base"):
            rec = json.loads((adir / case / "case.json").read_text())
            if "error" in rec or "skipped" in rec:
                rows.append(
                    (
                        ver,
                        arch,
                        case,
                        "old PEFT refused: " + rec.get("error", rec.get("skipped", ""))[:90],
                        "",
                    )
                )
                continue
            exp = load_file(adir / case / "expected.safetensors")["logits"]
            try:
                m = lk.LoraModel.from_pretrained(base(arch, adir / "base"), adir / case)
                m.eval()
                with torch.no_grad():
                    out = m(ids()).logits
                d = diff(out, exp)
                lkr = "agrees" if d <= 1e-5 else f"DISAGREES {d:.3e}"
            except Exception as exc:
                lkr = f"refuses: {type(exc).__name__}: {str(exc)[:220]}"
            try:
                pm = PeftModel.from_pretrained(base(arch, adir / "base"), adir / case).eval()
                with torch.no_grad():
                    d = diff(pm(ids()).logits, exp)
                pr = "agrees" if d <= 1e-5 else f"DISAGREES {d:.3e}"
            except Exception as exc:
                pr = f"refuses: {type(exc).__name__}: {str(exc)[:120]}"
            rows.append((ver, arch, case, lkr, pr))
for r in rows:
    print(" | ".join(r))
