"""Hot-swapping and multi-adapter inference: lora_kit vs PEFT, side by side in one process.

Run: ``python -m benchmarks.bench_hotswap [--models gpt2,bert] [--repeats N] [--clock cpu]``
(``--only-mixed``, ``--only-forward`` or ``--only-swap`` for one part; ``--only-mixed`` or
``--only-swap`` with ``--device cuda`` for those figures on a GPU).

GPT-2 small and BERT-base are built from their default configs (random weights: timings do not
depend on the values), on CPU with one thread, LoRA r=8 on every attention and MLP projection.
Every comparison interleaves its cases (A B A B ...) after a warm-up and reports the median
(min-max) of each case; ratios are of medians.

Measured:
* ``set_adapter`` latency with 1, 100 and 1000 resident adapters (lora_kit) and 1, 8 and 100
  (PEFT). The 1000 lora_kit adapters beyond the first 100 alias the same tensors (4.7 GB of
  real ones would not fit here); ``set_adapter`` never touches adapter tensors, so this measures
  the switch itself.
* loading an adapter directory into a live model (``load_adapter``, with 1 and with 8 adapters
  resident on both sides), and in-place swapping
  (``swap_adapter`` vs ``peft.utils.hotswap.hotswap_adapter``), both from the same files on disk;
* unmerged single-adapter forward overhead over the bare base model, with 1 and 100 resident;
* a batch of 8 rows over 8 distinct adapters vs 8 rows on one adapter, and vs PEFT's
  ``adapter_names`` mixed batch, with the bare base model beside them (no mixed batch can be
  faster than it, which bounds the ratio to PEFT);
* memory per resident adapter (tensor bytes and process RSS growth) vs file size, 100 resident.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lora_kit as lk

Stats = dict[str, float]


# The clock the timings use: wall time, or this thread's CPU time (``--clock cpu``), which leaves
# out the time the process waits for a core on a shared machine (the work runs on this thread:
# one intra-op thread).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
clock = CLOCKS["wall"]


def interleaved(
    cases: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, Stats]:
    """Run the cases round-robin; per-case median/min/max seconds."""
    times: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(warmup + repeats):
        for name, fn in cases.items():
            start = clock()
            fn()
            elapsed = clock() - start
            if i >= warmup:
                times[name].append(elapsed)
    return {
        n: {"median": statistics.median(t), "min": min(t), "max": max(t)} for n, t in times.items()
    }


def per_call(fn: Callable[[], object], calls: int) -> Callable[[], object]:
    """Time ``calls`` calls of a cheap ``fn`` as one sample (divide by ``calls`` later)."""

    def run() -> None:
        for _ in range(calls):
            fn()

    return run


def fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.3f} s"


def show(title: str, stats: dict[str, Stats], scale: float = 1.0) -> None:
    print(f"\n## {title}")
    for name, s in stats.items():
        print(
            f"  {name:<44} {fmt(s['median'] / scale):>10}  "
            f"({fmt(s['min'] / scale)} - {fmt(s['max'] / scale)})"
        )


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ---- models -------------------------------------------------------------------------------


def build(kind: str) -> tuple[nn.Module, Any, tuple[str, ...], dict[str, Any]]:
    """(base model, lora_kit preset, PEFT target modules, PEFT extra config) for ``kind``."""
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if kind == "gpt2":
        return (
            GPT2LMHeadModel(GPT2Config()).eval(),
            "gpt2-all",
            ("c_attn", "c_proj", "c_fc"),
            {"fan_in_fan_out": True, "task_type": "CAUSAL_LM"},
        )
    targets = ("query", "key", "value", "attention.output.dense", "intermediate.dense")
    return (
        BertForSequenceClassification(BertConfig(num_labels=2)).eval(),
        "bert-all",
        (*targets, "output.dense"),
        {"task_type": "SEQ_CLS"},  # PEFT adds the classifier to modules_to_save
    )


def randomize(lm: lk.LoraModel, name: str, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.adapter_parameters(name):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def make_library(kind: str, root: Path, count: int) -> list[Path]:
    """``count`` saved adapters (r=8, all projections) for ``kind``, PEFT format."""
    base, preset, _, _ = build(kind)
    heads = ("classifier",) if kind == "bert" else ()  # a classifier adapter carries its head
    config = lk.LoraConfig(r=8, alpha=16, targets=preset, modules_to_save=heads)
    lm = lk.inject(base, config, "a0")
    paths = []
    for i in range(count):
        randomize(lm, "a0", seed=i)
        paths.append(lm.save_adapter(root / f"{kind}-{i}", "a0"))
    return paths


def inputs(kind: str, rows: int, seq: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 20000, (rows, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# ---- benchmarks -------------------------------------------------------------------------------


def run(
    kind: str,
    repeats: int,
    results: dict[str, Any],
    only: str | None = None,
    forward_shape: tuple[int, int] = (1, 32),
    device: str = "cpu",
) -> None:
    """One model's figures into ``results[kind]``; the adapter files it writes for the run go
    to a temporary folder, removed afterwards (about 40 MB per model)."""
    with tempfile.TemporaryDirectory(prefix="bench_hotswap_") as tmp:
        _run(kind, repeats, results, Path(tmp), only, forward_shape, device)


def _run(
    kind: str,
    repeats: int,
    results: dict[str, Any],
    tmp: Path,
    only: str | None,
    forward_shape: tuple[int, int],
    device: str,
) -> None:
    """`run` with ``tmp`` as the scratch folder for the adapter files."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    out: dict[str, Any] = {}
    results[kind] = out
    paths = make_library(kind, tmp, 8)
    file_bytes = (paths[0] / "adapter_model.safetensors").stat().st_size
    print(f"\n# {kind}: adapter file {file_bytes / 1e6:.2f} MB (r=8, all projections)")

    plain, _, peft_targets, peft_extra = build(kind)
    plain.to(device)
    lk_base = copy.deepcopy(plain)
    lm = lk.LoraModel(lk_base)
    lm.load_adapter(paths[0], "a0")
    peft_base = copy.deepcopy(plain)
    pcfg = PeftLoraConfig(r=8, lora_alpha=16, target_modules=list(peft_targets), **peft_extra)
    pm = get_peft_model(peft_base, pcfg, adapter_name="p0")
    pm.eval()
    pm.load_adapter(str(paths[0]), adapter_name="a0")
    pm.delete_adapter("p0")
    _check_same_work(kind, plain, lm, pm, device)

    # -- load from disk with one adapter resident (both sides hold only a0) -------------------
    def lk_load() -> None:
        _forget_headers()  # as for a file not read before (see _forget_headers)
        lm.load_adapter(paths[1], "fresh")
        lm.delete_adapter("fresh")

    def peft_load() -> None:
        pm.load_adapter(str(paths[1]), adapter_name="fresh")
        pm.delete_adapter("fresh")

    def compare_loads(resident: int, rounds: int) -> tuple[float, dict[str, Stats]]:
        """lora_kit vs PEFT ``load_adapter`` (+ delete): the speed-up and the timings."""
        stats = interleaved(
            {"lora_kit load_adapter (+delete)": lk_load, "PEFT load_adapter (+delete)": peft_load},
            rounds,
        )
        show(f"load an adapter from disk into the live model, {resident} resident", stats)
        speedup = (
            stats["PEFT load_adapter (+delete)"]["median"]
            / stats["lora_kit load_adapter (+delete)"]["median"]
        )
        print(f"  lora_kit is {speedup:.1f}x faster")
        return speedup, stats

    if only == "forward":
        _forward_overhead(kind, lm, pm, plain, paths, repeats, forward_shape, out)
        return
    if only == "swap":
        _swap(kind, lm, pm, paths, repeats, out, device)
        return
    if only is None:
        out["load_speedup_1"], stats = compare_loads(1, repeats * 4)
        out["load_ms_1"] = {k: v["median"] * 1e3 for k, v in stats.items()}

    _load_resident(lm, pm, paths, range(1, 8))

    # -- mixed batch: 8 rows over 8 adapters vs 8 rows on one --------------------------------
    names = [f"a{i}" for i in range(8)]
    out["mixed"] = {}
    lm.set_adapter("a0")
    pm.set_adapter("a0")
    _check_same_mixed(kind, plain, lm, pm, names, device)
    for seq in (32, 1):  # a short prefill, and one decode-sized step (1 token per row)
        x = {k: v.to(device) for k, v in inputs(kind, 8, seq).items()}
        with torch.no_grad():
            cases: dict[str, Callable[[], object]] = {
                "base model alone (no LoRA)": lambda x=x: plain(**x),
                "lora_kit 8 rows, 1 adapter": lambda x=x: lm(**x),
                "lora_kit 8 rows, 8 adapters": lambda x=x: lm(**x, adapter_names=names),
                "PEFT 8 rows, 1 adapter": lambda x=x: pm(**x),
                "PEFT 8 rows, 8 adapters (adapter_names)": lambda x=x: pm(**x, adapter_names=names),
            }
            stats = interleaved(
                {name: _synced(fn, device) for name, fn in cases.items()},
                repeats * (4 if seq == 1 else 1),
            )
        show(f"mixed batch [8 rows x {seq} tokens]", stats)
        med = {k: v["median"] for k, v in stats.items()}
        ratios = {
            "lora_kit_mixed_over_single": med["lora_kit 8 rows, 8 adapters"]
            / med["lora_kit 8 rows, 1 adapter"],
            "peft_mixed_over_single": med["PEFT 8 rows, 8 adapters (adapter_names)"]
            / med["PEFT 8 rows, 1 adapter"],
            "throughput_vs_peft_mixed": med["PEFT 8 rows, 8 adapters (adapter_names)"]
            / med["lora_kit 8 rows, 8 adapters"],
            # Upper bound of the ratio above: a mixed batch cannot beat the bare base model.
            "peft_mixed_over_base": med["PEFT 8 rows, 8 adapters (adapter_names)"]
            / med["base model alone (no LoRA)"],
            "lora_kit_mixed_over_base": med["lora_kit 8 rows, 8 adapters"]
            / med["base model alone (no LoRA)"],
        }
        low = {k: v["min"] for k, v in stats.items()}  # least disturbed by other processes
        ratios["lora_kit_mixed_over_single_min"] = (
            low["lora_kit 8 rows, 8 adapters"] / low["lora_kit 8 rows, 1 adapter"]
        )
        ratios["throughput_vs_peft_mixed_min"] = (
            low["PEFT 8 rows, 8 adapters (adapter_names)"] / low["lora_kit 8 rows, 8 adapters"]
        )
        out["mixed"][f"seq{seq}"] = ratios
        print("  ratios:", json.dumps({k: round(v, 3) for k, v in ratios.items()}))

    if only == "mixed":
        return

    # -- load from disk with 8 resident ---------------------------------------------------------
    out["load_speedup"], _ = compare_loads(8, repeats * 2)

    _swap(kind, lm, pm, paths, repeats, out, device)

    # -- set_adapter latency vs adapter count ---------------------------------------------------
    calls = 2000
    sel: dict[str, Callable[[], object]] = {}
    toggle = [0]

    def lk_switch() -> None:
        toggle[0] ^= 1
        lm.set_adapter("a1" if toggle[0] else "a0")

    ptoggle = [0]

    def peft_switch() -> None:
        ptoggle[0] ^= 1
        pm.set_adapter("a1" if ptoggle[0] else "a0")

    sel["lora_kit set_adapter, 8 resident"] = per_call(lk_switch, calls)
    sel["PEFT set_adapter, 8 resident"] = per_call(peft_switch, 20)
    stats8 = interleaved(sel, repeats)
    show(
        "set_adapter latency (per switch)",
        {"lora_kit set_adapter, 8 resident": stats8["lora_kit set_adapter, 8 resident"]},
        calls,
    )
    show("", {"PEFT set_adapter, 8 resident": stats8["PEFT set_adapter, 8 resident"]}, 20)
    out["set_adapter_us"] = {
        "lora_kit_8": stats8["lora_kit set_adapter, 8 resident"]["median"] / calls * 1e6
    }
    out["set_adapter_us"]["peft_8"] = stats8["PEFT set_adapter, 8 resident"]["median"] / 20 * 1e6

    # 100 resident (real tensors): lora_kit and PEFT; also measures memory per adapter.
    gc.collect()
    rss0 = rss_bytes()
    for i in range(8, 100):
        lm.load_adapter(paths[i % 8], f"a{i}")
    gc.collect()
    rss_lk = (rss_bytes() - rss0) / 92
    tensor_bytes = sum(p.numel() * p.element_size() for p in lm.adapter_parameters("a0"))
    out["memory"] = {
        "file_bytes": file_bytes,
        "tensor_bytes_per_adapter": tensor_bytes,
        "rss_bytes_per_adapter": rss_lk,
    }
    print(
        f"\n## memory per resident adapter (100 resident): tensors {tensor_bytes / 1e6:.2f} MB, "
        f"RSS growth {rss_lk / 1e6:.2f} MB, file {file_bytes / 1e6:.2f} MB "
        f"(RSS/file {rss_lk / file_bytes:.2f})"
    )
    for i in range(8, 100):
        pm.load_adapter(str(paths[i % 8]), adapter_name=f"a{i}")
    stats = interleaved(
        {
            "lora_kit set_adapter, 100 resident": per_call(lk_switch, calls),
            "PEFT set_adapter, 100 resident": per_call(peft_switch, 5),
        },
        repeats,
    )
    show(
        "set_adapter latency (per switch), lora_kit",
        {"lora_kit set_adapter, 100 resident": stats["lora_kit set_adapter, 100 resident"]},
        calls,
    )
    show(
        "set_adapter latency (per switch), PEFT",
        {"PEFT set_adapter, 100 resident": stats["PEFT set_adapter, 100 resident"]},
        5,
    )
    out["set_adapter_us"]["lora_kit_100"] = (
        stats["lora_kit set_adapter, 100 resident"]["median"] / calls * 1e6
    )
    out["set_adapter_us"]["peft_100"] = stats["PEFT set_adapter, 100 resident"]["median"] / 5 * 1e6

    # -- forward overhead with many resident adapters --------------------------------------------
    x1 = inputs(kind, *forward_shape)
    shape = f"{forward_shape[0]} x {forward_shape[1]} tokens"
    with torch.no_grad():
        lm.set_adapter("a0")
        pm.set_adapter("a0")
        stats = interleaved(
            {
                "base model alone": lambda: plain(**x1),
                "lora_kit a0 active, 100 resident": lambda: lm(**x1),
                "PEFT a0 active, 100 resident": lambda: pm(**x1),
            },
            repeats,
        )
    show(f"unmerged single-adapter forward [{shape}]", stats)
    base_t = stats["base model alone"]["median"]
    out["forward_overhead_100"] = {
        "lora_kit": stats["lora_kit a0 active, 100 resident"]["median"] / base_t - 1,
        "peft": stats["PEFT a0 active, 100 resident"]["median"] / base_t - 1,
    }
    print(
        "  overhead over base:",
        json.dumps({k: f"{v:+.1%}" for k, v in out["forward_overhead_100"].items()}),
    )

    # 1000 resident for lora_kit: 900 extra names aliasing a0's tensors (see module docstring).
    for i in range(100, 1000):
        alias = f"a{i}"
        record = lm.adapter_record("a0")
        for module in record.modules:
            layer = lm._layer(module)
            layer.adapters[alias] = layer.adapter("a0")
        lm._adapters[alias] = lk.AdapterRecord(alias, record.config, record.modules, ())
    stats = interleaved(
        {"lora_kit set_adapter, 1000 resident": per_call(lk_switch, calls)}, repeats
    )
    show("set_adapter latency (per switch)", stats, calls)
    out["set_adapter_us"]["lora_kit_1000"] = (
        stats["lora_kit set_adapter, 1000 resident"]["median"] / calls * 1e6
    )
    with torch.no_grad():
        stats = interleaved(
            {
                "base model alone": lambda: plain(**x1),
                "lora_kit a0 active, 1000 resident": lambda: lm(**x1),
            },
            repeats,
        )
    show(f"unmerged single-adapter forward [{shape}], 1000 resident", stats)
    out["forward_overhead_1000_lora_kit"] = (
        stats["lora_kit a0 active, 1000 resident"]["median"] / stats["base model alone"]["median"]
        - 1
    )
    print(f"  overhead over base: {out['forward_overhead_1000_lora_kit']:+.1%}")


