"""The local adapter library: find the adapter directories under a folder and summarise each.

A directory is an adapter when it holds ``adapter_config.json`` or
``adapter_model.safetensors``; scanning does not descend into adapters, and skips hidden
entries. Hidden ``.*.tmp`` entries, in a scanned folder or an adapter, are what an interrupted
save (a killed process) leaves behind; they are reported as leftovers. Nothing is written or
removed.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .adapter_io import WEIGHTS_NAME, AdapterFiles, read_adapter
from .errors import AdapterFormatError, LoraKitError
from .inspection import lora_modules
from .resolve import DEFAULT_LIBRARY, LIBRARY_ENV, adapter_library, is_adapter_dir


@dataclass(frozen=True)
class AdapterSummary:
    """One line of ``lorakit list``.

    Attributes:
        name: Path relative to the library folder (``sst2`` or ``team/sst2``).
        path: The adapter directory.
        base: ``base_model_name_or_path`` from the config, else the fingerprint's model type,
            else None.
        targets: Distinct module suffixes adapted (``c_attn``, ``query`` ...), sorted.
        modules: Number of adapted modules.
        r: The config's rank (``rank_pattern`` may vary it per module; see ``ranks``).
        alpha: The config's alpha.
        ranks: The distinct stored ranks, sorted.
        parameters: Elements in the weights file.
        size_bytes: Size of ``adapter_model.safetensors``.
        created: ISO-8601 UTC time from the ``created`` metadata lora_kit writes, else the
            weights file's modification time.
        created_source: ``"metadata"`` or ``"mtime"``.
        origin: ``"lora_kit"`` or ``"peft"``.
    """

    name: str
    path: str
    base: str | None
    targets: tuple[str, ...]
    modules: int
    r: int
    alpha: float
    ranks: tuple[int, ...]
    parameters: int
    size_bytes: int
    created: str
    created_source: str
    origin: str


@dataclass(frozen=True)
class LibraryProblem:
    """An entry that looks like an adapter but cannot be read."""

    name: str
    path: str
    error: str


@dataclass(frozen=True)
class Leftover:
    """A hidden ``.*.tmp`` entry: what a save, merge, pull or checkpoint interrupted by a killed
    process leaves (a running one has such an entry too, until it renames it into place)."""

    path: str
    size_bytes: int


@dataclass(frozen=True)
class LibraryScan:
    """The result of :func:`scan_library`: readable adapters, broken entries and leftovers."""

    root: str
    adapters: tuple[AdapterSummary, ...]
    problems: tuple[LibraryProblem, ...] = field(default_factory=tuple)
    leftovers: tuple[Leftover, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def summarize(files: AdapterFiles, name: str | None = None) -> AdapterSummary:
    """The `AdapterSummary` of an adapter that has been read with `read_adapter`."""
    pairs = lora_modules(files.tensors)
    weights = files.path / WEIGHTS_NAME
    created = files.metadata.get("created")
    if isinstance(created, str) and created:
        source = "metadata"
    else:
        mtime = datetime.fromtimestamp(weights.stat().st_mtime, tz=timezone.utc)
        created, source = mtime.isoformat(timespec="seconds"), "mtime"
    fp = files.metadata.get("base_fingerprint")
    base = files.peft_config.get("base_model_name_or_path") or (
        fp.get("model_type") if isinstance(fp, dict) else None
    )
    return AdapterSummary(
        name=name if name is not None else files.path.name,
        path=str(files.path),
        base=str(base) if base else None,
        targets=tuple(sorted({m.rsplit(".", 1)[-1] for m in pairs})),
        modules=len(pairs),
        r=files.config.r,
        alpha=float(files.config.alpha),
        ranks=tuple(sorted({int(a.shape[0]) for a, _ in pairs.values()})),
        parameters=sum(t.numel() for t in files.tensors.values()),
        size_bytes=weights.stat().st_size,
        created=created,
        created_source=source,
        origin=files.origin,
    )


def scan_library(root: str | os.PathLike[str] | None = None) -> LibraryScan:
    """Summarise every adapter under ``root`` (``root`` itself may be one adapter).

    ``root`` defaults to the adapter library that names resolve from: ``$LORA_KIT_ADAPTERS``,
    else ``./adapters``.

    Unreadable adapters do not stop the scan: they are returned in ``problems`` with the
    reason.

    Raises:
        AdapterFormatError: ``root`` does not exist or is not a directory.
    """
    base = adapter_library() if root is None else Path(root)
    if not base.exists():
        raise AdapterFormatError(
            f"adapter library {str(base)!r} does not exist; pass the folder that holds your "
            f"adapters (default: ${LIBRARY_ENV}, else ./{DEFAULT_LIBRARY})"
        )
    if not base.is_dir():
        raise AdapterFormatError(f"{str(base)!r} is a file; pass a folder of adapters")
    found: list[AdapterSummary] = []
    problems: list[LibraryProblem] = []
    leftovers: list[Leftover] = []
    for path in _adapter_dirs(base, set(), leftovers):
        name = path.name if path == base else path.relative_to(base).as_posix()
        try:
            found.append(summarize(read_adapter(path), name))
        except (LoraKitError, OSError) as exc:
            problems.append(LibraryProblem(name, str(path), str(exc)))
    return LibraryScan(str(base), tuple(found), tuple(problems), tuple(leftovers))


def _adapter_dirs(root: Path, seen: set[Path], leftovers: list[Leftover]) -> Iterator[Path]:
    real = root.resolve()
    if real in seen:  # a symlink loop, or the same adapter reached twice
        return
    seen.add(real)
    entries = sorted(root.iterdir())
    for entry in entries:
        leftover = _leftover(entry)
        if leftover is not None:
            leftovers.append(leftover)
    if is_adapter_dir(root):
        yield root
        return
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        yield from _adapter_dirs(entry, seen, leftovers)


def _leftover(entry: Path) -> Leftover | None:
    """``entry`` with the bytes it holds (files under it, not following links) if it is a
    hidden ``.*.tmp`` file or folder; None otherwise, for a link, or if it is gone (the save it
    belongs to finished meanwhile)."""
    if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
        return None
    try:
        info = entry.lstat()
    except OSError:
        return None
    if stat.S_ISLNK(info.st_mode):
        return None
    if not stat.S_ISDIR(info.st_mode):
        return Leftover(str(entry), info.st_size)
    size = 0
    for folder, _, files in os.walk(entry):  # errors (a folder removed meanwhile) skipped
        for file in files:
            try:
                size += (Path(folder) / file).lstat().st_size
            except OSError:
                continue
    return Leftover(str(entry), size)
