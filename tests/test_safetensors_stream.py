"""``lora_kit.safetensors_stream``: produced tensors and byte ranges copied as stored."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_kit.errors import LoraKitError
from lora_kit.safetensors_stream import ByteRange, write_streaming


def _source(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(5, 7, generator=gen),
        "b": torch.randn(3, generator=gen).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.randn(4, 4, generator=gen),
    }
    path = tmp_path / "src.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def _ranges(path: Path) -> dict[str, ByteRange]:
    """Each tensor's absolute byte range in ``path`` (8-byte length, JSON header, data)."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {
        k: ByteRange(path, 8 + size + v["data_offsets"][0], 8 + size + v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__"
    }


def _write(tmp_path: Path, src: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Copy a, b, c (adjacent in the source) and d; produce a fresh tensor "new" in between."""
    ranges = _ranges(src)
    order = sorted(ranges, key=lambda k: ranges[k].start)
    new = torch.full((2, 2), 3.0)
    specs = [(k, tensors[k].dtype, tuple(tensors[k].shape)) for k in order]
    specs.insert(2, ("new", new.dtype, (2, 2)))
    out = tmp_path / "out.safetensors"
    write_streaming(out, specs, lambda name: new, {"format": "pt"}, ranges)
    return out


@pytest.mark.parametrize("kernel", [True, False], ids=["copy_file_range", "buffered"])
def test_copied_ranges_are_the_source_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: bool
) -> None:
    src, tensors = _source(tmp_path)
    if not kernel:

        def refuse(*_args: object) -> int:
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    out = _write(tmp_path, src, tensors)
    got = load_file(str(out))
    assert set(got) == {*tensors, "new"}
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in tensors.items())
    assert torch.equal(got["new"], torch.full((2, 2), 3.0))
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_wrong_range_size_and_truncated_source_are_refused(tmp_path: Path) -> None:
    src, tensors = _source(tmp_path)
    ranges = _ranges(src)
    short = {"a": ByteRange(src, ranges["a"].start, ranges["a"].end - 4)}
    spec = [("a", torch.float32, (5, 7))]
    with pytest.raises(LoraKitError, match="bytes to copy"):
        write_streaming(tmp_path / "o1", spec, lambda _: tensors["a"], {}, short)
    end = src.stat().st_size
    beyond = {"a": ByteRange(src, end - 40, end + 100)}
    with pytest.raises(LoraKitError, match="file ends before byte"):
        write_streaming(tmp_path / "o2", spec, lambda _: tensors["a"], {}, beyond)


@pytest.mark.parametrize("kernel", [True, False], ids=["copy_file_range", "buffered"])
def test_ranges_that_are_not_adjacent_are_copied_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kernel: bool
) -> None:
    """Consecutive copies whose source ranges are not back to back (a base tensor left out in
    between, or taken out of order) must not be joined into one range. Exact: a byte copy."""
    src, tensors = _source(tmp_path)
    if not kernel:

        def refuse(*_args: object) -> int:
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", refuse, raising=False)
    ranges = _ranges(src)
    order = sorted(ranges, key=lambda k: ranges[k].start)
    kept = [order[0], order[2], order[3], order[1]]  # skip one, then go back for it
    specs = [(k, tensors[k].dtype, tuple(tensors[k].shape)) for k in kept]
    out = tmp_path / "out.safetensors"
    write_streaming(out, specs, lambda name: tensors[name], {}, ranges)
    got = load_file(str(out))
    assert set(got) == set(kept)
    assert all(torch.equal(got[k], tensors[k]) and got[k].dtype == tensors[k].dtype for k in kept)
