"""Run logging: JSONL metrics always, a progress bar on a terminal, TensorBoard if installed."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, TextIO

METRICS_FILE = "metrics.jsonl"


class RunLogger:
    """Where a run reports: ``metrics.jsonl``, a tqdm bar, notices on stderr, TensorBoard.

    Only the main process (rank 0) should build an enabled logger; others pass
    ``enabled=False`` and every method becomes a no-op.

    Args:
        out: Directory for ``metrics.jsonl`` (and ``tensorboard/`` when installed).
        enabled: False on non-main ranks.
        progress: Show a progress bar (default: when stderr is a terminal).
        quiet: No progress bar and no notices (warnings still reach ``warnings``).
        stream: Where notices and the bar go (stderr by default).
    """

    def __init__(
        self,
        out: str | Path | None,
        *,
        enabled: bool = True,
        progress: bool | None = None,
        quiet: bool = False,
        stream: TextIO | None = None,
    ) -> None:
        self.enabled = enabled
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.path = Path(out) / METRICS_FILE if out is not None and enabled else None
        show = self.stream.isatty() if progress is None else progress
        self.show_progress = enabled and show and not quiet
        self._bar: Any = None
        self._tb: Any = None
        self._tb_opened = False  # the directory and TensorBoard come with the first record

    def start(self, total_steps: int, initial: int = 0) -> None:
        """Open the progress bar at ``initial`` of ``total_steps``."""
        if self.show_progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps, initial=initial, file=self.stream, unit="step", leave=True
            )

    def rewind(self, step: int) -> None:
        """Drop the records of steps after ``step`` and any ``end`` record (atomic rewrite).

        A fresh run rewinds to 0 (an earlier run's records in the same directory go); a
        resumed one to its checkpoint's step, so steps a killed run did after it are not
        logged twice, and the run that finishes logs the one ``end`` record.
        """
        if not self.enabled or self.path is None or not self.path.is_file():
            return
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if _kept(line, step)]
        if len(kept) == len(lines):
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to ``metrics.jsonl`` (and TensorBoard); update the bar on steps."""
        if not self.enabled:
            return
        if self.path is not None:
            if not self._tb_opened:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._tb = _tensorboard(self.path.parent / "tensorboard")
                self._tb_opened = True
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")
        step = record.get("step")
        if self._tb is not None and isinstance(step, int):
            for key, value in record.items():
                if isinstance(value, int | float) and key != "step":
                    self._tb.add_scalar(f"{record.get('event', 'train')}/{key}", value, step)
        if self._bar is not None and record.get("event") == "train":
            self._bar.update(1)
            self._bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                lr=f"{record['lr']:.2e}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                refresh=False,
            )

    def notice(self, message: str) -> None:
        """A one-line message for the human (suppressed when quiet)."""
        if not self.enabled or self.quiet:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream)

    def close(self) -> None:
        """Close the bar and TensorBoard writer."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def is_run_log(path: Path) -> bool:
    """Whether ``path`` is a ``metrics.jsonl`` a run may rewrite: a plain file (not a link)
    that is empty or starts with one of lora_kit's records (a JSON object with ``event``)."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with path.open("rb") as handle:
            first = handle.readline(1 << 16)
    except OSError:
        return False
    if not first:
        return True  # empty: nothing to lose
    record = _record(first)
    return record is not None and "event" in record


def _kept(line: str, step: int) -> bool:
    """Whether one JSONL record survives a rewind to ``step``: a record of a step up to it,
    not a run's ``end`` record (a line that is not a record goes too)."""
    record = _record(line)
    if record is None:
        return False
    at = record.get("step")
    return isinstance(at, int) and at <= step and record.get("event") != "end"


def _record(line: str | bytes) -> dict[str, Any] | None:
    """One JSONL line as a record (a JSON object), or None if it is not one."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) else None


def _tensorboard(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder))
