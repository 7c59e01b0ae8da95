"""Loading a base model from a folder (lora_kit/base_model.py): errors are lora_kit's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import lora_kit as lk
from lora_kit.base_model import INDEX, BaseModelError, load_base, model_positions, weight_files
from lora_kit.merge_files import merge_files
from lora_kit.model_inspection import inspect_model
from lora_kit_cli.app import app
from tests.conftest import tiny_bert, tiny_gpt2


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ('{"model_type": "no_such_model_type"}', "no_such_model_type"),
        ("{", "config.json"),
    ],
)
def test_unreadable_or_unknown_config_is_a_base_model_error(
    tmp_path: Path, config: str, expected: str
) -> None:
    """A model type this transformers does not know (a newer checkpoint) used to escape as a
    bare ValueError, a traceback in `lorakit generate`/`predict`/`verify`."""
    folder = tmp_path / "base"
    tiny_gpt2().save_pretrained(folder)
    (folder / "config.json").write_text(config)
    with pytest.raises(BaseModelError, match=expected):
        load_base(folder)
    result = CliRunner().invoke(app, ["generate", str(folder), "-p", "hello"])
    assert result.exit_code == 1, result.output
    assert "error:" in result.stderr and expected in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_known_config_still_loads(tmp_path: Path) -> None:
    folder = tmp_path / "base"
    tiny_gpt2().save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "gpt2"
    assert type(load_base(folder)).__name__ == "GPT2LMHeadModel"


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ('{"model_type": "no_such_model_type"}', "no_such_model_type"),
        ("{", "config.json"),
    ],
)
def test_lorakit_train_reports_an_unreadable_config_too(
    tmp_path: Path, config: str, expected: str
) -> None:
    """`lorakit train` read the config with AutoConfig directly: the same bare ValueError (or
    OSError), a traceback, that load_base now reports as a BaseModelError."""
    folder = tmp_path / "base"
    tiny_gpt2().save_pretrained(folder)
    (folder / "config.json").write_text(config)
    (tmp_path / "a.txt").write_text("hello world " * 50)
    args = ["train", "--model", str(folder), "--data", str(tmp_path / "a.txt")]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "out"), "--steps", "1"])
    assert result.exit_code == 1, result.output
    assert "error:" in result.stderr and expected in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(
    ("weight_map", "says"),
    [
        ({}, "no weight_map"),
        ([], "no weight_map"),
        ({"wte.weight": "../model.safetensors"}, "not a file in this folder"),
        ({"wte.weight": 3}, "not a file in this folder"),
    ],
)
def test_a_bad_shard_index_is_one_error_for_merge_and_inspect(
    tmp_path: Path, weight_map: object, says: str
) -> None:
    """`lorakit merge` and `lorakit inspect` each parsed the shard index: an empty weight_map
    was refused by inspect but not by merge, and a shard name outside the folder was read by
    both. One reader (`weight_files`) now refuses these for both, naming the index."""
    base = tmp_path / "sharded"
    tiny_gpt2().save_pretrained(base, max_shard_size="100KB")
    (tmp_path / "model.safetensors").write_bytes(b"outside the base folder")
    adapter = lk.inject(tiny_gpt2(), lk.LoraConfig(r=2)).save_adapter(tmp_path / "adapter")
    (base / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    merge = lambda: merge_files(base, [adapter], tmp_path / "out")  # noqa: E731
    for run in (lambda: inspect_model(base), merge):
        with pytest.raises(BaseModelError, match=says) as caught:
            run()
        assert INDEX in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_weight_files_lists_the_shards_or_the_single_file(tmp_path: Path) -> None:
    tiny_gpt2().save_pretrained(tmp_path / "one")
    tiny_gpt2().save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert weight_files(tmp_path / "one") == ["model.safetensors"]
    shards = weight_files(tmp_path / "sharded")
    assert shards is not None and len(shards) > 1
    assert shards == sorted(p.name for p in (tmp_path / "sharded").glob("model-*.safetensors"))
    assert weight_files(tmp_path) is None


@pytest.mark.parametrize(
    ("build", "positions"), [(tiny_gpt2, 64), (tiny_bert, 512)], ids=["gpt2", "bert"]
)
def test_model_positions_reads_either_config_name(build: Any, positions: int) -> None:
    """GPT-2 says n_positions, BERT max_position_embeddings: one helper reads both."""
    assert model_positions(build(0).config) == positions


def test_model_positions_is_none_when_the_config_does_not_say() -> None:
    assert model_positions(object()) is None
    assert model_positions(None) is None
