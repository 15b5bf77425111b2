"""Which implementation a kernel op runs: its Triton kernel or its plain-torch reference.

GAZELLE_KERNELS, read on every call so tests and users can switch at run time:
- unset or "auto": Triton for CUDA tensors when triton imports, the reference elsewhere;
- "ref": always the reference;
- "triton": always Triton (except inside torch.compile, which gets the reference to fuse: the decode step); for CPU tensors that is Triton's interpreter, which needs TRITON_INTERPRET=1 set
  before triton is imported (the test suite does this when there is no GPU).

A fallback from Triton to the reference where Triton was asked for or expected (triton missing, a dtype or
shape a kernel does not take, CPU tensors without the interpreter) is logged once per op, so a silently slow
path shows in the log without flooding it.
"""

from __future__ import annotations

import functools
import os

import torch

from gazelle.errors import GazelleError
from gazelle.utils.logging import get_logger

log = get_logger("gazelle.kernels")
MODES = ("auto", "ref", "triton")
_logged: set[str] = set()


def mode() -> str:
    value = os.environ.get("GAZELLE_KERNELS", "auto").strip().lower() or "auto"
    if value not in MODES:
        raise GazelleError(f"GAZELLE_KERNELS={value!r} is not a kernel mode; use one of {', '.join(MODES)}")
    return value


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (decided by TRITON_INTERPRET when triton.jit decorates)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on")


def fallback(op: str, reason: str) -> None:
    """Record that `op` runs its reference instead of Triton; logged the first time per op only."""
    if op not in _logged:
        _logged.add(op)
        log.warning("gazelle kernels: %s runs the torch reference (%s); logged once", op, reason)


def use_triton(op: str, *tensors: torch.Tensor, dtypes: tuple[torch.dtype, ...] | None = None) -> bool:
    """True when `op` over `tensors` should run its Triton kernel.

    dtypes: the floating dtypes the kernel takes (checked on the first tensor); another one falls back, logged.
    """
    if torch.compiler.is_compiling():
        return False  # under torch.compile the reference is what the compiler should fuse
    chosen = mode()
    if chosen == "ref":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if chosen == "auto" and not on_cuda:
        return False  # the reference is the CPU path by design: nothing to log
    if not triton_available():
        fallback(op, "triton does not import")
        return False
    if not on_cuda and not interpreting():
        fallback(op, "CPU tensors need Triton's interpreter: set TRITON_INTERPRET=1 before importing triton")
        return False
    if dtypes is not None and tensors and tensors[0].dtype not in dtypes:
        fallback(op, f"no kernel for {tensors[0].dtype}")
        return False
    return True