def _forward_overhead(
    kind: str,
    lm: lk.LoraModel,
    pm: Any,
    plain: nn.Module,
    paths: list[Path],
    repeats: int,
    shape: tuple[int, int],
    out: dict[str, Any],
) -> None:
    """Forward overhead over the bare base with 100 adapters resident on both sides.

    Adds a paired figure: each round times base, lora_kit and PEFT back to back (in a fresh
    random order, `benchmarks.harness.interleaved`); each library's overhead is the median of
    its per-round ratios to the base, and the paired lk/peft ratio of those comes with a 90%
    bootstrap interval over the rounds (`benchmarks.harness.overhead_ratio_interval`).
    """
    from benchmarks.harness import interleaved as paired_rounds
    from benchmarks.harness import overhead_ratio_interval

    _load_resident(lm, pm, paths, range(1, 100))
    lm.set_adapter("a0")
    pm.set_adapter("a0")
    x = inputs(kind, *shape)
    cases = {"base": lambda: plain(**x), "lora_kit": lambda: lm(**x), "peft": lambda: pm(**x)}
    with torch.no_grad():
        stats = paired_rounds(cases, repeats, warmup=1, clock=clock)
    ratio, low, high = overhead_ratio_interval(stats["lora_kit"], stats["peft"], stats["base"])
    result = {
        "lora_kit": stats["lora_kit"].median / stats["base"].median - 1,
        "peft": stats["peft"].median / stats["base"].median - 1,
        "paired_lk_over_peft": ratio,
        "paired_90ci": [low, high],
    }
    out["forward_overhead_100"] = result
    print(
        f"\n## unmerged single-adapter forward [{shape[0]} x {shape[1]} tokens], 100 resident, "
        f"{repeats} rounds: base median {stats['base'].median * 1e3:.1f} ms, overhead "
        f"lora_kit {result['lora_kit']:+.1%}, PEFT {result['peft']:+.1%}; paired lk/peft "
        f"{ratio:.2f} (90% CI {low:.2f}-{high:.2f})"
    )


