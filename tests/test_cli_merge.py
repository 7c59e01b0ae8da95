"""``lorakit merge`` through Typer's CliRunner and one real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from test_merge_files import make_base_and_adapters
from typer.testing import CliRunner

from lora_kit_cli.app import app

runner = CliRunner()


def test_merge_json_and_exit_codes(tmp_path: Path) -> None:
    base, adapters, _ = make_base_and_adapters(tmp_path, "gpt2")
    args = ["merge", str(base), *map(str, adapters), "-o", str(tmp_path / "out")]
    result = runner.invoke(app, [*args, "--weights", "0.5,-1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [a["weight"] for a in report["adapters"]] == [0.5, -1.0]
    assert report["merged_modules"] > 0
    # misfit (output exists) -> 1 with a message and no traceback
    again = runner.invoke(app, args)
    assert again.exit_code == 1
    assert "already exists" in again.stderr and "Traceback" not in again.output
    # bad usage -> 2
    bad = runner.invoke(app, [*args[:-1], str(tmp_path / "o2"), "--weights", "a,b"])
    assert bad.exit_code == 2
    bad_dtype = runner.invoke(app, [*args[:-1], str(tmp_path / "o2"), "--dtype", "float8"])
    assert bad_dtype.exit_code == 2 and "float8" in bad_dtype.output
    for weights in ("1,2,3", "1,inf"):  # checkable from the command line: usage, not misfit
        bad_w = runner.invoke(app, [*args[:-1], str(tmp_path / "o2"), "--weights", weights])
        assert bad_w.exit_code == 2 and "weights" in bad_w.output, bad_w.output
    assert not (tmp_path / "o2").exists()


def test_merge_subprocess_human_output(tmp_path: Path) -> None:
    base, adapters, _ = make_base_and_adapters(tmp_path, "bert")
    exe = Path(sys.executable).with_name("lorakit")
    proc = subprocess.run(
        [str(exe), "merge", str(base), str(adapters[0]), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "wrote" in proc.stdout and "fingerprint: match" in proc.stdout
    # a base that does not exist: exit 1, message, no traceback (CliRunner: no 2nd process)
    bad = runner.invoke(app, ["merge", str(tmp_path / "nope"), str(adapters[0]), "-o", "x"])
    assert bad.exit_code == 1 and "error:" in bad.stderr and "Traceback" not in bad.output
