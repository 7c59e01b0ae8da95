"""The one-pass safetensors reader: same tensors as the safetensors library, same strictness.

Exact comparisons (``torch.equal``, dtype and shape): reading is a byte copy, nothing is
computed.
"""

from __future__ import annotations

import io
import itertools
import json
import random
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save, save_file

import lora_kit as lk
from lora_kit import safetensors_read
from lora_kit.adapter_io import all_finite
from lora_kit.safetensors_read import (
    SafetensorsFormatError,
    read_safetensors,
    read_safetensors_raw,
)


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
    # Nesting deeper than the JSON parser recurses: RecursionError unless caught.
    "deeply nested": (
        lambda p: p.write_bytes(struct.pack("<Q", 200_002) + b"{" + b"[" * 200_000 + b"}"),
        "not valid UTF-8 JSON",
    ),
    "deeply nested metadata": (
        lambda p: p.write_bytes(struct.pack("<Q", 200_016) + b'{"__metadata__":' + b"[" * 200_000),
        "not valid UTF-8 JSON",
    ),
    "not an object": (lambda p: _raw_file(p, [], b""), "not a JSON object"),
    "unknown dtype": (
        lambda p: _raw_file(p, {"x": {"dtype": "F13", "shape": [2], "data_offsets": [0, 8]}}, F32),
        "unsupported dtype 'F13'",
    ),
    "bad shape": (
        lambda p: _raw_file(p, {"x": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, F32),
        "not a list of sizes",
    ),
    "bool shape": (
        lambda p: _raw_file(
            p, {"x": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, F32
        ),
        "not a list of sizes",
    ),
    "bool offsets": (
        lambda p: _raw_file(
            p, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [False, 8]}}, F32
        ),
        "bad data_offsets",
    ),
    "float offsets": (
        lambda p: _raw_file(
            p, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8.0]}}, F32
        ),
        "bad data_offsets",
    ),
    "three offsets": (
        lambda p: _raw_file(
            p, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}}, F32
        ),
        "bad data_offsets",
    ),
    "entry not an object": (lambda p: _raw_file(p, {"x": [0, 8]}, F32), "not an object"),
    "duplicate range": (
        lambda p: _raw_file(
            p,
            {
                "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "y": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            },
            F32,
        ),
        "expected 8",
    ),
    "reversed offsets": (
        lambda p: _raw_file(p, {"x": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, F32),
        "bad data_offsets",
    ),
    "size mismatch": (
        lambda p: _raw_file(p, {"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, F32),
        "do not hold F32",
    ),
    "range longer than shape": (  # the bytes fit the tiling but hold more than the shape
        lambda p: _raw_file(p, {"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}, F32),
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
    # not an object (null is none, as for the safetensors library, which refuses these too)
    **{
        f"metadata {value!r}": (
            lambda p, value=value: _raw_file(
                p,
                {
                    "__metadata__": value,
                    "x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                },
                F32,
            ),
            "__metadata__ must map strings to strings",
        )
        for value in (False, 0, "", [])
    },
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
    assert all_finite([big, torch.ones(3, dtype=torch.bfloat16)])
    assert not all_finite([big, torch.tensor([float("nan")], dtype=torch.float16)])
    assert not all_finite([torch.tensor([1.0, float("-inf")])])


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_files_are_refused_every_time(
    tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refusals are never remembered, and the unremembered (large-header) path is as strict."""
    make, message = BAD[case]
    path = tmp_path / "bad.safetensors"
    make(path)
    for _ in range(2):
        with pytest.raises(SafetensorsFormatError, match=message):
            read_safetensors(path)
    monkeypatch.setattr(safetensors_read, "MEMO_HEADER_BYTES", 0)
    with pytest.raises(SafetensorsFormatError, match=message):
        read_safetensors(path)


def _identical_header_files(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """Two files whose headers are byte for byte the same, with different data."""
    first = _tensors()
    second = {k: v + 1 if v.is_floating_point() else v for k, v in first.items()}
    paths = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    for path, tensors in zip(paths, (first, second), strict=True):
        save_file(tensors, str(path), metadata={"format": "pt"})
    raw = [p.read_bytes() for p in paths]
    length = 8 + struct.unpack("<Q", raw[0][:8])[0]
    assert raw[0][:length] == raw[1][:length]  # same header, so the remembered check applies
    return paths[0], paths[1], second


def test_remembered_header_still_reads_each_files_own_bytes(tmp_path: Path) -> None:
    one, two, second = _identical_header_files(tmp_path)
    read_safetensors(one)
    tensors, _ = read_safetensors(two)
    for key, want in second.items():
        assert torch.equal(tensors[key], want), key


def test_remembered_header_does_not_hide_truncated_or_padded_data(tmp_path: Path) -> None:
    one, two, _ = _identical_header_files(tmp_path)
    read_safetensors(one)  # its header is now remembered
    raw = two.read_bytes()
    two.write_bytes(raw[:-4])
    with pytest.raises(SafetensorsFormatError, match="truncated or padded"):
        read_safetensors(two)
    two.write_bytes(raw + b"\0" * 4)
    with pytest.raises(SafetensorsFormatError, match="truncated or padded"):
        read_safetensors(two)


def test_runs_hold_every_value_once(tmp_path: Path) -> None:
    """The flat runs cover exactly the tensors' bytes: one run per same-dtype stretch."""
    path = tmp_path / "t.safetensors"
    save_file(_tensors(), str(path))
    raw = read_safetensors_raw(path)
    tensors = raw.views()
    assert sum(r.numel() * r.element_size() for r in raw.runs) == sum(
        t.numel() * t.element_size() for t in tensors.values()
    )
    for run in raw.runs:
        assert run.dim() == 1 and run.is_contiguous()
    spans = {
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
        for t in tensors.values()
        if t.numel()
    }
    covered = sorted(spans)
    runs = sorted((r.data_ptr(), r.data_ptr() + r.numel() * r.element_size()) for r in raw.runs)
    assert covered[0][0] == runs[0][0] and covered[-1][1] == runs[-1][1]
    for (_, end), (begin, _) in itertools.pairwise(covered):
        assert end == begin  # back to back: the runs are exactly these bytes


def test_one_dtype_file_is_one_run(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    tensors = {f"m{i}.weight": torch.randn(3, i + 1) for i in range(5)}
    save_file(tensors, str(path))
    raw = read_safetensors_raw(path)
    assert len(raw.runs) == 1
    assert raw.runs[0].numel() == sum(t.numel() for t in tensors.values())


def _adapter_dir(root: Path, tensors: dict[str, torch.Tensor]) -> Path:
    root.mkdir()
    (root / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["c_attn"]})
    )
    save_file(tensors, str(root / "adapter_model.safetensors"))
    return root


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("where", ["first", "last"])
def test_non_finite_value_in_any_run_is_named(
    tmp_path: Path, dtype: torch.dtype, where: str
) -> None:
    """NaN/inf anywhere (a mixed-dtype file, several runs) fails, naming its tensor."""
    tensors = {
        "a.weight": torch.randn(4, 3),
        "b.weight": torch.randn(5, dtype=torch.float16),
        "c.weight": torch.randn(2, 2, dtype=torch.bfloat16),
        "d.weight": torch.randn(6, dtype=torch.float64),
    }
    key = next(k for k, v in tensors.items() if v.dtype == dtype)
    index = 0 if where == "first" else -1
    tensors[key].view(-1)[index] = float("nan") if where == "first" else float("-inf")
    bad = _adapter_dir(tmp_path / "bad", tensors)
    for _ in range(2):  # also once the header is remembered
        with pytest.raises(lk.NonFiniteError, match=key):
            lk.read_adapter(bad)


def test_huge_finite_values_are_accepted(tmp_path: Path) -> None:
    """A sum that overflows (finite values near the fp32 maximum) falls back to the exact check."""
    tensors = {"a.weight": torch.full((8,), 3e38), "b.weight": torch.full((4,), 3e38)}
    files = lk.read_adapter(_adapter_dir(tmp_path / "big", tensors))
    assert torch.equal(files.tensors["a.weight"], tensors["a.weight"])


def test_another_file_of_the_same_shape_reuses_the_checked_tensor_part(tmp_path: Path) -> None:
    """Adapters of one recipe differ only in their metadata: the second one's header is
    checked by parsing its metadata alone, and each file keeps its own metadata."""
    tensors = {k: v for k, v in _tensors().items() if v.is_floating_point()}
    first, second = tmp_path / "1.safetensors", tmp_path / "2.safetensors"
    save_file(tensors, str(first), metadata={"format": "pt", "created": "1"})
    save_file(tensors, str(second), metadata={"format": "pt", "created": "2", "more": "x"})
    safetensors_read._memo_layout.cache_clear()
    _, meta_first = read_safetensors(first)
    read, meta_second = read_safetensors(second)
    info = safetensors_read._memo_layout.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    assert meta_first == {"format": "pt", "created": "1"}
    assert meta_second == {"format": "pt", "created": "2", "more": "x"}
    reference = load_file(str(second))
    assert all(torch.equal(read[k], reference[k]) for k in reference)


_X = '"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'


@pytest.mark.parametrize(
    ("header", "metadata"),
    [
        ('{"__metadata__":{"a":"1"},' + _X + "}", {"a": "1"}),
        ('{"__metadata__":{"a":"1"},' + _X + ',"__metadata__":{"a":"2"}}', {"a": "2"}),
        # a later empty or null __metadata__ wins too (json.loads: the last duplicate key)
        ('{"__metadata__":{"a":"1"},' + _X + ',"__metadata__":{}}', {}),
        ('{"__metadata__":{"a":"1"},' + _X + ',"__metadata__":null}', {}),
        ('{"__metadata__":{"a":"1"},"__metadata__":{},' + _X + "}", {}),
        ('{"__metadata__":{"a":"1"},' + _X + ',"\\u005f_metadata__":{}}', {}),  # escaped key
        ('{"__metadata__":null,' + _X + "}", {}),
        ('{"__metadata__":{"a":"1"},' + _X + ",}", None),  # trailing comma
        ('{"__metadata__":{"a":1},' + _X + "}", None),  # a non-string value
        ('{"__metadata__":{"a":"1"} ,' + _X + "}", {"a": "1"}),  # spacing: no split
        ('{"__metadata__":{"a":"1"}' + _X + "}", None),  # no comma
    ],
)
def test_a_split_header_reads_as_the_whole_header_does(
    tmp_path: Path, header: str, metadata: dict[str, str] | None
) -> None:
    """Exactly json.loads semantics (the last duplicate key wins), whether or not the tensor
    part was checked before for another file."""
    for warm in (False, True):
        safetensors_read._memo_layout.cache_clear()
        if warm:  # the same tensor part, from a valid file with other metadata
            good = tmp_path / "good.safetensors"
            _raw_text_file(good, '{"__metadata__":{"z":"0"},' + _X + "}", b"\0" * 4)
            read_safetensors(good)
        path = tmp_path / "t.safetensors"
        _raw_text_file(path, header, struct.pack("<f", 2.5))
        for _ in range(2):  # and again, remembered
            if metadata is None:
                with pytest.raises(SafetensorsFormatError):
                    read_safetensors(path)
            else:
                tensors, found = read_safetensors(path)
                assert found == metadata and tensors["x"].tolist() == [2.5]


def test_metadata_only_header_reads(tmp_path: Path) -> None:
    path = tmp_path / "empty.safetensors"
    _raw_text_file(path, '{"__metadata__":{"a":"1"}}', b"")
    for _ in range(2):
        assert read_safetensors(path) == ({}, {"a": "1"})


def _raw_text_file(path: Path, header: str, data: bytes) -> None:
    raw = header.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def test_read_header_gives_each_tensors_bytes_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "t.safetensors"
    save_file(_tensors(), str(path), metadata={"format": "pt"})
    spans = safetensors_read.read_header(path)
    raw = path.read_bytes()
    reference = load_file(str(path))
    assert set(spans) == set(reference)
    for key, (dtype, shape, start, end) in spans.items():
        want = reference[key]
        assert (dtype, shape) == (want.dtype, tuple(want.shape)), key
        assert raw[start:end] == want.contiguous().view(-1).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("spoil", ["truncated", "gap", "short"])
def test_read_header_refuses_what_a_whole_read_refuses(tmp_path: Path, spoil: str) -> None:
    path = tmp_path / "t.safetensors"
    if spoil == "gap":  # bytes between two tensors: refused like the library does
        header = {
            "x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
            "y": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]},
        }
        _raw_file(path, header, b"\0" * 12)
    else:
        save_file(_tensors(), str(path))
        raw = path.read_bytes()
        path.write_bytes(raw[:-1] if spoil == "truncated" else raw[:20])
    with pytest.raises(SafetensorsFormatError):
        read_safetensors(path)
    with pytest.raises(SafetensorsFormatError):
        safetensors_read.read_header(path)


class _Trickle(io.RawIOBase):
    """A file that gives at most 5 bytes per read, as a raw read may (a pipe, NFS, FUSE)."""

    def __init__(self, path: Path) -> None:
        self._file = io.FileIO(path, "r")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        return self._file.readinto(memoryview(buffer)[:5])

    def fileno(self) -> int:
        return self._file.fileno()

    def close(self) -> None:
        self._file.close()
        super().close()


def test_short_reads_are_read_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A raw read may return fewer bytes than asked before the end of the file: the readers
    read on instead of calling a whole file truncated."""
    path = tmp_path / "t.safetensors"
    save_file(_tensors(), str(path), metadata={"format": "pt"})
    spans = safetensors_read.read_header(path)
    tensors, metadata = read_safetensors(path)
    monkeypatch.setattr(Path, "open", lambda self, *args, **kwargs: _Trickle(self))
    assert safetensors_read.read_header(path) == spans
    trickled, trickled_metadata = read_safetensors(path)
    assert trickled_metadata == metadata
    assert all(torch.equal(trickled[k], tensors[k]) for k in tensors)


_TOKENS = [b'"', b",", b"{", b"}", b":", b" ", b"\\", b"u", b"_", b"__metadata__", b"\\u005f",
           b',"__metadata__":{}', b',"__metadata__":null', b"\xff", b"\xc3\xa9", b"[", b"]",
           b"0", b"\n", b"null"]  # fmt: skip


def _outcome(
    read: Callable[[bytes, int], safetensors_read.Layout], header: bytes, size: int
) -> Any:
    try:
        layout = read(header, size)
    except SafetensorsFormatError:
        return "refused"
    return layout.entries, layout.runs, layout.metadata


def test_split_headers_read_as_json_loads_reads_the_whole_one_under_random_edits() -> None:
    """Random edits of a real header (JSON punctuation, escapes, duplicate or null
    ``__metadata__``, invalid UTF-8; half of them just after a ``}``, where a member may
    follow): the split, memoised read gives exactly what parsing the whole header gives (same
    layout and metadata, or a refusal), with the memo cold or warm."""
    data = save(
        {"a.lora_A.weight": torch.zeros(2, 3), "a.lora_B.weight": torch.zeros(3, 2)},
        metadata={"format": "pt", "lora_kit.x": '{"k": "v\\u00e9"}'},
    )
    length = int.from_bytes(data[:8], "little")
    base, size = data[8 : 8 + length].rstrip(b" "), len(data) - 8 - length
    rng = random.Random(0)
    for _ in range(3000):
        header = bytearray(base)
        for _ in range(rng.randint(1, 3)):
            token = rng.choice(_TOKENS)
            ends = [i + 1 for i, byte in enumerate(header) if byte == ord("}")]
            at = rng.choice(ends) if ends and rng.random() < 0.5 else rng.randint(0, len(header))
            action = rng.random()
            if action < 0.4:
                header[at:at] = token
            elif action < 0.7:
                del header[at : at + rng.randint(1, 4)]
            else:
                header[at : at + len(token)] = token
        edited = bytes(header) + b" " * rng.randint(0, 3)
        if rng.random() < 0.5:
            safetensors_read._memo_layout.cache_clear()
        expected = _outcome(safetensors_read._layout, edited, size)
        assert _outcome(safetensors_read._checked_layout, edited, size) == expected, edited


_X8 = '"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]'


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("{" + _X8 + ',"extra":NaN}}', "NaN"),
        ("{" + _X8 + ',"extra":-Infinity}}', "Infinity"),
        ("{" + _X8 + ',"n":' + "9" * 5000 + "}}", "digits"),
    ],
)
def test_non_json_constants_and_huge_integers_are_refused(
    tmp_path: Path, header: str, message: str
) -> None:
    """Found by fuzzing: NaN parsed (the library refuses it), a 5000-digit integer raised a
    bare ValueError."""
    path = tmp_path / "bad.safetensors"
    _raw_text_file(path, header, F32)
    for read in (read_safetensors, safetensors_read.read_header):
        with pytest.raises(SafetensorsFormatError, match=message):
            read(path)
