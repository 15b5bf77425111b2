"""Decode attention (gazelle.kernels.decode_attention): the reference against an independent float64 formulation,
the Triton kernels against the reference (Triton's interpreter on the CPU, realistic shapes on the GPU), and the
custom op inside torch.compile and a CUDA graph.

Every kernel test writes garbage (NaN) into the slots a row cannot see, so reading one would show.
Tolerances (atol, rtol): the reference against float64 (1e-5, 1e-5); float32 kernels against the reference
(1e-5, 1e-5: only the order of float32 sums differs); bf16 kernels against the reference run in float32 on the
same bf16 values (2e-2, 2e-2: the probabilities and the output are rounded to bf16, 2^-9 relative each).
"""

from __future__ import annotations

import pytest
import torch

from gazelle.kernels import decode_attention as da
from gazelle.kernels import dispatch
from gazelle.kernels.decode_attention import decode_attention, decode_attention_ref
from tests.kernels.check import TOLERANCE, needs_gpu, needs_interpreter


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the Triton launches of the op, so a test cannot pass on the reference alone."""
    calls = []
    launch = da._decode_attention_triton

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return launch(*args, **kwargs)

    monkeypatch.setattr(da, "_decode_attention_triton", spy)
    return calls


def _inputs(B, H, KV, S, D, dtype=torch.float32, device="cpu", seed=0):
    """q as the decoder's view (B, 1, H, D) -> (B, H, 1, D); k, v rows 1..B of a (B + 2, KV, S, D) cache;
    positions (B,) random, with the first row at slot 0 and the last at S - 1."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 1, H, D, generator=gen).to(device, dtype).transpose(1, 2)
    cache_k = torch.randn(B + 2, KV, S, D, generator=gen).to(device, dtype)
    cache_v = torch.randn(B + 2, KV, S, D, generator=gen).to(device, dtype)
    positions = torch.randint(0, S, (B,), generator=gen)
    positions[0], positions[-1] = 0, S - 1
    return q, cache_k[1:1 + B], cache_v[1:1 + B], positions.to(device)


def _spoil_invisible(k, v, positions, window, value) -> None:
    """Writes `value` into every slot of k and v (views of the cache) that its row cannot see, in place."""
    slot = torch.arange(k.shape[2], device=k.device)[None, :]
    hidden = slot > positions[:, None]  # (B, S)
    if window is not None:
        hidden |= slot <= positions[:, None] - window
    k.masked_fill_(hidden[:, None, :, None], value)
    v.masked_fill_(hidden[:, None, :, None], value)


def _oracle(q, k, v, positions, scale, softcap=None, window=None):
    """float64, every query head with its own copy of its kv head, a boolean mask, masked_fill and softmax."""
    G = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(G, dim=1)  # (B, H, S, D)
    v64 = v.double().repeat_interleave(G, dim=1)
    slot = torch.arange(k.shape[2])[None, :]
    mask = slot <= positions[:, None]  # (B, S)
    if window is not None:
        mask &= slot > positions[:, None] - window
    scores = torch.einsum("bhd,bhsd->bhs", q[:, :, 0].double(), k64) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    return torch.einsum("bhs,bhsd->bhd", scores.softmax(-1), v64)[:, :, None]  # (B, H, 1, D)


# ---- the reference ----

REF_CASES = [  # (H, KV, D, softcap, window)
    (4, 4, 64, None, None),   # G = 1
    (6, 2, 96, None, None),   # G = 3
    (8, 2, 80, None, 5),      # G = 4, a window shorter than most positions
    (8, 2, 64, 2.0, None),    # soft-capped scores (a small cap, so it binds)
    (6, 2, 64, 3.0, 9),
]


@pytest.mark.parametrize("H, KV, D, softcap, window", REF_CASES)
def test_reference_matches_float64(H, KV, D, softcap, window):
    q, k, v, positions = _inputs(5, H, KV, 37, D)
    scale = D**-0.5 * 2  # scores of a few units: a peaked softmax
    ref = decode_attention_ref(q, k, v, positions, scale, softcap, window)
    assert ref.shape == (5, H, 1, D) and ref.dtype == torch.float32
    torch.testing.assert_close(ref, _oracle(q, k, v, positions, scale, softcap, window).float(),
                               atol=1e-5, rtol=1e-5)
    for garbage in (float("nan"), 1e4):
        k_bad, v_bad = k.clone(), v.clone()
        _spoil_invisible(k_bad, v_bad, positions, window, garbage)
        assert torch.equal(decode_attention_ref(q, k_bad, v_bad, positions, scale, softcap, window), ref)


