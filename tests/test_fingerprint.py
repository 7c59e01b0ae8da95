"""``lora_kit.fingerprint``: what a mismatch names.

Exact comparisons only: fingerprints are strings, shapes and hashes, nothing is computed in
floating point here.
"""

from __future__ import annotations

import copy

import pytest

import lora_kit as lk
from lora_kit.fingerprint import compare_fingerprint, fingerprint
from lora_kit.targets import find_targets
from tests.conftest import Arch


@pytest.mark.parametrize("change", ["layout", "out_features"])
def test_a_module_recorded_in_another_shape_or_layout_is_named(arch: Arch, change: str) -> None:
    """Same weights (the same hash), but the recorded ``[out, in, layout]`` of one module
    differs: the error names that module and both records, not just "weights differ"."""
    model = arch.build(0)
    config = lk.LoraConfig(targets=arch.attn_preset)
    names = find_targets(model, config)
    lm = lk.inject(model, config, "a")
    actual = fingerprint(lm.model, {n: lm.model.get_submodule(n) for n in names})
    name = names[0]
    expected = copy.deepcopy(actual)
    record = expected["modules"][name]
    if change == "layout":
        record[2] = {"conv1d": "linear", "linear": "conv1d"}[record[2]]
    else:
        record[0] += 1
    assert expected["weights_sha256"] == actual["weights_sha256"]
    compare_fingerprint(actual, copy.deepcopy(actual), "src")  # equal: no error
    with pytest.raises(lk.AdapterMismatchError, match=rf"module '{name}' was \[.*\] \[out, in"):
        compare_fingerprint(expected, actual, "src")