def _swap(
    kind: str,
    lm: lk.LoraModel,
    pm: Any,
    paths: list[Path],
    repeats: int,
    out: dict[str, Any],
    device: str = "cpu",
) -> None:
    """In-place swap from disk: lora_kit ``swap_adapter`` vs PEFT ``hotswap_adapter``.

    The resident adapter is loaded with ``max_rank=8``, so it is packed and a file at rank 8
    over the same modules is swapped with one copy (`lora_kit.swap_packed`). Rows:

    - "from disk": another adapter of the same recipe (modules, ranks, config, base), the
      serving case: what lora_kit remembers across such files (the checked tensor part of
      the header, the parsed config text, the checked base fingerprint text) is kept; every
      byte of the file is read and its metadata parsed and checked;
    - "first of its recipe": forgets all of that first (the worst case);
    - "rank 4 into max_rank 8": another rank, so the general path (padding), from disk;
    - "parsed AdapterFiles": the general path from tensors already in memory.

    On a GPU (``device``) each swap waits for the device's copies to finish.
    """
    from peft.utils.hotswap import hotswap_adapter

    lm.load_adapter(paths[0], "live", max_rank=8)
    low_rank = _rank4_adapter(kind, paths[0].parent)
    flip = [0]

    def lk_swap() -> None:
        flip[0] ^= 1
        lm.swap_adapter("live", paths[flip[0]])

    def lk_swap_first() -> None:
        _forget_recipes(lm)
        flip[0] ^= 1
        lm.swap_adapter("live", paths[flip[0]])

    def lk_swap_low_rank() -> None:
        lm.swap_adapter("live", low_rank)

    pflip = [0]

    def peft_swap() -> None:
        pflip[0] ^= 1
        hotswap_adapter(pm, str(paths[pflip[0]]), adapter_name="a0")

    parsed = [lk.read_adapter(p) for p in paths[:2]]

    def lk_swap_parsed() -> None:
        flip[0] ^= 1
        lm.swap_adapter("live", parsed[flip[0]])

    # Every swap puts in other factors than the live ones.
    swaps: dict[str, Callable[[], object]] = {
        "lora_kit swap_adapter (from disk)": lk_swap,
        "lora_kit swap_adapter (from disk, first of its recipe)": lk_swap_first,
        "lora_kit swap_adapter (from disk, rank 4 into max_rank 8)": lk_swap_low_rank,
        "lora_kit swap_adapter (parsed AdapterFiles)": lk_swap_parsed,
    }
    if kind == "gpt2":  # PEFT's hotswap_adapter does not handle modules_to_save (BERT's head)
        swaps["PEFT hotswap_adapter (from disk)"] = peft_swap
    stats = interleaved({n: _synced(fn, device) for n, fn in swaps.items()}, repeats * 4)
    show("in-place swap from disk", stats)
    out["swap_ms"] = stats["lora_kit swap_adapter (from disk)"]["median"] * 1e3
    out["swap_first_ms"] = (
        stats["lora_kit swap_adapter (from disk, first of its recipe)"]["median"] * 1e3
    )
    out["swap_rank4_ms"] = (
        stats["lora_kit swap_adapter (from disk, rank 4 into max_rank 8)"]["median"] * 1e3
    )
    out["swap_parsed_ms"] = stats["lora_kit swap_adapter (parsed AdapterFiles)"]["median"] * 1e3
    if "PEFT hotswap_adapter (from disk)" in stats:
        out["swap_speedup"] = (
            stats["PEFT hotswap_adapter (from disk)"]["median"]
            / stats["lora_kit swap_adapter (from disk)"]["median"]
        )
        print(f"  lora_kit is {out['swap_speedup']:.1f}x faster")
    else:
        print("  PEFT: hotswap_adapter raises KeyError on modules_to_save keys (not comparable)")


