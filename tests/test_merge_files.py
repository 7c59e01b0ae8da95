"""``lora_kit.merge_files`` (the library side of ``lorakit merge``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from merge_helpers import broken_copies, config, logits, randomize, tiny, with_adapters
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

import lora_kit as lk
from lora_kit.base_model import BaseModelError
from lora_kit.merge_files import METADATA_KEY, merge_files

# Output vs the unmerged LoraModel in fp32: the same fp32 reordering tolerance as test_merge.
ATOL = 1e-4
LOADERS = {"gpt2": AutoModelForCausalLM, "bert": AutoModelForSequenceClassification}


def make_base_and_adapters(
    tmp_path: Path, kind: str, heads: bool = False
) -> tuple[Path, list[Path], lk.LoraModel]:
    base = tmp_path / "base"
    tiny(kind).save_pretrained(base)
    (base / "tokenizer_config.json").write_text("{}")  # a stand-in tokenizer file
    lm = with_adapters(kind, ("a", "b"), heads=heads)
    for name in ("a", "b"):
        lm.save_adapter(tmp_path / name, name)
    return base, [tmp_path / "a", tmp_path / "b"], lm


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_output_loads_in_plain_transformers_and_matches(tmp_path: Path, kind: str) -> None:
    base, adapters, lm = make_base_and_adapters(tmp_path, kind, heads=True)
    if kind == "bert":
        randomize(lm, "b", seed=5)  # distinct head copy for b; only a's (chosen) head is used
        lm.save_adapter(tmp_path / "b", "b")
    lm.set_adapter({"a": 0.7, "b": -0.3})  # the first active adapter's head: a's
    ref = logits(lm, kind)
    chosen = adapters[0] if kind == "bert" else None
    report = merge_files(base, adapters, tmp_path / "out", weights=[0.7, -0.3], heads=chosen)
    out = LOADERS[kind].from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(out, kind), ref, rtol=0, atol=ATOL)
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {
        "model.safetensors",
        "config.json",
        "tokenizer_config.json",
    }
    assert report.max_change and all(s.fingerprint == "match" for s in report.adapters)
    assert bool(report.heads) == (kind == "bert")
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    assert meta["method"] == "linear" and meta["lora_kit_version"] == lk.__version__
    assert [a["weight"] for a in meta["sources"]] == [0.7, -0.3]
    assert all(len(a["weights_sha256"]) == 64 for a in meta["sources"])


def test_matches_in_memory_merge_bitwise_and_dtype(tmp_path: Path) -> None:
    base, adapters, lm = make_base_and_adapters(tmp_path, "gpt2")
    merge_files(base, adapters[:1], tmp_path / "o32")
    merge_files(base, adapters[:1], tmp_path / "o16", dtype="bfloat16")
    model = lm.merge_and_unload("a")
    ours = model.state_dict()
    with safe_open(str(tmp_path / "o32" / "model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118
            assert torch.equal(f.get_tensor(key), ours[key]), key  # same arithmetic, fp32
    with safe_open(str(tmp_path / "o16" / "model.safetensors"), framework="pt") as f:
        w = f.get_tensor("transformer.h.0.attn.c_attn.weight")
    assert w.dtype == torch.bfloat16  # rounded once from the fp32 sum:
    assert torch.equal(w, ours["transformer.h.0.attn.c_attn.weight"].to(torch.bfloat16))
    cfg = json.loads((tmp_path / "o16" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) in ("bfloat16", None)


def test_fingerprint_mismatch_refused_unless_forced(tmp_path: Path) -> None:
    _, adapters, _ = make_base_and_adapters(tmp_path, "gpt2")
    other = tmp_path / "other"
    tiny("gpt2", seed=1).save_pretrained(other)  # same shapes, other weights
    with pytest.raises(lk.AdapterMismatchError, match="--force"):
        merge_files(other, adapters, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    report = merge_files(other, adapters, tmp_path / "out", force=True)
    assert {s.fingerprint for s in report.adapters} == {"mismatch (forced)"}


def test_bad_inputs_leave_nothing(tmp_path: Path) -> None:
    base, adapters, lm = make_base_and_adapters(tmp_path, "gpt2")
    out = tmp_path / "out"
    cases = [
        (lambda: merge_files(base, adapters, out, weights=[1.0]), lk.ConfigError),
        (lambda: merge_files(base, adapters, out, weights=[1.0, float("nan")]), lk.ConfigError),
        # read as stack reads weights: these were a bare ValueError/TypeError, or parsed
        (lambda: merge_files(base, adapters, out, weights=[1.0, "x"]), lk.ConfigError),  # type: ignore[list-item]
        (lambda: merge_files(base, adapters, out, weights="12"), lk.ConfigError),  # type: ignore[arg-type]
        (lambda: merge_files(base, adapters, out, weights=[1.0, 10**400]), lk.ConfigError),
        (lambda: merge_files(base, adapters, out, dtype="float8"), lk.ConfigError),
        (lambda: merge_files(tmp_path / "nope", adapters, out), BaseModelError),
        (lambda: merge_files(base, [tmp_path / "nope"], out), lk.AdapterFormatError),
        (lambda: merge_files(base, [], out), lk.ConfigError),
    ]
    bert_base = tmp_path / "bert"
    tiny("bert").save_pretrained(bert_base)
    cases.append((lambda: merge_files(bert_base, adapters, out), lk.AdapterMismatchError))
    # fp16 overflow: the merged weight would be inf; detected while streaming, nothing kept.
    with torch.no_grad():
        for p in lm.adapter_parameters("a"):
            p.mul_(1e3)
    lm.save_adapter(tmp_path / "huge", "a")
    cases.append(
        (
            lambda: merge_files(base, [tmp_path / "huge"], out, dtype="float16"),
            lk.NonFiniteError,
        )
    )
    for call, error in cases:
        with pytest.raises(error):
            call()
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    out.mkdir()
    with pytest.raises(lk.ConfigError, match="already exists"):
        merge_files(base, adapters, out)


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_factors_that_do_not_pair_up_are_refused(tmp_path: Path, kind: str) -> None:
    # A lora_B without its lora_A was silently left out of the merge (the merged model lacked
    # that module's update), and ranks that disagree failed in the middle of streaming.
    base, adapters, _ = make_base_and_adapters(tmp_path, kind)
    broken = broken_copies(adapters[0], tmp_path / "broken")
    cases = {
        "no_A": "has lora_B but no lora_A",
        "no_B": "has lora_A but no lora_B",
        "rank": "with the same r",
        "heads_only": "no lora_A/lora_B tensors",
    }
    out = tmp_path / "out"
    for what, match in cases.items():
        with pytest.raises(lk.LoraKitError, match=match):
            merge_files(base, [adapters[1], broken[what]], out)
        assert not out.exists()


def test_base_without_safetensors_is_refused(tmp_path: Path) -> None:
    base, adapters, _ = make_base_and_adapters(tmp_path, "gpt2")
    (base / "model.safetensors").rename(base / "pytorch_model.bin")
    with pytest.raises(BaseModelError, match="safe_serialization"):
        merge_files(base, adapters, tmp_path / "out")


def test_sharded_base(tmp_path: Path) -> None:
    _, adapters, lm = make_base_and_adapters(tmp_path, "gpt2")
    sharded = tmp_path / "sharded"
    tiny("gpt2").save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    merge_files(sharded, adapters[:1], tmp_path / "out")
    lm.set_adapter("a")
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(out, "gpt2"), logits(lm, "gpt2"), rtol=0, atol=ATOL)
    assert not [p for p in (tmp_path / "out").iterdir() if "index" in p.name]


def test_peft_saved_adapter_square_conv1d(tmp_path: Path) -> None:
    """A PEFT adapter has no fingerprint: orientation of square Conv1D comes from fan_in_fan_out."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    base = tmp_path / "base"
    tiny("gpt2").save_pretrained(base)
    cfg = PeftConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    pm = get_peft_model(tiny("gpt2"), cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    pm.save_pretrained(tmp_path / "peft")
    ref = logits(pm.eval(), "gpt2")
    report = merge_files(base, [tmp_path / "peft"], tmp_path / "out")
    assert report.adapters[0].fingerprint == "none recorded"
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(out, "gpt2"), ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("broken", ["config.json", "model.safetensors.index.json"])
def test_unreadable_base_json_is_a_typed_error(tmp_path: Path, broken: str) -> None:
    """A corrupt config.json or shard index raised a bare JSONDecodeError (a traceback from
    ``lorakit merge``) instead of a BaseModelError naming the file."""
    _, adapters, _ = make_base_and_adapters(tmp_path, "gpt2")
    base = tmp_path / "sharded"
    tiny("gpt2").save_pretrained(base, max_shard_size="100KB")
    (base / broken).write_text("{not json")
    with pytest.raises(BaseModelError, match=broken):
        merge_files(base, adapters[:1], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _rewrite_header(path: Path, edit: object) -> None:
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    edit(header)  # type: ignore[operator]
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + size :])


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_base_header_that_disagrees_with_its_data_is_refused(
    tmp_path: Path, dtype: str | None
) -> None:
    """A base whose header gives a tensor a shape its byte range cannot hold raised an
    "internal error" LoraKitError (kernel copy) or a bare RuntimeError (reshape, with --dtype);
    a truncated file was only noticed halfway through writing. Both are now BaseModelErrors
    raised before anything is written."""
    base, adapters, _ = make_base_and_adapters(tmp_path, "gpt2")
    weights = base / "model.safetensors"
    good = weights.read_bytes()

    def shrink(header: dict[str, dict[str, list[int]]]) -> None:
        header["transformer.wpe.weight"]["shape"][0] -= 1

    _rewrite_header(weights, shrink)
    with pytest.raises(BaseModelError, match=r"transformer\.wpe\.weight"):
        merge_files(base, adapters[:1], tmp_path / "out", dtype=dtype)
    for cut in (100, 1):  # 1: the last tensor ends one byte past the end of the file
        weights.write_bytes(good[:-cut])
        with pytest.raises(BaseModelError, match="truncated"):
            merge_files(base, adapters[:1], tmp_path / "out", dtype=dtype)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# A square projection of the other kind: GPT-2's attn.c_proj as nn.Linear, a BERT attention
