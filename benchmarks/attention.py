"""Causal grouped-query attention, forward and backward, through each SDPA backend at the SFT rows' shapes. GPU only.

    PYTHONPATH=. python3 benchmarks/attention.py

For each shape (llama-8B 2 x 2048, qwen-1.5B 8 x 1024, bf16) and backend (flash, cuDNN, memory-efficient): the
median time of forward alone and of forward + backward over 20 runs, and the largest difference of the output and
of dq, dk, dv from the flash backend's. A backend that refuses the inputs (grouped heads, causal) is reported so.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = {"llama8b 2x2048": (2, 2048, 32, 8, 128), "qwen1.5b 8x1024": (8, 1024, 12, 2, 128)}
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def timed(fn, runs: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[runs // 2]


def main() -> None:
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name()}")
    print("| shape | backend | fwd ms | fwd+bwd ms | max diff out, dq, dk, dv vs flash |\n|---|---|---|---|---|")
    for name, (b, t, heads, kv_heads, d) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(b, heads, t, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        k = torch.randn(b, kv_heads, t, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        v = torch.randn(b, kv_heads, t, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
        grad = torch.randn(b, heads, t, d, device="cuda", dtype=torch.bfloat16, generator=g)
        reference = None
        for backend, kind in BACKENDS.items():
            def forward():
                with sdpa_kernel([kind]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

            def step():
                out = forward()
                return (out, *torch.autograd.grad(out, (q, k, v), grad))

            try:
                results = step()
            except RuntimeError as err:
                print(f"| {name} | {backend} | refused: {str(err).splitlines()[0][:90]} | | |")
                continue
            if reference is None:
                reference = results
            diffs = ", ".join(f"{(a.float() - r.float()).abs().max().item():.3g}" for a, r in zip(results, reference))
            with torch.no_grad():
                fwd = timed(forward)
            both = timed(step)
            print(f"| {name} | {backend} | {fwd:.3f} | {both:.3f} | {diffs} |", flush=True)


if __name__ == "__main__":
    main()