def _rank4_adapter(kind: str, root: Path) -> Path:
    """A rank-4 adapter over the same modules as `make_library`'s (swapped via padding)."""
    base, preset, _, _ = build(kind)
    heads = ("classifier",) if kind == "bert" else ()
    lm = lk.inject(base, lk.LoraConfig(r=4, alpha=16, targets=preset, modules_to_save=heads), "r4")
    randomize(lm, "r4", seed=99)
    return lm.save_adapter(root / f"{kind}-rank4", "r4")


def _forget_recipes(lm: lk.LoraModel) -> None:
    """`_forget_headers`, and the remembered config texts, and for each adapter the layouts
    fitting a config and the fingerprint texts checked (`lora_kit.swap_packed`)."""
    from lora_kit import adapter_io
    from lora_kit.swap_plan import _PLANS

    _forget_headers()
    adapter_io._CONFIGS.clear()
    for plan in _PLANS.get(lm, {}).values():
        memo = plan.memo.get("packed")
        if memo is not None:
            memo.fits.clear()  # type: ignore[attr-defined]
            memo.fingerprints.clear()  # type: ignore[attr-defined]


def _check_same_work(kind: str, plain: nn.Module, lm: lk.LoraModel, pm: Any, device: str) -> None:
    """Raise unless both sides, loaded from the same file, adapt the same modules alike and agree.

    One small forward per side (`benchmarks.same_work`): adapted modules, ranks, scalings, zero
    dropout, eval mode, and outputs equal to 1e-4 of their scale but unlike the bare base's.
    """
    from benchmarks.same_work import SameWorkError, check_eval, check_same_outputs, check_twins

    check_twins(lm, pm, "a0", "a0")
    check_eval({"base": plain, "lora_kit": lm, "peft": pm})
    if list(pm.active_adapters) != ["a0"]:
        raise SameWorkError(f"PEFT's active adapters are {pm.active_adapters}, expected ['a0']")
    x = {k: v.to(device) for k, v in inputs(kind, 1, 8).items()}
    with torch.no_grad(), lm.using("a0"):  # leaves lora_kit's default selection as it was
        check_same_outputs(f"{kind} adapter a0", plain(**x), lm(**x), pm(**x))


