"""Resumable checkpoints: the adapter (safetensors) plus the trainer's state (tensors only).

Layout of ``<out>/checkpoint/``::

    adapter/               a complete adapter directory, loadable on its own
    trainer_state.pt       optimizer, scheduler, scaler, RNG states and data position

``trainer_state.pt`` holds only tensors, numbers, strings and containers of them and is read
with ``torch.load(..., weights_only=True)``: nothing is ever unpickled. A checkpoint is built in
a temporary directory and renamed into place, so a crash mid-save keeps the previous one.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapter_io import AdapterFiles, read_adapter
from ..errors import LoraKitError
from ..model import LoraModel

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "trainer_state.pt"
ADAPTER_DIR = "adapter"
STATE_KEYS = (
    "step",
    "epoch",
    "window",
    "bad_run",
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "config",
)
"""What the trainer writes into ``trainer_state.pt`` and needs back to resume."""


class CheckpointError(LoraKitError):
    """A checkpoint is missing, incomplete or unreadable."""


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read back from disk.

    Attributes:
        path: The checkpoint directory.
        adapter: The adapter files.
        state: The trainer state (see :func:`trainer_state`).
    """

    path: Path
    adapter: AdapterFiles
    state: dict[str, Any]


def rng_state() -> dict[str, Any]:
    """Python and torch (CPU and CUDA) RNG states, in weights-only-loadable form."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(
    out: str | os.PathLike[str],
    lm: LoraModel,
    adapter_name: str,
    state: dict[str, Any],
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``<out>/checkpoint`` atomically (the previous one stays until the new one is whole).

    Once it is in place, the previous checkpoints that runs killed mid-save set aside
    (``.checkpoint.old-<pid>`` of processes no longer running) are removed.

    Args:
        out: The run's output directory.
        lm: The model (its parameters must be whole: call inside ``full_params``).
        adapter_name: The adapter to save.
        state: Trainer state of tensors/numbers/strings only.
        extra_files: ``{file name: text}`` written beside the adapter (e.g. ``labels.json``).

    Returns:
        The checkpoint directory.
    """
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    target = root / CHECKPOINT_DIR
    tmp = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT_DIR}.", suffix=".tmp", dir=root))
    old = root / f".{CHECKPOINT_DIR}.old-{os.getpid()}"
    try:
        adapter_dir = lm.save_adapter(tmp / ADAPTER_DIR, adapter_name)
        for file_name, text in (extra_files or {}).items():
            (adapter_dir / file_name).write_text(text)
        torch.save(state, tmp / STATE_FILE)
        shutil.rmtree(old, ignore_errors=True)  # left by a killed process of the same pid
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)  # the previous checkpoint back in place
        raise
    shutil.rmtree(old, ignore_errors=True)
    _remove_dead_runs_set_aside(root)
    return target


def _remove_dead_runs_set_aside(root: Path) -> None:
    """Remove the ``.checkpoint.old-<pid>`` folders of processes no longer running.

    Called once a new checkpoint is in place, so none is needed to recover one. A folder of a
    process still running is kept: it may be that process's only copy between its two renames
    (two runs sharing ``--out``). A pid reused by an unrelated process keeps a stale folder,
    which is harmless; where liveness cannot be checked (not POSIX), nothing is removed.
    """
    prefix = f".{CHECKPOINT_DIR}.old-"
    for folder in root.glob(f"{prefix}*"):
        pid = folder.name[len(prefix) :]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _running(pid: int) -> bool:
    """Whether process ``pid`` exists (True when that cannot be told)."""
    if os.name != "posix" or pid <= 0:
        return True  # on Windows os.kill would terminate it; pid 0 means our process group
    try:
        os.kill(pid, 0)  # signal 0: existence and permission check only, nothing is sent
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's process
        return True
    return True


def _recover_set_aside(root: Path) -> None:
    """Move back a checkpoint that a save killed between its two renames left set aside."""
    target = root / CHECKPOINT_DIR
    if target.exists():
        return
    aside = [p for p in root.glob(f".{CHECKPOINT_DIR}.old-*") if (p / STATE_FILE).is_file()]
    if aside:
        os.replace(max(aside, key=lambda p: p.stat().st_mtime), target)


def read_checkpoint(out: str | os.PathLike[str]) -> Checkpoint:
    """Read ``<out>/checkpoint`` (weights-only; no pickle).

    A checkpoint that a save killed between its two renames left set aside is moved back first.

    Raises:
        CheckpointError: No checkpoint there, or it is incomplete/unreadable.
    """
    path = Path(out) / CHECKPOINT_DIR
    state_file = path / STATE_FILE
    _recover_set_aside(Path(out))
    if not state_file.is_file():
        raise CheckpointError(
            f"no checkpoint to resume in {str(path)!r} (expected {STATE_FILE}); run without "
            f"--resume to start fresh, or pass the --out of the interrupted run"
        )
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/garbage/foreign files
        raise CheckpointError(
            f"{state_file}: unreadable trainer state ({type(exc).__name__}); it is truncated, "
            f"corrupt or holds more than tensors, numbers and strings (it is never unpickled). "
            f"Delete {str(path)!r} to start fresh"
        ) from exc
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(
            f"{state_file}: not a lora_kit trainer state (missing {missing}); delete "
            f"{str(path)!r} to start fresh"
        )
    return Checkpoint(path, read_adapter(path / ADAPTER_DIR), state)


def publish_adapter(
    out: str | os.PathLike[str],
    lm: LoraModel,
    adapter_name: str,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Save the final adapter into the run directory ``out`` beside its logs and checkpoint.

    The adapter is written completely in a temporary directory first; its files are then
    renamed into ``out`` one by one (each rename is atomic; the weights go last, so a reader
    never sees new weights with an old config). The files they replace are kept aside until
    all are in: if a rename fails, every file is put back as it was. A process killed between
    two renames can leave a new config beside the previous weights; the checkpoint is whole
    either way, and ``--resume`` of the finished run publishes the adapter again.

    Returns:
        ``out``.
    """
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adapter.", suffix=".tmp", dir=root))
    try:
        written = lm.save_adapter(staging / ADAPTER_DIR, adapter_name)
        for file_name, text in (extra_files or {}).items():
            (written / file_name).write_text(text)
        names = sorted(p.name for p in written.iterdir())
        names.sort(key=lambda n: n.endswith(".safetensors"))
        kept = _keep_aside(root, names, staging / "previous")
        try:
            for file_name in names:
                os.replace(written / file_name, root / file_name)
        except BaseException:
            for file_name in names:  # each back as it was: the old file, or none
                if file_name in kept:
                    os.replace(kept[file_name], root / file_name)
                elif not (written / file_name).exists():  # moved in, and new to ``out``
                    (root / file_name).unlink(missing_ok=True)
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _keep_aside(root: Path, names: list[str], folder: Path) -> dict[str, Path]:
    """A second name in ``folder`` (a hard link, else a copy) for each of ``names`` in ``root``."""
    folder.mkdir()
    kept: dict[str, Path] = {}
    for file_name in names:
        if (root / file_name).is_file():
            kept[file_name] = folder / file_name
            try:
                os.link(root / file_name, kept[file_name])
            except OSError:  # a file system without hard links
                shutil.copy2(root / file_name, kept[file_name])
    return kept