def test_reference_keeps_dtype():
    q, k, v, positions = _inputs(2, 4, 2, 9, 16, dtype=torch.bfloat16)
    out = decode_attention_ref(q, k, v, positions, 0.25)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 1, 16)


# ---- the kernels under Triton's interpreter ----

KERNEL_CASES = [  # (D, softcap, window): B=3, H=6, KV=2 (G=3), S=37 in blocks of 16
    (64, None, None),
    (96, None, 9),     # D padded to 128; the window starts inside a block
    (64, 3.0, None),
    (96, 3.0, 20),
]


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("D, softcap, window", KERNEL_CASES)
def test_kernel_matches_reference_cpu(triton_mode, dtype, splits, D, softcap, window):
    """Several key blocks per row, and with 4 splits some empty ones (the row at slot 0 has one block)."""
    q, k, v, positions = _inputs(3, 6, 2, 37, D, dtype=dtype)
    scale = D**-0.5
    ref = decode_attention_ref(q.float(), k.float(), v.float(), positions, scale, softcap, window)
    _spoil_invisible(k, v, positions, window, float("nan"))
    out = da._decode_attention_triton(q, k, v, positions, scale, softcap, window, splits=splits, block_s=16)
    assert out.dtype == dtype and out.shape == (3, 6, 1, D)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


@needs_interpreter
def test_op_runs_kernel_cpu(triton_mode, kernel_calls, monkeypatch):
    """The public op with its own block size and split rule: one split, then three (a larger program target)."""
    q, k, v, positions = _inputs(3, 12, 2, 800, 64)  # G = 6; 800 slots = 13 blocks of 64: 3 splits at most
    _spoil_invisible(k, v, positions, None, float("nan"))
    ref = decode_attention_ref(q, k, v, positions, 0.125, 20.0)
    for programs, splits in ((8, 1), (64, 3)):
        monkeypatch.setattr(da, "INTERPRETER_PROGRAMS", programs)
        assert da.num_splits(3, 2, 800, 64, q.device) == splits
        out = decode_attention(q, k, v, positions, 0.125, softcap=20.0)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert len(kernel_calls) == 2


def test_ref_mode_runs_reference(monkeypatch, kernel_calls):
    monkeypatch.setenv("GAZELLE_KERNELS", "ref")
    q, k, v, positions = _inputs(3, 6, 2, 37, 64)
    assert torch.equal(decode_attention(q, k, v, positions, 0.125, window=7),
                       decode_attention_ref(q, k, v, positions, 0.125, window=7))
    assert not kernel_calls


@needs_interpreter
def test_fallbacks(triton_mode, kernel_calls):
    """float64 and head dims over MAX_HEAD_DIM run the reference (logged once), not the kernel."""
    for dtype, D in ((torch.float64, 64), (torch.float32, 2 * da.MAX_HEAD_DIM)):
        q, k, v, positions = _inputs(2, 4, 2, 9, D, dtype=dtype)
        assert torch.equal(decode_attention(q, k, v, positions, 0.1), decode_attention_ref(q, k, v, positions, 0.1))
    assert not kernel_calls


def test_split_rule(monkeypatch):
    """B * KV * SPLITS up to 2 programs per SM (132 SMs: an H100), at least 1, each split 4 key blocks at least."""
    monkeypatch.setattr(da, "sm_count", lambda device: 132)
    gpu = torch.device("cuda", 0)
    assert da.num_splits(64, 2, 384, 64, gpu) == 1  # 6 key blocks: too few to split
    assert da.num_splits(32, 8, 384, 64, gpu) == 1
    assert da.num_splits(4, 4, 4096, 32, gpu) == 16
    assert da.num_splits(1, 8, 8192, 64, gpu) == 32  # capped by 128 blocks / 4
    assert da.num_splits(1, 8, 2048, 64, gpu) == 8  # 32 blocks / 4
    assert da.num_splits(1, 1, 100, 64, gpu) == 1
    assert da.num_splits(512, 8, 384, 64, gpu) == 1


def test_bad_shapes_and_no_gradient():
    q, k, v, positions = _inputs(2, 6, 2, 9, 16)
    with pytest.raises(ValueError, match="multiple of KV"):
        decode_attention(q, k[:, :1].expand(-1, 4, -1, -1), v[:, :1].expand(-1, 4, -1, -1), positions, 0.25)
    with pytest.raises(ValueError, match="positions"):
        decode_attention(q, k, v, positions[:1], 0.25)
    out = decode_attention(q.detach().requires_grad_(), k, v, positions, 0.25)
    with pytest.raises(RuntimeError, match="no autograd formula"):  # inference only
        out.sum().backward()


