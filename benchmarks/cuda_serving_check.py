"""The serving paths on a GPU, checked: mixed batches, hot swap and compile-safe swap on CUDA.

Run on a CUDA machine: ``python -m benchmarks.cuda_serving_check [--device cuda]``. Not a test:
CI has no GPU; ``tests/`` checks the same behaviour on CPU. Exits 1 if any check fails.

On the tiny GPT-2 and BERT of the tests (3 adapters of different ranks, alphas and target
subsets; BERT's "a" and "c" save their own classifier copy), moved to the device:

* a mixed batch equals each row run alone with its adapter (fp32 logits, atol/rtol 1e-5: the
  two runs differ only in summation order; TF32 is off for this), and GPT-2's mixed greedy
  ``generate`` gives each row's own continuation token for token;
* the same mixed batch in bf16 (the whole model cast) runs and stays within 5e-2 of fp32 on
  these O(1) logits (bf16 keeps 8 bits of mantissa);
* ``swap_adapter`` from disk into an adapter loaded with ``max_rank`` keeps every parameter's
  ``data_ptr`` and gives the logits of that file loaded normally (the one-copy path for a file
  of the adapter's layout, the padding path for a lower rank);
* a ``torch.compile``d model (inductor) sees swapped weights without recompiling;
* the compiled GPT-2 and BERT take mixed batches with new names per call (each row's adapter,
  in runs or gathered) without compiling again after one call of each, within 1e-4 of each
  row run alone in eager mode (inductor may fuse and reorder sums).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hotswap_helpers import (
    config_for,
    each_row_alone,
    input_ids,
    logits,
    model_with_adapters,
    randomize,
    save_adapters,
)

RESULTS: list[tuple[str, bool, str]] = []


def check(label: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((label, ok, detail))
    print(f"{'ok  ' if ok else 'FAIL'} {label}" + (f"  ({detail})" if detail else ""))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def mixed_batches(kind: str, device: str) -> None:
    lm = model_with_adapters(kind)
    lm.model.to(device)
    names: list[str | None] = ["a", None, "b", "a", "c", None, "b", "c"]
    ids = input_ids(len(names)).to(device)
    mixed = logits(lm, ids, adapter_names=names)
    reference = each_row_alone(lm, ids, names)
    diff = max_diff(mixed, reference)
    check(f"{kind}: mixed batch == each row alone, fp32", diff <= 1e-5, f"max diff {diff:.1e}")
    spread = max_diff(mixed[0], mixed[1])
    check(f"{kind}: the adapters change outputs", spread > 1e-2, f"row a vs base {spread:.2f}")

    lm.model.to(torch.bfloat16)
    low = logits(lm, ids, adapter_names=names)
    diff = max_diff(low, mixed)
    check(
        f"{kind}: mixed batch in bf16 vs fp32",
        low.dtype == torch.bfloat16 and diff <= 5e-2,
        f"dtype {low.dtype}, max diff {diff:.1e}",
    )

    if kind == "gpt2":
        lm.model.to(torch.float32)
        prompt = input_ids(5, seq=5, seed=3).to(device)
        rows: list[str | None] = ["b", None, "a", "c", "b"]
        kw: dict[str, Any] = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
        with torch.no_grad():
            together = lm.generate(
                prompt, attention_mask=torch.ones_like(prompt), adapter_names=rows, **kw
            )
            one_by_one = []
            for row, name in enumerate(rows):
                with lm.using(name):
                    one = prompt[row : row + 1]
                    one_by_one.append(lm.generate(one, attention_mask=torch.ones_like(one), **kw))
        check(
            "gpt2: mixed greedy generate == each row alone",
            torch.equal(together, torch.cat(one_by_one)),
        )


def library_with_full_rank8(kind: str, root: Path) -> Path:
    """The helpers' adapters a, b, c, and d1, d2: "a"'s modules at rank 8 (other values)."""
    library = save_adapters(kind, root)
    source = model_with_adapters(kind, ())
    for seed, name in enumerate(("d1", "d2")):
        source.add_adapter(name, dataclasses.replace(config_for(kind, "a"), r=8, alpha=16))
        randomize(source, name, seed=7 + seed)
        source.save_adapter(library / name, name)
    return Path(library)


def swaps(kind: str, device: str, root: Path) -> None:
    library = library_with_full_rank8(kind, root / kind)
    lm = model_with_adapters(kind, ())
    lm.model.to(device)
    lm.load_adapter(library / "d1", "live", max_rank=8)  # packed; d2 has its exact layout
    pointers = [p.data_ptr() for p in lm.adapter_parameters("live")]
    ids = input_ids(4).to(device)

    def fresh(path: Path) -> torch.Tensor:
        other = model_with_adapters(kind, ())
        other.model.to(device)
        other.load_adapter(path, "x")
        other.set_adapter("x")
        return torch.as_tensor(logits(other, ids))

    # d2, d1: the one-copy path; a: rank 4 (padding); b, c: fewer modules, other ranks
    for source in ("d2", "a", "b", "c", "d1"):
        lm.swap_adapter("live", library / source)
        lm.set_adapter("live")
        got = logits(lm, ids)
        diff = max_diff(got, fresh(library / source))
        same = pointers == [p.data_ptr() for p in lm.adapter_parameters("live")]
        check(
            f"{kind}: swap '{source}' into max_rank 8 on {device} == '{source}' loaded normally",
            diff <= 1e-5 and same,
            f"max diff {diff:.1e}, data_ptrs kept: {same}",
        )


def compile_counting(model: torch.nn.Module) -> tuple[Callable[..., Any], list[int]]:
    """``model`` compiled with inductor (dynamo reset first), and ``[graphs compiled]``."""
    from torch._dynamo import lookup_backend

    frames = [0]
    inductor = lookup_backend("inductor")

    def counting(gm: torch.fx.GraphModule, example: list[torch.Tensor]) -> Callable[..., Any]:
        frames[0] += 1
        return inductor(gm, example)

    torch._dynamo.reset()
    return torch.compile(model, backend=counting), frames


def compiled_swap(device: str, root: Path) -> None:
    library = library_with_full_rank8("gpt2", root / "compile")
    lm = model_with_adapters("gpt2", ())
    lm.model.to(device)
    lm.load_adapter(library / "d1", "live", max_rank=8)
    lm.set_adapter("live")
    compiled, frames = compile_counting(lm.model)
    ids = input_ids(2).to(device)
    with torch.no_grad():
        compiled(input_ids=ids)
        before = frames[0]
        for source in ("d2", "a", "c", "d1"):
            lm.swap_adapter("live", library / source)
            got = compiled(input_ids=ids).logits
            eager = lm.model(input_ids=ids).logits
            diff = max_diff(got, eager)
            check(
                f"gpt2: compiled model after swapping in '{source}'",
                frames[0] == before and diff <= 1e-4,
                f"graphs compiled {frames[0] - before} after the first, eager diff {diff:.1e}",
            )
    torch._dynamo.reset()


def compiled_mixed(kind: str, device: str) -> None:
    lm = model_with_adapters(kind)
    lm.model.to(device)
    compiled, frames = compile_counting(lm.model)
    ids = input_ids(4).to(device)
    plans: list[list[str | None]] = [["a", None, "c", "b"], ["a", "a", "b", None]]  # run, gather
    plans += [["c", "b", "a", None], ["b", "c", "c", "a"]]

    def run(names: list[str | None]) -> torch.Tensor:
        with torch.no_grad(), lm._rows(names, None):
            return compiled(input_ids=ids).logits  # type: ignore[no-any-return]

    for names in plans[:2]:
        run(names)
    before = frames[0]
    worst = 0.0
    for names in plans * 2:
        worst = max(worst, max_diff(run(names), each_row_alone(lm, ids, names)))
    check(
        f"{kind}: compiled model, mixed batches with new names per call",
        frames[0] == before and worst <= 1e-4,
        f"graphs compiled {frames[0] - before} after the first calls, max diff {worst:.1e}",
    )
    torch._dynamo.reset()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no-compile", action="store_true", help="Skip the torch.compile check.")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"torch {torch.__version__}, device {name}")
    with tempfile.TemporaryDirectory(prefix="lk_cuda_serving_") as tmp:
        for kind in ("gpt2", "bert"):
            mixed_batches(kind, args.device)
            swaps(kind, args.device, Path(tmp))
        if not args.no_compile:
            compiled_swap(args.device, Path(tmp))
            for kind in ("gpt2", "bert"):
                compiled_mixed(kind, args.device)
    failed = [label for label, ok, _ in RESULTS if not ok]
    print(f"\n{len(RESULTS) - len(failed)} of {len(RESULTS)} checks passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
