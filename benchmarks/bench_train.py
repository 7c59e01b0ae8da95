"""Training-step throughput and memory: lora_kit LoRA vs PEFT LoRA vs full fine-tuning.

Run ``python -m benchmarks.bench_train [--steps N] [--batch B] [--seq T] [--json]``
(add ``--device cuda --precision bf16|fp16|fp32`` on a GPU).

One training step = forward, backward and an AdamW step over the trainable tensors, on the same
model, batch and precision (default fp32, CPU, 1 thread; bf16/fp16 use autocast, fp16 also a
GradScaler, as the trainer does). Timings interleave lora_kit and PEFT (A B A B) in one process
after warm-up. On CPU, memory is measured per case in a fresh subprocess (peak RSS from
``/proc/self/status`` ``VmHWM``, minus the RSS after the model was built), so one case's
allocator history cannot hide another's; on CUDA it is the allocator's peak
(``torch.cuda.max_memory_allocated``) minus what was allocated after the model was built.
Models: GPT-2 small shape (r=8, c_attn/c_proj/c_fc) and BERT-base shape for sequence
classification (r=8, query/key/value/dense), built from config.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

CASES = ("lora_kit", "peft", "full")


def _base(kind: str, num_labels: int = 2) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    config = BertConfig(
        num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    return BertForSequenceClassification(config)


def _prepare(kind: str, case: str, base: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    if case == "full":
        return base, list(base.parameters())
    if case == "lora_kit":
        import lora_kit as lk

        targets: tuple[str, ...] = (
            ("c_attn", "c_proj", "c_fc") if kind == "gpt2" else ("query", "key", "value", "dense")
        )
        heads = ("classifier",) if kind == "bert" else ()
        lm = lk.inject(base, lk.LoraConfig(r=8, alpha=16, targets=targets, modules_to_save=heads))
        return lm, lm.adapter_parameters("default")
    from peft import LoraConfig, get_peft_model

    if kind == "gpt2":
        config = LoraConfig(
            r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True
        )
    else:
        config = LoraConfig(
            r=8,
            lora_alpha=16,
            target_modules=["query", "key", "value", "dense"],
            task_type="SEQ_CLS",
        )
    model = get_peft_model(base, config)
    return model, [p for p in model.parameters() if p.requires_grad]


def _batch(kind: str, batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 30000, (batch, seq), generator=g)  # [B, T]
    labels = ids if kind == "gpt2" else torch.randint(0, 2, (batch,), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _step_fn(
    model: nn.Module,
    params: list[nn.Parameter],
    batch: dict[str, torch.Tensor],
    precision: str = "fp32",
) -> Callable[[], None]:
    from lora_kit.train import resolve_precision

    device = next(model.parameters()).device
    plan = resolve_precision(precision, device)
    batch = {k: v.to(device) for k, v in batch.items()}
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    scaler = plan.scaler()
    model.train()

    def step() -> None:
        with plan.autocast():
            loss = model(**batch).loss
        scaler.scale(loss.float()).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def measure_memory(kind: str, case: str, batch: int, seq: int) -> dict[str, float]:
    """Run in a fresh process: peak RSS growth over 2 steps after the model was built."""
    torch.set_num_threads(1)
    model, params = _prepare(kind, case, _base(kind))
    step = _step_fn(model, params, _batch(kind, batch, seq))
    before = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:  # reset VmHWM to the current RSS
        handle.write("5")
    step()
    step()
    peak = _rss_kib("VmHWM")
    return {"peak_step_mib": (peak - before) / 1024, "trainable": sum(p.numel() for p in params)}


def measure_cuda_memory(
    kind: str, case: str, batch: int, seq: int, precision: str
) -> dict[str, float]:
    """Allocator peak over 2 steps, minus what the built model holds (CUDA, in process)."""
    model, params = _prepare(kind, case, _base(kind).cuda())
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step = _step_fn(model, params, _batch(kind, batch, seq), precision)
    step()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    trainable = sum(p.numel() for p in params)
    del model, params, step
    torch.cuda.empty_cache()
    return {"peak_step_mib": (peak - before) / 2**20, "trainable": trainable}


def _check_same_training(prepared: dict[str, tuple[nn.Module, list[nn.Parameter]]]) -> None:
    """Raise unless both sides adapt the same modules alike and train as many parameters.

    The adapted modules, ranks, scalings and zero dropout (`benchmarks.same_work.check_twins`),
    and the trainable element count (LoRA factors plus, for BERT, the classifier head).
    """
    from lora_kit import LoraModel

    from .same_work import SameWorkError, check_twins

    (ours, ours_params), (theirs, theirs_params) = prepared["lora_kit"], prepared["peft"]
    if not isinstance(ours, LoraModel):
        raise SameWorkError(f"lora_kit's case built a {type(ours).__name__}, not a LoraModel")
    check_twins(ours, theirs, "default", "default")
    counts = [sum(p.numel() for p in params) for params in (ours_params, theirs_params)]
    if counts[0] != counts[1]:
        raise SameWorkError(f"trainable elements differ: lora_kit {counts[0]}, PEFT {counts[1]}")


def measure_speed(
    kind: str,
    steps: int,
    warmup: int,
    batch: int,
    seq: int,
    device: str = "cpu",
    precision: str = "fp32",
) -> dict[str, Any]:
    """Interleaved lora_kit/PEFT steps on twin models; median seconds and tokens/s."""
    base = _base(kind).to(device)
    prepared = {case: _prepare(kind, case, copy.deepcopy(base)) for case in ("lora_kit", "peft")}
    _check_same_training(prepared)
    fns = {
        case: _step_fn(model, params, _batch(kind, batch, seq), precision)
        for case, (model, params) in prepared.items()
    }
    times: dict[str, list[float]] = {case: [] for case in fns}
    for round_ in range(warmup + steps):
        for case, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            if round_ >= warmup:
                times[case].append(time.perf_counter() - start)
    tokens = batch * seq
    return {
        case: {
            "median_s": statistics.median(t),
            "min_s": min(t),
            "max_s": max(t),
            "tokens_per_s": tokens / statistics.median(t),
        }
        for case, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--models", default="gpt2,bert")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--skip-memory", action="store_true", help="timings only")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    parser.add_argument("--memory-case", nargs=2, metavar=("KIND", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_case:
        print(json.dumps(measure_memory(*args.memory_case, args.batch, args.seq)))
        return
    if args.device == "cpu":
        torch.set_num_threads(1)
    rows = []
    for kind in args.models.split(","):
        speed = measure_speed(
            kind, args.steps, args.warmup, args.batch, args.seq, args.device, args.precision
        )
        memory = {case: {"peak_step_mib": float("nan"), "trainable": 0} for case in CASES}
        for case in () if args.skip_memory or args.device == "cuda" else CASES:
            out = subprocess.run(
                [sys.executable, "-m", "benchmarks.bench_train", "--memory-case", kind, case,
                 "--batch", str(args.batch), "--seq", str(args.seq)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            memory[case] = json.loads(out.stdout.strip().splitlines()[-1])
        for case in CASES if args.device == "cuda" and not args.skip_memory else ():
            memory[case] = measure_cuda_memory(kind, case, args.batch, args.seq, args.precision)
        ratio = speed["peft"]["median_s"] / speed["lora_kit"]["median_s"]
        for case in CASES:
            rows.append(
                {
                    "model": kind,
                    "case": case,
                    "tokens_per_s": round(speed[case]["tokens_per_s"], 1)
                    if case in speed
                    else None,
                    "step_s_median": round(speed[case]["median_s"], 3) if case in speed else None,
                    "step_s_min_max": (
                        f"{speed[case]['min_s']:.3f}-{speed[case]['max_s']:.3f}"
                        if case in speed
                        else None
                    ),
                    "peak_step_mib": round(memory[case]["peak_step_mib"], 1),
                    "trainable": memory[case]["trainable"],
                    "speedup_vs_peft": round(ratio, 3) if case == "lora_kit" else None,
                }
            )
    if args.json:
        print(
            json.dumps(
                {
                    "benchmark": "train_step",
                    "device": args.device,
                    "precision": args.precision,
                    "batch": args.batch,
                    "seq": args.seq,
                    "rows": rows,
                }
            )
        )
        return
    where = "CPU 1 thread" if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"\n## training step, {args.precision} {where}, batch {args.batch} x {args.seq} tokens")
    keys = list(rows[0])
    widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths, strict=True)))


if __name__ == "__main__":
    main()