def _check_same_mixed(
    kind: str, plain: nn.Module, lm: lk.LoraModel, pm: Any, names: list[str], device: str
) -> None:
    """Raise unless both sides' mixed batches (one adapter per row) agree (`_check_same_work`)."""
    from benchmarks.same_work import check_same_outputs

    x = {k: v.to(device) for k, v in inputs(kind, len(names), 4).items()}
    with torch.no_grad():
        check_same_outputs(
            f"{kind} mixed batch of {len(names)} adapters",
            plain(**x),
            lm(**x, adapter_names=names),
            pm(**x, adapter_names=names),
        )


def _forget_headers() -> None:
    """Drop lora_kit's remembered safetensors headers (`lora_kit.safetensors_read`).

    lora_kit remembers checked headers by their tensor part (keys, dtypes, shapes, offsets),
    which files of one recipe share: a timed load after this parses and checks the whole
    header, as for the first file of its shape, while PEFT parses every header.
    """
    from lora_kit.safetensors_read import _memo_layout

    _memo_layout.cache_clear()


def _synced(fn: Callable[[], object], device: str) -> Callable[[], object]:
    """``fn``, then wait for the device to finish its work (so wall time covers it)."""
    if device == "cpu":
        return fn

    def run() -> None:
        fn()
        torch.cuda.synchronize()

    return run


