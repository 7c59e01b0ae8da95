"""Read a whole safetensors file in one pass: one read, a strict header check, tensor views.

The layout (see `safetensors_stream`): an 8-byte little-endian header length, a JSON header
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``), then
the raw little-endian bytes. Nothing is unpickled: a tensor is a typed view of the bytes.

Reading the file with one ``readinto`` into a single buffer and viewing each tensor in place
costs a fraction of opening the file through ``safetensors.safe_open`` and copying tensor by
tensor (that path pays a fixed cost per tensor, and an adapter has a hundred small ones). The
header is checked as strictly as the ``safetensors`` library does: known dtypes, non-negative
integer shapes, byte ranges that match the shapes and tile the data area exactly (no gaps,
overlaps or bytes past the end), string-only metadata. The check depends on nothing but the
header's bytes and the data area's length, so its result is remembered for a few recent small
headers, by their tensor part where the metadata comes first (as the library writes it):
another file of the same shape (an adapter of the same recipe, or the same file again) has
all its bytes read and its metadata parsed and checked, but skips re-checking the tensors.
`read_header` checks a header without reading the data (for a streamed merge).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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
    tensor; they share one storage); a run of tensors whose bytes are not aligned to their
    element size is copied to aligned memory instead.

    Raises:
        SafetensorsFormatError: Truncated file, malformed header, unknown dtype, or byte
            ranges that do not match the shapes or do not tile the data area.
        OSError: The file cannot be read.
    """
    raw = read_safetensors_raw(path)
    return raw.views(), dict(raw.layout.metadata)


def read_header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
    """``name -> (dtype, shape, start, end)`` of a file's tensors, from its header alone.

    ``start``/``end`` are absolute byte offsets in the file. The header gets the same check as
    a whole read (`read_safetensors`) against the file's length, without reading the data: a
    reader of one tensor at a time (a streamed merge) holds no more than that tensor.

    Raises:
        SafetensorsFormatError, OSError: As `read_safetensors`.
    """
    with path.open("rb", buffering=0) as handle:
        size = os.fstat(handle.fileno()).st_size
        first = _read_exactly(handle, 8)
        if len(first) < 8:
            raise SafetensorsFormatError(f"file of {size} bytes is shorter than its header length")
        header_len = int.from_bytes(first, "little")
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            raise SafetensorsFormatError(
                f"header length {header_len} does not fit a file of {size} bytes"
            )
        header = _read_exactly(handle, header_len)
        if len(header) != header_len:
            raise SafetensorsFormatError(f"file ended inside its {header_len}-byte header")
    data_start = 8 + header_len
    layout = _checked_layout(header, size - data_start)
    spans: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
    for name, dtype, shape, _, run, first_element in layout.entries:
        if run < 0:  # no bytes
            spans[name] = (dtype, shape, data_start, data_start)
            continue
        begin = data_start + layout.runs[run][1] + first_element * dtype.itemsize
        spans[name] = (dtype, shape, begin, begin + math.prod(shape) * dtype.itemsize)
    return spans


def _read_exactly(handle: BinaryIO, count: int) -> bytes:
    """Up to ``count`` bytes, fewer only at the end of the file: a raw read may return less
    than asked before it (e.g. on a pipe or NFS), as in `_read_bytes`."""
    chunks: list[bytes] = []
    left = count
    while left:
        chunk = handle.read(left)
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class SafetensorsRaw:
    """A read and checked file before any per-tensor view is made (see `read_safetensors_raw`).

    Attributes:
        layout: The checked header: entries in file order, same-dtype runs, metadata.
        runs: Flat 1-D views of the file's buffer that together hold every tensor's elements
            exactly once: one per maximal run of same-dtype tensors lying back to back in the
            data area (a single view for a file of one dtype). A check over every value
            (finiteness) is one reduction per run instead of one per tensor.
    """

    layout: Layout
    runs: tuple[Tensor, ...]

    def views(self) -> dict[str, Tensor]:
        """Name -> tensor, each a view of its run (an empty tensor for a zero-size entry)."""
        tensors: dict[str, Tensor] = {}
        runs = self.runs
        for name, dtype, shape, strides, run, first in self.layout.entries:
            if run < 0:  # no bytes: an empty tensor
                tensors[name] = torch.empty(shape, dtype=dtype)
            else:
                flat = runs[run]
                tensors[name] = flat.as_strided(shape, strides, flat.storage_offset() + first)
        return tensors


