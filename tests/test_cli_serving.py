"""`lorakit generate` and `lorakit predict` (cli/generate.py, cli/predict.py, cli/serving.py).

Bases are tiny GPT-2/BERT models saved from config with a word-level tokenizer; CLI outputs are
checked against the library run row by row (greedy tokens exactly; probabilities to 1e-5, the
mixed-batch tolerance of test_rows.py).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hotswap_helpers import randomize, tiny_bert, tiny_gpt2
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

import lora_kit as lk
from lora_kit import model as model_module
from lora_kit.base_model import load_base
from lora_kit_cli import predict as predict_cli
from lora_kit_cli.app import app

WORDS = ["[PAD]", "[UNK]", *(f"w{i}" for i in range(98))]


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        eos_token="[PAD]",
        model_input_names=["input_ids", "attention_mask"],
    )


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    out: dict[str, Path] = {}
    for kind, model in (("gpt2", tiny_gpt2()), ("bert", tiny_bert())):
        base = root / f"{kind}-base"
        model.save_pretrained(base)
        _tokenizer().save_pretrained(base)
        out[kind] = base
        for i, name in enumerate(("x", "y")):
            heads = ("classifier",) if kind == "bert" else ()
            lm = lk.inject(load_base(base), lk.LoraConfig(r=4, modules_to_save=heads), name)
            randomize(lm, name, seed=10 + i)
            lm.save_adapter(root / f"{kind}-{name}", name)
    return out


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_generate_per_prompt_adapter(bases: dict[str, Path]) -> None:
    base = bases["gpt2"]
    prompts = ["w1 w2 w3", "w4 w5 w6", "w7 w8 w9"]
    chosen = ["x", "base", "y"]
    args = ["generate", str(base), "-a", f"x={base.parent}/gpt2-x", "-a", f"y={base.parent}/gpt2-y"]
    for p, a in zip(prompts, chosen, strict=True):
        args += ["-p", p, "--prompt-adapter", a]
    code, out, err = _run(*args, "--max-new-tokens", "5", "--json")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["adapter"] for r in records] == ["x", None, "y"]
    lm = lk.LoraModel(load_base(base))
    lm.load_adapter(base.parent / "gpt2-x", "x")
    lm.load_adapter(base.parent / "gpt2-y", "y")
    tok = _tokenizer()
    for record, prompt, name in zip(records, prompts, chosen, strict=True):
        ids = tok(prompt, return_tensors="pt")
        with torch.no_grad(), lm.using(None if name == "base" else name):
            gen = lm.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        want = tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
        assert record["text"] == want


def test_generate_grid_and_human_output(bases: dict[str, Path]) -> None:
    base = bases["gpt2"]
    code, out, err = _run(
        "generate", str(base), "-a", f"{base.parent}/gpt2-x", "-p", "w1 w2", "--max-new-tokens", "3"
    )
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("[base] 'w1 w2' -> ")
    assert lines[1].startswith("[gpt2-x] ")


def test_predict_matches_library(bases: dict[str, Path]) -> None:
    base = bases["bert"]
    texts = ["w1 w2 w3 w4", "w5 w6", "w9"]
    args = ["predict", str(base), "-a", f"x={base.parent}/bert-x", "-a", f"y={base.parent}/bert-y"]
    for t, a in zip(texts, ["y", "base", "x"], strict=True):
        args += ["-t", t, "--text-adapter", a]
    code, out, err = _run(*args, "--json")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    lm = lk.LoraModel(load_base(base))
    lm.load_adapter(base.parent / "bert-x", "x")
    lm.load_adapter(base.parent / "bert-y", "y")
    tok = _tokenizer()
    for record, text, name in zip(records, texts, ["y", None, "x"], strict=True):
        with torch.no_grad(), lm.using(name):
            probs = lm(**tok(text, return_tensors="pt")).logits.softmax(-1)[0]
        assert record["adapter"] == name
        torch.testing.assert_close(torch.tensor(record["probs"]), probs, atol=1e-5, rtol=0)


def test_errors_and_exit_codes(bases: dict[str, Path], tmp_path: Path) -> None:
    base = bases["bert"]
    code, _, err = _run("predict", str(base), "-a", str(tmp_path / "nope"), "-t", "w1")
    assert code == 1 and "error: cannot find adapter" in err and "Traceback" not in err
    code, _, err = _run(
        "predict", str(base), "-a", f"{base.parent}/bert-x", "-t", "w1", "--text-adapter", "zz"
    )
    assert code == 2 and "not a loaded adapter" in err
    code, _, err = _run(
        "generate",
        str(bases["gpt2"]),
        "-p",
        "a",
        "--prompt-adapter",
        "base",
        "--prompt-adapter",
        "base",
    )
    assert code == 2 and "one --prompt-adapter per input" in err


def test_real_subprocess(bases: dict[str, Path]) -> None:
    base = bases["bert"]
    lorakit = Path(sys.executable).parent / "lorakit"
    done = subprocess.run(
        [
            str(lorakit),
            "predict",
            str(base),
            "-a",
            f"{base.parent}/bert-x",
            "-t",
            "w3 w4",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["adapter"] for r in rows] == [None, "bert-x"]
    assert all(abs(sum(r["probs"]) - 1.0) < 1e-4 for r in rows)


def test_predict_names_labels_from_each_adapters_labels_json(
    bases: dict[str, Path], tmp_path: Path
) -> None:
    """`lorakit train` saves the label names in labels.json beside a classifier's adapter;
    predict printed the base config's names (LABEL_0 ...) for the adapter's rows too."""
    base = bases["bert"]
    named = tmp_path / "named"
    shutil.copytree(base.parent / "bert-x", named)
    id2label = {"0": "neg", "1": "mid", "2": "pos"}
    (named / "labels.json").write_text(json.dumps({"id2label": id2label}))
    args = ["predict", str(base), "-a", f"x={named}", "-a", f"y={base.parent}/bert-y"]
    code, out, err = _run(*args, "-t", "w1 w2", "--json")
    assert code == 0, err
    records = {r["adapter"]: r for r in map(json.loads, out.splitlines())}
    assert set(records) == {None, "x", "y"}
    for name, record in records.items():
        best = max(range(3), key=lambda i: record["probs"][i])
        want = id2label[str(best)] if name == "x" else f"LABEL_{best}"  # base and y: config's
        assert record["label"] == want


def test_predict_with_a_gpt2_classifier_whose_tokenizer_has_no_pad_token(tmp_path: Path) -> None:
    """GPT-2's tokenizer has no pad token: predict raised ValueError ("Asking to pad but the
    tokenizer does not have a padding token", a traceback). Like lorakit train, it pads with
    EOS and the head reads each row's last real token: every row equals that text run alone."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=64, num_labels=2,
        bos_token_id=2, eos_token_id=2,
    )  # fmt: skip
    base = tmp_path / "gpt2-cls"
    GPT2ForSequenceClassification(config).eval().save_pretrained(base)
    tok = _tokenizer()
    tok.pad_token, tok.eos_token = None, "w0"  # id 2, as GPT-2: an EOS and no pad token
    tok.save_pretrained(base)
    lm = lk.inject(load_base(base), lk.LoraConfig(r=4, modules_to_save=("score",)), "s")
    randomize(lm, "s", seed=3)
    lm.save_adapter(tmp_path / "s", "s")
    texts = ["w1 w2 w3 w4", "w5"]
    args = ["predict", str(base), "-a", str(tmp_path / "s"), "--json"]
    code, out, err = _run(*args, "-t", texts[0], "-t", texts[1])
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [(r["text"], r["adapter"]) for r in records] == [
        (texts[0], None), (texts[0], "s"), (texts[1], None), (texts[1], "s")
    ]  # fmt: skip
    for record in records:
        code, alone, err = _run(
            *args, "-t", record["text"], "--text-adapter", record["adapter"] or "base"
        )
        assert code == 0, err
        torch.testing.assert_close(
            torch.tensor(record["probs"]),
            torch.tensor(json.loads(alone)["probs"]),
            atol=1e-5,
            rtol=0,
        )


