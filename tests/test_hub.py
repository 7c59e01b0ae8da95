"""Tests of lora_kit.hub that need no network: push plans, offline refusals, cache pulls.

The Hub cache is a real on-disk layout (blobs + snapshot symlinks + refs/main) read by the real
``huggingface_hub.snapshot_download``; nothing in huggingface_hub is mocked.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from tooling_helpers import make_adapter, make_hub_cache, make_peft_adapter, tree_hashes

import lora_kit as lk
from lora_kit.hub import HubError, check_repo_id, plan_push, pull_adapter, push_adapter

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter("gpt2", tmp_path_factory.mktemp("hub") / "sst2")


def test_push_plan_lists_every_file_and_a_model_card(adapter: Path, tmp_path: Path) -> None:
    before = tree_hashes(adapter)
    plan = plan_push(adapter, "me/sst2")
    assert tree_hashes(adapter) == before  # the card is not written into the adapter
    assert [f.path_in_repo for f in plan.files] == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    card = plan.model_card
    assert card is not None and card.startswith("---\nlibrary_name: peft\n")
    assert plan.files[0].local_path is None and plan.files[0].size_bytes == len(card.encode())
    for file in plan.files[1:]:
        assert file.local_path is not None
        assert file.size_bytes == Path(file.local_path).stat().st_size
    config = lk.read_adapter(adapter).config
    assert f"| r | `{config.r}` |" in card and '| targets | `["c_attn"]` |' in card
    assert "No training or evaluation metrics" in card
    assert lk.read_adapter(adapter).metadata["base_fingerprint"]["weights_sha256"] in card


def test_push_plan_takes_metrics_and_keeps_an_own_card(adapter: Path, tmp_path: Path) -> None:
    folder = tmp_path / "ad"
    folder.mkdir()
    for file in adapter.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    (folder / "metrics.json").write_text(json.dumps({"eval_accuracy": 0.91}))
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x").write_text("hidden files are not uploaded")
    plan = plan_push(folder, "me/sst2")
    assert plan.model_card is not None and "| eval_accuracy | 0.91 |" in plan.model_card
    assert "metrics.json" in {f.path_in_repo for f in plan.files}
    assert plan_push(folder, "me/x", metrics={"f1": 0.5}).model_card.count("| f1 | 0.5 |") == 1
    (folder / "README.md").write_text("# mine\n")
    plan = plan_push(folder, "me/sst2")
    assert plan.model_card is None
    readme = next(f for f in plan.files if f.path_in_repo == "README.md")
    assert readme.local_path == str(folder / "README.md")


def _with_base(adapter: Path, folder: Path, base: str) -> Path:
    """A copy of ``adapter`` whose config records ``base`` as its base model."""
    shutil.copytree(adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("base", ["models/gpt2", "gpt2"])
def test_model_card_names_no_hub_base_for_a_local_folder(
    adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, base: str
) -> None:
    """A base loaded from a local folder whose path looks like a Hub id was written into the
    card's front matter as ``base_model:``, linking the adapter to an unrelated Hub model."""
    (tmp_path / base).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    card = plan_push(_with_base(adapter, tmp_path / "ad", base), "me/sst2").model_card
    assert card is not None and "base_model:" not in card.split("\n---\n")[0]
    assert f"for `{base}`" in card  # still named in the text


