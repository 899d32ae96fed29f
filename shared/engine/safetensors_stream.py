"""Writing a safetensors file one tensor at a time, so a conversion never holds the whole model.

The format: 8 bytes (little-endian header length), a JSON header mapping each name to
dtype, shape and [begin, end) byte offsets into the data, then the data. Shapes and dtypes
are known up front (from the model's parameter shapes), so the header is written first and
each tensor's bytes follow as it is produced.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import BinaryIO

import torch

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def header_bytes(shapes: Mapping[str, torch.Size], dtype: torch.dtype, metadata: Mapping[str, str]) -> bytes:
    """The length-prefixed JSON header for tensors `shapes` (written in sorted-name order) of `dtype`."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in sorted(shapes):
        nbytes = itemsize
        for dim in shapes[name]:
            nbytes *= dim
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    return len(text).to_bytes(8, "little") + text


def write_streaming(
    out: BinaryIO,
    shapes: Mapping[str, torch.Size],
    dtype: torch.dtype,
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str],
) -> None:
    """Writes `tensors` (each name of `shapes` exactly once, any order) as one safetensors file."""
    out.write(header_bytes(shapes, dtype, metadata))
    pending = {name: None for name in sorted(shapes)}
    order = list(pending)
    written = 0
    for name, tensor in tensors:
        if name not in pending or pending[name] is not None:
            raise ValueError(f"unexpected or repeated tensor {name!r}")
        if tuple(tensor.shape) != tuple(shapes[name]):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(shapes[name])}")
        pending[name] = tensor.to(dtype).contiguous()
        while written < len(order) and pending[order[written]] is not None:
            data = pending[order[written]]
            out.write(data.view(-1).view(torch.uint8).numpy().tobytes())
            pending[order[written]] = torch.empty(0)  # written: drop the data, keep the mark
            written += 1
    if written != len(order):
        raise ValueError(f"missing tensors: {[n for n in order if pending[n] is None][:5]}")
