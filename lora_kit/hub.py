"""Pushing adapters to and pulling them from the Hugging Face Hub (through ``huggingface_hub``).

* Push: :func:`plan_push` decides exactly what is uploaded (every non-hidden file of the adapter
  directory, plus a generated ``README.md`` model card unless the directory has its own) and
  :func:`push_adapter` uploads that plan in one commit. The adapter directory is never written
  to: the card is uploaded from memory.
* Pull: :func:`pull_adapter` resolves the repo through the Hub cache (offline mode, or
  ``offline=True``, uses only the cache), checks it is a readable adapter, and copies it into
  the library atomically (temp directory, then rename).

Tokens come from huggingface_hub's usual places (``HF_TOKEN``, ``hf auth login``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._version import __version__
from .adapter_io import CONFIG_NAME, named_dir, read_adapter, real_dir, swap_dir
from .base_model import hub_offline
from .errors import AdapterFormatError, LoraKitError
from .inspection import AdapterReport, inspect_files
from .resolve import adapter_library

CARD_NAME = "README.md"
METRICS_NAME = "metrics.json"
_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?\Z")  # \Z: "$" allows a final "\n"
_LOGIN_HINT = "log in with `hf auth login` (or set HF_TOKEN) with a token that can write to it"


class HubError(LoraKitError):
    """The Hub could not be reached, refused the request, or the repo is not in the cache."""


@dataclass(frozen=True)
class PlannedFile:
    """One file of a push.

    Attributes:
        path_in_repo: Where it lands in the repo.
        local_path: The file it is read from; None for the generated model card.
        size_bytes: Its size.
    """

    path_in_repo: str
    local_path: str | None
    size_bytes: int


@dataclass(frozen=True)
class PushPlan:
    """Exactly what :func:`push_adapter` uploads.

    Attributes:
        adapter: The adapter directory.
        repo_id: Target repo (``user/name``).
        files: Every file uploaded, sorted by path in the repo.
        model_card: The generated ``README.md`` (None when the directory has its own).
    """

    adapter: str
    repo_id: str
    files: tuple[PlannedFile, ...]
    model_card: str | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "adapter": self.adapter,
            "repo_id": self.repo_id,
            "files": [vars(f) for f in self.files],
            "model_card": self.model_card,
        }


@dataclass(frozen=True)
class PullResult:
    """What :func:`pull_adapter` did.

    Attributes:
        repo_id: The repo.
        commit: The commit hash of the snapshot copied.
        path: The adapter directory written.
        files: Files copied, relative to ``path``.
    """

    repo_id: str
    commit: str
    path: str
    files: tuple[str, ...]


def check_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` if it has the Hub's ``name`` or ``owner/name`` form.

    Raises:
        HubError: It does not (the message shows the expected form).
    """
    if not _REPO_RE.match(repo_id) or ".." in repo_id or repo_id.endswith((".", "-")):
        raise HubError(
            f"{repo_id!r} is not a Hub repo id: use 'owner/name' (letters, digits, '-', '_', '.')"
        )
    return repo_id


