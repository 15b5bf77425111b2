"""triton and triton.language when they import, stand-ins otherwise, so kernel modules import everywhere.

Kernels are decorated with `jit` here at import: whether they compile for the GPU or run in Triton's
interpreter is fixed then, by TRITON_INTERPRET (the CPU test suite sets it before importing gazelle).
Without triton, `jit` returns the plain function, which dispatch never launches.
"""

from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:  # the references still work
    triton = tl = None

    def jit(fn=None, **_):
        return fn if fn is not None else (lambda f: f)
else:
    jit = triton.jit


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
