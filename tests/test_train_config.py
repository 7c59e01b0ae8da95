"""`TrainConfig`: validation and JSON round-trip."""

from __future__ import annotations

import pytest

from lora_kit.errors import ConfigError
from lora_kit.train import TrainConfig


def test_json_round_trip() -> None:
    config = TrainConfig(lr=1e-3, steps=7, precision="bf16", schedule="cosine", strategy="fsdp")
    assert TrainConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"lr": 0}, "lr must be a positive number"),
        ({"lr": float("nan")}, "lr must be a positive number"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"batch_size": True}, "batch_size must be a positive integer"),
        ({"precision": "int8"}, "precision must be one of"),
        ({"schedule": "step"}, "schedule must be one of"),
        ({"strategy": "deepspeed"}, "strategy must be one of"),
        ({"eval_fraction": 1.0}, r"eval_fraction must be in \[0, 1\)"),
        ({"clip_norm": -1}, "clip_norm must be a number >= 0"),
        ({"max_length": 1}, "at least 2 tokens"),
    ],
)
def test_validation(changes: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**changes)  # type: ignore[arg-type]


def test_unknown_field_and_bad_json() -> None:
    with pytest.raises(ConfigError, match=r"unknown TrainConfig field\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrainConfig.from_json("{")


def test_resume_mismatch_lists_changed_fields() -> None:
    a = TrainConfig(lr=1e-3, batch_size=4)
    b = a.replace(batch_size=8, out="elsewhere", save_every=3)
    assert b.resume_mismatch(a) == ["batch_size: checkpoint 4, now 8"]
    # Clipping and precision change every later update, so they are refused too.
    c = a.replace(clip_norm=0.5, precision="bf16", gradient_checkpointing=True)
    assert c.resume_mismatch(a) == [
        "clip_norm: checkpoint 1.0, now 0.5",
        "precision: checkpoint 'auto', now 'bf16'",
    ]
