"""What the kernel launchers share: the SM count a grid is planned for, and the split-K tile counters."""

from __future__ import annotations

import functools

import torch

INTERPRETER_SMS = 4  # CPU tensors (Triton's interpreter): a small machine, so small tests take split paths too


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def addmm_takes_out_dtype() -> bool:
    """Whether torch's addmm takes out_dtype (torch >= 2.8; CUDA kernels only): 16-bit products accumulated and
    written in float32 by one cuBLAS call."""
    return "dtype_out" in torch.ops.aten.addmm.overloads()


def sm_count(device: torch.device) -> int:
    """SMs of a CUDA device (cached); INTERPRETER_SMS for any other device."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


_COUNTERS: dict = {}  # (device, stream) -> int32 counters of the split-K tiles
_RETIRED: list = []  # counters outgrown by a larger grid: a captured CUDA graph may still point at them


def split_counters(device: torch.device, n: int) -> torch.Tensor:
    """int32 zeros, at least n, for the split-K tile counters, kept zero by the kernel itself (each tile's last
    program resets its counter), so no memset runs per call.

    One buffer per (device, stream): launches on one stream are ordered, launches on two could interleave. The
    first call on a stream makes it (an eager warm-up before a CUDA-graph capture, or else inside the capture,
    where its zeroing replays with the graph). Buffers are never freed: a graph captured with one keeps it."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    buf = _COUNTERS.get((device, stream))
    if buf is None or buf.numel() < n:
        if buf is not None:
            _RETIRED.append(buf)
        buf = _COUNTERS[(device, stream)] = torch.zeros(max(n, 1 << 14), dtype=torch.int32, device=device)
    return buf