def test_predict_truncates_texts_longer_than_the_model(bases: dict[str, Path]) -> None:
    """A text longer than the model's positions (512 here) raised RuntimeError, a traceback;
    it is truncated as lorakit train truncates (closing [SEP] kept), with a notice."""
    base = bases["bert"]
    long_text = " ".join(["w5", "w6"] * 400)  # 800 words
    args = ["predict", str(base), "-a", f"x={base.parent}/bert-x", "--json"]
    result = CliRunner().invoke(app, [*args, "-t", long_text, "-t", "w1"])
    assert result.exit_code == 0, result.output
    assert "truncated" in result.stderr and "512" in result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    lm = lk.LoraModel(load_base(base))
    lm.load_adapter(base.parent / "bert-x", "x")
    ids = _tokenizer()(long_text, return_tensors="pt", truncation=True, max_length=512)
    assert ids["input_ids"].shape == (1, 512)
    with torch.no_grad(), lm.using("x"):
        probs = lm(**ids).logits.softmax(-1)[0]
    torch.testing.assert_close(torch.tensor(records[1]["probs"]), probs, atol=1e-5, rtol=0)


def test_generate_past_the_models_positions_is_a_usage_error(bases: dict[str, Path]) -> None:
    """Prompt plus --max-new-tokens beyond GPT-2's 64 positions raised IndexError mid-run."""
    prompt = " ".join(["w3"] * 60)
    code, out, err = _run("generate", str(bases["gpt2"]), "-p", prompt, "--max-new-tokens", "10")
    assert code == 2 and out == ""
    assert "64 positions" in err and "--max-new-tokens" in err
    code, out, err = _run("generate", str(bases["gpt2"]), "-p", prompt, "--max-new-tokens", "4")
    assert code == 0, err


