"""``lora_kit.train.checkpoint``: the final adapter published into a run directory, and what a
checkpoint save cleans up.

(Checkpoint writing and resuming are exercised through the trainer in test_train_loop.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tooling_helpers import tree_hashes

import lora_kit as lk
from lora_kit.train.checkpoint import publish_adapter, write_checkpoint
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


def test_a_checkpoint_save_removes_what_dead_runs_set_aside(arch: Arch, tmp_path: Path) -> None:
    """A save sets the previous checkpoint aside as .checkpoint.old-<pid> between its two
    renames; a run killed there left it behind, and later saves (another pid) never removed it.
    One of a process still running may be its only copy mid-save: that one stays."""
    run = tmp_path / "run"
    lm = lk.inject(arch.build(0), lk.LoraConfig(r=4, targets=arch.attn_preset))
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()  # reaped: its pid names no process
    dead = run / f".checkpoint.old-{finished.pid}"
    alive = run / f".checkpoint.old-{os.getppid()}"  # our parent: running
    foreign = run / ".checkpoint.old-backup"  # not named by a save: not ours to remove
    for folder in (dead, alive, foreign):
        (folder / "adapter").mkdir(parents=True)
        (folder / "trainer_state.pt").write_bytes(b"set aside")
    write_checkpoint(run, lm, "default", {"step": 1})
    assert sorted(p.name for p in run.iterdir()) == sorted(["checkpoint", alive.name, foreign.name])
