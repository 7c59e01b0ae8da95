"""``lora_kit.train.checkpoint``: the final adapter published into a run directory.

(Checkpoint writing and resuming are exercised through the trainer in test_train_loop.py.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tooling_helpers import tree_hashes

import lora_kit as lk
from lora_kit.train.checkpoint import publish_adapter
from tests.conftest import Arch, randomize


def test_publish_failing_part_way_keeps_the_previous_adapter_whole(
    arch: Arch, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files are renamed into the run directory one by one: a failure after the first left
    the new adapter_config.json beside the previous run's weights (here another rank, so the
    directory no longer loaded; with the same rank and another alpha it would load, wrongly)."""
    run = tmp_path / "run"
    previous = lk.inject(arch.build(0), lk.LoraConfig(r=4, targets=arch.attn_preset))
    randomize(previous)
    publish_adapter(run, previous, "default", {"labels.json": "{}\n"})
    (run / "metrics.jsonl").write_text('{"step": 1}\n')  # the run's own files stay too
    before = tree_hashes(run)
    new = lk.inject(arch.build(0), lk.LoraConfig(r=2, targets=arch.attn_preset))
    randomize(new, seed=1)
    real_replace = os.replace
    calls = [0]

    def failing_replace(src: object, dst: object) -> None:
        if Path(str(dst)).parent == run:  # a file moving into the run directory
            calls[0] += 1
            if calls[0] == 2:
                raise OSError("disk full")
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        publish_adapter(run, new, "default", {"labels.json": '{"x": 1}\n'})
    monkeypatch.undo()
    assert tree_hashes(run) == before  # no staging directory left either
    assert lk.read_adapter(run).config.r == 4
    publish_adapter(run, new, "default", {"labels.json": '{"x": 1}\n'})
    assert lk.read_adapter(run).config.r == 2
