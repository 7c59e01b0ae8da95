"""Process-wide settings scoped to a block: torch's thread count and transformers' chatter."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import transformers

__all__ = ["quiet_transformers", "torch_threads"]


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads (None: unchanged); restored on exit.

    The demo models are small (128 wide), so splitting each matmul over threads buys little,
    while on a CPU shared with other processes the threads wait on each other: a LoRA step of
    the Shakespeare GPT-2 took 0.43-0.56 s with 1 thread and 3.7-5.6 s with 2 on a 2-core
    machine at load average ~4 (``torch.set_num_threads``, interleaved runs).
    """
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' loading bars and one-off notices inside the block (restored)."""
    verbosity = transformers.utils.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
