"""Read a whole safetensors file in one pass: one read, a strict header check, tensor views.

The layout (see `safetensors_stream`): an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``), then
the raw little-endian bytes. Nothing is unpickled: a tensor is a typed view of the bytes.

Reading the file with one ``readinto`` into a single buffer and viewing each tensor in place
costs a fraction of opening the file through ``safetensors.safe_open`` and copying tensor by
tensor (that path pays a fixed cost per tensor, and an adapter has a hundred small ones). The
header is checked as strictly as the ``safetensors`` library does: known dtypes, non-negative
integer shapes, byte ranges that match the shapes and tile the data area exactly (no gaps,
overlaps or bytes past the end), string-only metadata.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch
from torch import Tensor

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
# The same bound as the safetensors library: a larger header is refused as corrupt.
MAX_HEADER_BYTES = 100_000_000
# Tensor views need the machine to be little-endian (as the file is).
NATIVE_LITTLE_ENDIAN = sys.byteorder == "little"


class SafetensorsFormatError(ValueError):
    """The file is not a well-formed safetensors file (the message says what is wrong)."""


def read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; tensors are CPU views of one buffer.

    The tensors are views of one uint8 tensor holding the file's bytes (no copy per
    tensor; they share one storage); a tensor whose bytes are not aligned to its element size
    is copied to aligned memory instead.

    Raises:
        SafetensorsFormatError: Truncated file, malformed header, unknown dtype, or byte
            ranges that do not match the shapes or do not tile the data area.
        OSError: The file cannot be read.
    """
    with path.open("rb", buffering=0) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size < 8:
            raise SafetensorsFormatError(f"file of {size} bytes is shorter than its header length")
        buffer = torch.empty(size, dtype=torch.uint8)  # [bytes]; not zero-filled, read over
        view = buffer.numpy().data  # a writable memoryview of the same bytes
        done = 0
        while done < size:  # readinto may return less than asked (e.g. on a pipe or NFS)
            got = handle.readinto(view[done:])
            if not got:
                raise SafetensorsFormatError(f"file ended after {done} of {size} bytes")
            done += got
    header_len = int.from_bytes(view[:8], "little")
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise SafetensorsFormatError(
            f"header length {header_len} does not fit a file of {size} bytes"
        )
    data_start = 8 + header_len
    header = _parse_header(bytes(view[8:data_start]))
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise SafetensorsFormatError("__metadata__ must map strings to strings")
    spans = [_span(name, entry) for name, entry in header.items()]
    _check_tiling(spans, size - data_start)
    data = buffer[data_start:] if size > data_start else None
    tensors: dict[str, Tensor] = {}
    for name, dtype, shape, begin, end in spans:
        if data is None or begin == end:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        raw = data[begin:end]  # [bytes], one storage for every tensor
        if raw.storage_offset() % dtype.itemsize or raw.data_ptr() % dtype.itemsize:
            raw = raw.clone()  # an odd offset: dtype views and CPU kernels need alignment
        tensors[name] = raw.view(dtype).view(shape)
    return tensors, dict(metadata)


def _parse_header(raw: bytes) -> dict[str, object]:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsFormatError(f"header is not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise SafetensorsFormatError("header is not a JSON object")
    return header


Span = tuple[str, torch.dtype, tuple[int, ...], int, int]


def _span(name: str, entry: object) -> Span:
    if not isinstance(entry, dict):
        raise SafetensorsFormatError(f"tensor {name!r}: header entry is not an object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    dtype = _DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise SafetensorsFormatError(f"tensor {name!r}: unsupported dtype {code!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise SafetensorsFormatError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise SafetensorsFormatError(f"tensor {name!r}: bad data_offsets {offsets!r}")
    begin, end = offsets
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise SafetensorsFormatError(
            f"tensor {name!r}: {end - begin} bytes do not hold {code}{shape}"
        )
    return name, dtype, tuple(shape), begin, end


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tiling(spans: list[Span], data_bytes: int) -> None:
    """The byte ranges must cover ``[0, data_bytes)`` exactly, without gaps or overlaps."""
    position = 0
    for name, _, _, begin, end in sorted(spans, key=lambda s: (s[3], s[4])):
        if begin != position:
            raise SafetensorsFormatError(
                f"tensor {name!r} starts at byte {begin}, expected {position} (gap or overlap)"
            )
        position = end
    if position != data_bytes:
        raise SafetensorsFormatError(
            f"tensor data ends at byte {position} but the file holds {data_bytes} bytes of data "
            f"(truncated or padded file)"
        )
