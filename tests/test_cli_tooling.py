"""The list/inspect/verify/diff/push/pull commands, through Typer's CliRunner and real processes.

Every invocation checks that the inputs (adapters, bases, Hub cache) are byte-identical
afterwards, and that failures exit non-zero with an ``error:`` line and no traceback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from tooling_helpers import (
    make_adapter,
    make_hub_cache,
    make_peft_adapter,
    save_base,
    tree_hashes,
)
from typer.testing import CliRunner, Result

from lora_kit_cli.app import app

COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
# The console script installed beside the interpreter running the tests (.venv/bin/lorakit).
LORAKIT = Path(sys.executable).with_name("lorakit")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    save_base("gpt2", root / "base-gpt2")
    save_base("bert", root / "base-bert")
    lib = root / "adapters"
    make_adapter("gpt2", lib / "g1", seed=1)
    make_adapter("gpt2", lib / "g2", seed=2)
    make_peft_adapter("bert", lib / "b-peft")
    broken = root / "broken"
    shutil.copytree(lib / "g1", broken / "corrupt")
    weights = broken / "corrupt" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:64])
    (broken / "not-adapter").mkdir()
    (broken / "not-adapter" / "notes.txt").write_text("hello")
    make_hub_cache(root / "hf-cache", "org/remote", lib / "g1", COMMIT)
    make_hub_cache(root / "hf-cache", "org/base-bert", root / "base-bert", COMMIT)
    return root


def run(inputs: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    """Invoke the CLI in-process and check that no input file changed."""
    before = tree_hashes(inputs)
    result = CliRunner().invoke(app, list(args), env=env)
    assert tree_hashes(inputs) == before, f"lorakit {' '.join(args)} modified its inputs"
    assert "Traceback" not in result.output
    return result


def fails(result: Result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    assert result.stderr.startswith("error: ") or code == 2, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_list(inputs: Path) -> None:
    result = run(inputs, "list", str(inputs / "adapters"))
    assert result.exit_code == 0, result.output
    header, _, *rows = result.stdout.splitlines()
    assert header.split() == ["NAME", "BASE", "TARGETS", "R/ALPHA", "SIZE", "CREATED", "ORIGIN"]
    assert [r.split()[0] for r in rows[:3]] == ["b-peft", "g1", "g2"]
    data = json.loads(run(inputs, "list", str(inputs / "adapters"), "--json").stdout)
    assert {a["name"]: a["origin"] for a in data["adapters"]} == {
        "b-peft": "peft",
        "g1": "lora_kit",
        "g2": "lora_kit",
    }
    fails(run(inputs, "list", str(inputs / "broken")), 1, "corrupt", "truncated or corrupt")
    fails(run(inputs, "list", str(inputs / "nowhere")), 1, "does not exist")


def test_list_reports_leftovers_of_interrupted_saves(inputs: Path, tmp_path: Path) -> None:
    lib = tmp_path / "adapters"
    shutil.copytree(inputs / "adapters", lib)
    shutil.copytree(lib / "g1", lib / ".g1.k2j.tmp")  # a save killed before its rename
    size = sum(f.stat().st_size for f in (lib / ".g1.k2j.tmp").iterdir())
    result = CliRunner().invoke(app, ["list", str(lib)])
    assert result.exit_code == 0, result.output  # not an error: nothing is broken
    assert "1 leftover(s) of interrupted saves" in result.stdout
    assert str(lib / ".g1.k2j.tmp") in result.stdout
    data = json.loads(CliRunner().invoke(app, ["list", str(lib), "--json"]).stdout)
    assert data["leftovers"] == [{"path": str(lib / ".g1.k2j.tmp"), "size_bytes": size}]
    assert (lib / ".g1.k2j.tmp").is_dir()  # reported, never removed


def test_inspect(inputs: Path) -> None:
    result = run(inputs, "inspect", str(inputs / "adapters" / "g1"))
    assert result.exit_code == 0, result.output
    assert "transformer.h.1.attn.c_attn  96x32" in result.stdout
    assert "effective rank: singular values of dW above 0.001" in result.stdout
    data = json.loads(run(inputs, "inspect", str(inputs / "adapters" / "g1"), "--json").stdout)
    assert [m["effective_rank"] for m in data["modules"]] == [4, 4]
    assert len(data["modules"][0]["singular_values"]) == 4
    fails(run(inputs, "inspect", str(inputs / "nowhere")), 1, "does not exist")
    not_adapter = str(inputs / "broken" / "not-adapter")
    fails(run(inputs, "inspect", not_adapter), 1, "adapter_config.json is missing")
    corrupt = str(inputs / "broken" / "corrupt")
    fails(run(inputs, "inspect", corrupt), 1, "unreadable safetensors file")
    g1 = str(inputs / "adapters" / "g1")
    fails(run(inputs, "inspect", g1, "--threshold", "2"), 2, "not in [0, 1)")  # bad usage


def test_verify(inputs: Path) -> None:
    g1, base = str(inputs / "adapters" / "g1"), str(inputs / "base-gpt2")
    result = run(inputs, "verify", g1, "--base", base)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("FITS") and "coverage     100.0% (4/4" in result.stdout
    data = json.loads(run(inputs, "verify", g1, "--base", base, "--json").stdout)
    assert (data["fits"], data["coverage"], data["fingerprint"]) == (True, 1.0, "match")
    wrong = run(inputs, "verify", g1, "--base", str(inputs / "base-bert"))
    fails(wrong, 1, "matched no Linear/Conv1D module", "--no-fingerprint")
    assert wrong.stdout.startswith("DOES NOT FIT") and "coverage     0.0%" in wrong.stdout
    peft = str(inputs / "adapters" / "b-peft")
    assert run(inputs, "verify", peft, "-b", str(inputs / "base-bert")).exit_code == 0
    fails(run(inputs, "verify", g1, "--base", str(inputs / "nowhere")), 1, "cannot resolve base")
    corrupt = str(inputs / "broken" / "corrupt")
    fails(run(inputs, "verify", corrupt, "--base", base), 1, "unreadable safetensors")
    fails(run(inputs, "verify", g1), 2)  # --base is required: a usage error


def test_verify_accepts_every_flag_its_fingerprint_error_names(
    inputs: Path, tmp_path: Path
) -> None:
    """Same architecture, other weights: the error names flags to skip the check; each works."""
    g1, other = str(inputs / "adapters" / "g1"), str(save_base("gpt2", tmp_path / "other", 7))
    wrong = run(inputs, "verify", g1, "--base", other)
    fails(wrong, 1, "the targeted base weights differ")
    named = set(re.findall(r"--no-[a-z-]+", wrong.stderr))
    assert named >= {"--no-fingerprint", "--no-check-base"}, wrong.stderr
    for flag in sorted(named):
        skipped = run(inputs, "verify", g1, "--base", other, flag)
        assert skipped.exit_code == 0, (flag, skipped.output)
        assert skipped.stdout.startswith("FITS") and "fingerprint  skipped" in skipped.stdout


def test_diff(inputs: Path) -> None:
    g1, g2 = str(inputs / "adapters" / "g1"), str(inputs / "adapters" / "g2")
    result = run(inputs, "diff", g1, g2)
    assert result.exit_code == 0, result.output
    assert "REL.DIFF" in result.stdout and "identical" not in result.stdout
    same = run(inputs, "diff", g1, g1)
    assert "identical: same config" in same.stdout
    data = json.loads(run(inputs, "diff", g1, str(inputs / "adapters" / "b-peft"), "--json").stdout)
    assert data["modules"] == [] and len(data["only_in_a"]) == 2 and not data["identical"]
    fails(run(inputs, "diff", g1, str(inputs / "broken" / "corrupt")), 1, "corrupt")


def test_push_dry_run_and_offline_refusal(inputs: Path) -> None:
    g1 = str(inputs / "adapters" / "g1")
    result = run(inputs, "push", g1, "me/g1", "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("would upload to me/g1:")
    assert "--- README.md (model card) ---" in result.stdout and "## Configuration" in result.stdout
    data = json.loads(run(inputs, "push", g1, "me/g1", "--dry-run", "--json").stdout)
    assert [f["path_in_repo"] for f in data["files"]] == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert data["commit_url"] is None and data["dry_run"] is True
    offline = run(inputs, "push", g1, "me/g1", env={"HF_HUB_OFFLINE": "1"})
    fails(offline, 1, "HF_HUB_OFFLINE is set")
    fails(run(inputs, "push", str(inputs / "broken" / "not-adapter"), "me/x", "--dry-run"), 1)
    fails(run(inputs, "push", g1, "not/a/repo", "--dry-run"), 2, "not a Hub repo id")


def test_pull(inputs: Path, tmp_path: Path) -> None:
    cache, out = str(inputs / "hf-cache"), tmp_path / "lib" / "remote"
    args = ["pull", "org/remote", "-o", str(out), "--cache-dir", cache, "--offline"]
    result = run(inputs, *args)
    assert result.exit_code == 0, result.output
    assert f"pulled org/remote@{COMMIT[:12]} into {out}" in result.stdout
    assert tree_hashes(out) == tree_hashes(inputs / "adapters" / "g1")
    fails(run(inputs, *args), 1, "already exists", "--force")
    assert run(inputs, *args, "--force", "--json").exit_code == 0
    missing = run(inputs, "pull", "org/absent", "-o", str(tmp_path / "x"), "--cache-dir", cache,
                  "--offline")  # fmt: skip
    fails(missing, 1, "'org/absent' (revision main) is not in cache", "offline mode is on")
    bad_id = run(inputs, "pull", "org/../x", "-o", str(tmp_path / "y"), "--offline")
    fails(bad_id, 2, "not a Hub repo id")  # bad usage, as any malformed argument
    assert not (tmp_path / "y").exists()


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(LORAKIT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def test_every_subcommand_in_a_real_process(inputs: Path, tmp_path: Path) -> None:
    lib, out = inputs / "adapters", tmp_path / "pulled"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(inputs / "hf-cache")}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    commands: dict[str, list[str]] = {
        "list": ["list", str(lib), "--json"],
        "inspect": ["inspect", str(lib / "g1"), "--json"],
        # a misfit: exit code 1, the JSON verdict on stdout, the first misfit on stderr
        # ... on a base given as a Hub id, resolved from the offline cache
        "verify": ["verify", str(lib / "g1"), "--base", "org/base-bert", "--json"],
        "diff": ["diff", str(lib / "g1"), str(lib / "g2"), "--json"],
        "push": ["push", str(lib / "g1"), "me/g1", "--dry-run", "--json"],
        "pull": ["pull", "org/remote", "-o", str(out), "--json"],  # offline + cache from env
    }
    before = tree_hashes(inputs)
    procs = {name: _spawn(args, env) for name, args in commands.items()}  # run side by side
    done: dict[str, tuple[int, str, str]] = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        done[name] = (proc.returncode, stdout, stderr)
    assert tree_hashes(inputs) == before
    for name, (code, _stdout, stderr) in done.items():
        assert "Traceback" not in stderr, f"{name}: {stderr}"
        assert code == (1 if name == "verify" else 0), f"{name}: {stderr}"
    parsed: dict[str, Any] = {n: json.loads(done[n][1]) for n in commands}
    assert len(parsed["list"]["adapters"]) == 3
    assert len(parsed["inspect"]["modules"]) == 2
    assert parsed["verify"]["fits"] is False and parsed["verify"]["coverage"] == 0.0
    assert parsed["verify"]["base"] == "org/base-bert"
    assert "BertForSequenceClassification" in done["verify"][2]  # the cached base was loaded
    assert done["verify"][2].startswith("error: ") and "matched no" in done["verify"][2]
    assert len(parsed["diff"]["modules"]) == 2
    assert parsed["push"]["dry_run"] is True and parsed["push"]["model_card"]
    assert parsed["pull"]["commit"] == COMMIT and tree_hashes(out) == tree_hashes(lib / "g1")


def test_list_defaults_to_the_adapters_folder(
    inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(inputs / "adapters" / "g1", tmp_path / "adapters" / "mine")
    monkeypatch.chdir(tmp_path)
    result = run(inputs, "list")
    assert result.exit_code == 0 and result.stdout.splitlines()[2].startswith("mine ")
    monkeypatch.chdir(tmp_path / "adapters")
    fails(run(inputs, "list"), 1, "adapter library 'adapters' does not exist")


def test_list_and_pull_use_the_library_that_names_resolve_from(
    inputs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """$LORA_KIT_ADAPTERS moves the library for `-a NAME` and load_adapter("NAME"); `list` and
    `pull` used to ignore it and read/write ./adapters instead."""
    library = tmp_path / "shared-library"
    shutil.copytree(inputs / "adapters" / "g1", library / "mine")
    monkeypatch.chdir(tmp_path)  # no ./adapters here
    monkeypatch.setenv("LORA_KIT_ADAPTERS", str(library))
    result = run(inputs, "list")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[2].startswith("mine ")
    cache = str(inputs / "hf-cache")
    pulled = run(inputs, "pull", "org/remote", "--cache-dir", cache, "--offline")
    assert pulled.exit_code == 0, pulled.output
    assert tree_hashes(library / "remote") == tree_hashes(inputs / "adapters" / "g1")
    assert not (tmp_path / "adapters").exists()
    monkeypatch.delenv("LORA_KIT_ADAPTERS")
    fails(run(inputs, "list"), 1, "adapter library 'adapters' does not exist")


@pytest.mark.parametrize("threshold", ["1", "2", "-0.1"])
def test_inspect_threshold_out_of_range_is_a_usage_error(inputs: Path, threshold: str) -> None:
    """It exited 1 (a lora_kit error) after reading the adapter; bad usage is exit 2."""
    result = run(inputs, "inspect", str(inputs / "adapters" / "g1"), "--threshold", threshold)
    fails(result, 2, "--threshold")


def test_verify_on_a_base_with_truncated_weights_is_an_error_not_a_traceback(
    inputs: Path, tmp_path: Path
) -> None:
    """safetensors' SafetensorError is no OSError: load_base let it out as a traceback."""
    base = tmp_path / "base"
    shutil.copytree(inputs / "base-gpt2", base)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    result = run(inputs, "verify", str(inputs / "adapters" / "g1"), "--base", str(base))
    fails(result, 1, "unreadable safetensors weights", "re-save or re-download the base")


