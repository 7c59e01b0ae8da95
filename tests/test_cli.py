"""The `lorakit` entry point: --help, --version, and the demo command (runner + subprocess)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lora_kit import __version__
from lora_kit_cli.app import app

runner = CliRunner()


def test_version_and_help() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"lorakit {__version__}"
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "demo" in result.stdout


def test_unknown_command_is_a_usage_error() -> None:
    assert runner.invoke(app, ["no-such-command"]).exit_code == 2


def test_demo_json_reports_exact_reload_and_peft_match(tmp_path: Path) -> None:
    result = runner.invoke(app, ["demo", "--quick", "--root", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    assert payload["ok"] is True
    for row in payload["results"]:
        assert row["reload_vs_live"] == 0.0 and row["peft_vs_live"] <= 1e-5
        assert row["adapter_vs_base"] > 0.0
        assert (Path(row["adapter_path"]) / "adapter_model.safetensors").is_file()


def test_demo_quick_without_peft_does_not_claim_a_peft_match(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pip install -e .` brings no peft: the check is skipped, and the summary says so."""
    monkeypatch.setitem(sys.modules, "peft", None)  # `from peft import ...` raises ImportError
    result = runner.invoke(app, ["demo", "--quick", "--root", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("PEFT vs live peft not installed") == 2
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("OK: saved adapters reload exactly") and "match PEFT" not in last
    assert "not installed" in last


def test_console_script_runs_in_a_subprocess() -> None:
    exe = shutil.which("lorakit") or str(Path(sys.executable).parent / "lorakit")
    done = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and __version__ in done.stdout
    import_cli = subprocess.run(
        [sys.executable, "-c", "import cli"], capture_output=True, text=True, cwd="/", timeout=60
    )
    assert import_cli.returncode != 0  # the distribution does not claim the name `cli`


def test_demo_quick_with_a_root_under_a_file_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    result = runner.invoke(app, ["demo", "--quick", "--root", str(tmp_path / "afile")])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: ") and "afile" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.parametrize(
    "command",
    [
        "list", "inspect", "verify", "diff", "push", "pull", "demo", "train", "generate",
        "predict", "merge", "stack",
    ],
)  # fmt: skip
def test_every_command_help_teaches_with_an_example(command: str) -> None:
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    _, example, after = result.stdout.partition("Example")  # (the Usage line names it too)
    assert example and f"lorakit {command}" in after, result.stdout


def test_top_level_help_documents_the_exit_codes() -> None:
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert "Exit codes: 0 success, 1 failure" in result.stdout and "2 bad usage" in result.stdout
