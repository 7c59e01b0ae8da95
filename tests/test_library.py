"""Tests of lora_kit.library: scanning a folder of adapters into summaries."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest
from tooling_helpers import make_adapter, make_peft_adapter, tree_hashes

import lora_kit as lk
from lora_kit.errors import AdapterFormatError
from lora_kit.library import scan_library


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lib") / "adapters"
    make_adapter("gpt2", root / "gpt2-attn")
    make_adapter("bert", root / "team" / "bert-qv", lk.LoraConfig(r=8, alpha=16))
    make_adapter(
        "gpt2", root / "mixed", lk.LoraConfig(r=4, alpha=4, rank_pattern={"h.1.attn.c_attn": 2})
    )
    make_peft_adapter("bert", root / "from-peft")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("not an adapter")
    shutil.copytree(root / "gpt2-attn", root / ".gpt2-attn.x.tmp")  # interrupted-save leftover
    return root


def test_scan_summarises_every_adapter(library: Path) -> None:
    before = tree_hashes(library)
    scan = scan_library(library)
    assert tree_hashes(library) == before  # read-only
    by_name = {a.name: a for a in scan.adapters}
    assert sorted(by_name) == ["from-peft", "gpt2-attn", "mixed", "team/bert-qv"]
    assert not scan.problems
    gpt2 = by_name["gpt2-attn"]
    assert (gpt2.base, gpt2.targets, gpt2.modules, gpt2.r, gpt2.alpha) == (
        "gpt2",
        ("c_attn",),
        2,
        4,
        8.0,
    )
    assert gpt2.origin == "lora_kit" and gpt2.created_source == "metadata"
    files = lk.read_adapter(library / "gpt2-attn")
    assert gpt2.created == files.metadata["created"]
    assert gpt2.parameters == sum(t.numel() for t in files.tensors.values())
    assert gpt2.size_bytes == (library / "gpt2-attn" / "adapter_model.safetensors").stat().st_size
    bert = by_name["team/bert-qv"]
    assert bert.targets == ("query", "value") and (bert.r, bert.ranks) == (8, (8,))
    assert by_name["mixed"].ranks == (2, 4)
    peft = by_name["from-peft"]
    assert (peft.origin, peft.created_source, peft.targets) == ("peft", "mtime", ("query", "value"))
    # The interrupted save's hidden copy is no adapter, but is reported with its size.
    leftover = library / ".gpt2-attn.x.tmp"
    size = sum(f.stat().st_size for f in leftover.iterdir())
    assert [(x.path, x.size_bytes) for x in scan.leftovers] == [(str(leftover), size)]


def test_leftovers_inside_adapters_and_run_directories_are_reported(
    library: Path, tmp_path: Path
) -> None:
    # A training run killed while checkpointing leaves .checkpoint.*.tmp in its run directory
    # (an adapter directory, which the scan does not descend into otherwise).
    root = tmp_path / "lib"
    shutil.copytree(library, root, symlinks=True)
    checkpoint = root / "mixed" / ".checkpoint.abc.tmp"
    checkpoint.mkdir()
    (checkpoint / "state.safetensors").write_bytes(b"x" * 1000)
    (root / "team" / ".adapter.q.tmp").write_bytes(b"y" * 10)  # a file, one level down
    (root / ".not-a-leftover").mkdir()  # hidden, but no .tmp: ignored as before
    os.symlink(root / "mixed", root / ".linked.tmp")  # a link is not followed or counted
    found = {
        Path(x.path).relative_to(root).as_posix(): x.size_bytes
        for x in scan_library(root).leftovers
    }
    assert found == {
        ".gpt2-attn.x.tmp": sum(f.stat().st_size for f in (root / ".gpt2-attn.x.tmp").iterdir()),
        "mixed/.checkpoint.abc.tmp": 1000,
        "team/.adapter.q.tmp": 10,
    }
    assert sorted(a.name for a in scan_library(root).adapters) == sorted(
        a.name for a in scan_library(library).adapters
    )


def test_broken_adapters_are_reported_not_fatal(library: Path, tmp_path: Path) -> None:
    root = tmp_path / "lib"
    shutil.copytree(library, root, symlinks=True)
    weights = root / "gpt2-attn" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated download
    (root / "half").mkdir()
    (root / "half" / "adapter_config.json").write_text("{}")
    scan = scan_library(root)
    assert {p.name for p in scan.problems} == {"gpt2-attn", "half"}
    assert "truncated or corrupt" in next(p for p in scan.problems if p.name == "gpt2-attn").error
    assert len(scan.adapters) == 3


def test_root_may_be_one_adapter_and_must_exist(library: Path, tmp_path: Path) -> None:
    scan = scan_library(library / "mixed")
    assert [a.name for a in scan.adapters] == ["mixed"]
    with pytest.raises(AdapterFormatError, match="does not exist"):
        scan_library(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(AdapterFormatError, match="is a file"):
        scan_library(tmp_path / "file")


def test_symlink_loops_are_not_followed_forever(library: Path, tmp_path: Path) -> None:
    root = tmp_path / "lib"
    root.mkdir()
    os.symlink(library / "mixed", root / "linked")
    os.symlink(root, root / "loop")
    assert [a.name for a in scan_library(root).adapters] == ["linked"]


def test_a_leftover_gone_during_the_scan_is_skipped(
    library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A save running beside `list` renames its .tmp into place between the listing and the
    # size: the scan goes on without it instead of failing.
    root = tmp_path / "lib"
    shutil.copytree(library, root, symlinks=True)
    real_lstat = Path.lstat

    def vanished(self: Path) -> os.stat_result:
        if self.name.endswith(".tmp"):
            raise FileNotFoundError(errno.ENOENT, "gone", str(self))
        return real_lstat(self)

    monkeypatch.setattr(Path, "lstat", vanished)
    scan = scan_library(root)
    assert scan.leftovers == () and len(scan.adapters) == 4
