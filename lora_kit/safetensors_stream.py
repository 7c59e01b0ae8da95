"""Write a safetensors file one tensor at a time, so a whole model never sits in memory.

The safetensors layout is an 8-byte little-endian header length, a JSON header (dtype, shape and
byte range of every tensor, plus string ``__metadata__``), then the raw little-endian bytes. When
every tensor's dtype and shape are known up front (they are when converting or merging a
checkpoint), the header can be written first and the tensors produced and written one by one.

A tensor that goes out exactly as it is stored in another safetensors file (a base weight no
adapter touches, in its own dtype) need not pass through Python at all: it is given as a
`ByteRange` and copied file to file by the kernel (``copy_file_range``), adjacent ranges in one
call. Where the kernel cannot (another OS, across file systems), it is copied in chunks through
one reused buffer. Either way the bytes are the source's, unchanged.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .errors import LoraKitError

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors dtype code of a torch dtype.

    Raises:
        LoraKitError: A dtype safetensors (as written here) does not support.
    """
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise LoraKitError(f"cannot write dtype {dtype} to safetensors") from None


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``[start, end)`` of the file ``path``: a tensor to copy as stored."""

    path: Path
    start: int
    end: int


_CHUNK = 16 * 2**20  # bytes per read when the kernel cannot copy
# copy_file_range errors that mean "not here" (old kernel, other file systems, special files).
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM}


def write_streaming(
    path: Path,
    specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], Tensor],
    metadata: Mapping[str, str],
    copies: Mapping[str, ByteRange] | None = None,
) -> None:
    """Write ``path`` holding the tensors ``specs`` (name, dtype, shape), produced on demand.

    Args:
        path: The file to write (created or truncated).
        specs: Every tensor, in file order.
        produce: Called once per name not in ``copies``, in order; must return a CPU tensor of
            that dtype/shape.
        metadata: String metadata for the header (e.g. ``{"format": "pt"}``).
        copies: Name -> bytes of another file that are that tensor as stored (its dtype and
            shape are still ``specs``'); copied without being read into Python.

    Raises:
        LoraKitError: ``produce`` returned a tensor of another dtype or shape, a copy range has
            the wrong size, or a source file is shorter than its range.
    """
    copies = copies or {}
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        source = copies.get(name)
        if source is not None and source.end - source.start != size:
            raise LoraKitError(
                f"internal error writing {name!r}: {source.end - source.start} bytes to copy "
                f"from {source.path}, expected {size} for {dtype}{list(shape)}"
            )
        header[name] = {
            "dtype": dtype_code(dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    with path.open("wb", buffering=0) as handle, _Copier(handle.fileno()) as copier:
        _write_all(handle.fileno(), len(raw).to_bytes(8, "little") + raw)
        for name, dtype, shape in specs:
            if name in copies:
                copier.add(copies[name])  # joined to the previous range when adjacent
                continue
            copier.flush()
            tensor = produce(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise LoraKitError(
                    f"internal error writing {name!r}: got {tensor.dtype}{list(tensor.shape)}, "
                    f"expected {dtype}{list(shape)}"
                )
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                _write_all(handle.fileno(), flat.view(torch.uint8).numpy().data)  # no copy
        copier.flush()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view.nbytes:
        view = view[os.write(fd, view) :]  # a large write may be partial


class _Copier:
    """Copies byte ranges of source files to ``fd``'s position, adjacent ranges at once."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.pending: ByteRange | None = None
        self.sources: dict[Path, io.FileIO] = {}
        self.kernel = hasattr(os, "copy_file_range")
        self.buffer: memoryview | None = None

    def __enter__(self) -> _Copier:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.sources.values():
            handle.close()

    def add(self, source: ByteRange) -> None:
        pending = self.pending
        if pending is not None and pending.path == source.path and pending.end == source.start:
            self.pending = ByteRange(source.path, pending.start, source.end)
            return
        self.flush()
        self.pending = source

    def flush(self) -> None:
        if self.pending is None:
            return
        source, self.pending = self.pending, None
        if source.path not in self.sources:
            self.sources[source.path] = io.FileIO(source.path, "r")
        src, start, left = self.sources[source.path], source.start, source.end - source.start
        while left:
            done = self._kernel_copy(src, start, left) if self.kernel else 0
            if not done:
                done = self._buffered_copy(src, start, left)
            if not done:
                raise LoraKitError(f"{source.path}: file ends before byte {source.end}")
            start, left = start + done, left - done

    def _kernel_copy(self, src: io.FileIO, start: int, count: int) -> int:
        try:
            return os.copy_file_range(src.fileno(), self.fd, count, start)
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
            self.kernel = False  # not possible here: copy through a buffer from now on
            return 0

    def _buffered_copy(self, src: io.FileIO, start: int, count: int) -> int:
        if self.buffer is None:
            self.buffer = memoryview(bytearray(_CHUNK))
        src.seek(start)
        got = src.readinto(self.buffer[: min(count, _CHUNK)]) or 0
        _write_all(self.fd, self.buffer[:got])
        return got