def read_safetensors_raw(path: Path) -> SafetensorsRaw:
    """Read and check a file, returning its layout and flat runs without per-tensor views.

    A reader that knows the layout it wants (a swap into a packed adapter) compares
    ``layout.entries`` and works on the runs, skipping a hundred view constructions.

    Raises:
        SafetensorsFormatError, OSError: As `read_safetensors`.
    """
    buffer = _read_bytes(path)
    size = buffer.numel()
    view = buffer.numpy().data
    header_len = int.from_bytes(view[:8], "little")
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise SafetensorsFormatError(
            f"header length {header_len} does not fit a file of {size} bytes"
        )
    data_start = 8 + header_len
    layout = _checked_layout(bytes(view[8:data_start]), size - data_start)
    runs: list[Tensor] = []
    for dtype, begin, end in layout.runs:
        raw = buffer[data_start + begin : data_start + end]  # [bytes], the file's one storage
        if raw.storage_offset() % dtype.itemsize or raw.data_ptr() % dtype.itemsize:
            raw = raw.clone()  # an odd offset: dtype views and CPU kernels need alignment
        runs.append(raw.view(dtype))  # [elements of the run]
    return SafetensorsRaw(layout, tuple(runs))


def _read_bytes(path: Path) -> Tensor:
    """The whole file as a uint8 tensor ``[bytes]``, read with one ``readinto`` (or a few)."""
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
    return buffer


# name, dtype, shape, contiguous strides, run index (-1: no bytes), element offset in the run
Entry = tuple[str, torch.dtype, tuple[int, ...], tuple[int, ...], int, int]


@dataclass(frozen=True)
class Layout:
    """A checked header: where each tensor lies, the same-dtype runs, the metadata."""

    entries: tuple[Entry, ...]
    runs: tuple[tuple[torch.dtype, int, int], ...]  # dtype, begin, end (bytes of the data area)
    metadata: tuple[tuple[str, str], ...]


# Headers up to this size are remembered (at most _LAYOUTS_KEPT of them), so reading the same
# adapter again skips parsing and checking its header (swapping between a few adapters), and
# so are their tensor parts: another adapter of the same shape (same keys, dtypes, shapes)
# differs only in its metadata, and is checked by parsing that alone.
MEMO_HEADER_BYTES = 1 << 18
_LAYOUTS_KEPT = 32
_METADATA_FIRST = '{"__metadata__":'  # how the safetensors library writes a header


def _checked_layout(header: bytes, data_bytes: int) -> Layout:
    """`_layout`, remembered for small headers: it depends on nothing but its two arguments.

    A header that starts with its metadata (as the safetensors library writes them) is
    remembered by its tensor part; any other, or one whose split fails, as a whole.
    """
    if len(header) > MEMO_HEADER_BYTES:
        return _layout(header, data_bytes)
    split = _split_metadata(header)
    if split is not None:
        metadata, tensor_part = split
        tensors = _memo_layout(tensor_part, data_bytes)
        return Layout(tensors.entries, tensors.runs, metadata)
    return _memo_layout(header, data_bytes)


def _split_metadata(header: bytes) -> tuple[tuple[tuple[str, str], ...], bytes] | None:
    """``(metadata, the header without it)`` for ``{"__metadata__":{...},<tensors>}``.

    The second is ``{<tensors>}``, which parses to exactly the tensor entries the whole header
    parses to. Returns None where the split would not be exact: another start, invalid UTF-8,
    metadata that is not an object of strings, no valid continuation (an invalid whole header
    is left for `_layout` to refuse, with its message), or a rest that may hold another
    ``__metadata__`` key: the whole header's last one wins, even an empty or null one (which
    parsing the rest alone cannot tell from none), and a key spelled with escapes
    (``"\\u005f_metadata__"``) needs a backslash.
    """
    try:
        text = header.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text.startswith(_METADATA_FIRST):
        return None
    try:
        metadata, end = _DECODER.raw_decode(text, len(_METADATA_FIRST))
    except (ValueError, RecursionError):  # the whole-header parse names the error
        return None
    if type(metadata) is not dict or not all(
        type(k) is str and type(v) is str for k, v in metadata.items()
    ):
        return None
    rest = text[end:].rstrip(_JSON_SPACE)  # the padding differs with the metadata's length
    if "__metadata__" in rest or "\\" in rest:  # maybe a later __metadata__: no split
        return None
    if rest.startswith(","):  # members follow: "{" + them is the object of tensors
        if rest[1:].lstrip(_JSON_SPACE).startswith("}"):
            return None  # a trailing comma: invalid JSON as a whole
        return tuple(metadata.items()), ("{" + rest[1:]).encode()
    if rest.startswith("}"):  # metadata only
        return tuple(metadata.items()), rest.encode().replace(b"}", b"{}", 1)
    return None


def _no_constant(name: str) -> object:
    """Refuse ``NaN``/``Infinity``: not JSON (the library refuses them)."""
    raise ValueError(f"{name} is not a JSON value")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)
_JSON_SPACE = " \t\n\r"


