"""Shortened GPT-2 adaptation runs, trained once per session for the job and hot-swap tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from lora_kit.demo.runtime import torch_threads
from lora_kit.demo.shakespeare_job import AdaptResult, train_posts_adapter, train_roman_adapter
from tests.demo.gpt2_demo_helpers import SHORT


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> Iterator[None]:
    """One torch thread: the demo models are tiny, and two threads on a shared 2-core machine
    were several times slower (see ``lora_kit.demo.runtime.torch_threads``)."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def roman_short(tmp_path_factory: pytest.TempPathFactory) -> AdaptResult:
    return train_roman_adapter(tmp_path_factory.mktemp("roman") / "adapter", SHORT)


@pytest.fixture(scope="session")
def posts_short(tmp_path_factory: pytest.TempPathFactory) -> AdaptResult:
    return train_posts_adapter(tmp_path_factory.mktemp("posts") / "adapter", SHORT)
