"""`lorakit push ADAPTER REPO_ID` and `lorakit pull REPO_ID [-o DIR]`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lora_kit.errors import AdapterFormatError
from lora_kit.hub import HubError, check_repo_id, plan_push, pull_adapter, push_adapter

from ._tooling import emit_json, errors_to_exit, fail, human_bytes


def _repo_id(value: str) -> str:
    """A malformed repo id is bad usage (exit 2), caught before anything is read."""
    try:
        return check_repo_id(value)
    except HubError as exc:
        raise typer.BadParameter(str(exc)) from None


def push(
    adapter: Annotated[Path, typer.Argument(help="The adapter directory to upload.")],
    repo_id: Annotated[
        str,
        typer.Argument(help="Hub repo, 'owner/name' (created if missing).", callback=_repo_id),
    ],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private.")] = False,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message.")] = None,
    metrics: Annotated[
        Path | None,
        typer.Option(
            "--metrics",
            help="JSON file {metric: value} for the model card (default: ADAPTER/metrics.json).",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Print the files and model card that would be uploaded; no network."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Upload ADAPTER to the Hugging Face Hub as REPO_ID, in one commit.

    Uploads every non-hidden file of the adapter directory plus a generated README.md model
    card (config, metrics, statistics, provenance) unless the directory has its own README.md.
    The adapter directory is not modified. The token comes from huggingface_hub's usual places
    (HF_TOKEN, or `hf auth login`). Use --dry-run to see exactly what would be uploaded.

    Example: lorakit push adapters/sst2 me/sst2-lora --dry-run
    """
    with errors_to_exit():
        extra = _read_metrics(metrics) if metrics is not None else None
        plan = plan_push(adapter, repo_id, metrics=extra)
        url = None if dry_run else push_adapter(plan, private=private, commit_message=message)
    if as_json:
        emit_json({**plan.to_dict(), "dry_run": dry_run, "commit_url": url})
        return
    verb = "would upload" if dry_run else "uploaded"
    typer.echo(f"{verb} to {plan.repo_id}:")
    for planned in plan.files:
        origin = planned.local_path or "(generated model card)"
        typer.echo(f"  {planned.path_in_repo:<32} {human_bytes(planned.size_bytes):>10}  {origin}")
    if dry_run and plan.model_card is not None:
        typer.echo("\n--- README.md (model card) ---\n" + plan.model_card, nl=False)
    if url:
        typer.echo(f"commit: {url}")


def pull(
    repo_id: Annotated[str, typer.Argument(help="Hub repo, 'owner/name'.", callback=_repo_id)],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Destination directory (default: $LORA_KIT_ADAPTERS/NAME, else adapters/NAME).",
        ),
    ] = None,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Branch, tag or commit.")
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option("--cache-dir", help="Hub cache to use (default: HF_HUB_CACHE / HF_HOME's)."),
    ] = None,
    offline: Annotated[
        bool,
        typer.Option(
            "--offline", help="Use only the local Hub cache (also when HF_HUB_OFFLINE=1)."
        ),
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing adapter at the destination.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Download adapter REPO_ID from the Hugging Face Hub into the library.

    Offline (--offline or HF_HUB_OFFLINE=1) it is taken from the local Hub cache. The repo
    must be a LoRA adapter lora_kit can read.

    The copy is atomic: a failed pull leaves nothing half-written. The token for private repos
    comes from huggingface_hub's usual places.

    Example: lorakit pull me/sst2-lora -o adapters/sst2
    """
    with errors_to_exit():
        result = pull_adapter(
            repo_id,
            out,
            revision=revision,
            cache_dir=cache_dir,
            offline=True if offline else None,
            force=force,
        )
    if as_json:
        emit_json(vars(result))
        return
    typer.echo(f"pulled {result.repo_id}@{result.commit[:12]} into {result.path}")
    for name in result.files:
        typer.echo(f"  {name}")


def _read_metrics(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        fail(f"metrics file {str(path)!r} does not exist")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise AdapterFormatError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise AdapterFormatError(f"{path}: expected a JSON object of metric -> value")
    return data
