"""The trainer's CUDA paths, checked and timed: fp32, bf16, fp16 (+ GradScaler) and ``auto``.

Run on a CUDA machine: ``python -m benchmarks.cuda_train_check [--steps 40] [--json]``.

For the GPT-2 small shape (causal LM, r=8, all projections) and the BERT-base shape (3-class
sequence classification, r=8, query/key/value/dense + head), built from config, each precision
trains the same seeded adapter on the same learnable synthetic data with `lora_kit.train.train`
and reports: the plan ``auto`` resolved to, whether a GradScaler ran, the adapter's dtype after
training (must stay fp32), skipped steps, the mean training loss over the first and the last 5
steps, the final eval loss (and accuracy for BERT), its difference from the fp32 run, and the
trainer's median tokens/s.
It then checks resume on CUDA (a run stopped at step 8 of 12 and resumed vs an uninterrupted
one, fp32) and exits 1 if any check fails. Not a test: CI has no GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import lora_kit as lk
from benchmarks.bench_train import _base
from lora_kit.train import (
    Dataset,
    Example,
    StepInfo,
    TrainConfig,
    read_checkpoint,
    resolve_precision,
    train,
)

PRECISIONS = ("fp32", "bf16", "fp16", "auto")


def _data(kind: str, n: int, seq: int) -> tuple[Dataset, Dataset]:
    """Learnable synthetic data: arithmetic token runs (LM), or a class-marked vocabulary (cls)."""
    rng = random.Random(0)
    examples = []
    for _ in range(n):
        if kind == "gpt2":
            start, stride = rng.randrange(100, 20000), rng.choice((1, 2, 3))
            examples.append(Example(tuple(start + stride * i for i in range(seq))))
        else:
            label = rng.randrange(3)
            ids = tuple(1000 + 300 * label + rng.randrange(300) for _ in range(seq))
            examples.append(Example(ids, label))
    if kind == "gpt2":
        return Dataset("causal-lm", tuple(examples)).split(0.1, seed=0)
    return Dataset("seq-cls", tuple(examples), ("a", "b", "c")).split(0.1, seed=0)


def _inject(kind: str, device: str) -> lk.LoraModel:
    heads = ("classifier",) if kind == "bert" else ()
    model = _base(kind, num_labels=3).to(device)
    return lk.inject(model, lk.LoraConfig(r=8, alpha=16, modules_to_save=heads))


def _run(
    kind: str, precision: str, steps: int, batch: int, seq: int, tmp: Path, device: str
) -> dict[str, Any]:
    lm = _inject(kind, device)
    train_set, eval_set = _data(kind, steps * batch + 64, seq)
    out = tmp / f"{kind}-{precision}"
    losses: list[StepInfo] = []
    config = TrainConfig(
        out=str(out), steps=steps, batch_size=batch, lr=1e-3, precision=precision,  # type: ignore[arg-type]
        warmup_steps=2, schedule="constant",
    )  # fmt: skip
    result = train(lm, train_set, config, eval_data=eval_set, callbacks=[losses.append])
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in log if r.get("event") == "train"]
    rates = rates[2:] or rates  # the first steps warm up
    dtypes = {str(p.dtype) for p in lm.adapter_parameters("default")}
    return {
        "model": kind,
        "precision": precision,
        "resolved": resolve_precision(precision, torch.device(device)).name,
        # A GradScaler that ran leaves its scale in the checkpoint; a disabled one saves {}.
        "scaler": bool(read_checkpoint(out).state["scaler"]),
        "adapter_dtypes": sorted(dtypes),
        "skipped": sum(i.skipped for i in losses),
        "loss_first5": round(statistics.mean(i.loss for i in losses[:5]), 4),
        "loss_last5": round(statistics.mean(i.loss for i in losses[-5:]), 4),
        "eval_loss": round(result.metrics["eval_loss"], 4),
        "eval_accuracy": round(result.metrics.get("eval_accuracy", float("nan")), 4),
        "tokens_per_s": round(statistics.median(rates), 1),
    }


class _StopError(Exception):
    pass


def _stop_at_8(info: StepInfo) -> None:
    if info.step == 8:
        raise _StopError


def _resume_check(tmp: Path, device: str) -> dict[str, Any]:
    train_set, _ = _data("gpt2", 12 * 4 + 8, 128)

    def config(out: Path) -> TrainConfig:
        return TrainConfig(out=str(out), steps=12, batch_size=4, save_every=4, precision="fp32")

    whole = _inject("gpt2", device)
    train(whole, train_set, config(tmp / "whole"))
    stopped = _inject("gpt2", device)
    with contextlib.suppress(_StopError):
        train(stopped, train_set, config(tmp / "resumed"), callbacks=[_stop_at_8])
    resumed = _inject("gpt2", device)
    train(resumed, train_set, config(tmp / "resumed"), resume=True)
    pairs = zip(
        whole.adapter_parameters("default"), resumed.adapter_parameters("default"), strict=True
    )
    diff = max(float((a - b).detach().abs().max()) for a, b in pairs)
    return {"check": f"resume fp32 {device}, stopped at 8/12", "max_abs_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script")
    parser.add_argument("--precisions", default=",".join(PRECISIONS))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("cuda_train_check needs a CUDA GPU")
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("gpt2", "bert"):
            for precision in args.precisions.split(","):
                row = _run(
                    kind, precision, args.steps, args.batch, args.seq, Path(tmp), args.device
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
        resume = _resume_check(Path(tmp), args.device)
    print(json.dumps(resume), flush=True)
    by = {(r["model"], r["precision"]): r for r in rows}
    for r in rows:
        ref = by[(r["model"], "fp32")]
        r["eval_loss_vs_fp32"] = round(r["eval_loss"] - ref["eval_loss"], 4)
        where = f"{r['model']} {r['precision']}"
        if r["adapter_dtypes"] != ["torch.float32"]:
            failures.append(f"{where}: adapter dtype {r['adapter_dtypes']}")
        if not r["loss_last5"] < r["loss_first5"]:
            failures.append(f"{where}: loss did not fall ({r['loss_first5']} -> {r['loss_last5']})")
        if r["scaler"] != (r["resolved"] == "fp16"):
            failures.append(f"{where}: GradScaler {'on' if r['scaler'] else 'off'}")
        if abs(r["eval_loss_vs_fp32"]) > 0.05 * max(ref["eval_loss"], 0.1) + 0.02:
            failures.append(f"{where}: eval loss {r['eval_loss']} vs fp32 {ref['eval_loss']}")
    if args.device == "cuda" and ("gpt2", "auto") in by:
        auto = by[("gpt2", "auto")]["resolved"]
        expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if auto != expected:
            failures.append(f"auto resolved to {auto}, expected {expected}")
    if resume["max_abs_diff"] != 0.0:
        failures.append(f"resume differs from an uninterrupted run: {resume['max_abs_diff']}")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    report = {"device": name, "torch": torch.__version__, "rows": rows,
              "resume": resume, "failures": failures}  # fmt: skip
    if args.json:
        print(json.dumps(report))
    else:
        print(f"\n## trainer on {report['device']} (torch {report['torch']})")
        keys = [k for k in rows[0] if k != "adapter_dtypes"]
        widths = [max(len(k), *(len(str(r[k])) for r in rows)) for k in keys]
        print("  ".join(k.ljust(w) for k, w in zip(keys, widths, strict=True)))
        for r in rows:
            print("  ".join(str(r[k]).ljust(w) for k, w in zip(keys, widths, strict=True)))
        print(f"resume: {resume}")
        print("failures: " + ("; ".join(failures) or "none"))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
