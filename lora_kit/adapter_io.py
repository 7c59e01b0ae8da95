"""Reading and writing adapter directories (PEFT's format), atomically and without pickle.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. lora_kit adds string
metadata to the safetensors header (ignored by PEFT): ``lora_kit.format_version``,
``lora_kit.version``, ``lora_kit.config`` (the `LoraConfig` as JSON) and
``lora_kit.base_fingerprint`` (see `fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ._version import __version__
from .config import LoraConfig
from .errors import AdapterFormatError, NonFiniteError
from .peft_format import check_pattern_order, check_tied_tensors, from_peft_dict, unknown_keys
from .safetensors_read import (
    NATIVE_LITTLE_ENDIAN,
    SafetensorsFormatError,
    SafetensorsRaw,
    read_safetensors_raw,
)

# A weights file read by `read_raw_weights`: checked layout and flat runs, or (on a big-endian
# machine) ``(tensors, metadata)`` from the safetensors library.
Weights = SafetensorsRaw | tuple[dict[str, Tensor], dict[str, str]]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LABELS_NAME = "labels.json"  # beside a classifier's adapter: {"id2label": ..., "label2id": ...}
FORMAT_VERSION = "1"
META_PREFIX = "lora_kit."


@dataclass
class AdapterFiles:
    """The parsed content of an adapter directory.

    Attributes:
        path: The directory it was read from.
        config: The adapter's `LoraConfig` (from ``adapter_config.json``).
        peft_config: The raw ``adapter_config.json`` dict.
        tensors: PEFT tensor key -> tensor (CPU).
        metadata: lora_kit's header metadata, prefix stripped, JSON values decoded
            (empty for an adapter saved by PEFT).
        base_weights: Copies of base weights saved beside an adapted module
            (``<module>.base_layer.<param>``: PEFT saves those of an embedding or output layer
            it targets, such as a tied ``lm_head``), kept out of ``tensors``; loading checks
            they equal the model's own (PEFT writes them into the base).
    """

    path: Path
    config: LoraConfig
    peft_config: dict[str, Any]
    tensors: dict[str, Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    base_weights: dict[str, Tensor] = field(default_factory=dict)

    @property
    def origin(self) -> str:
        """``"lora_kit"`` if lora_kit wrote it, else ``"peft"``."""
        return "lora_kit" if "format_version" in self.metadata else "peft"

    def check_pattern_order(self, modules: Iterable[str]) -> None:
        """Refuse pattern keys of a PEFT file older than 0.22 whose lost order decides a value
        of one of ``modules`` (see `peft_format.check_pattern_order`).

        Raises:
            AdapterFormatError: Naming the module and the two keys.
        """
        check_pattern_order(
            self.peft_config, self.origin == "peft", modules, str(self.path), self.tensors
        )


def read_adapter(path: str | os.PathLike[str]) -> AdapterFiles:
    """Read and check an adapter directory; nothing is unpickled.

    Raises:
        AdapterFormatError: Missing directory/files, invalid JSON, unsupported features, an
            unreadable or truncated safetensors file, or non-floating tensors.
        NonFiniteError: A tensor holds NaN or infinity.
    """
    root, peft_config, config = read_adapter_config(path)
    weights_path = root / WEIGHTS_NAME
    return adapter_files(root, peft_config, config, read_raw_weights(weights_path))


def read_adapter_config(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any], LoraConfig]:
    """``(directory, raw adapter_config.json, LoraConfig)`` of an adapter directory.

    Checks that the directory holds both files; the weights are not read.

    Raises:
        AdapterFormatError: As `read_adapter`, for the directory and its config.
    """
    root = Path(path)
    if not root.exists():
        raise AdapterFormatError(f"adapter directory {str(root)!r} does not exist")
    if not root.is_dir():
        raise AdapterFormatError(
            f"{str(root)!r} is a file; an adapter is a directory holding {CONFIG_NAME} and "
            f"{WEIGHTS_NAME}"
        )
    config_path, weights_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    for needed in (config_path, weights_path):
        if not needed.is_file():
            raise AdapterFormatError(
                f"{str(root)!r} is not an adapter directory: {needed.name} is missing"
            )
    try:
        text = config_path.read_text(encoding="utf-8")
        peft_config = json.loads(text)
    except (ValueError, RecursionError) as exc:  # ValueError: also an over-long integer
        raise AdapterFormatError(f"{config_path}: not valid JSON ({exc})") from exc
    if not isinstance(peft_config, dict):
        raise AdapterFormatError(f"{config_path}: expected a JSON object")
    return root, peft_config, _parsed_config(text, peft_config, str(config_path))


# adapter_config.json text -> its LoraConfig (immutable), for a few recent texts: adapters
# trained with one recipe share their config file byte for byte, and parsing it is a fair
# part of a hot swap. Only clean parses are kept, so errors and unknown-key warnings repeat.
_CONFIGS: dict[str, LoraConfig] = {}
_CONFIGS_KEPT = 32


def _parsed_config(text: str, peft_config: Mapping[str, Any], source: str) -> LoraConfig:
    # Shared between reads of one text: LoraConfig is frozen, its pattern mappings read-only.
    found = _CONFIGS.get(text)
    if found is not None:
        return found
    config = from_peft_dict(peft_config, source)
    if unknown_keys(peft_config):
        return config
    if len(_CONFIGS) >= _CONFIGS_KEPT:
        _CONFIGS.clear()  # bounded; no iteration another thread could disturb
    _CONFIGS[text] = config
    return config


def read_raw_weights(path: Path) -> Weights:
    """An adapter's weights file, read and its header checked; values not checked yet.

    Returns the layout and flat runs (`SafetensorsRaw`) where tensors can view the file's
    bytes (a little-endian machine), else ``(tensors, metadata)`` read by the ``safetensors``
    library.

    Raises:
        AdapterFormatError: Unreadable, truncated or malformed file.
    """
    try:
        if NATIVE_LITTLE_ENDIAN:
            return read_safetensors_raw(path)
        return _read_with_library(path)  # tensor views need native byte order; it swaps them
    except (SafetensorsFormatError, SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterFormatError(
            f"{path}: unreadable safetensors file ({exc}); it may be truncated or corrupt: "
            f"re-save or re-download the adapter"
        ) from exc


def adapter_files(
    root: Path,
    peft_config: dict[str, Any],
    config: LoraConfig,
    weights: Weights,
) -> AdapterFiles:
    """`AdapterFiles` from a directory's parsed config and its read weights, checked.

    Raises:
        AdapterFormatError: Non-floating tensors, malformed lora_kit metadata, or tensors of a
            layer PEFT ties to the embeddings (``ensure_weight_tying``).
        NonFiniteError: A tensor holds NaN or infinity.
    """
    path = root / WEIGHTS_NAME
    tensors, raw_meta = _checked_tensors(path, weights)
    check_tied_tensors(peft_config, tensors, str(root))
    metadata = decode_metadata(raw_meta)
    check_fingerprint_metadata(metadata, path)
    base_weights = {k: tensors.pop(k) for k in [k for k in tensors if is_base_copy(k, tensors)]}
    return AdapterFiles(root, config, peft_config, tensors, metadata, base_weights)


def is_base_copy(key: str, tensors: Mapping[str, Tensor]) -> bool:
    """Whether ``key`` is a base weight saved beside the adapter of the same module."""
    module, found, _ = key.rpartition(".base_layer.")
    return bool(found) and f"{module}.lora_A.weight" in tensors


def check_fingerprint_metadata(metadata: Mapping[str, Any], path: Path) -> None:
    """Raise unless a recorded base fingerprint has the shape `fingerprint` writes.

    Raises:
        AdapterFormatError: ``lora_kit.base_fingerprint`` is present but malformed (it would
            otherwise be skipped silently, or fail comparing with an untyped error).
    """
    if "base_fingerprint" not in metadata:
        return
    fp = metadata["base_fingerprint"]
    modules = fp.get("modules") if isinstance(fp, dict) else None
    well_formed = (
        isinstance(fp, dict)
        and isinstance(fp.get("model_type"), str | None)
        and isinstance(fp.get("weights_sha256"), str)
        and isinstance(modules, dict)
        and all(
            isinstance(v, list)
            and len(v) == 3
            and all(type(n) is int for n in v[:2])
            and isinstance(v[2], str)
            for v in modules.values()
        )
    )
    if not well_formed:
        raise AdapterFormatError(
            f"{path}: header metadata {META_PREFIX}base_fingerprint is malformed ({fp!r:.120}); "
            f"the file was edited or corrupted: re-save the adapter"
        )


def checked_state_dict(tensors: Mapping[Any, Any], where: str) -> dict[str, Tensor]:
    """A PEFT-keyed state dict given in memory, checked as an adapter file's tensors are.

    Raises:
        AdapterFormatError: A key that is not a string, a value that is not a floating tensor.
        NonFiniteError: A tensor holds NaN or infinity.
    """
    out: dict[str, Tensor] = {}
    for key, value in tensors.items():
        if not isinstance(key, str) or not isinstance(value, Tensor):
            raise AdapterFormatError(
                f"{where}: a state dict maps PEFT tensor names to tensors; got {key!r} -> "
                f"{type(value).__name__}"
            )
        out[key] = value
    return _checked_tensors(Path(where), (out, {}))[0]


def _checked_tensors(path: Path, weights: Weights) -> tuple[dict[str, Tensor], dict[str, str]]:
    if isinstance(weights, SafetensorsRaw):
        tensors, metadata = weights.views(), dict(weights.layout.metadata)
        values = list(weights.runs)
    else:
        tensors, metadata = weights
        values = list(tensors.values())
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise AdapterFormatError(f"{path}: tensor {key!r} has dtype {tensor.dtype}, not float")
    if not all_finite(values):  # every value of every tensor, in a few reductions
        for key, tensor in tensors.items():
            wide = tensor if tensor.dtype.itemsize > 1 else tensor.float()  # fp8: no isfinite
            if not bool(torch.isfinite(wide).all()):
                raise NonFiniteError(f"{path}: tensor {key!r} contains NaN or infinity")
    return tensors, metadata


def _read_with_library(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    return tensors, metadata


def all_finite(tensors: list[Tensor]) -> bool:
    """Fast test that no tensor holds NaN/inf: True is exact, False needs a per-tensor check.

    Any NaN or infinity makes a sum non-finite. Summing in fp32 or wider (one reduction per
    tensor; `read_safetensors_raw` hands over the whole data area as one flat run per
    dtype, so a file of one dtype is one reduction) can also overflow on huge finite values;
    the caller then checks each tensor exactly.
    """
    sums: list[Tensor] = []
    for tensor in tensors:
        if tensor.numel():
            dtype = tensor.dtype
            sums.append(tensor.sum(dtype=dtype if dtype.itemsize >= 4 else torch.float32))
    if not sums:
        return True
    total = sums[0] if len(sums) == 1 else torch.stack([s.double() for s in sums]).sum()
    return bool(total.isfinite())


def decode_metadata(raw: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if not key.startswith(META_PREFIX):
            continue
        name = key[len(META_PREFIX) :]
        try:
            out[name] = json.loads(value)
        except (ValueError, RecursionError):  # ValueError: also an over-long integer
            out[name] = value
    return out


def write_adapter(
    path: str | os.PathLike[str],
    peft_config: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, Any],
    *,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write an adapter directory atomically (temp directory, then rename into place).

    An existing adapter at ``path`` is replaced only once the new one is complete, never a mix:
    a save that fails (an error, an interrupt) leaves the old one as it was and nothing else; a
    process killed mid-save leaves the old one and a hidden ``.<name>.*.tmp`` sibling, or, if
    killed between the two renames of `swap_dir`, the old one under ``.<name>.old-<pid>``.
    ``extra_files`` (``{file name: text}``, e.g. ``labels.json``) are written with it.

    Raises:
        NonFiniteError: A tensor holds NaN or infinity (nothing is written).
        AdapterFormatError: ``path`` exists and is not an adapter directory, lies under a
            file, or ends in ``.``/``..`` (see `named_dir`).
    """
    root = named_dir(path)
    for key, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(
                f"refusing to save: tensor {key!r} contains NaN or infinity (did training diverge?)"
            )
    is_adapter = root.is_dir() and (root / CONFIG_NAME).exists()
    if root.exists() and not is_adapter and (root.is_file() or any(root.iterdir())):
        raise AdapterFormatError(
            f"refusing to overwrite {str(root)!r}: it exists and is not an adapter directory"
        )
    header = {"format": "pt"}
    header[META_PREFIX + "format_version"] = FORMAT_VERSION
    header[META_PREFIX + "version"] = __version__
    for key, value in metadata.items():
        header[META_PREFIX + key] = value if isinstance(value, str) else json.dumps(value)
    try:
        root.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as exc:  # a file where a folder must be
        raise AdapterFormatError(
            f"cannot write {str(root)!r}: a part of that path is a file, not a directory "
            f"({exc.filename}); choose another path"
        ) from exc
    dest = real_dir(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(contiguous, str(tmp / WEIGHTS_NAME), metadata=header)
        (tmp / CONFIG_NAME).write_text(json.dumps(dict(peft_config), indent=2) + "\n")
        for file_name, text in (extra_files or {}).items():
            (tmp / file_name).write_text(text, encoding="utf-8")
        _replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target`` with `swap_dir`.

    Files in an old ``target`` other than the adapter's own (a model card, a training log)
    are carried over into the new directory first.
    """
    if target.exists():
        for entry in target.iterdir():
            if (new / entry.name).exists():
                continue
            if entry.is_symlink() or entry.is_file():  # a link stays a link (not a copy)
                shutil.copy2(entry, new / entry.name, follow_symlinks=False)
            else:
                shutil.copytree(entry, new / entry.name, symlinks=True)
    swap_dir(new, target)


def named_dir(path: str | os.PathLike[str]) -> Path:
    """``path`` as a folder this module may replace: one whose last part names it.

    A folder is replaced by renaming (`swap_dir`), which needs its name: ``.`` and ``..`` (and
    ``x/..``) have none to rename.

    Raises:
        AdapterFormatError: ``path`` ends in ``.`` or ``..``; the message gives its full path
            to pass instead.
    """
    root = Path(path)
    if root.name in ("", ".."):
        raise AdapterFormatError(
            f"cannot write to {str(path)!r}: the folder is replaced as a whole, so it must be "
            f"named, not reached through '.' or '..'; pass {os.path.abspath(path)!r} instead"
        )
    return root


def real_dir(path: Path) -> Path:
    """``path``, or the folder it links to when it is a symlink to one.

    Replacing a directory renames it: done on a link, that replaced the link with a new
    folder and left the folder it pointed to as it was (not updated).
    """
    return Path(os.path.realpath(path)) if path.is_symlink() and path.is_dir() else path


def swap_dir(new: Path, target: Path) -> None:
    """Rename directory ``new`` to ``target``; an old ``target`` is removed only after that.

    The old ``target`` is first renamed aside to ``.<name>.old-<pid>`` beside it; if renaming
    ``new`` into place then fails, it is renamed back. The one window two renames cannot close:
    a process killed between them leaves no ``target``, and the old directory under that hidden
    name (rename it back by hand).
    """
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)  # put the old directory back where it was
        raise
    shutil.rmtree(old, ignore_errors=True)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
