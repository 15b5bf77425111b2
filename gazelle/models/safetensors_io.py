"""Reading safetensors checkpoints one tensor at a time into their final dtype and device.

Tensors are read with plain file reads into freshly allocated memory rather than through a memory
map, so a loaded checkpoint costs its own size in RAM once, and file pages are not counted twice.
The format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then the raw little-endian data.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Iterator

import torch

from gazelle.errors import GazelleError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER = 100 * 1024 * 1024


def read_header(path: str) -> tuple[dict[str, dict], int]:
    """({name: {dtype, shape, data_offsets}}, offset of the data section), validated against the file size."""
    size = os.path.getsize(path)

    def corrupt(reason: str) -> GazelleError:
        return GazelleError(f"{path} has a corrupt safetensors header ({reason}); re-download or re-save it")

    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise corrupt("file shorter than 8 bytes")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > min(MAX_HEADER, size - 8):
            raise corrupt(f"header length {header_len} exceeds the file")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise corrupt(f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise corrupt("header is not a JSON object")
    header.pop("__metadata__", None)
    data_start, data_size = 8 + header_len, size - 8 - header_len
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            begin, end = info["data_offsets"]
            count = math.prod(info["shape"])
        except (KeyError, TypeError, ValueError):
            raise corrupt(f"entry {name!r} lacks a known dtype, shape or data_offsets") from None
        if not 0 <= begin <= end <= data_size or end - begin != count * dtype.itemsize:
            raise corrupt(f"entry {name!r} points outside the data or has the wrong byte size")
    return header, data_start


def iter_safetensors(path: str, dtype: torch.dtype, device: torch.device | str = "cpu",
                     keep_dtype: Callable[[str], bool] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) in file order; floating tensors converted to `dtype` (unless keep_dtype(name)),
    all moved to `device`."""
    header, data_start = read_header(path)
    device = torch.device(device)
    with open(path, "rb") as f:
        for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            stored = DTYPES[info["dtype"]]
            tensor = torch.empty(info["shape"], dtype=stored)
            f.seek(data_start + info["data_offsets"][0])
            if f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != tensor.nbytes:
                raise GazelleError(f"{path} ends inside tensor {name}: the file is truncated")
            keep = not stored.is_floating_point or (keep_dtype is not None and keep_dtype(name))
            target = stored if keep else dtype
            yield name, tensor.to(device=device, dtype=target)
