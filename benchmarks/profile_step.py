"""Where a training step's time goes, lora_kit vs PEFT: kernels, CUDA time and CPU time per step.

Run on a GPU: ``python -m benchmarks.profile_step [--precision bf16] [--models gpt2,bert]``.
Prints, per case, the step's wall time, the summed CUDA kernel time, the number of kernel
launches and the top kernels, from ``torch.profiler`` over a few steps after warm-up; then a
timing run in both orders (lora_kit first, PEFT first) so that position in the round cannot
masquerade as a difference.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_train import _base, _batch, _prepare, _step_fn, _sync

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of this script


def _profile(name: str, fn: Callable[[], None], steps: int) -> None:
    for _ in range(3):
        fn()
    _sync(DEVICE)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        _sync(DEVICE)
        wall = (time.perf_counter() - start) / steps
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    cuda_us = sum(e.device_time for e in kernels) / steps
    print(
        f"{name}: wall {wall * 1e3:.2f} ms/step (under the profiler), kernels "
        f"{len(kernels) / steps:.0f}/step, CUDA busy {cuda_us / 1e3:.2f} ms/step"
    )
    table = prof.key_averages().table(sort_by="device_time_total", row_limit=12)
    print(table)


def _timing(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(rounds + 3):
        for name, fn in fns.items():
            _sync(DEVICE)
            start = time.perf_counter()
            fn()
            _sync(DEVICE)
            if i >= 3:
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2,bert")
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--no-profile", action="store_true")
    args = parser.parse_args()
    for kind in args.models.split(","):
        base = _base(kind).to(DEVICE)
        fns = {
            case: _step_fn(
                *_prepare(kind, case, copy.deepcopy(base)),
                _batch(kind, args.batch, args.seq),
                args.precision,
            )
            for case in ("lora_kit", "peft")
        }
        if not args.no_profile:
            for case, fn in fns.items():
                _profile(f"{kind} {args.precision} {case}", fn, args.steps)
        first = _timing(fns, args.rounds)
        second = _timing(dict(reversed(fns.items())), args.rounds)
        print(
            f"{kind} {args.precision} medians ms: lora_kit first "
            f"{first['lora_kit'] * 1e3:.2f}/{first['peft'] * 1e3:.2f} (lk/peft), PEFT first "
            f"{second['lora_kit'] * 1e3:.2f}/{second['peft'] * 1e3:.2f}; peft/lk "
            f"{first['peft'] / first['lora_kit']:.3f}, {second['peft'] / second['lora_kit']:.3f}"
        )


if __name__ == "__main__":
    main()