def test_predict_on_a_headless_base_uses_the_adapters_heads(tmp_path: Path) -> None:
    """lorakit train adapts a bare encoder checkpoint (BertModel, e.g. the demo's MiniLM) as a
    sequence classifier; predict loaded that checkpoint as it is and failed ('missing tensor
    ... was it saved for another model?'). It now builds the classifier as train did, runs
    each row with its adapter's head, and refuses 'base' rows (an untrained head)."""
    classifier = tiny_bert()  # 3 labels
    base = tmp_path / "encoder"
    classifier.bert.save_pretrained(base)  # architectures: ["BertModel"]
    _tokenizer().save_pretrained(base)
    lm = lk.inject(classifier, lk.LoraConfig(r=4, modules_to_save=("classifier",)), "named")
    lm.add_adapter("plain", lk.LoraConfig(r=2, modules_to_save=("classifier",)))
    for seed, name in enumerate(("named", "plain")):
        randomize(lm, name, seed=20 + seed)
        lm.save_adapter(tmp_path / name, name)
    (tmp_path / "named" / "labels.json").write_text(
        json.dumps({"id2label": {"0": "neg", "1": "mid", "2": "pos"}})
    )
    args = ["predict", str(base), "-a", str(tmp_path / "named"), "-a", str(tmp_path / "plain")]
    code, out, err = _run(*args, "-t", "w1 w2 w3", "-t", "w4", "--json")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["adapter"] for r in records] == ["named", "plain"] * 2  # no base rows
    tok = _tokenizer()
    for record in records:
        with torch.no_grad(), lm.using(record["adapter"]):
            probs = lm(**tok(record["text"], return_tensors="pt")).logits.softmax(-1)[0]
        torch.testing.assert_close(torch.tensor(record["probs"]), probs, atol=1e-5, rtol=0)
        best = int(probs.argmax())
        names = (
            ["neg", "mid", "pos"]
            if record["adapter"] == "named"
            else ["LABEL_0", "LABEL_1", "LABEL_2"]
        )
        assert record["label"] == names[best]
    code, _, err = _run(*args, "-t", "w1", "--text-adapter", "base")
    assert code == 2 and "no sequence-classification head" in err
    code, _, err = _run("predict", str(base), "-t", "w1")
    assert code == 1 and err.startswith("error: ") and "no sequence-classification head" in err


def test_an_adapter_whose_name_is_not_valid_says_how_to_name_it(
    bases: dict[str, Path], tmp_path: Path
) -> None:
    """`-a sst2-v1.1` (a library folder with a dot) failed with 'adapter name ... is invalid'
    and no word of the NAME=SOURCE form that loads it."""
    base = bases["gpt2"]
    shutil.copytree(base.parent / "gpt2-x", tmp_path / "sst2-v1.1")
    spec = str(tmp_path / "sst2-v1.1")
    code, _, err = _run("generate", str(base), "-a", spec, "-p", "w1")
    assert code == 1 and "'sst2-v1.1'" in err and f"-a NAME={spec}" in err
    code, _, err = _run(
        "generate", str(base), "-a", f"v1={spec}", "-p", "w1", "--max-new-tokens", "2"
    )
    assert code == 0, err


