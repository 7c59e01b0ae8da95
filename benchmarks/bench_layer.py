"""Where one LoRA layer's forward time goes: per call, lora_kit vs PEFT vs the bare projection.

For each GPT-2/BERT projection shape and token count: the base layer alone, lora_kit's and
PEFT's wrapped layer (one r=8 adapter, unmerged, eval, no grad), and the adapter's kernels
alone: both down-projection layouts, the in-place up-projection from either layout of ``h``
(what lora_kit does after ``base(x)`` when it cannot fuse; its fused fp32 CPU path runs the same
GEMM into the bias before the base GEMM), and PEFT's out-of-place ``result + B(A(x)) *
scaling``. Kernels timed alone run on warm caches, so they show each GEMM's cost, not the
memory traffic it causes inside the layer. All cases run interleaved in one process on the same
input; each sample averages ``calls`` back-to-back calls (enough for ~2 ms), and the table shows
medians and minima.

    python -m benchmarks.bench_layer [--tokens 1,128,512,1024,4096] [--repeats 25]
        [--threads 1] [--clock cpu|wall] [--layers Linear:3072->768,...] [--json]
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import cast

import torch
import torch.nn.functional as F

import lora_kit as lk

from .bench_overhead import LAYERS, R, layer_sides
from .harness import (
    CLOCKS,
    Stats,
    interleaved,
    overhead_ratio_interval,
    paired_ratio,
    report,
)


def _repeat(fn: Callable[[], object], calls: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(calls):
            fn()

    return run


def measure(
    kind: str, n_in: int, n_out: int, tokens: int, repeats: int, clock: Callable[[], float]
) -> dict[str, object]:
    holder, ours, theirs, x = layer_sides(kind, n_in, n_out, tokens)
    layer = holder.get_submodule("proj")  # the bare projection, shared by all three
    ours_layer = cast(lk.LoRALinear, ours.model.get_submodule("proj"))
    theirs_layer = theirs.get_submodule("base_model.model.proj")
    adapter = ours_layer.adapter("default")
    a, b = adapter.lora_A.detach(), adapter.lora_B.detach()  # [r, in], [out, r]
    out = torch.randn(tokens, n_out)  # [T, o], a stand-in base output (updated in place)
    scaling = adapter.scaling  # ALPHA / R on both sides
    h = F.linear(x, a)  # [T, r]
    h_t = h.t().contiguous()  # [r, T]
    # ~2 ms per sample at ~50 GFLOP/s, so the clock's resolution and call overhead do not matter
    calls = max(1, min(1000, int(1e8 // (2 * tokens * n_in * n_out + 1))))
    cases: dict[str, Callable[[], object]] = {
        "base": lambda: layer(x),
        "lora_kit": lambda: ours_layer(x),
        "peft": lambda: theirs_layer(x),
        "down x@A^T": lambda: F.linear(x, a),  # [T, r]: PEFT's (and the large-T) layout
        "down A@x^T": lambda: torch.mm(a, x.t()),  # [r, T]: lora_kit's up to 1024 rows
        "up, h [T,r]": lambda: out.addmm_(h, b.t(), alpha=1e-9),
        "up, h^T [r,T]": lambda: out.addmm_(h_t.t(), b.t(), alpha=1e-9),
        "peft up+add": lambda: out + F.linear(h, b) * scaling,
    }
    with torch.inference_mode():
        stats = interleaved(
            {name: _repeat(fn, calls) for name, fn in cases.items()},
            repeats=repeats,
            warmup=3,
            clock=clock,
        )
    per_call = {name: _scaled(s, calls) for name, s in stats.items()}
    base = per_call["base"]

    def over(name: str) -> tuple[float, float, float]:
        s = per_call[name]
        return s.median - base.median, s.min - base.min, paired_ratio(s, base) - 1.0

    lk_x, peft_x = over("lora_kit"), over("peft")
    row: dict[str, object] = {
        "case": f"{kind} {n_in}->{n_out}, {tokens} tok",
        "base": _us(base.median),
        "lk extra": f"{_us(lk_x[0])} ({100 * lk_x[0] / base.median:+.1f}%)",
        "peft extra": f"{_us(peft_x[0])} ({100 * peft_x[0] / base.median:+.1f}%)",
        "lk/peft med": _ratio(lk_x[0], peft_x[0]),
        "min": _ratio(lk_x[1], peft_x[1]),
        "paired": _ratio(lk_x[2], peft_x[2]),
        "paired 90% CI": "{1:.2f}-{2:.2f}".format(
            *overhead_ratio_interval(per_call["lora_kit"], per_call["peft"], base)
        ),
    }
    for name in list(cases)[3:]:
        row[name] = f"{_us(per_call[name].median)}/{_us(per_call[name].min)}"
    return row


def _scaled(stats: Stats, calls: int) -> Stats:
    samples = tuple(t / calls for t in stats.samples)
    return Stats(stats.median / calls, stats.min / calls, stats.max / calls, stats.runs, samples)


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f}"


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}" if theirs > 0 else "n/a"


def _layer_name(kind: str, n_in: int, n_out: int) -> str:
    return f"{kind}:{n_in}->{n_out}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="1,128,512,1024,4096")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    parser.add_argument(
        "--layers",
        default=",".join(_layer_name(*layer) for layer in LAYERS),
        help="Comma-separated layers to measure, as KIND:IN->OUT with KIND Linear or Conv1D, "
        "any sizes (default: the four GPT-2/BERT shapes).",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu counts the calling thread only: use it with --threads 1")
    layers = []
    for name in args.layers.split(","):
        match = re.fullmatch(r"(Linear|Conv1D):(\d+)->(\d+)", name.strip())
        if match is None or min(int(match[2]), int(match[3])) < 1:
            parser.error(f"layer {name!r}: give KIND:IN->OUT, KIND Linear or Conv1D")
        layers.append((match[1], int(match[2]), int(match[3])))
    torch.set_num_threads(args.threads)
    rows = [
        measure(kind, n_in, n_out, int(tokens), args.repeats, CLOCKS[args.clock])
        for tokens in args.tokens.split(",")
        for kind, n_in, n_out in layers
    ]
    title = (
        f"One layer, per call in µs (kernels: median/min), r={R}, fp32 CPU, {args.threads} "
        f"threads, {args.clock} clock, {args.repeats} interleaved samples"
    )
    report(title, rows, as_json=args.json)


if __name__ == "__main__":
    main()
