"""``lorakit stack`` through Typer's CliRunner and one real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from merge_helpers import with_adapters
from typer.testing import CliRunner

from lora_kit_cli.app import app

runner = CliRunner()


def _adapters(tmp_path: Path) -> list[str]:
    lm = with_adapters("gpt2", ("a", "b"))
    for name in ("a", "b"):
        lm.save_adapter(tmp_path / name, name)
    return [str(tmp_path / "a"), str(tmp_path / "b")]


def test_stack_cli(tmp_path: Path) -> None:
    paths = _adapters(tmp_path)
    out = str(tmp_path / "s")
    args = ["stack", *paths, "--weights", "0.7,-0.3", "--method", "svd", "--rank", "2"]
    result = runner.invoke(app, [*args, "-o", out, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["method"] == "svd" and 0 < report["energy_kept"] < 1
    bad = runner.invoke(app, ["stack", *paths, "--method", "avg", "-o", out])
    assert bad.exit_code == 2
    # what the command line alone gets wrong is bad usage (2), before any file is read
    for wrong, needle in [
        (["--method", "ties"], "density"),
        (["--method", "ties", "--density", "2"], "density"),
        (["--method", "svd", "--rank", "0"], "rank"),
        (["--weights", "1,2,3"], "3 weights for 2 adapters"),
        (["--weights", "1,nan"], "finite"),
    ]:
        misuse = runner.invoke(app, ["stack", *paths, *wrong, "-o", out])
        assert misuse.exit_code == 2 and needle in misuse.output, (wrong, misuse.output)
    misfit = runner.invoke(app, ["stack", paths[0], str(tmp_path / "none"), "-o", out])
    assert misfit.exit_code == 1 and "error:" in misfit.stderr


def test_stack_subprocess(tmp_path: Path) -> None:
    paths = _adapters(tmp_path)
    exe = Path(sys.executable).with_name("lorakit")
    proc = subprocess.run(
        [str(exe), "stack", *paths, "--method", "dare", "--density", "0.5", "-o",
         str(tmp_path / "d")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "dare stack of 2 adapters" in proc.stdout and "seed:" in proc.stdout


def test_an_option_the_method_ignores_is_a_usage_error(tmp_path: Path) -> None:
    """`--rank 2` with the default method cat wrote a rank-8 stack without a word; --density
    with cat/svd and --seed with anything but dare were dropped the same way."""
    paths = _adapters(tmp_path)
    out = tmp_path / "s"
    for wrong, needle in [
        (["--rank", "2"], "--rank"),
        (["--method", "svd", "--density", "0.5"], "--density"),
        (["--method", "ties", "--density", "0.5", "--seed", "1"], "--seed"),
    ]:
        misuse = runner.invoke(app, ["stack", *paths, *wrong, "-o", str(out)])
        assert misuse.exit_code == 2 and needle in misuse.output, (wrong, misuse.output)
        assert not out.exists()
    ok = ["--method", "dare", "--density", "0.5", "--seed", "1", "--rank", "2", "--json"]
    done = runner.invoke(app, ["stack", *paths, *ok, "-o", str(out)])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["seed"] == 1