def test_compiled_op_cpu(monkeypatch, kernel_calls):
    """The custom op inside torch.compile(fullgraph=True) (inductor: ~8 s on 2 CPU cores, first compile): the
    reference at run time by default, the kernel under GAZELLE_KERNELS=triton with the same compiled graph."""
    q, k, v, positions = _inputs(3, 6, 2, 37, 64)

    @torch.compile(fullgraph=True)
    def step(q, k, v, positions):
        return decode_attention(q, k, v, positions, 0.125, softcap=5.0, window=11) * 2.0

    ref = decode_attention_ref(q, k, v, positions, 0.125, 5.0, 11) * 2.0
    monkeypatch.setenv("GAZELLE_KERNELS", "auto")
    assert torch.equal(step(q, k, v, positions), ref)
    assert not kernel_calls
    if dispatch.interpreting():
        monkeypatch.setenv("GAZELLE_KERNELS", "triton")
        torch.testing.assert_close(step(q, k, v, positions), ref, atol=1e-5, rtol=1e-5)
        assert len(kernel_calls) == 1


# ---- GPU: realistic shapes, compiled kernels ----

GPU_CASES = [  # (B, H, KV, S, D, softcap, window)
    (64, 12, 2, 384, 128, None, None),      # qwen-1.5B-like decode batch: one split on an H100
    (32, 32, 8, 384, 128, None, None),      # llama-8B-like: one split
    (4, 8, 4, 4096, 256, 50.0, 4096),       # gemma2-like: head dim 256, soft-capped, its 4096 window, 16 splits
    (4, 8, 4, 4096, 256, 50.0, 1000),       # the window cutting in
    (1, 32, 8, 8192, 128, None, None),      # one long row: many splits
]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B, H, KV, S, D, softcap, window", GPU_CASES)
def test_matches_reference_gpu(monkeypatch, kernel_calls, dtype, B, H, KV, S, D, softcap, window):
    """bf16 (2e-2, 2e-2) and float32 (1e-5, 1e-5) against the float32 reference, NaN in every invisible slot."""
    monkeypatch.setenv("GAZELLE_KERNELS", "auto")
    q, k, v, positions = _inputs(B, H, KV, S, D, dtype=dtype, device="cuda")
    scale = D**-0.5
    ref = decode_attention_ref(q.float(), k.float(), v.float(), positions, scale, softcap, window)
    _spoil_invisible(k, v, positions, window, float("nan"))
    out = decode_attention(q, k, v, positions, scale, softcap=softcap, window=window)
    assert len(kernel_calls) == 1
    assert out.dtype == dtype and out.shape == (B, H, 1, D)
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)


@needs_gpu
@pytest.mark.parametrize("B, S", [(128, 384), (2, 2048)])  # H100: one split; 8 splits, the combine kernel
def test_compiled_cuda_graph_gpu(monkeypatch, kernel_calls, B, S):
    """The op in a torch.compile'd step captured in a CUDA graph; new positions, queries and garbage written in
    place, then a replay: the graph reads positions from memory, so it follows them without a new capture."""
    monkeypatch.setenv("GAZELLE_KERNELS", "auto")
    H, KV, D = 12, 2, 128
    q, k, v, positions = _inputs(B, H, KV, S, D, dtype=torch.bfloat16, device="cuda")
    scale = D**-0.5

    @torch.compile(fullgraph=True)
    def step(q, k, v, positions):
        return decode_attention(q, k, v, positions, scale, softcap=30.0, window=S // 2) * 2.0

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and JIT the kernels before the capture
        for _ in range(2):
            step(q, k, v, positions)
    torch.cuda.current_stream().wait_stream(side)
    assert kernel_calls  # the warm-up ran the kernel
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(q, k, v, positions)
    calls = len(kernel_calls)

    gen = torch.Generator().manual_seed(1)
    for new_positions in (torch.randint(0, S, (B,), generator=gen), torch.arange(B) % 3, torch.full((B,), S - 1)):
        positions.copy_(new_positions)
        q.copy_(torch.randn(q.shape, generator=gen).to(q))
        ref = decode_attention_ref(q.float(), k.float(), v.float(), positions, scale, 30.0, S // 2) * 2.0
        k_clean, v_clean = k.clone(), v.clone()
        _spoil_invisible(k, v, positions, S // 2, float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), ref, atol=4e-2, rtol=2e-2)  # out is twice the attention
        k.copy_(k_clean)
        v.copy_(v_clean)
    assert len(kernel_calls) == calls  # replays launch from the graph, not from Python