def _load_resident(lm: lk.LoraModel, pm: Any, paths: list[Path], numbers: range) -> None:
    """Load adapters ``a{i}`` (from the library, cyclically) on both sides."""
    for i in numbers:
        lm.load_adapter(paths[i % len(paths)], f"a{i}")
        pm.load_adapter(str(paths[i % len(paths)]), adapter_name=f"a{i}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,bert")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only-mixed", action="store_true", help="Only the mixed-batch figures.")
    parser.add_argument(
        "--only-swap", action="store_true", help="Only the in-place swap from disk."
    )
    parser.add_argument(
        "--only-forward",
        action="store_true",
        help="Only the forward overhead with 100 resident, with per-round paired ratios.",
    )
    parser.add_argument(
        "--forward-shape", default="1x32", help="ROWSxTOKENS for the forward-overhead input"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or this thread's CPU time (steadier on a shared machine)",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="Run --only-mixed or --only-swap on this device, e.g. cuda (wall clock)",
    )
    args = parser.parse_args()
    on_device = (args.only_mixed or args.only_swap) and args.clock == "wall"
    if args.device != "cpu" and not on_device:
        parser.error("--device other than cpu runs --only-mixed or --only-swap, with --clock wall")
    global clock
    clock = CLOCKS[args.clock]
    print(f"clock: {args.clock}, torch {torch.__version__}, 1 thread, device {args.device}")
    torch.set_num_threads(1)
    rows, seq = (int(v) for v in args.forward_shape.split("x"))
    only = next((n for n in ("mixed", "forward", "swap") if getattr(args, f"only_{n}")), None)
    results: dict[str, Any] = {}
    for kind in args.models.split(","):
        run(kind, args.repeats, results, only, (rows, seq), args.device)
        gc.collect()
    print("\nJSON " + json.dumps(results))


if __name__ == "__main__":
    main()
