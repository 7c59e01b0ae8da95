"""`lorakit train`: end to end through CliRunner and one real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from train_helpers import tiny_bert, tiny_gpt2, tokenizer, write_cls, write_text
from typer.testing import CliRunner

import lora_kit as lk
from lora_kit_cli.app import app

runner = CliRunner()


def _base(kind: str, tmp: Path) -> Path:
    folder = tmp / kind
    (tiny_gpt2() if kind == "gpt2" else tiny_bert(num_labels=2)).save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def test_train_gpt2_prints_adapter_metrics_and_merge_command(tmp_path: Path) -> None:
    base, data = _base("gpt2", tmp_path), write_text(tmp_path / "corpus.txt")
    out = tmp_path / "adapters" / "poems"
    args = ["train", "--model", str(base), "--data", str(data), "--steps", "3", "-r", "4"]
    result = runner.invoke(app, [*args, "--max-length", "16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"adapter: {out}" in result.output
    assert "eval_perplexity=" in result.output
    assert f"lorakit merge {base} {out} -o {out}-merged" in result.output
    lm = lk.LoraModel.from_pretrained(tiny_gpt2(), out)  # loads on its own, fingerprint OK
    assert lm.adapters["default"].r == 4
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["event"] for x in lines] == ["train"] * 3 + ["eval", "end"]


def test_default_out_is_in_the_adapter_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Without --out the run lands where `-a NAME` and load_adapter("NAME") look: the library.
    # It went to ./adapters even with $LORA_KIT_ADAPTERS set.
    base, data = _base("gpt2", tmp_path), write_text(tmp_path / "poems.txt")
    library = tmp_path / "library"
    monkeypatch.setenv("LORA_KIT_ADAPTERS", str(library))
    monkeypatch.chdir(tmp_path)
    args = ["train", "--model", str(base), "--data", str(data), "--steps", "1", "-r", "4"]
    result = runner.invoke(app, [*args, "--max-length", "16", "--eval-fraction", "0"])
    assert result.exit_code == 0, result.output
    assert (library / "poems" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapters").exists()
    lm = lk.inject(tiny_gpt2(), lk.LoraConfig(r=4), name="x")
    lm.load_adapter("poems", name="poems")  # found by name in the library
    assert lm.adapters["poems"].r == 4


@pytest.mark.parametrize(
    ("module", "runner_name", "name"),
    [
        ("lora_kit.demo.default_job", "run_job", "bert-sentiment"),
        ("lora_kit.demo.shakespeare_job", "train_roman_adapter", "gpt2-shakespeare-roman"),
    ],
)
def test_embedded_jobs_default_out_is_in_the_adapter_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, runner_name: str, name: str
) -> None:
    import importlib

    job = importlib.import_module(module)
    seen: list[Path] = []

    def record(*args: object, **kwargs: object) -> None:
        seen.append(next(a for a in args if isinstance(a, Path)))
        raise lk.LoraKitError("stop here")  # run() reports it and returns 1

    monkeypatch.setattr(job, runner_name, record)
    monkeypatch.setenv("LORA_KIT_ADAPTERS", str(tmp_path / "lib"))
    assert job.run(quiet=True) == 1
    monkeypatch.delenv("LORA_KIT_ADAPTERS")
    assert job.run(quiet=True) == 1
    assert seen == [tmp_path / "lib" / name, Path("adapters") / name]


def test_train_bert_remaps_head_and_saves_labels(tmp_path: Path) -> None:
    # The saved base has 2 labels; the data has 3: the head is rebuilt with 3 outputs.
    base, data = _base("bert", tmp_path), write_cls(tmp_path / "reviews.jsonl")
    out = tmp_path / "cls"
    result = runner.invoke(
        app,
        ["train", "--model", str(base), "--data", str(data), "--epochs", "1",
         "--batch-size", "8", "--max-length", "12", "--out", str(out), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["task"] == "seq-cls"
    assert set(summary["metrics"]) == {"eval_loss", "eval_accuracy", "eval_macro_f1"}
    labels = json.loads((out / "labels.json").read_text())
    assert labels["id2label"] == {"0": "c0", "1": "c1", "2": "c2"}
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    lm = lk.LoraModel.from_pretrained(tiny_bert(num_labels=3), out)
    assert "classifier" in lm.adapter_record("default").saved_modules


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    result = runner.invoke(app, ["train", "--model", "x", "--data", "y", "--epochs", "1",
                                 "--steps", "2"])  # fmt: skip
    assert result.exit_code == 2
    assert "--epochs or --steps, not both" in result.output
    result = runner.invoke(app, ["train", "--model", "x"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["train", "--model", "x", "--data", "y", "--lr", "-1"])
    assert result.exit_code == 2
    assert "lr must be a positive number" in result.output
    # An --out that is a file failed with a FileExistsError traceback after loading everything.
    (tmp_path / "afile").write_text("x")
    result = runner.invoke(
        app, ["train", "--model", "x", "--data", "y", "--out", str(tmp_path / "afile")]
    )
    assert result.exit_code == 2
    assert "is a file, not a directory" in result.output
    # --epochs 0 was replaced by the default (1 epoch) and trained instead of being refused.
    result = runner.invoke(app, ["train", "--model", "x", "--data", "y", "--epochs", "0"])
    assert result.exit_code == 2
    assert "epochs must be a positive integer, got 0" in result.output


def test_failures_exit_1_with_what_was_tried(tmp_path: Path) -> None:
    base = _base("gpt2", tmp_path)
    result = runner.invoke(app, ["train", "--model", str(base), "--data", str(tmp_path / "no")])
    assert result.exit_code == 1
    assert "does not exist" in result.output
    result = runner.invoke(
        app, ["train", "--model", str(tmp_path / "nomodel"), "--data", str(base)]
    )
    assert result.exit_code == 1
    assert "tried" in result.output
    # A failed run left its (empty) output directory behind, by default under ./adapters/.
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["train", "--model", str(base), "--data", str(tmp_path / "no"), "--out", str(out)]
    )
    assert result.exit_code == 1
    assert not out.exists()


def _fake_job(monkeypatch: pytest.MonkeyPatch, module: str) -> list[dict[str, object]]:
    """Replace an embedded job module by one that records its calls and returns 0."""
    calls: list[dict[str, object]] = []
    job = types.ModuleType(module)
    job.run = lambda **kw: calls.append(kw) or 0  # type: ignore[attr-defined]
    job.__spec__ = types.SimpleNamespace(name=module)  # type: ignore[assignment]
    monkeypatch.setitem(sys.modules, module, job)
    return calls


@pytest.mark.parametrize(
    ("args", "module"),
    [
        ([], "lora_kit.demo.default_job"),
        (["--preset", "bert-sentiment"], "lora_kit.demo.default_job"),
        (["--preset", "gpt2-shakespeare"], "lora_kit.demo.shakespeare_job"),
    ],
)
def test_embedded_jobs_dispatch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], module: str
) -> None:
    calls = _fake_job(monkeypatch, module)
    result = runner.invoke(app, ["train", *args, "--json", "--out", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert calls == [{"out": tmp_path / "d", "json_output": True, "quiet": False}]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--preset", "nope"], "--preset must be one of bert-sentiment, gpt2-shakespeare"),
        (["--preset", "gpt2-shakespeare", "--lr", "0.1"], "drop --lr"),
        (["--steps", "3", "-r", "4"], "drop --rank, --steps"),
        (["--preset", "bert-sentiment", "--data", "x.txt"], "drop --data"),
    ],
)
def test_embedded_job_usage_errors(
    monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    calls = _fake_job(monkeypatch, "lora_kit.demo.default_job")
    result = runner.invoke(app, ["train", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert calls == []


def test_real_subprocess_json(tmp_path: Path) -> None:
    base, data = _base("gpt2", tmp_path), write_text(tmp_path / "c.txt")
    exe = Path(sys.executable).parent / "lorakit"
    proc = subprocess.run(
        [str(exe), "train", "--model", str(base), "--data", str(data), "--steps", "2",
         "--max-length", "16", "--out", str(tmp_path / "o"), "--json"],
        capture_output=True, text=True, timeout=120,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["steps"] == 2
    assert torch.isfinite(torch.tensor(summary["metrics"]["eval_loss"]))


def test_same_seed_gives_the_same_classifier(tmp_path: Path) -> None:
    # The saved base has 2 labels and the data 3: the rebuilt head was initialised from
    # whatever state the global RNG was in, not from --seed, so two runs differed.
    from safetensors.torch import load_file

    base, data = _base("bert", tmp_path), write_cls(tmp_path / "reviews.jsonl")
    adapters = []
    for run in ("a", "b"):
        torch.rand(7)  # other RNG use in the process before the run
        args = ["train", "--model", str(base), "--data", str(data), "--steps", "2"]
        result = runner.invoke(app, [*args, "--max-length", "12", "--out", str(tmp_path / run)])
        assert result.exit_code == 0, result.output
        adapters.append(load_file(str(tmp_path / run / "adapter_model.safetensors")))
    assert adapters[0].keys() == adapters[1].keys()
    assert any("classifier" in key for key in adapters[0])
    for key in adapters[0]:
        assert torch.equal(adapters[0][key], adapters[1][key]), key


@pytest.mark.parametrize(("kind", "positions"), [("gpt2", 64), ("bert", 512)])
def test_train_caps_max_length_at_the_models_positions(
    tmp_path: Path, kind: str, positions: int
) -> None:
    """GPT-2 names its limit n_positions, BERT max_position_embeddings: both are honoured."""
    base = _base(kind, tmp_path)
    data = write_text(tmp_path / "c.txt") if kind == "gpt2" else write_cls(tmp_path / "d.jsonl")
    result = runner.invoke(
        app,
        ["train", "--model", str(base), "--data", str(data), "--steps", "1",
         "--max-length", str(positions + 1), "--out", str(tmp_path / "o")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"exceeds the model's {positions} positions; using {positions}" in result.output


def test_an_out_under_a_file_is_refused_before_any_work(tmp_path: Path) -> None:
    """It trained first, then failed with a NotADirectoryError traceback."""
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "run"
    result = runner.invoke(app, ["train", "--model", "x", "--data", "y", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "which is a file, not a directory" in result.output and "Traceback" not in result.output


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_out_that_cannot_be_written_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    """An OSError while writing the run (here: /proc refuses new folders, even to root) escaped
    as a traceback."""
    base, data = _base("gpt2", tmp_path), write_text(tmp_path / "c.txt")
    args = ["train", "--model", str(base), "--data", str(data), "--steps", "1", "-r", "2"]
    result = runner.invoke(app, [*args, "--max-length", "16", "--out", "/proc/lorakit-run"])
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "error: cannot write the run" in result.stderr and "/proc/lorakit-run" in result.stderr


def test_an_os_error_reading_the_inputs_is_not_called_a_write_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every OSError of the run was reported as 'cannot write the run', an unreadable --data
    file too."""
    data = write_text(tmp_path / "c.txt")

    def unreadable(job: object) -> None:
        raise PermissionError(13, "Permission denied", str(data))

    monkeypatch.setattr("lora_kit.train.job.run_job", unreadable)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "--model", "m", "--data", str(data), "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert result.stderr == f"error: Permission denied: {data}\n"


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kind", ["project", "foreign-checkpoint", "foreign-metrics", "dot"])
def test_an_out_holding_the_users_files_is_refused_and_left_untouched(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run deleted a checkpoint/ folder it had not written, rewrote a metrics.jsonl it had not
    written (dropping its lines) and wrote its adapter among a project's files: `--out .` or
    `--out ~/project` trained into the project."""
    base, data = _base("gpt2", tmp_path), write_text(tmp_path / "c.txt")
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.md").write_text("my notes")
    if kind == "foreign-checkpoint":  # an adapter folder also holding another tool's checkpoint
        (out / "adapter_config.json").write_text("{}")
        (out / "checkpoint").mkdir()
        (out / "checkpoint" / "model.bin").write_bytes(b"another framework's checkpoint")
    if kind == "foreign-metrics":
        (out / "metrics.jsonl").write_text('{"step": 5, "loss": 1.0}\n{"step": 9, "loss": 0.5}\n')
    before = _tree(out)
    target = str(out)
    if kind == "dot":
        monkeypatch.chdir(out)
        target = "."
    args = ["train", "--model", str(base), "--data", str(data), "--steps", "1", "-r", "2"]
    result = runner.invoke(app, [*args, "--max-length", "16", "--out", target])
    assert result.exit_code == 2, result.output
    assert "error: --out" in result.stderr and "pass a new or empty --out" in result.stderr
    assert _tree(out) == before and sorted(p.name for p in out.iterdir()) == sorted(
        {name.split("/")[0] for name in before}
    )


def test_a_run_directory_is_still_trained_into_again(tmp_path: Path) -> None:
    """The refusal above spares lora_kit's own outputs: a second fresh run into a run directory,
    and a run into an adapter folder (keeping its other files, as save_adapter does)."""
    base, data = _base("gpt2", tmp_path), write_text(tmp_path / "c.txt")
    args = ["train", "--model", str(base), "--data", str(data), "--steps", "1", "-r", "2"]
    run = tmp_path / "run"
    for _ in range(2):
        result = runner.invoke(app, [*args, "--max-length", "16", "--out", str(run)])
        assert result.exit_code == 0, result.output
    assert (run / "checkpoint" / "trainer_state.pt").is_file()
    folder = tmp_path / "adapter"
    lk.inject(tiny_gpt2(), lk.LoraConfig(r=2)).save_adapter(folder)
    (folder / "README.md").write_text("my card")
    result = runner.invoke(app, [*args, "--max-length", "16", "--out", str(folder)])
    assert result.exit_code == 0, result.output
    assert (folder / "README.md").read_text() == "my card"
