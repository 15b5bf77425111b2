"""Fused GPU kernels, each beside a plain-torch reference with the same signature.

One op per module. Each public op (e.g. `rms_norm`) asks `dispatch.use_triton` and runs either its Triton
autograd.Function or its reference; GAZELLE_KERNELS=ref|triton forces either (see dispatch).
Triton is imported only by the modules that launch kernels, so importing gazelle needs no triton.
"""
