"""The one-pass safetensors reader: same tensors as the safetensors library, same strictness.

Exact comparisons (``torch.equal``, dtype and shape): reading is a byte copy, nothing is
computed.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lora_kit as lk
from lora_kit.adapter_io import _all_finite
from lora_kit.safetensors_read import SafetensorsFormatError, read_safetensors


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "a.lora_A.weight": torch.randn(4, 7, generator=gen),
        "a.lora_B.weight": torch.randn(5, 4, generator=gen).to(torch.bfloat16),
        "b.half": torch.randn(3, generator=gen).to(torch.float16),
        "c.double": torch.randn(2, 3, generator=gen, dtype=torch.float64),
        "d.empty": torch.zeros(0, 6),
        "e.scalar": torch.tensor(1.5),
        "f.int": torch.arange(6, dtype=torch.int32).reshape(2, 3),
    }


def test_reads_what_the_library_reads(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file(_tensors(), str(path), metadata={"format": "pt", "note": "x"})
    tensors, metadata = read_safetensors(path)
    reference = load_file(str(path))
    assert metadata == {"format": "pt", "note": "x"}
    assert set(tensors) == set(reference)
    for key, value in reference.items():
        assert tensors[key].dtype == value.dtype and tensors[key].shape == value.shape, key
        assert torch.equal(tensors[key], value), key


def _raw_file(path: Path, header: object, data: bytes, pad: int = 8) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % pad)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("start", [0, 1, 2, 3])
def test_misaligned_tensors_are_copied_to_aligned_memory(tmp_path: Path, start: int) -> None:
    """Offsets that are not multiples of the element size (legal, if unusual) still read."""
    u8 = torch.tensor([1, 2, 3], dtype=torch.uint8)
    f32 = torch.arange(3, dtype=torch.float32)
    f16 = torch.tensor([0.5, -2.0], dtype=torch.float16)
    header = {
        "u": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
        "x": {"dtype": "F32", "shape": [3], "data_offsets": [3, 15]},
        "y": {"dtype": "F16", "shape": [2], "data_offsets": [15, 19]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * ((start - 8 - len(raw)) % 4)  # the data area starts at ``start`` mod 4
    data = b"".join(t.numpy().tobytes() for t in (u8, f32, f16))
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    tensors, _ = read_safetensors(path)
    for key, want in (("u", u8), ("x", f32), ("y", f16)):
        assert tensors[key].data_ptr() % want.element_size() == 0
        assert torch.equal(tensors[key], want), key


F32 = torch.ones(2, dtype=torch.float32).numpy().tobytes()  # 8 bytes
BAD: dict[str, tuple[Callable[[Path], None], str]] = {
    "empty file": (lambda p: p.write_bytes(b""), "shorter than its header length"),
    "header too long": (
        lambda p: p.write_bytes(struct.pack("<Q", 1000) + b"{}"),
        "does not fit",
    ),
    "not json": (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"{oop"), "not valid UTF-8 JSON"),
    "not an object": (lambda p: _raw_file(p, [], b""), "not a JSON object"),
    "unknown dtype": (
        lambda p: _raw_file(p, {"x": {"dtype": "F13", "shape": [2], "data_offsets": [0, 8]}}, F32),
        "unsupported dtype 'F13'",
    ),
    "bad shape": (
        lambda p: _raw_file(p, {"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, F32),
        "not a list of sizes",
    ),
    "reversed offsets": (
        lambda p: _raw_file(p, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, F32),
        "bad data_offsets",
    ),
    "size mismatch": (
        lambda p: _raw_file(p, {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, F32),
        "do not hold F32",
    ),
    "gap": (
        lambda p: _raw_file(p, {"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, F32),
        "starts at byte 4, expected 0",
    ),
    "overlap": (
        lambda p: _raw_file(
            p,
            {
                "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "y": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
            },
            F32,
        ),
        "expected 8",
    ),
    "truncated data": (
        lambda p: _raw_file(p, {"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, F32),
        "truncated or padded",
    ),
    "trailing bytes": (
        lambda p: _raw_file(p, {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, F32),
        "truncated or padded",
    ),
    "metadata not strings": (
        lambda p: _raw_file(
            p,
            {
                "__metadata__": {"a": 1},
                "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            },
            F32,
        ),
        "__metadata__ must map strings to strings",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_files_are_refused(tmp_path: Path, case: str) -> None:
    make, message = BAD[case]
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(SafetensorsFormatError, match=message):
        read_safetensors(path)


def test_malformed_adapter_file_is_an_adapter_format_error(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["c_attn"]})
    )
    _raw_file(
        tmp_path / "adapter_model.safetensors",
        {"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
        F32,
    )
    with pytest.raises(lk.AdapterFormatError, match="truncated or corrupt"):
        lk.read_adapter(tmp_path)


def test_finite_check_on_half_precision_does_not_overflow() -> None:
    """fp16 values whose fp16 sum overflows are finite: the sum is taken in fp32."""
    big = torch.full((64,), 60000.0, dtype=torch.float16)
    assert _all_finite([big, torch.ones(3, dtype=torch.bfloat16)])
    assert not _all_finite([big, torch.tensor([float("nan")], dtype=torch.float16)])
    assert not _all_finite([torch.tensor([1.0, float("-inf")])])
