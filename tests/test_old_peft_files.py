"""Adapter files written by older PEFT releases (audit: scripts/oldpeft_audit)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import lora_kit as lk
from lora_kit.errors import AdapterFormatError
from lora_kit.peft_format import from_peft_dict
from lora_kit.verify import verify_fit
from tests.conftest import GPT2, logits, tiny_gpt2

ALTERNATION = r"h\.0\.attn\.c_attn|h\.1\.mlp\.c_fc"


def _config(**extra: Any) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 8,
        "target_modules": ["c_attn", "c_proj", "c_fc"],
        "fan_in_fan_out": True,
        **extra,
    }


@pytest.mark.parametrize("field", ["alpha_pattern", "rank_pattern"])
def test_an_ungrouped_alternation_in_an_unversioned_file_is_refused(field: str) -> None:
    # peft 0.14 (no peft_version in its files) matched re.match(r".*\." + key + "$"): of "a|b"
    # only "a" applied; current PEFT applies both, so the file would silently load otherwise.
    with pytest.raises(AdapterFormatError, match=rf"{field} key .* peft_version"):
        from_peft_dict(_config(**{field: {ALTERNATION: 4}}), "old.json")


@pytest.mark.parametrize(
    "key",
    [r"(h\.0\.attn\.c_attn|h\.1\.mlp\.c_fc)", r"h\.[0|1]\.attn\.c_attn", r"h\.0\.\|x", "c_attn"],
)
def test_unversioned_keys_that_both_rules_read_alike_load(key: str) -> None:
    config = from_peft_dict(_config(alpha_pattern={key: 4}), "old.json")
    assert dict(config.alpha_pattern) == {key: 4}


def test_a_versioned_file_keeps_current_peft_s_grouping() -> None:
    config = from_peft_dict(
        _config(peft_version="0.21.0", alpha_pattern={ALTERNATION: 64}), "new.json"
    )
    assert config.alpha_for("transformer.h.1.mlp.c_fc") == 64
    assert config.alpha_for("transformer.h.0.attn.c_attn") == 64


OVERLAP = {"mlp.c_proj": 64, "c_proj": 2}  # both match h.N.mlp.c_proj: the first one wins


def _overlapping_peft_file(tmp_path: Path, version: str | None) -> Path:
    """A PEFT 0.22 file whose alpha_pattern keys overlap, rewritten as an older PEFT wrote it
    (sorted keys; ``version`` as its peft_version, None: none recorded)."""
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    config = PeftConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                        alpha_pattern=dict(OVERLAP), init_lora_weights=False)  # fmt: skip
    get_peft_model(tiny_gpt2(), config).save_pretrained(str(tmp_path / "p"))
    path = tmp_path / "p" / "adapter_config.json"
    data = json.loads(path.read_text())
    data.pop("peft_version", None)
    if version is not None:
        data["peft_version"] = version
    path.write_text(json.dumps(data, sort_keys=True))  # as PEFT < 0.22 saved it
    return tmp_path / "p"


@pytest.mark.parametrize("version", [None, "0.21.0"])
def test_overlapping_pattern_keys_in_a_sorted_older_file_are_refused(
    version: str | None, tmp_path: Path
) -> None:
    """PEFT before 0.22 sorted the keys, losing which of two overlapping keys its writer used:
    the file loaded with the other one's alpha (logits off by 0.63 in the audit)."""
    path = _overlapping_peft_file(tmp_path, version)
    lm = lk.inject(tiny_gpt2(), lk.LoraConfig(r=4, targets=["c_attn", "c_proj"]))
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    match = r"alpha_pattern keys 'c_proj' \(2\) and 'mlp.c_proj' \(64\) both match .*mlp.c_proj"
    with pytest.raises(AdapterFormatError, match=match):
        lm.load_adapter(path, "old")
    assert lm.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in lm.state_dict().items())
    with pytest.raises(AdapterFormatError, match=match):
        lm.swap_adapter("default", path)
    report = verify_fit(path, tiny_gpt2())
    assert not report.fits and any("both match" in p for p in report.problems)


