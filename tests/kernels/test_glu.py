"""glu (act(gate) * up) in Triton against the decoder's torch math: forward, both input gradients, launchers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gazelle.kernels import glu as glu_mod
from gazelle.kernels.glu import (
    ACTS,
    glu,
    glu_backward,
    glu_backward_ref,
    glu_forward,
    glu_ref,
)
from tests.kernels.check import TOLERANCE, assert_matches, needs_gpu, needs_interpreter


def _inputs(shape, dtype=torch.float32, device="cpu", seed=0):
    """gate spread wide (saturated, tiny and exact-zero values included: both tanh branches), up ~ N(0, 1)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    gate = torch.randn(shape, generator=gen) * 4
    flat = gate.view(-1)
    flat[:8] = torch.tensor([0.0, 1e-4, -1e-3, 0.05, -0.124, 0.126, 30.0, -30.0])[: flat.numel()]
    up = torch.randn(shape, generator=gen)
    return (gate.to(device, dtype).requires_grad_(), up.to(device, dtype).requires_grad_())


TORCH_ACTS = {  # the decoder's activations by name, as it computed them before kernels (torch, input dtype)
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


def test_act_names_are_the_decoders():
    assert set(ACTS) == set(TORCH_ACTS)
    gate, up = _inputs((4, 9))
    for act, fn in TORCH_ACTS.items():
        torch.testing.assert_close(glu_ref(gate, up, act), fn(gate) * up, atol=0, rtol=0)


@pytest.mark.parametrize("act", list(ACTS))
def test_backward_ref_is_the_autograd_gradient(act):
    gate, up = (x.double().detach().requires_grad_() for x in _inputs((5, 67), seed=1))
    grad_h = torch.randn(5, 67, dtype=torch.float64)
    glu_ref(gate, up, act).backward(grad_h)
    grad_gate, grad_up = glu_backward_ref(grad_h, gate.detach(), up.detach(), act)
    torch.testing.assert_close(grad_gate, gate.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad_up, up.grad, atol=1e-12, rtol=1e-12)


@needs_interpreter
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("shape", [(3, 7, 131), (1, 1000), (13,)])
def test_glu_matches_reference(triton_mode, act, shape):
    gate, up = _inputs(shape)
    assert_matches(glu, glu_ref, [gate, up, act])


@needs_interpreter
@pytest.mark.parametrize("act", list(ACTS))
def test_glu_on_halves_of_a_fused_projection(triton_mode, act):
    """gate and up as strided views of one (B, T, 2I) gate_up output: no copy needed, gradient flows into it."""
    gen = torch.Generator().manual_seed(2)
    gate_up = (torch.randn(2, 5, 2 * 77, generator=gen) * 3).requires_grad_()

    def run(fn):
        return lambda gu: fn(*gu.chunk(2, dim=-1), act)

    assert_matches(run(glu), run(glu_ref), [gate_up])


@needs_interpreter
@pytest.mark.parametrize("act", list(ACTS))
def test_launchers_without_autograd(triton_mode, act):
    gate, up = (x.detach() for x in _inputs((6, 45), seed=3))
    grad_h = torch.randn(6, 45)
    h = glu_forward(gate, up, act)
    grad_gate, grad_up = glu_backward(grad_h, gate, up, act)
    assert h.grad_fn is None and grad_gate.grad_fn is None
    atol, rtol = TOLERANCE[torch.float32]
    torch.testing.assert_close(h, glu_ref(gate, up, act), atol=atol, rtol=rtol)
    ref_gate, ref_up = glu_backward_ref(grad_h, gate, up, act)
    torch.testing.assert_close(grad_gate, ref_gate, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_up, ref_up, atol=atol, rtol=rtol)
    # a transposed (non-row-major) grad is copied, not misread
    grad_t = grad_h.t().contiguous().t()
    torch.testing.assert_close(glu_backward(grad_t, gate, up, act)[0], ref_gate, atol=atol, rtol=rtol)


@needs_interpreter
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("fused", [False, True])
def test_backward_in_place(triton_mode, act, fused):
    """inplace=True writes grad_gate over gate and grad_up over up (the strided halves of one gate_up output when
    fused) with the values of the out-of-place launcher's reference."""
    gen = torch.Generator().manual_seed(4)
    if fused:
        gate, up = (torch.randn(7, 2 * 45, generator=gen) * 3).chunk(2, dim=-1)
    else:
        gate, up = (torch.randn(7, 45, generator=gen) * 3 for _ in range(2))
    grad_h = torch.randn(7, 45, generator=gen)
    ref_gate, ref_up = glu_backward_ref(grad_h, gate.clone(), up.clone(), act)
    grad_gate, grad_up = glu_backward(grad_h, gate, up, act, inplace=True)
    assert grad_gate.data_ptr() == gate.data_ptr() and grad_up.data_ptr() == up.data_ptr()
    atol, rtol = TOLERANCE[torch.float32]
    torch.testing.assert_close(gate, ref_gate, atol=atol, rtol=rtol)
    torch.testing.assert_close(up, ref_up, atol=atol, rtol=rtol)


def test_ref_mode_and_fallbacks(monkeypatch):
    gate, up = _inputs((3, 11))
    monkeypatch.setenv("GAZELLE_KERNELS", "ref")
    out = glu(gate, up, "silu")
    assert "GluFunction" not in type(out.grad_fn).__name__
    torch.testing.assert_close(out, glu_ref(gate, up, "silu"), atol=0, rtol=0)
    h = glu_forward(gate, up, "gelu")  # the launchers fall back to torch math, still without autograd
    assert h.grad_fn is None
    torch.testing.assert_close(h, glu_ref(gate, up, "gelu").detach(), atol=0, rtol=0)
    grad_h = torch.ones(3, 11)
    for a, b in zip(glu_backward(grad_h, gate, up, "gelu"), glu_backward_ref(grad_h, gate, up, "gelu")):
        torch.testing.assert_close(a, b.detach(), atol=0, rtol=0)
    with pytest.raises(ValueError, match="unknown activation"):
        glu(gate, up, "relu")


@needs_interpreter
def test_triton_mode_uses_the_kernel_and_float64_falls_back(triton_mode):
    gate, up = _inputs((3, 11))
    assert "GluFunction" in type(glu(gate, up, "silu").grad_fn).__name__
    g64, u64 = gate.double(), up.double()  # no float64 kernel: the reference, logged
    assert "GluFunction" not in type(glu(g64, u64, "silu").grad_fn).__name__
    assert glu_mod.KERNEL_DTYPES == (torch.float32, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------------------ GPU


@needs_gpu
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(8, 1024, 8960), (2, 2048, 14336)])
def test_glu_gpu(triton_mode, act, dtype, shape):
    """Real MLP sizes (Qwen2.5-1.5B, Llama-3-8B intermediate); bf16 against the float32 reference of the same
    inputs, within TOLERANCE (2e-2 abs + rel for bf16, 1e-5 for float32)."""
    gate, up = _inputs(shape, dtype=dtype, device="cuda")
    assert_matches(glu, glu_ref, [gate, up, act])
