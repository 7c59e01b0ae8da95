"""Write a safetensors file one tensor at a time, so a whole model never sits in memory.

The safetensors layout is an 8-byte little-endian header length, a JSON header (dtype, shape and
byte range of every tensor, plus string ``__metadata__``), then the raw little-endian bytes. When
every tensor's dtype and shape are known up front (they are when converting or merging a
checkpoint), the header can be written first and the tensors produced and written one by one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
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


def write_streaming(
    path: Path,
    specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    produce: Callable[[str], Tensor],
    metadata: Mapping[str, str],
) -> None:
    """Write ``path`` holding the tensors ``specs`` (name, dtype, shape), produced on demand.

    Args:
        path: The file to write (created or truncated).
        specs: Every tensor, in file order.
        produce: Called once per name, in order; must return a CPU tensor of that dtype/shape.
        metadata: String metadata for the header (e.g. ``{"format": "pt"}``).

    Raises:
        LoraKitError: ``produce`` returned a tensor of another dtype or shape.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name, dtype, shape in specs:
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": dtype_code(dtype),
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    with path.open("wb") as handle:
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        for name, dtype, shape in specs:
            tensor = produce(name)
            if tensor.dtype != dtype or tuple(tensor.shape) != tuple(shape):
                raise LoraKitError(
                    f"internal error writing {name!r}: got {tensor.dtype}{list(tensor.shape)}, "
                    f"expected {dtype}{list(shape)}"
                )
            flat = tensor.detach().to("cpu").contiguous().reshape(-1)
            if flat.numel():
                handle.write(flat.view(torch.uint8).numpy().data)  # no extra copy
