"""Shared checks for kernel tests: a Triton op against its reference in forward and every gradient.

CPU tests run the kernels in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without a GPU)
on small odd shapes; GPU tests use realistic shapes. 16-bit results are judged against the reference run in
float32 (or float64) on the same inputs, with the tolerances of TOLERANCE unless a test states its own.
"""

from __future__ import annotations

import os

import pytest
import torch

GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA GPU (run on the device machine)")
needs_interpreter = pytest.mark.skipif(
    GPU or os.environ.get("TRITON_INTERPRET") != "1", reason="CPU test of a Triton kernel under its interpreter"
)

TOLERANCE = {  # (atol, rtol) of a Triton result against the float32/float64 reference
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


def forward_backward(fn, inputs: list, grad_seed: int = 0):
    """fn(*inputs) and the gradients of <fn(*inputs), g> wrt every input that requires grad, g fixed random.

    Inputs are cloned, so the same list can be passed to two implementations.
    """
    inputs = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
              for x in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator(device="cpu").manual_seed(grad_seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum()
               for o in outs if o.is_floating_point() and o.requires_grad)
    grads = []
    if isinstance(loss, torch.Tensor):
        leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        grads = list(torch.autograd.grad(loss, leaves, allow_unused=True))
    return [o.detach() for o in outs], grads


def assert_matches(fast, ref, inputs: list, dtype: torch.dtype | None = None, tol=None, ref_dtype=torch.float32):
    """fast(*inputs) equals ref(*inputs) in outputs and input/weight gradients.

    For 16-bit inputs the reference runs on the same values cast to ref_dtype (float32 by default).
    """
    dtype = dtype or next(x.dtype for x in inputs if isinstance(x, torch.Tensor) and x.is_floating_point())
    atol, rtol = tol or TOLERANCE[dtype]
    out_f, grad_f = forward_backward(fast, inputs)
    ref_inputs = inputs
    if dtype in (torch.float16, torch.bfloat16):
        ref_inputs = [x.detach().to(ref_dtype).requires_grad_(x.requires_grad)
                      if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    out_r, grad_r = forward_backward(ref, ref_inputs)
    assert len(out_f) == len(out_r) and len(grad_f) == len(grad_r)
    for i, (a, b) in enumerate(zip(out_f, out_r)):
        torch.testing.assert_close(a.to(b.dtype), b, atol=atol, rtol=rtol, msg=lambda m: f"output {i}: {m}")
    for i, (a, b) in enumerate(zip(grad_f, grad_r)):
        assert (a is None) == (b is None), f"gradient {i}: one side is None"
        if a is not None:
            torch.testing.assert_close(a.to(b.dtype), b, atol=atol, rtol=rtol, msg=lambda m: f"gradient {i}: {m}")