def _layout(header: bytes, data_bytes: int) -> Layout:
    """Parse and check a header for a data area of ``data_bytes`` bytes.

    Raises:
        SafetensorsFormatError: Anything malformed (see `read_safetensors`).
    """
    parsed = _parse_header(header)
    metadata = parsed.pop("__metadata__", None)
    if metadata is None:  # null or absent: none (false, 0, "" or [] are refused below)
        metadata = {}
    if not isinstance(metadata, dict) or not all(
        type(k) is str and type(v) is str for k, v in metadata.items()
    ):
        raise SafetensorsFormatError("__metadata__ must map strings to strings")
    spans = _spans(parsed)
    spans.sort()  # file order: (begin, end, name) tuples, compared in C
    entries: list[Entry] = []
    runs: list[tuple[torch.dtype, int, int]] = []
    strides_of: dict[tuple[int, ...], tuple[int, ...]] = {}
    position = 0  # the spans, in file order, must tile [0, data_bytes) exactly
    for begin, end, name, dtype, shape in spans:
        if begin != position:
            raise SafetensorsFormatError(
                f"tensor {name!r} starts at byte {begin}, expected {position} (gap or overlap)"
            )
        position = end
        if begin == end:
            entries.append((name, dtype, shape, (), -1, 0))
            continue
        if not runs or runs[-1][0] != dtype:
            runs.append((dtype, begin, end))
        else:
            runs[-1] = (dtype, runs[-1][1], end)
        first = (begin - runs[-1][1]) // dtype.itemsize
        strides = strides_of.get(shape)  # an adapter has a handful of distinct shapes
        if strides is None:
            strides = strides_of[shape] = _contiguous_strides(shape)
        entries.append((name, dtype, shape, strides, len(runs) - 1, first))
    if position != data_bytes:
        raise SafetensorsFormatError(
            f"tensor data ends at byte {position} but the file holds {data_bytes} bytes of data "
            f"(truncated or padded file)"
        )
    return Layout(tuple(entries), tuple(runs), tuple(metadata.items()))


_memo_layout = functools.lru_cache(maxsize=_LAYOUTS_KEPT)(_layout)


def layout_for(tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]) -> Layout:
    """The layout a file holding ``(name, dtype, shape)`` back to back, in this order, has.

    Built by checking the header such a file would carry, so it equals, entry for entry, what
    reading that file gives (metadata aside: this one has none).
    """
    codes = {dtype: code for code, dtype in _DTYPES.items()}
    header: dict[str, object] = {}
    position = 0
    for name, dtype, shape in tensors:
        end = position + math.prod(shape) * dtype.itemsize
        offsets = [position, end]
        header[name] = {"dtype": codes[dtype], "shape": list(shape), "data_offsets": offsets}
        position = end
    return _layout(json.dumps(header).encode(), position)


def _parse_header(raw: bytes) -> dict[str, object]:
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        # RecursionError: nesting deeper than the parser goes (a corrupt or hostile file);
        # ValueError: also an over-long integer, NaN or Infinity
        raise SafetensorsFormatError(f"header is not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise SafetensorsFormatError("header is not a JSON object")
    return header


# begin, end, name, dtype, shape: sorting the tuples puts the tensors in file order.
Span = tuple[int, int, str, torch.dtype, tuple[int, ...]]


def _spans(parsed: dict[str, object]) -> list[Span]:
    """Every tensor entry's span, checked as `_span` does (one tight loop: an adapter has a
    hundred entries, and this runs for every header read for the first time)."""
    spans: list[Span] = []
    append = spans.append
    dtypes = _DTYPES
    for name, entry in parsed.items():
        if type(entry) is dict:
            code, shape = entry.get("dtype"), entry.get("shape")
            offsets = entry.get("data_offsets")
            dtype = dtypes.get(code) if type(code) is str else None
            if (
                dtype is not None
                and type(shape) is list
                and type(offsets) is list
                and len(offsets) == 2
            ):
                begin, end = offsets
                if type(begin) is int and type(end) is int and 0 <= begin <= end:
                    count = 1
                    for size in shape:
                        if type(size) is not int or size < 0:
                            break
                        count *= size
                    else:
                        if end - begin == count * dtype.itemsize:
                            append((begin, end, name, dtype, tuple(shape)))
                            continue
        append(_span(name, entry))  # not well-formed: raises, saying why
    return spans


def _span(name: str, entry: object) -> Span:
    if type(entry) is not dict:
        raise SafetensorsFormatError(f"tensor {name!r}: header entry is not an object")
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    dtype = _DTYPES.get(code) if type(code) is str else None
    if dtype is None:
        raise SafetensorsFormatError(f"tensor {name!r}: unsupported dtype {code!r}")
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise SafetensorsFormatError(f"tensor {name!r}: shape {shape!r} is not a list of sizes")
    if type(offsets) is not list or len(offsets) != 2:
        raise SafetensorsFormatError(f"tensor {name!r}: bad data_offsets {offsets!r}")
    begin, end = offsets
    if type(begin) is not int or type(end) is not int or not 0 <= begin <= end:
        raise SafetensorsFormatError(f"tensor {name!r}: bad data_offsets {offsets!r}")
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise SafetensorsFormatError(
            f"tensor {name!r}: {end - begin} bytes do not hold {code}{shape}"
        )
    return begin, end, name, dtype, tuple(shape)


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))
