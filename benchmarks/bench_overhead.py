"""Unmerged forward overhead of one LoRA adapter over the base model: lora_kit vs PEFT.

GPT-2-small and BERT-base shapes built from config (random weights: timing only), r=8, all
projections, CPU, fp32, no grad. Whole model and per layer (one projection of each kind),
next to the adapter's theoretical extra FLOPs.

    python -m benchmarks.bench_overhead [--repeats 30] [--threads N] [--json]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from peft import LoraConfig as PeftConfig
from peft import get_peft_model
from torch import nn
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model
from transformers.pytorch_utils import Conv1D

import lora_kit as lk

from .harness import (
    CLOCKS,
    Stats,
    interleaved,
    overhead_ratio_interval,
    paired_ratio,
    report,
    sharing_copy,
)
from .same_work import check_eval, check_same_outputs, tie_adapters

R = 8
# The adapters' alpha, the same on both sides (lora_kit's default is 16, PEFT's 8): scaling 2.
ALPHA = 16

# One projection of each kind: (module type, in, out).
LAYERS = [
    ("Conv1D", 768, 2304),  # GPT-2 c_attn
    ("Conv1D", 768, 3072),  # GPT-2 c_fc
    ("Linear", 768, 768),  # BERT query
    ("Linear", 3072, 768),  # BERT output.dense
]


def peft_layer_config(kind: str) -> PeftConfig:
    """PEFT's config for the one-layer cases: lora_kit's rank and alpha, Conv1D's orientation."""
    return PeftConfig(
        r=R, lora_alpha=ALPHA, target_modules=["proj"], fan_in_fan_out=kind == "Conv1D"
    )


def layer_sides(
    kind: str, n_in: int, n_out: int, tokens: int
) -> tuple[nn.Module, lk.LoraModel, nn.Module, torch.Tensor]:
    """One projection ``proj`` bare, with lora_kit's adapter and with PEFT's, and an input.

    All three share the projection's weights, are in eval mode and pass `check_same_work`.

    Returns:
        ``(base, lora_kit model, PEFT model, x [tokens, n_in])``, seeded (the same every call).
    """
    torch.manual_seed(0)
    layer = Conv1D(n_out, n_in) if kind == "Conv1D" else nn.Linear(n_in, n_out)
    base = nn.Sequential()
    base.add_module("proj", layer)
    base.eval()  # nothing in a bare projection depends on it, but all sides match
    ours = lk.inject(sharing_copy(base), lk.LoraConfig(r=R, alpha=ALPHA, targets=("proj",)))
    theirs = get_peft_model(sharing_copy(base), peft_layer_config(kind))
    ours.eval()
    theirs.eval()
    x = torch.randn(tokens, n_in)  # [T, in]
    check_same_work(base, ours, theirs, f"{kind} {n_in}->{n_out}", {"input": x})
    return base, ours, theirs, x


def check_same_work(
    base: nn.Module,
    ours: lk.LoraModel,
    theirs: nn.Module,
    what: str,
    inputs: dict[str, torch.Tensor],
) -> None:
    """Same adapted modules, rank, scaling, eval mode and outputs on both sides, or raise.

    Gives both sides the same non-zero adapter factors first (`same_work.tie_adapters`).
    """
    tie_adapters(ours, theirs)
    check_eval({"base": base, "lora_kit": ours, "peft": theirs})
    with torch.inference_mode():
        check_same_outputs(what, base(**inputs), ours(**inputs), theirs(**inputs))


def _overheads(stats: dict[str, Stats], case: str) -> tuple[float, float, float]:
    """``case``'s overhead over ``base``: from medians, from minima, paired per round."""
    base = stats["base"]
    ours = stats[case]
    return (
        ours.median / base.median - 1.0,
        ours.min / base.min - 1.0,
        paired_ratio(ours, base) - 1.0,
    )


def _row(case: str, base: str, flops: float, stats: dict[str, Stats]) -> dict[str, object]:
    lk_o, peft_o = _overheads(stats, "lora_kit"), _overheads(stats, "peft")

    def ratio(i: int) -> str:
        return f"{lk_o[i] / peft_o[i]:.2f}" if peft_o[i] > 0 else "n/a"

    return {
        "case": case,
        "base": base,
        "lora_kit": f"{100 * lk_o[0]:+.1f}%",
        "peft": f"{100 * peft_o[0]:+.1f}%",
        "flops": f"+{100 * flops:.1f}%",
        "lk/peft overhead": ratio(0),
        "lk/peft (min)": ratio(1),
        "lk/peft (paired)": ratio(2),
        "paired 90% CI": "{1:.2f}-{2:.2f}".format(
            *overhead_ratio_interval(stats["lora_kit"], stats["peft"], stats["base"])
        ),
    }


