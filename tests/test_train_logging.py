"""Run logging: JSONL always, a progress bar only when asked (or on a terminal), quiet mode."""

from __future__ import annotations

import io
import json
from pathlib import Path

from lora_kit.train import RunLogger

STEP = {"event": "train", "step": 1, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 1234.0}


def test_jsonl_and_progress_bar(tmp_path: Path) -> None:
    stream = io.StringIO()
    log = RunLogger(tmp_path, progress=True, stream=stream)
    log.start(total_steps=3)
    log.log(STEP)
    log.notice("hello")
    log.close()
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == STEP
    text = stream.getvalue()
    assert "1/3" in text and "loss=2.5000" in text and "hello" in text


def test_quiet_and_non_tty_show_nothing_but_still_write_jsonl(tmp_path: Path) -> None:
    for kwargs in ({"quiet": True, "progress": True}, {}):
        stream = io.StringIO()  # not a TTY: no bar by default
        log = RunLogger(tmp_path, stream=stream, **kwargs)  # type: ignore[arg-type]
        log.start(total_steps=3)
        log.log(STEP)
        log.notice("hello" if kwargs else "")
        log.close()
        assert "loss" not in stream.getvalue()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_disabled_logger_on_other_ranks_writes_nothing(tmp_path: Path) -> None:
    log = RunLogger(tmp_path / "x", enabled=False, progress=True)
    log.start(3)
    log.log(STEP)
    log.close()
    assert not (tmp_path / "x").exists()
