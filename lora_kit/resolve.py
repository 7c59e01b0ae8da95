"""Finding an adapter directory: a path, a name in the adapter library, or a Hub repo id.

Resolution order for ``spec``:

1. an existing directory ``spec`` (one that holds no adapter files yields to a library entry
   of the same name, so an unrelated ``sst2/`` folder does not hide ``adapters/sst2``);
2. ``<library>/<spec>``, where the library is ``$LORA_KIT_ADAPTERS`` or ``./adapters``;
   skipped for a spec written as a path (``./sst2``, ``~/sst2``, absolute, or with ``..``),
   which means that path and nothing else;
3. a Hugging Face Hub repo id, through ``huggingface_hub.snapshot_download`` (the local cache
   first; the network only when ``HF_HUB_OFFLINE`` is not set).

When nothing works, the error lists every place that was tried.
"""

from __future__ import annotations

import os
from pathlib import Path

from .adapter_io import CONFIG_NAME, WEIGHTS_NAME
from .base_model import hub_offline
from .errors import AdapterFormatError

LIBRARY_ENV = "LORA_KIT_ADAPTERS"
DEFAULT_LIBRARY = Path("adapters")


def adapter_library() -> Path:
    """The adapter library directory: ``$LORA_KIT_ADAPTERS`` or ``./adapters``."""
    return Path(os.environ.get(LIBRARY_ENV) or DEFAULT_LIBRARY)


def is_adapter_dir(path: Path) -> bool:
    """Whether ``path`` is a directory that holds (part of) an adapter."""
    return path.is_dir() and ((path / CONFIG_NAME).exists() or (path / WEIGHTS_NAME).exists())


def _written_as_path(text: str) -> bool:
    """Whether ``text`` names a path explicitly, so it must not resolve to a library name or a
    Hub repo: absolute, or starting with ``~`` or ``./``, or climbing with ``..``.

    Works on the text (``os.fspath`` of the spec): ``Path("./b")`` is ``"b"``, a plain name,
    which is also how the adapter cache stores it for reloading.
    """
    return (
        Path(text).is_absolute() or text.startswith(("~", "./", ".\\")) or ".." in Path(text).parts
    )


def resolve_adapter(spec: str | os.PathLike[str]) -> Path:
    """The local directory holding adapter ``spec`` (see the module docstring for the order).

    Raises:
        AdapterFormatError: Nothing found; the message lists every place tried.
    """
    text = os.fspath(spec)
    path = Path(text).expanduser()
    library = adapter_library()
    explicit = _written_as_path(text)
    in_library = bool(text) and not explicit
    if path.exists():  # a directory, or a file read_adapter will explain
        if path.is_dir() and not is_adapter_dir(path) and in_library:
            candidate = library / text
            if is_adapter_dir(candidate) and candidate.resolve() != path.resolve():
                return candidate
        return path
    tried = [f"directory {str(path)!r}: does not exist"]
    if in_library:
        candidate = library / text
        if candidate.is_dir():
            return candidate
        tried.append(f"adapter library {str(candidate)!r} (${LIBRARY_ENV}): does not exist")
    if not text or explicit or path.is_file() or text.count("/") != 1:
        raise AdapterFormatError(f"cannot find adapter {text!r}; tried: {'; '.join(tried)}")
    from huggingface_hub import snapshot_download

    attempts = [True] if hub_offline() else [True, False]
    for local_only in attempts:
        where = "Hugging Face cache" if local_only else "Hugging Face Hub (network)"
        try:
            folder = Path(snapshot_download(text, local_files_only=local_only))
        except Exception as exc:  # huggingface_hub raises many types; each is reported
            tried.append(f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            continue
        if (folder / CONFIG_NAME).is_file():
            return folder
        tried.append(f"{where}: repo {text!r} has no {CONFIG_NAME}")
    if hub_offline():
        tried.append("network: skipped because HF_HUB_OFFLINE is set")
    raise AdapterFormatError(f"cannot find adapter {text!r}; tried: {'; '.join(tried)}")
