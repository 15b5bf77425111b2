"""Page-locking host tensors where they lie, for copies to and from the GPU that run beside its compute.

torch's pin_memory=True goes through its caching host allocator, which rounds every block up to a power of two: a
3.3 GB layer input (400k tokens, hidden 4096) would take 4 GiB, and 32 of them more than the host has. cudaHostRegister
locks exactly the tensor's bytes. Callers turn a failure (a non-zero status) into an error that says what to change.
"""

from __future__ import annotations

import torch


def pin(buf: torch.Tensor) -> int:
    """Page-locks buf's bytes (a contiguous CPU tensor); the cudaError status, 0 on success."""
    return int(torch.cuda.cudart().cudaHostRegister(buf.data_ptr(), buf.nbytes, 0))


def unpin(buf: torch.Tensor) -> None:
    """Undoes pin(buf); buf must not be read by a copy still in flight."""
    torch.cuda.cudart().cudaHostUnregister(buf.data_ptr())