def test_overlapping_pattern_keys_load_where_the_order_was_kept(tmp_path: Path) -> None:
    """PEFT 0.22 keeps the order (its file loads, as PEFT reads it), and so does lora_kit."""
    from peft import PeftModel

    path = _overlapping_peft_file(tmp_path, "0.22.0")
    data = json.loads((path / "adapter_config.json").read_text())
    data["alpha_pattern"] = dict(OVERLAP)  # the order PEFT 0.22 wrote
    (path / "adapter_config.json").write_text(json.dumps(data))
    lm = lk.LoraModel.from_pretrained(tiny_gpt2(), path)
    assert lm.adapters["default"].alpha_for("transformer.h.0.mlp.c_proj") == 64
    peft_model = PeftModel.from_pretrained(tiny_gpt2(), str(path)).eval()
    inputs = GPT2.inputs()
    torch.testing.assert_close(logits(lm, inputs), logits(peft_model, inputs), rtol=1e-5, atol=1e-5)
    ours = lk.inject(tiny_gpt2(), lk.LoraConfig(r=4, targets=["c_attn", "c_proj"],
                                                alpha_pattern=dict(OVERLAP)))  # fmt: skip
    lk.LoraModel.from_pretrained(tiny_gpt2(), ours.save_adapter(tmp_path / "lk"))


@pytest.mark.parametrize("marker", ["trainable_token_indices", "corda_config"])
def test_an_alternation_in_an_unversioned_peft_0_15_to_0_17_file_loads(marker: str) -> None:
    r"""PEFT 0.15 to 0.17 wrote no peft_version either, but grouped the key as PEFT does today
    (re.match(r"(.*\.)?(" + key + ")$")); their files carry fields that 0.14 lacked."""
    config = from_peft_dict(_config(**{marker: None, "alpha_pattern": {ALTERNATION: 64}}), "p.json")
    assert config.alpha_for("transformer.h.1.mlp.c_fc") == 64
    assert config.alpha_for("transformer.h.0.attn.c_attn") == 64


def test_stack_and_merge_on_disk_refuse_overlapping_keys_of_a_sorted_older_file(
    tmp_path: Path,
) -> None:
    """``lorakit stack`` and ``lorakit merge`` read the scalings from the file too: they baked the
    other key's alpha into their output (stack's output then loaded without a word)."""
    from lora_kit.merge_files import merge_files

    path = _overlapping_peft_file(tmp_path, "0.21.0")
    match = r"alpha_pattern keys 'c_proj' \(2\) and 'mlp.c_proj' \(64\) both match"
    with pytest.raises(AdapterFormatError, match=match):
        lk.stack([path], out=tmp_path / "stacked")
    assert not (tmp_path / "stacked").exists()
    tiny_gpt2().save_pretrained(tmp_path / "base")
    with pytest.raises(AdapterFormatError, match=match):
        merge_files(tmp_path / "base", [path], tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_overlapping_rank_keys_load_where_the_tensors_show_the_applied_rank(
    tmp_path: Path,
) -> None:
    """Ranks are in the tensors: where the key read first (sorted) gives the rank the file's
    tensors have, it is the one the writer applied, and the file loads as PEFT reads it."""
    from peft import LoraConfig as PeftConfig
    from peft import PeftModel, get_peft_model

    ranks = {"attn.c_proj": 6, "c_proj": 2}  # sorted already: the writer's order survives
    config = PeftConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                        rank_pattern=dict(ranks), init_lora_weights=False)  # fmt: skip
    get_peft_model(tiny_gpt2(), config).save_pretrained(str(tmp_path / "p"))
    path = tmp_path / "p" / "adapter_config.json"
    data = json.loads(path.read_text()) | {"peft_version": "0.21.0"}
    path.write_text(json.dumps(data, sort_keys=True))
    lm = lk.LoraModel.from_pretrained(tiny_gpt2(), tmp_path / "p")
    assert lm.adapters["default"].rank_for("transformer.h.0.attn.c_proj") == 6
    peft_model = PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path / "p")).eval()
    inputs = GPT2.inputs()
    torch.testing.assert_close(logits(lm, inputs), logits(peft_model, inputs), rtol=1e-5, atol=1e-5)
    assert verify_fit(tmp_path / "p", tiny_gpt2()).fits
    data["rank_pattern"] = {"attn.c_proj": 2, "c_proj": 6}  # the tensors say 6, read first: 2
    path.write_text(json.dumps(data))
    with pytest.raises(AdapterFormatError, match=r"rank_pattern keys 'attn.c_proj' \(2\)"):
        lk.LoraModel.from_pretrained(tiny_gpt2(), tmp_path / "p")
