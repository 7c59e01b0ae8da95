"""Scoped process-wide settings of the demo jobs."""

from __future__ import annotations

import pytest
import torch
import transformers

from lora_kit.demo.runtime import quiet_transformers, torch_threads


def test_torch_threads_is_scoped_and_restored_on_error() -> None:
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with torch_threads(target):
        assert torch.get_num_threads() == target
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(target):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before


def test_quiet_transformers_restores_verbosity_and_bars() -> None:
    verbosity = transformers.utils.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    with quiet_transformers():
        assert transformers.utils.logging.get_verbosity() == transformers.logging.ERROR
        assert not transformers.utils.logging.is_progress_bar_enabled()
    assert transformers.utils.logging.get_verbosity() == verbosity
    assert transformers.utils.logging.is_progress_bar_enabled() == bars