def test_model_card_names_a_hub_base(
    adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    card = plan_push(_with_base(adapter, tmp_path / "ad", "org/name"), "me/sst2").model_card
    assert card is not None and "\nbase_model: org/name\n---\n" in card


def test_push_refuses_bad_input_and_offline_mode(
    adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(lk.AdapterFormatError, match="does not exist"):
        plan_push(tmp_path / "missing", "me/x")
    with pytest.raises(HubError, match="not a Hub repo id"):
        plan_push(adapter, "me/x/y")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE is set"):
        push_adapter(plan_push(adapter, "me/x"))


@pytest.mark.parametrize("origin", ["lora_kit", "peft"])
def test_pull_from_the_offline_cache(origin: str, adapter: Path, tmp_path: Path) -> None:
    source = adapter if origin == "lora_kit" else make_peft_adapter("bert", tmp_path / "peft")
    cache = tmp_path / "hf-cache"
    make_hub_cache(cache, "org/remote", source, COMMIT)
    out = tmp_path / "lib" / "remote"
    result = pull_adapter("org/remote", out, cache_dir=cache, offline=True)
    assert (result.commit, result.path) == (COMMIT, str(out))
    assert tree_hashes(out) == tree_hashes(source)  # byte-identical copy, no symlinks left
    assert not any(p.is_symlink() for p in out.iterdir())
    assert lk.read_adapter(out).origin == origin
    cache_before = tree_hashes(cache)
    with pytest.raises(lk.AdapterFormatError, match="already exists"):
        pull_adapter("org/remote", out, cache_dir=cache, offline=True)
    (out / "stale.txt").write_text("from an older pull")
    pull_adapter("org/remote", out, cache_dir=cache, offline=True, force=True)
    assert not (out / "stale.txt").exists() and tree_hashes(out) == tree_hashes(source)
    assert tree_hashes(cache) == cache_before


def test_pull_force_into_dot_is_refused_before_any_download(
    adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pull --force REPO -o .`` from inside the adapter raised a bare ValueError at the swap."""
    out = tmp_path / "remote"
    shutil.copytree(adapter, out)
    before = tree_hashes(out)
    monkeypatch.chdir(out)
    with pytest.raises(lk.AdapterFormatError, match=f"pass {str(out)!r} instead"):
        pull_adapter("org/remote", ".", cache_dir=tmp_path / "no-cache", offline=True, force=True)
    assert tree_hashes(out) == before


def test_pull_force_failing_as_it_moves_in_keeps_the_old_adapter(
    adapter: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--force renames the old directory aside before renaming the new one in: when the second
    rename failed, the library was left without the adapter (it sat under a hidden name)."""
    import os

    cache = tmp_path / "hf-cache"
    make_hub_cache(cache, "org/remote", make_peft_adapter("bert", tmp_path / "peft"), COMMIT)
    library = tmp_path / "lib"
    library.mkdir()
    out = library / "remote"
    shutil.copytree(adapter, out)
    before = tree_hashes(out)
    real_replace = os.replace

    def failing_replace(src: object, dst: object) -> None:
        if Path(str(src)).name.endswith(".tmp"):  # the new copy moving into place
            raise OSError("simulated failure")
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        pull_adapter("org/remote", out, cache_dir=cache, offline=True, force=True)
    assert tree_hashes(out) == before
    assert [p.name for p in library.iterdir()] == ["remote"]  # no temporary copy left either
    monkeypatch.undo()
    pull_adapter("org/remote", out, cache_dir=cache, offline=True, force=True)
    assert lk.read_adapter(out).origin == "peft"


def test_pull_offline_and_not_cached_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(HubError, match=r"is not in cache .* and offline mode is on"):
        pull_adapter("org/absent", tmp_path / "out", cache_dir=tmp_path / "empty", offline=True)
    assert not (tmp_path / "out").exists()


def test_pull_refuses_a_repo_that_is_not_an_adapter(tmp_path: Path) -> None:
    model_repo = tmp_path / "model"
    model_repo.mkdir()
    (model_repo / "config.json").write_text("{}")
    make_hub_cache(tmp_path / "cache", "org/model", model_repo, COMMIT)
    with pytest.raises(lk.AdapterFormatError, match="'org/model' is not a LoRA adapter"):
        pull_adapter("org/model", tmp_path / "out", cache_dir=tmp_path / "cache", offline=True)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))  # no temp leftovers


@pytest.mark.parametrize("bad", ["", "a/b/c", "../x", "me/", "/abs", "a b", "me/x\n"])
def test_repo_ids_are_checked(bad: str) -> None:
    with pytest.raises(HubError):
        check_repo_id(bad)


# A closed local port: huggingface_hub's real network code runs and fails to connect at once.
UNREACHABLE = "http://127.0.0.1:9"


def test_push_network_failure_is_a_clear_error(
    adapter: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    before = tree_hashes(adapter)
    with pytest.raises(HubError, match=r"pushing .* to 'me/x' failed: .*check the network"):
        push_adapter(plan_push(adapter, "me/x"), token="hf_fake", endpoint=UNREACHABLE)
    assert tree_hashes(adapter) == before


def test_pull_online_falls_back_to_the_cache_when_unreachable(
    adapter: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    make_hub_cache(cache, "org/remote", adapter, COMMIT)
    out = tmp_path / "out"
    result = pull_adapter("org/remote", out, cache_dir=cache, offline=False, endpoint=UNREACHABLE)
    assert result.commit == COMMIT and tree_hashes(out) == tree_hashes(adapter)
    with pytest.raises(HubError, match=r"could not download 'org/other'.*check the network"):
        pull_adapter("org/other", tmp_path / "o2", cache_dir=cache, offline=False,
                     endpoint=UNREACHABLE)  # fmt: skip


def test_pull_into_an_empty_existing_folder_needs_no_force(adapter: Path, tmp_path: Path) -> None:
    """An empty directory at ``out`` (made by the user, or ``mkdir -p``) holds nothing to
    lose: it is filled without ``force``; a non-empty one is refused."""
    cache = tmp_path / "hf-cache"
    make_hub_cache(cache, "org/remote", adapter, COMMIT)
    out = tmp_path / "lib" / "remote"
    out.mkdir(parents=True)
    pull_adapter("org/remote", out, cache_dir=cache, offline=True)
    assert tree_hashes(out) == tree_hashes(adapter)


def test_pull_leaves_out_hidden_files_of_the_snapshot(adapter: Path, tmp_path: Path) -> None:
    """A Hub snapshot usually holds ``.gitattributes``; hidden files and folders are not part
    of the adapter and are neither copied nor listed."""
    source = tmp_path / "source"
    shutil.copytree(adapter, source)
    (source / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    cache = tmp_path / "hf-cache"
    make_hub_cache(cache, "org/remote", source, COMMIT)
    out = tmp_path / "lib" / "remote"
    result = pull_adapter("org/remote", out, cache_dir=cache, offline=True)
    assert not (out / ".gitattributes").exists()
    assert set(result.files) == set(tree_hashes(adapter)) == set(tree_hashes(out))


def test_pull_force_through_a_symlink_replaces_the_linked_folder_and_keeps_the_link(
    adapter: Path, tmp_path: Path
) -> None:
    """--force renamed the link aside and put a new folder in its place: the linked folder kept
    the old adapter and a hidden ``.NAME.old-<pid>`` link was left beside the new folder."""
    cache = tmp_path / "hf-cache"
    source = make_peft_adapter("bert", tmp_path / "peft")
    make_hub_cache(cache, "org/remote", source, COMMIT)
    real = tmp_path / "store" / "remote"
    shutil.copytree(adapter, real)
    link = tmp_path / "lib" / "remote"
    link.parent.mkdir()
    link.symlink_to(real)
    pull_adapter("org/remote", link, cache_dir=cache, offline=True, force=True)
    assert link.is_symlink() and [p.name for p in link.parent.iterdir()] == ["remote"]
    assert tree_hashes(real) == tree_hashes(source)
