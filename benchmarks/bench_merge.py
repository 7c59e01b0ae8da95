"""Merging and stacking benchmarks: drift, `lorakit merge` cost, stack error and svd timing.

Run: ``.venv/bin/python -m benchmarks.bench_merge [--quick]``. Everything is built from configs
(GPT-2-small shapes, random weights, random r=8 adapters on ``c_attn``); nothing is downloaded.
Single-threaded. Only the `lorakit merge` cost is an A/B comparison: the two cases alternate in
child processes (for their own peak memory), so that ratio is meaningful on a noisy machine.
The other timings are not interleaved: each side's 100 drift cycles are timed once, one side
after the other; each stacking method is timed once, and lora_kit's svd again as the median of
5 runs, against PEFT's svd timed once (it is ~200x slower, which no warm-up effect explains).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import lora_kit as lk
from lora_kit.adapter_io import read_adapter
from lora_kit.merge import lora_delta
from lora_kit.stack import stack

WEIGHTS = (0.7, 0.3)


def gpt2_small(n_layer: int = 12) -> GPT2LMHeadModel:
    """GPT-2-small shapes (768 wide, 12 layers), random weights."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=n_layer, n_embd=768, n_head=12)).eval()


def interleaved(cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict:
    """Median/min/max seconds per case, running the cases A B A B ..."""
    for _ in range(warmup):
        for fn in cases.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {
        k: {"median": statistics.median(v), "min": min(v), "max": max(v)} for k, v in times.items()
    }


def table(title: str, header: list[str], rows: list[list[object]]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c) for c in row) + " |")


# ---- drift -------------------------------------------------------------------------------------