def plan_push(
    adapter: str | os.PathLike[str],
    repo_id: str,
    *,
    metrics: dict[str, Any] | None = None,
) -> PushPlan:
    """Decide what pushing ``adapter`` to ``repo_id`` uploads; reads only.

    Args:
        adapter: The adapter directory (must be readable by `read_adapter`).
        repo_id: ``owner/name``.
        metrics: Metrics for the model card; defaults to the directory's ``metrics.json``, or
            the ``metrics`` entry of lora_kit's metadata.

    Raises:
        AdapterFormatError: Not a readable adapter, or an invalid ``metrics.json``.
        HubError: Invalid repo id.
    """
    check_repo_id(repo_id)
    files = read_adapter(adapter)
    root = files.path
    planned = [
        PlannedFile(p.relative_to(root).as_posix(), str(p), p.stat().st_size)
        for p in sorted(root.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    card = None
    if not any(f.path_in_repo == CARD_NAME for f in planned):
        found = metrics if metrics is not None else _metrics(root, files.metadata)
        card = model_card(inspect_files(files), repo_id, found)
        planned.append(PlannedFile(CARD_NAME, None, len(card.encode("utf-8"))))
    return PushPlan(str(root), repo_id, tuple(sorted(planned, key=lambda f: f.path_in_repo)), card)


def push_adapter(
    plan: PushPlan,
    *,
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload ``plan`` to the Hub in one commit (the repo is created if needed).

    Args:
        plan: From :func:`plan_push`.
        private: Create the repo as private (an existing repo keeps its visibility).
        commit_message: Defaults to "Upload LoRA adapter with lora_kit <version>".
        token: Defaults to huggingface_hub's (``HF_TOKEN``, ``hf auth login``).
        endpoint: Hub URL (defaults to huggingface_hub's, ``HF_ENDPOINT``).

    Returns:
        The URL of the commit.

    Raises:
        HubError: Offline mode is on, no/invalid token, or the Hub refused the upload.
    """
    if hub_offline():
        raise HubError(
            f"cannot push to {plan.repo_id!r}: HF_HUB_OFFLINE is set; unset it to use the network"
        )
    from huggingface_hub import CommitOperationAdd, HfApi

    operations = [
        CommitOperationAdd(
            path_in_repo=f.path_in_repo,
            path_or_fileobj=f.local_path
            if f.local_path is not None
            else (plan.model_card or "").encode("utf-8"),
        )
        for f in plan.files
    ]
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(plan.repo_id, private=private, exist_ok=True)
        info = api.create_commit(
            plan.repo_id,
            operations=operations,
            commit_message=commit_message or f"Upload LoRA adapter with lora_kit {__version__}",
        )
    except Exception as exc:  # huggingface_hub raises many types; each is reported the same way
        raise HubError(
            f"pushing {plan.adapter!r} to {plan.repo_id!r} failed: {type(exc).__name__}: "
            f"{_first_line(exc)}; check the network, and {_LOGIN_HINT}"
        ) from exc
    return str(info.commit_url)


def pull_adapter(
    repo_id: str,
    out: str | os.PathLike[str] | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    offline: bool | None = None,
    force: bool = False,
    endpoint: str | None = None,
) -> PullResult:
    """Fetch adapter ``repo_id`` (or find it in the Hub cache) and copy it to ``out``.

    Args:
        repo_id: ``owner/name``.
        out: Destination directory; default ``<library>/<name>``, the library being
            ``$LORA_KIT_ADAPTERS`` or ``./adapters`` (where ``load_adapter("<name>")`` looks).
        revision: Branch, tag or commit (default: ``main``).
        cache_dir: Hub cache to use (default: huggingface_hub's, ``HF_HUB_CACHE``/``HF_HOME``).
        offline: Use only the cache; defaults to whether ``HF_HUB_OFFLINE`` is set.
        force: Replace an existing adapter directory at ``out`` (never another folder).
        endpoint: Hub URL (defaults to huggingface_hub's, ``HF_ENDPOINT``).

    Raises:
        HubError: Invalid id, not cached while offline, or the download failed.
        AdapterFormatError: The repo is not a readable LoRA adapter, or ``out`` exists (without
            ``force``), is a file, is a non-empty folder that is not an adapter, holds a
            training run (``checkpoint/``, ``metrics.jsonl``), or ends in ``.``/``..``.
    """
    check_repo_id(repo_id)
    target = named_dir(out) if out is not None else adapter_library() / repo_id.rsplit("/", 1)[-1]
    filled = target.is_dir() and any(target.iterdir())  # listed once (an empty one is new)
    if target.is_file() or (filled and not force):
        raise AdapterFormatError(
            f"{str(target)!r} already exists; choose another -o directory or pass --force to "
            f"replace it"
        )
    if filled and not (target / CONFIG_NAME).is_file():
        raise AdapterFormatError(  # --force replaces an adapter, never another folder's files
            f"refusing to replace {str(target)!r}: it is not an adapter directory (no "
            f"{CONFIG_NAME}); choose another -o directory"
        )
    if filled:
        _refuse_training_run(target)
    offline = hub_offline() if offline is None else offline
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                cache_dir=None if cache_dir is None else Path(cache_dir),
                local_files_only=offline,
                endpoint=endpoint,
            )
        )
    except Exception as exc:  # huggingface_hub raises many types; each is reported the same way
        where = f"cache {str(cache_dir)!r}" if cache_dir is not None else "the Hugging Face cache"
        if offline:
            raise HubError(
                f"{repo_id!r} (revision {revision or 'main'}) is not in {where} and offline mode "
                f"is on; run the pull once with network access (unset HF_HUB_OFFLINE) "
                f"[{type(exc).__name__}]"
            ) from exc
        raise HubError(
            f"could not download {repo_id!r}: {type(exc).__name__}: {_first_line(exc)}; check "
            f"the network and the repo id, and for a private repo {_LOGIN_HINT}"
        ) from exc
    try:
        read_adapter(snapshot)
    except AdapterFormatError as exc:
        raise AdapterFormatError(
            f"{repo_id!r} is not a LoRA adapter lora_kit can read: {exc}"
        ) from exc
    copied = _copy_atomically(snapshot, target)
    return PullResult(repo_id, snapshot.name, str(target), copied)


def model_card(report: AdapterReport, repo_id: str, metrics: dict[str, Any]) -> str:
    """The ``README.md`` pushed with an adapter: front matter, usage, config, metrics."""
    base = report.peft_config.get("base_model_name_or_path")
    front = ["---", "library_name: peft", "tags:", "- lora", "- lora_kit", "- peft"]
    if isinstance(base, str) and _is_hub_id(base):
        front.append(f"base_model: {base}")
    front.append("---")
    fp = report.provenance.get("base_fingerprint")
    norms = [m.delta_norm for m in report.modules]
    lines = [
        *front,
        "",
        f"# {repo_id.rsplit('/', 1)[-1]}",
        "",
        f"A LoRA adapter (origin: {report.origin}) for `{base or 'an unrecorded base model'}`, "
        f"in PEFT's format, pushed with lora_kit {__version__}.",
        "",
        "## Usage",
        "",
        "```python",
        "import lora_kit as lk",
        f"# `lorakit pull {repo_id}` puts it in adapters/{repo_id.rsplit('/', 1)[-1]}",
        f'lm = lk.LoraModel.from_pretrained(base_model, "adapters/{repo_id.rsplit("/", 1)[-1]}")',
        "```",
        "",
        f'PEFT reads it too: `PeftModel.from_pretrained(base_model, "{repo_id}")`.',
        "",
        "## Configuration",
        "",
        "| field | value |",
        "|---|---|",
        *(f"| {k} | `{json.dumps(v)}` |" for k, v in sorted(report.config.items())),
        "",
        "## Metrics",
        "",
    ]
    if metrics:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(metrics.items())]
    else:
        lines.append("No training or evaluation metrics were recorded with this adapter.")
    lines += [
        "",
        "Adapter statistics:",
        "",
        f"- adapted modules: {len(report.modules)}",
        f"- parameters: {report.parameters:,}",
        f"- weights file: {report.file_bytes:,} bytes",
        f"- delta Frobenius norm per module: min {min(norms, default=0.0):.4g}, "
        f"max {max(norms, default=0.0):.4g}",
        "",
        "## Provenance",
        "",
        f"- created: {report.provenance.get('created', 'unknown')}",
        f"- written by: lora_kit {report.provenance.get('version', 'n/a (PEFT)')}",
    ]
    if isinstance(fp, dict):
        lines.append(
            f"- base fingerprint: {fp.get('model_type')}, "
            f"weights sha256 `{fp.get('weights_sha256')}`"
        )
    return "\n".join(lines) + "\n"


def _is_hub_id(name: str) -> bool:
    """Whether a recorded base model name is a Hub id: written as one, and not a local folder.

    A base loaded from ``models/gpt2`` (or ``gpt2`` in the working directory) records that
    path, which reads like a Hub id; it is taken as local when it exists from where the push
    runs. (A relative path recorded elsewhere that does not exist here cannot be told apart.)
    """
    return bool(_REPO_RE.match(name)) and not Path(name).exists()


def _metrics(root: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    path = root / METRICS_NAME
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise AdapterFormatError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(data, dict):
            raise AdapterFormatError(f"{path}: expected a JSON object of metric -> value")
        return data
    found = metadata.get("metrics")
    return dict(found) if isinstance(found, dict) else {}


def _refuse_training_run(target: Path) -> None:
    """Refuse a folder holding what a `lorakit train` run keeps beside its adapter: the pulled
    copy mirrors the repo, so replacing the folder would delete them.

    Raises:
        AdapterFormatError: Naming the run's files found there.
    """
    from .train.checkpoint import CHECKPOINT_DIR  # (the trainer: imported only here)
    from .train.logging import METRICS_FILE

    found = [
        n
        for n in (CHECKPOINT_DIR, METRICS_FILE)
        if (target / n).exists() or (target / n).is_symlink()
    ]
    if found:
        raise AdapterFormatError(
            f"refusing to replace {str(target)!r}: it holds a training run ({', '.join(found)}) "
            f"that replacing the folder would delete; choose another -o directory"
        )


def _copy_atomically(source: Path, target: Path) -> tuple[str, ...]:
    target = real_dir(target)  # a link to a folder: that folder is replaced, the link kept
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    copied: list[str] = []
    try:
        for path in sorted(source.rglob("*")):
            rel = path.relative_to(source)
            if any(part.startswith(".") for part in rel.parts) or not path.is_file():
                continue
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, tmp / rel)  # follows the cache's symlinks to the blobs
            copied.append(rel.as_posix())
        swap_dir(tmp, target)  # an old directory goes only once the new one is in place
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tuple(copied)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "(no message)"
