"""Loading a base model from a folder (lora_kit/base_model.py): errors are lora_kit's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lora_kit.base_model import BaseModelError, load_base
from lora_kit_cli.app import app
from tests.conftest import tiny_gpt2


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