def test_predict_on_a_headless_base_refuses_an_adapter_without_a_head(tmp_path: Path) -> None:
    """On a base with no classification head, an adapter that saves no head but has a
    labels.json ran its rows through the new, untrained head (random scores, no error):
    classifier_labels read the label count from labels.json before checking for a head."""
    classifier = tiny_bert()  # 3 labels
    base = tmp_path / "encoder"
    classifier.bert.save_pretrained(base)  # architectures: ["BertModel"]
    _tokenizer().save_pretrained(base)
    lm = lk.inject(classifier, lk.LoraConfig(r=4), "plain")  # no modules_to_save
    randomize(lm, "plain", seed=20)
    lm.save_adapter(tmp_path / "plain", "plain")
    (tmp_path / "plain" / "labels.json").write_text(
        json.dumps({"id2label": {"0": "neg", "1": "mid", "2": "pos"}})
    )
    code, out, err = _run("predict", str(base), "-a", str(tmp_path / "plain"), "-t", "w1")
    assert code == 1 and out == "", out
    assert err.startswith("error: ") and "saves no classifier head" in err


@pytest.mark.parametrize("headless", [False, True], ids=["with-head", "headless"])
def test_predict_reads_each_adapters_files_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, headless: bool
) -> None:
    """On a headless base, predict read every adapter's files twice: once to size the new
    head from the adapters' heads, and again to load them."""
    classifier = tiny_bert()
    base = tmp_path / "base"
    (classifier.bert if headless else classifier).save_pretrained(base)
    _tokenizer().save_pretrained(base)
    lm = lk.inject(classifier, lk.LoraConfig(r=4, modules_to_save=("classifier",)), "p")
    lm.add_adapter("q", lk.LoraConfig(r=2, modules_to_save=("classifier",)))
    for name in ("p", "q"):
        lm.save_adapter(tmp_path / name, name)
    reads: list[str] = []

    def counting(path: Path) -> lk.AdapterFiles:
        reads.append(Path(path).name)
        return lk.read_adapter(path)

    for module in (predict_cli, model_module):  # every caller of read_adapter on this path
        monkeypatch.setattr(module, "read_adapter", counting)
    args = ["predict", str(base), "-a", str(tmp_path / "p"), "-a", str(tmp_path / "q")]
    code, _, err = _run(*args, "-t", "w1 w2", "--text-adapter", "p")
    assert code == 0, err
    assert sorted(reads) == ["p", "q"]


@pytest.mark.parametrize("command", ["generate", "predict"])
def test_an_input_with_no_tokens_is_a_usage_error(bases: dict[str, Path], command: str) -> None:
    """An empty prompt/text (GPT-2's tokenizer gives no token for '') crashed the forward with
    a RuntimeError traceback."""
    kind, option = ("gpt2", "-p") if command == "generate" else ("bert", "-t")
    code, _, err = _run(command, str(bases[kind]), option, "w1", option, "")
    assert code == 2 and "'' has no tokens" in err and "Traceback" not in err, err


@pytest.mark.parametrize("spec", ["base={}/gpt2-x", "{}/base"])
def test_an_adapter_named_base_is_a_usage_error(
    bases: dict[str, Path], tmp_path: Path, spec: str
) -> None:
    """'base' names the base model's rows: an adapter called so printed as a second [base] row
    and `--prompt-adapter base` silently ran the base model instead of it."""
    base = bases["gpt2"]
    shutil.copytree(base.parent / "gpt2-x", tmp_path / "base")
    folder = base.parent if spec.startswith("base=") else tmp_path
    args = ["generate", str(base), "-a", spec.format(folder), "-p", "w1 w2"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "400"})  # one line per message
    assert result.exit_code == 2, result.output
    assert "stands for the base model" in result.stderr and "-a NAME=" in result.stderr
    assert result.stdout == ""
