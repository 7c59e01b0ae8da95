"""Shortened settings of the GPT-2 adaptation demo, shared by the demo tests."""

from __future__ import annotations

from lora_kit.demo.generation import SampleSettings
from lora_kit.demo.shakespeare_job import AdaptSettings

SHORT = AdaptSettings(
    steps=3,
    rank=4,
    alpha=8.0,
    lr=1e-2,
    batch_size=2,
    block_size=64,
    warmup_steps=0,
    eval_tokens=512,
    sample=SampleSettings(max_new_tokens=6),
)
"""A few steps on small blocks: exercises the whole job in seconds; the real drop is measured
with the defaults (README figures), not asserted here."""
