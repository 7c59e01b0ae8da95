"""Adapter files written by older PEFT releases (audit: scripts/oldpeft_audit)."""

from __future__ import annotations

from typing import Any

import pytest

from lora_kit.errors import AdapterFormatError
from lora_kit.peft_format import from_peft_dict

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