# output dense as Conv1D (same [32, 32] shape either way, so the orientation is not in the shape).
_SWAPPED = {
    "gpt2": "transformer.h.0.attn.c_proj",
    "bert": "bert.encoder.layer.0.attention.output.dense",
}


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_square_projections_of_both_kinds_in_one_adapter(tmp_path: Path, kind: str) -> None:
    """One adapter over square Conv1D and square nn.Linear modules: adapter_config.json has a
    single fan_in_fan_out flag (True if any target is Conv1D), so each square module's layout
    comes from the fingerprint's per-module record; the flag alone would transpose some.
    Bitwise against the in-memory merge: the same fp32 arithmetic, rounded once."""
    model = tiny(kind)
    name = _SWAPPED[kind]
    old = model.get_submodule(name)
    weight = old.weight.detach().t().contiguous()  # [in, out] <-> [out, in]
    new: nn.Module = nn.Linear(32, 32) if kind == "gpt2" else Conv1D(32, 32)
    new.weight = nn.Parameter(weight)
    new.bias = old.bias
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)
    base = tmp_path / "base"
    model.save_pretrained(base)
    lm = lk.inject(model, config(kind), "a")
    randomize(lm, "a", seed=3)
    lm.save_adapter(tmp_path / "a", "a")
    report = merge_files(base, [tmp_path / "a"], tmp_path / "out")
    assert report.adapters[0].fingerprint == "match" and name in report.max_change
    merged = lm.merge_and_unload("a").state_dict()
    with safe_open(str(tmp_path / "out" / "model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118
            assert torch.equal(f.get_tensor(key), merged[key]), key


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
def test_output_dtype_is_recorded_under_the_base_configs_key(tmp_path: Path, key: str) -> None:
    """A base config written by older transformers names ``torch_dtype``; the merged model's
    config must then say the dtype it was written in, not the base's."""
    base, adapters, _ = make_base_and_adapters(tmp_path, "gpt2")
    cfg = json.loads((base / "config.json").read_text())
    cfg.pop("dtype", None)
    cfg.pop("torch_dtype", None)
    cfg[key] = "float32"
    (base / "config.json").write_text(json.dumps(cfg))
    merge_files(base, adapters[:1], tmp_path / "out", dtype="bfloat16")
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out[key] == "bfloat16"


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_dtype_overflow_of_an_unmerged_tensor_is_refused(tmp_path: Path, kind: str) -> None:
    """--dtype float16 on an fp32 base: a tensor no adapter touches (a norm's bias here) that
    holds a value beyond fp16's range must not be written as infinity (merged ones already
    were refused); the same base goes out fine as bfloat16."""
    from safetensors.torch import load_file, save_file

    base, adapters, _ = make_base_and_adapters(tmp_path, kind)
    weights = load_file(str(base / "model.safetensors"))
    key = next(k for k in weights if k.endswith(("ln_f.bias", "embeddings.LayerNorm.bias")))
    weights[key][0] = 1e6
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    with pytest.raises(lk.NonFiniteError, match=key):
        merge_files(base, adapters[:1], out, dtype="float16")
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    merge_files(base, adapters[:1], out, dtype="bfloat16")
    assert torch.isfinite(load_file(str(out / "model.safetensors"))[key]).all()