def _randomize(params: list[torch.nn.Parameter], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_((torch.randn(p.shape, generator=gen) * 0.02).to(p.dtype))


def drift(cycles: int, n_layer: int) -> list[list[object]]:
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    rows: list[list[object]] = []
    for dtype in (torch.bfloat16, torch.float16):
        model = gpt2_small(n_layer).to(dtype)
        lm = lk.inject(model, lk.LoraConfig(r=8, alpha=16))
        _randomize(lm.adapter_parameters("default"), 1)
        before = {
            n: m.weight.detach().clone()
            for n, m in model.named_modules()
            if isinstance(m, lk.LoRALinear)
        }
        start = time.perf_counter()
        for _ in range(cycles):
            lm.merge("default")
            lm.unmerge()
        ours_t = time.perf_counter() - start
        changed = sum(
            int((before[n] != m.weight).sum())
            for n, m in model.named_modules()
            if isinstance(m, lk.LoRALinear)
        )
        kept = lm.merge("default").kept_bytes
        lm.unmerge()
        total = sum(t.numel() for t in before.values())
        rows.append(
            [
                f"lora_kit {str(dtype)[6:]}",
                changed,
                total,
                0.0 if not changed else "!",
                f"{ours_t:.2f}",
                f"{kept / 2**20:.1f} MiB",
            ]
        )
        del lm, model
        base = gpt2_small(n_layer).to(dtype)
        pm = get_peft_model(
            base, PeftConfig(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True)
        )
        _randomize([p for n, p in pm.named_parameters() if "lora_" in n], 1)
        layers = {n: m for n, m in pm.named_modules() if n.endswith("c_attn")}
        before = {n: m.base_layer.weight.detach().clone() for n, m in layers.items()}
        start = time.perf_counter()
        for _ in range(cycles):
            pm.merge_adapter()
            pm.unmerge_adapter()
        peft_t = time.perf_counter() - start
        changed = sum(int((before[n] != m.base_layer.weight).sum()) for n, m in layers.items())
        worst = max(
            float((before[n].float() - m.base_layer.weight.float()).abs().max())
            for n, m in layers.items()
        )
        rows.append([f"PEFT {str(dtype)[6:]}", changed, total, worst, f"{peft_t:.2f}", "0"])
        del pm, base
    return rows


# ---- lorakit merge vs load + save_pretrained -------------------------------------------------

_CHILD = """
import os, sys, time, torch
torch.set_num_threads(1)
def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
case, base, adapter, out = sys.argv[1:5]
from transformers import GPT2LMHeadModel
from lora_kit.merge_files import merge_files
start_rss = status('VmRSS:')
t = time.perf_counter()
if case == 'merge':
    merge_files(base, [adapter], out)
else:
    GPT2LMHeadModel.from_pretrained(base).save_pretrained(out)
t = time.perf_counter() - t
peak = status('VmHWM:')  # this process's own high-water mark (ru_maxrss inherits the parent's)
print(t, peak, start_rss)
"""


def merge_cost(tmp: Path, repeats: int) -> list[list[object]]:
    model = gpt2_small()
    model.save_pretrained(tmp / "base")
    lm = lk.inject(model, lk.LoraConfig(r=8, alpha=16))
    _randomize(lm.adapter_parameters("default"), 2)
    lm.save_adapter(tmp / "adapter")
    del lm, model
    results: dict[str, list[tuple[float, float, float]]] = {"merge": [], "save": []}
    for _ in range(repeats):
        for case in ("merge", "save"):
            out = tmp / f"out-{case}"
            shutil.rmtree(out, ignore_errors=True)
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _CHILD,
                    case,
                    str(tmp / "base"),
                    str(tmp / "adapter"),
                    str(out),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            t, peak, start = (float(x) for x in proc.stdout.split()[-3:])
            results[case].append((t, peak, peak - start))
    rows = []
    per_run = [m[0] / b[0] for m, b in zip(results["merge"], results["save"], strict=True)]
    print(f"per-run time ratios merge/baseline: {', '.join(f'{r:.2f}' for r in per_run)}")
    med = {k: [statistics.median(x[i] for x in v) for i in range(3)] for k, v in results.items()}
    for case, label in (("merge", "lorakit merge (stream)"), ("save", "load + save_pretrained")):
        t, peak, extra = med[case]
        rows.append([label, f"{t:.2f}", f"{peak / 2**20:.0f}", f"{extra / 2**20:.0f}"])
    rows.append(
        [
            "ratio merge / baseline",
            f"{med['merge'][0] / med['save'][0]:.2f}x",
            f"{med['merge'][1] / med['save'][1]:.2f}x",
            f"{med['merge'][2] / max(med['save'][2], 1):.2f}x",
        ]
    )
    return rows


# ---- stack error table and svd timing ----------------------------------------------------------


def _deltas(path: Path) -> dict[str, torch.Tensor]:
    files = read_adapter(path)
    out = {}
    for key, a in files.tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = files.tensors[key.replace("lora_A", "lora_B")]
            out[module] = lora_delta(a, b, files.config.scaling_for(module)).double()
    return out


def _rel(got: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> float:
    err = sum(float((got[m] - exact[m]).norm() ** 2) for m in exact)
    return (err / sum(float(exact[m].norm() ** 2) for m in exact)) ** 0.5


def stack_table(tmp: Path, repeats: int, peak_svd: bool) -> tuple[list[list[object]], list]:
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    pm = get_peft_model(
        gpt2_small(),
        PeftConfig(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True),
        adapter_name="a",
    )
    pm.add_adapter(
        "b", PeftConfig(r=8, lora_alpha=16, target_modules=["c_attn"], fan_in_fan_out=True)
    )
    for i, name in enumerate(("a", "b")):
        _randomize(
            [p for n, p in pm.named_parameters() if "lora_" in n and f".{name}." in n], 10 + i
        )
    pm.save_pretrained(tmp / "peft")  # non-default names: peft/a and peft/b
    paths = [tmp / "peft" / "a", tmp / "peft" / "b"]
    da, db = _deltas(paths[0]), _deltas(paths[1])
    exact = {m: WEIGHTS[0] * da[m] + WEIGHTS[1] * db[m] for m in da}
    rows: list[list[object]] = []
    runs = {
        "cat": {},
        "svd": {"rank": 8},
        "ties": {"rank": 8, "density": 0.5},
        "dare": {"rank": 8, "density": 0.5, "seed": 0},
    }
    for method, extra in runs.items():
        out = tmp / f"lk-{method}"
        t = time.perf_counter()
        report = stack(paths, weights=list(WEIGHTS), method=method, out=out, **extra)  # type: ignore[arg-type]
        t = time.perf_counter() - t
        rows.append(
            [
                f"lora_kit {method}",
                f"{_rel(_deltas(out), exact):.3g}",
                f"{report.energy_kept:.4f}",
                max(r.rank for r in report.modules),
                f"{t:.2f}",
            ]
        )
    layers = {
        n.removeprefix("base_model.model."): m
        for n, m in pm.named_modules()
        if n.endswith("c_attn")
    }
    peft_runs = {
        "linear": {},
        "svd": {"svd_rank": 8},
        "cat": {},
        "ties": {"density": 0.5},
    }
    peft_svd_time = None
    for kind, extra in peft_runs.items():
        if kind == "svd" and not peak_svd:
            continue
        name = f"m_{kind}"
        t = time.perf_counter()
        pm.add_weighted_adapter(["a", "b"], list(WEIGHTS), name, combination_type=kind, **extra)
        t = time.perf_counter() - t
        if kind == "svd":
            peft_svd_time = t
        got = {m: layer.get_delta_weight(name).double() for m, layer in layers.items()}
        got = {m: v.t() if layers[m].fan_in_fan_out else v for m, v in got.items()}  # [out, in]
        rank = next(iter(layers.values())).r[name]
        rows.append([f"PEFT {kind}", f"{_rel(got, exact):.3g}", "-", rank, f"{t:.2f}"])
        pm.delete_adapter(name)
    # svd timing, interleaved (ours only: PEFT's is timed once above; it is ~40x slower)
    timing = interleaved(
        {
            "lora_kit svd": lambda: stack(
                paths, weights=list(WEIGHTS), method="svd", out=tmp / "t-svd", rank=8
            )
        },
        repeats=repeats,
    )
    svd = timing["lora_kit svd"]
    timing_rows = [
        [
            f"lora_kit svd (median of {repeats})",
            f"{svd['median']:.3f}",
            f"{svd['min']:.3f}",
            f"{svd['max']:.3f}",
        ]
    ]
    if peft_svd_time is not None:
        timing_rows.append(
            ["PEFT add_weighted_adapter svd (once)", f"{peft_svd_time:.2f}", "-", "-"]
        )
        timing_rows.append(
            ["ratio PEFT / lora_kit", f"{peft_svd_time / svd['median']:.0f}x", "", ""]
        )
    return rows, timing_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats, skip PEFT svd")
    parser.add_argument("--only", choices=["drift", "stack", "merge"], default=None)
    parser.add_argument(
        "--repeats", type=int, default=None, help="merge-cost runs per case (default 3, quick 2)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats = args.repeats or (2 if args.quick else 3)
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        if args.only in (None, "drift"):
            rows = drift(cycles=100, n_layer=12)
            table(
                "Drift after 100 merge/unmerge cycles (GPT-2-small, r=8 on c_attn)",
                [
                    "who / dtype",
                    "elements changed",
                    "of",
                    "max |drift|",
                    "seconds",
                    "kept for unmerge",
                ],
                rows,
            )
            results["drift"] = rows
        if args.only in (None, "stack"):
            rows, timing = stack_table(tmp, repeats=5, peak_svd=not args.quick)
            table(
                "Stacking two r=8 GPT-2-small adapters, weights 0.7/0.3: relative Frobenius "
                "error vs the exact weighted sum",
                ["method", "rel. error", "energy kept", "rank", "seconds"],
                rows,
            )
            table("svd stacking time (seconds)", ["", "median", "min", "max"], timing)
            results["stack"] = rows
            results["svd_timing"] = timing
        if args.only in (None, "merge"):
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            rows = merge_cost(tmp, repeats)
            table(
                f"lorakit merge vs load + save_pretrained (GPT-2-small fp32 base, one r=8 "
                f"adapter, child processes alternating, median of {repeats})",
                ["case", "seconds", "peak RSS MiB", "peak - post-import MiB"],
                rows,
            )
            results["merge_cost"] = rows
    print("\n" + json.dumps(results, default=str))


if __name__ == "__main__":
    main()