def test_verify_on_a_base_given_as_a_file_says_it_is_a_file(inputs: Path) -> None:
    """It said the local folder 'does not exist'."""
    weights = str(inputs / "base-gpt2" / "model.safetensors")
    result = run(inputs, "verify", str(inputs / "adapters" / "g1"), "--base", weights)
    fails(result, 1, "is a file, not a model folder")


def test_pull_force_never_replaces_a_folder_that_is_not_an_adapter(
    inputs: Path, tmp_path: Path
) -> None:
    """--force swapped any non-empty folder for the adapter: `-o . --force` emptied the cwd."""
    folder = tmp_path / "work"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.txt").write_text("precious")
    (folder / "sub" / "data.txt").write_text("more")
    before = tree_hashes(folder)
    args = ["pull", "org/remote", "-o", str(folder), "--cache-dir", str(inputs / "hf-cache")]
    result = run(inputs, *args, "--offline", "--force")
    fails(result, 1, "not an adapter directory", "choose another -o")
    assert tree_hashes(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["work"]  # no temporary copy left


@pytest.mark.parametrize("run_file", ["checkpoint", "metrics.jsonl"])
def test_pull_force_never_deletes_a_training_run(
    inputs: Path, tmp_path: Path, run_file: str
) -> None:
    """A pull mirrors the repo, so --force onto a `lorakit train` output deleted its
    checkpoint/ and metrics.jsonl along with the old adapter."""
    folder = tmp_path / "run"
    shutil.copytree(inputs / "adapters" / "g1", folder)
    if run_file == "checkpoint":
        (folder / "checkpoint").mkdir()
        (folder / "checkpoint" / "trainer_state.pt").write_bytes(b"state")
    else:
        (folder / "metrics.jsonl").write_text('{"event": "train", "step": 1}\n')
    before = tree_hashes(folder)
    args = ["pull", "org/remote", "-o", str(folder), "--cache-dir", str(inputs / "hf-cache")]
    fails(run(inputs, *args, "--offline", "--force"), 1, "holds a training run", run_file)
    assert tree_hashes(folder) == before
