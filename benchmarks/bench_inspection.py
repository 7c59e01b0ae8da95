"""Inspecting an adapter: lora_kit's factor-based norms/singular values vs. the dense route.

The dense route is what one does with PEFT (no inspect command): ``get_delta_weight`` per module
(a dense ``[out, in]`` matrix), then its Frobenius norm and singular values. lora_kit gets the
same figures from the ``r x r`` Gram/QR cores. Shapes: GPT-2 small's ``c_attn`` (768 -> 2304),
r=16, 4 modules. Interleaved A B A B in one process, one thread; medians and the ratio are
reported (absolute times on a shared machine are noisy, the ratio less so).

Run: ``python -m benchmarks.bench_inspection``
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

import torch

from lora_kit.inspection import delta_norm, effective_rank, singular_values

IN, OUT, R, MODULES, SCALING = 768, 2304, 16, 4, 2.0


def _peft_layers() -> list[torch.nn.Module]:
    import peft
    from torch import nn

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.ModuleList(nn.Linear(IN, OUT) for _ in range(MODULES))

    model = peft.get_peft_model(
        Stack(),
        peft.LoraConfig(r=R, lora_alpha=int(R * SCALING), target_modules=["0", "1", "2", "3"]),
    )
    gen = torch.Generator().manual_seed(0)
    layers = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if hasattr(module, "get_delta_weight") and name.endswith(("0", "1", "2", "3")):
                module.lora_A["default"].weight.copy_(torch.randn(R, IN, generator=gen) * 0.02)
                module.lora_B["default"].weight.copy_(torch.randn(OUT, R, generator=gen) * 0.02)
                layers.append(module)
    return layers


def main() -> None:
    torch.set_num_threads(1)
    layers = _peft_layers()
    factors = [
        (m.lora_A["default"].weight.detach(), m.lora_B["default"].weight.detach()) for m in layers
    ]

    def lora_kit_route() -> list[tuple[float, int]]:
        return [
            (delta_norm(a, b, SCALING), effective_rank(singular_values(a, b, SCALING)))
            for a, b in factors
        ]

    @torch.no_grad()
    def dense_route() -> list[tuple[float, int]]:
        out = []
        for module in layers:
            delta = module.get_delta_weight("default").double()  # [out, in], dense
            values = torch.linalg.svdvals(delta)
            out.append((float(torch.linalg.matrix_norm(delta)), effective_rank(values)))
        return out

    cases: dict[str, Callable[[], list[tuple[float, int]]]] = {
        "lora_kit (factors)": lora_kit_route,
        "dense via PEFT get_delta_weight": dense_route,
    }
    mine, ref = lora_kit_route(), dense_route()
    for (n1, r1), (n2, r2) in zip(mine, ref, strict=True):
        assert abs(n1 - n2) <= 1e-6 * n2 and r1 == r2, (n1, n2, r1, r2)
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(1):  # warm-up
        for fn in cases.values():
            fn()
    for _ in range(5):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    rows = {
        k: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v)}
        for k, v in times.items()
    }
    ratio = (
        rows["dense via PEFT get_delta_weight"]["median_s"] / rows["lora_kit (factors)"]["median_s"]
    )
    print(f"inspect {MODULES} modules {OUT}x{IN}, r={R}, 1 thread, 5 interleaved repeats")
    for name, row in rows.items():
        print(
            f"  {name:<34} median {row['median_s'] * 1e3:9.2f} ms  "
            f"(min {row['min_s'] * 1e3:.2f}, max {row['max_s'] * 1e3:.2f})"
        )
    print(f"  speed-up of lora_kit: {ratio:.1f}x (same norms to 1e-6, same effective ranks)")
    print(json.dumps({"rows": rows, "speedup": ratio}))


if __name__ == "__main__":
    main()