def whole_model(
    arch: str, repeats: int, batch: int, seq: int, clock: Callable[[], float], best_of: int
) -> dict[str, object]:
    torch.manual_seed(0)
    if arch == "gpt2":
        base: nn.Module = GPT2Model(GPT2Config()).eval()
        targets = list(lk.presets()["gpt2-all"])
    else:
        base = BertModel(BertConfig()).eval()
        targets = list(lk.presets()["bert-all"])
    ours = lk.inject(
        sharing_copy(base), lk.LoraConfig(r=R, alpha=ALPHA, targets=tuple(targets))
    ).eval()
    theirs = get_peft_model(
        sharing_copy(base),
        PeftConfig(r=R, lora_alpha=ALPHA, target_modules=targets, fan_in_fan_out=arch == "gpt2"),
    ).eval()
    ids = torch.randint(0, 1000, (batch, seq))
    check_same_work(base, ours, theirs, f"{arch} whole model", {"input_ids": ids[:1, :16]})

    def run(model: nn.Module) -> None:
        with torch.inference_mode():
            model(input_ids=ids)

    stats = interleaved(
        {"base": lambda: run(base), "lora_kit": lambda: run(ours), "peft": lambda: run(theirs)},
        repeats=repeats,
        warmup=3,
        clock=clock,
        best_of=best_of,
    )
    return _row(
        f"{arch} whole model (b={batch}, s={seq})",
        f"{stats['base'].median * 1e3:.1f} ms",
        _model_flop_share(base, targets),
        stats,
    )


def _model_flop_share(model: nn.Module, targets: list[str]) -> float:
    """Adapter FLOPs over the targeted projections' FLOPs: r*(in+out) / (in*out)."""
    dense = extra = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | Conv1D) and any(
            name == t or name.endswith("." + t) for t in targets
        ):
            w = module.weight
            n_in, n_out = (
                (w.shape[0], w.shape[1]) if isinstance(module, Conv1D) else (w.shape[1], w.shape[0])
            )
            dense += n_in * n_out
            extra += R * (n_in + n_out)
    return extra / dense


def one_layer(
    kind: str,
    n_in: int,
    n_out: int,
    repeats: int,
    tokens: int,
    clock: Callable[[], float],
    best_of: int,
) -> dict[str, object]:
    base, ours, theirs, x = layer_sides(kind, n_in, n_out, tokens)

    def run(model: nn.Module) -> None:
        with torch.inference_mode():
            model(x)

    stats = interleaved(
        {"base": lambda: run(base), "lora_kit": lambda: run(ours), "peft": lambda: run(theirs)},
        repeats=repeats * 5,
        warmup=10,
        clock=clock,
        best_of=best_of,
    )
    return _row(
        f"{kind} {n_in}->{n_out} ({tokens} tokens)",
        f"{stats['base'].median * 1e3:.2f} ms",
        R * (n_in + n_out) / (n_in * n_out),
        stats,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--best-of", type=int, default=1, help="fastest of k calls per sample")
    parser.add_argument("--only", choices=["all", "layers", "models"], default="all")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu counts the calling thread only: use it with --threads 1")
    torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    tokens = args.batch * args.seq
    rows = []
    if args.only in ("all", "layers"):
        for kind, n_in, n_out in LAYERS:
            rows.append(one_layer(kind, n_in, n_out, args.repeats, tokens, clock, args.best_of))
    if args.only in ("all", "models"):
        for arch in ("bert", "gpt2"):
            rows.append(whole_model(arch, args.repeats, args.batch, args.seq, clock, args.best_of))
    title = (
        f"Unmerged forward overhead vs base, r={R}, all projections, fp32 CPU, "
        f"{args.threads} threads, {args.clock} clock, {args.repeats} interleaved runs "
        f"(layers: {5 * args.repeats}), best of {args.best_of}"
    )
    report(title, rows, as_json=args.json)


if __name__ == "__main__":
    main()
