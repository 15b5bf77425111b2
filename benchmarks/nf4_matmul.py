"""NF4 matmul on the GPU (not a test): python benchmarks/nf4_matmul.py [--sweep] [--shapes qkv_1.5b,...] [--m 1,32,64]

For the projection shapes of qwen2.5-1.5B and llama-3-8B, at decode sizes M in {1, 32, 64}, times
- bf16: F.linear with the dense bf16 weight (what 4-bit has to beat: it reads 3.6x the bytes);
- deq+mm: the Triton dequantize kernel into a bf16 temporary, then F.linear (nf4_linear's path for M > 64);
- fused: gazelle.kernels.nf4.nf4_linear, the fused kernel (M <= 64),
after checking the Triton paths against the reference on this GPU. Times are GPU microseconds per call from
CUDA-graph replays (no Python launch cost, as in a graph-captured decode step); each graph calls the op on
several copies of the weight in turn, more bytes in all than twice the L2 cache (50 MB on an H100), so every
call reads its weight from HBM as a real decode step does. GB/s: the bytes of the weight that method reads
(NF4: packed codes + block statistics; bf16: 2 bytes an element) over its time.
--sweep times the fused kernel's configurations (tiles, warps, stages) per shape and M instead; --sweep --splits
the default tiles at each K split.
--grouped times the decode step's groups instead (q/k/v; gate/up with the activation): dense bf16 in one launch
(gazelle.kernels.multi_linear), NF4 one launch a weight (nf4_linear, then the glu kernel), NF4 in one launch
(nf4_multi_linear, nf4_glu_linear); with --sweep, the grouped launch's tiles and K splits.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import torch
import torch.nn.functional as F

from benchmarks.graph_timing import graph_time, rotations
from gazelle.kernels import nf4 as K
from gazelle.kernels.glu import glu
from gazelle.kernels.multi_linear import glu_linear, multi_linear
from gazelle.quant.nf4 import dequantize_nf4, quantize_nf4

SHAPES = {  # name: (N, K) of W
    "q/o 1.5b": (1536, 1536),
    "kv 1.5b": (256, 1536),
    "gate|up 1.5b": (8960, 1536),
    "down 1.5b": (1536, 8960),
    "q/o 8b": (4096, 4096),
    "gate|up 8b": (14336, 4096),
    "down 8b": (4096, 14336),
}
MS = (1, 32, 64)
GROUPS = {  # name: (rows of each weight, K, glu)
    "qkv 1.5b": ((1536, 256, 256), 1536, False),
    "gate/up 1.5b": ((8960, 8960), 1536, True),
    "qkv 8b": ((4096, 1024, 1024), 4096, False),
    "gate/up 8b": ((14336, 14336), 4096, True),
}


def nf4_nbytes(q) -> int:
    stats = [q.absmax, q.nested_absmax, q.nested_quant_map]
    return q.packed.numel() + sum(t.numel() * t.element_size() for t in stats if t is not None)


def copies(t, nbytes: int) -> list:
    """Enough copies of a tensor or NF4Tensor (fresh storage each) to cover ROTATE_BYTES."""
    n = rotations(nbytes)
    if isinstance(t, torch.Tensor):
        return [t.clone() for _ in range(n)]
    return [dataclasses.replace(t, packed=t.packed.clone(), absmax=t.absmax.clone(),
                                nested_absmax=None if t.nested_absmax is None else t.nested_absmax.clone())
            for _ in range(n)]


def check(q, w) -> None:
    """Triton against the reference on this GPU; raises on a mismatch."""
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(K.dequantize_nf4(q, dtype), dequantize_nf4(q, dtype)), f"dequantize {dtype}"
    for m in (1, 5, 64, 65):
        x = torch.randn(m, q.shape[1], device="cuda", dtype=torch.bfloat16)
        y = K.nf4_linear(x, q)
        ref = x.float() @ w.float().T
        err = ((y.float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, f"nf4_linear M={m}: relative error {err:.2e}"


def sweep(q0, m: int, splits: bool = False) -> None:
    """Time the fused kernel over configurations for one shape and M; print the best few beside the default.

    splits: the default tiles with every K split instead."""
    N, Kd = q0.shape
    qs = copies(q0, nf4_nbytes(q0))
    x = torch.randn(m, Kd, device="cuda", dtype=torch.bfloat16)
    wpb = q0.blocksize // 8
    default = K.fused_config(m, N, Kd, q0.blocksize, x.device)
    if splits:
        grid = [(default["BM"], default["BN"], default["BN"] * default["NC"] * default["CW"], 4, 1, split)
                for split in (1, 2, 3, 4, 6, 8, 12, 16)]
    elif m == 1:
        grid = itertools.product((1,), (8, 16, 32), (512, 1024, 2048), (4, 8), (1, 2), (None,))
    else:
        bm = max(16, 1 << (m - 1).bit_length())
        grid = itertools.product((bm,), (32, 64, 128), (256, 512, 1024), (4, 8), (1, 2), (None,))
    rows = []
    for bm, bn, words, warps, stages, split in grid:
        cw = min(8, wpb)
        nc = words // (bn * cw)
        if nc < 1 or nc * cw > Kd // 8:
            continue
        cfg = {"BM": bm, "BN": bn, "NC": nc, "CW": cw, "num_warps": warps, "num_stages": stages}
        if split is not None:
            cfg["split"] = split
        try:
            t = graph_time(lambda q, cfg=cfg: K.nf4_linear_fused(x, q, None, cfg), qs)
        except Exception as e:  # noqa: BLE001 (a configuration the compiler rejects: skip it)
            print(f"    {cfg}: {type(e).__name__}: {str(e)[:80]}")
            continue
        rows.append((t, cfg))
    rows.sort(key=lambda r: r[0])
    t_default = graph_time(lambda q: K.nf4_linear_fused(x, q), qs)
    print(f"  N={N} K={Kd} M={m}: default {default} {t_default:.1f} us "
          f"({nf4_nbytes(q0) / t_default / 1e3:.0f} GB/s); best:")
    for t, cfg in rows[:5]:
        print(f"    {t:7.1f} us {nf4_nbytes(q0) / t / 1e3:5.0f} GB/s  {cfg}")


def grouped(names: list[str], ms: list[int], sweep_configs: bool) -> None:
    """The decode step's groups: dense bf16 grouped, NF4 one launch a weight, NF4 grouped (or a sweep of the last)."""
    head = (f"{'group':13} {'M':>3} | {'bf16 1 launch':>13} {'nf4 per weight':>14} {'nf4 1 launch':>12} | "
            f"{'nf4 1/bf16':>10} {'nf4 1/per':>9}")
    if not sweep_configs:
        print(head + "\n" + "-" * len(head))
    for (name, (ns, k, is_glu)), m in itertools.product(names, ms):
        dense = [(torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16) for n in ns]
        quant = [quantize_nf4(w, 64, double_quant=True) for w in dense]
        nbytes = sum(nf4_nbytes(q) for q in quant)
        groups = list(zip(*[copies(q, nbytes) for q in quant]))  # copies of the whole group, past L2
        dense_groups = list(zip(*[copies(w, sum(w.nbytes for w in dense)) for w in dense]))
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        if is_glu:
            one = lambda qs, cfg=None: K.nf4_grouped_fused(x, qs, [None, None], "silu", cfg)  # noqa: E731
            ref = glu(x.float() @ dequantize_nf4(quant[0], torch.float32).T,
                      x.float() @ dequantize_nf4(quant[1], torch.float32).T, "silu")
        else:
            one = lambda qs, cfg=None: K.nf4_grouped_fused(x, qs, [None] * len(qs), None, cfg)  # noqa: E731
            ref = torch.cat([x.float() @ dequantize_nf4(q, torch.float32).T for q in quant], -1)
        err = ((one(quant).float() - ref).norm() / ref.norm()).item()
        assert err < 1e-2, f"{name} M={m}: relative error {err:.2e}"
        if sweep_configs:
            default = K.fused_config(m, list(ns), k, 64, x.device, is_glu)
            bm = default["BM"]
            rows = []
            tiles = [(bn, 1024) for bn in ((8, 16, 32) if m == 1 else (32, 64, 128))]
            tiles += [(default["BN"], 512), (default["BN"], 2048)]
            for (bn, words), split in itertools.product(tiles, (1, 2, 4, 8)):
                nc = words // (bn * 8)
                if nc < 1 or nc * 8 * split > k // 8:
                    continue
                cfg = {"BM": bm, "BN": bn, "NC": nc, "CW": 8, "split": split}
                try:
                    rows.append((graph_time(lambda qs, cfg=cfg: one(qs, cfg), groups), cfg))
                except Exception as e:  # noqa: BLE001 (a configuration the compiler rejects: skip it)
                    print(f"    {cfg}: {type(e).__name__}: {str(e)[:80]}")
            rows.sort(key=lambda r: r[0])
            print(f"  {name} M={m}: default {default} {graph_time(one, groups):.1f} us; best:")
            for t, cfg in rows[:4]:
                print(f"    {t:7.1f} us {nbytes / t / 1e3:5.0f} GB/s  {cfg}")
            continue
        if is_glu:
            t_dense = graph_time(lambda ws: glu_linear(x, ws[0], ws[1], "silu"), dense_groups)
            t_each = graph_time(lambda qs: glu(K.nf4_linear(x, qs[0]), K.nf4_linear(x, qs[1]), "silu"), groups)
            t_one = graph_time(lambda qs: K.nf4_glu_linear(x, qs[0], qs[1], "silu"), groups)
        else:
            t_dense = graph_time(lambda ws: multi_linear(x, ws), dense_groups)
            t_each = graph_time(lambda qs: [K.nf4_linear(x, q) for q in qs], groups)
            t_one = graph_time(lambda qs: K.nf4_multi_linear(x, qs), groups)
        print(f"{name:13} {m:3} | {t_dense:13.1f} {t_each:14.1f} {t_one:12.1f} | {t_one / t_dense:10.2f} "
              f"{t_one / t_each:9.2f}")
    if not sweep_configs:
        print("GPU microseconds per group (CUDA-graph replays, weights rotated past L2); checks: NF4 grouped within "
              "1e-2 of float32 products")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", action="store_true", help="time the fused kernel's configurations per shape")
    parser.add_argument("--splits", action="store_true", help="with --sweep: the default tiles at every K split")
    parser.add_argument("--grouped", action="store_true", help="the decode step's groups (q/k/v, gate/up) instead")
    parser.add_argument("--groups", default="", help="with --grouped: comma-separated names of GROUPS (all)")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of SHAPES")
    parser.add_argument("--m", default=",".join(map(str, MS)), help="comma-separated rows of x")
    args = parser.parse_args()
    names, ms = args.shapes.split(","), [int(m) for m in args.m.split(",")]
    torch.manual_seed(0)
    import triton

    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    if args.grouped:
        grouped([(n, GROUPS[n]) for n in (args.groups.split(",") if args.groups else GROUPS)], ms, args.sweep)
        return
    weights = {}
    for name in names:
        n, k = SHAPES[name]
        w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
        q = quantize_nf4(w, 64, double_quant=True)
        check(q, dequantize_nf4(q, torch.bfloat16))
        weights[name] = q, dequantize_nf4(q, torch.bfloat16)
    print("checks passed: dequantize bitwise the reference (bf16, fp32); nf4_linear within 1e-2 (bf16)")
    if args.sweep:
        for name, m in itertools.product(names, ms):
            sweep(weights[name][0], m, args.splits)
        return
    head = (f"{'shape':13} {'N':>6} {'K':>6} {'M':>3} | {'bf16 us':>8} {'deq+mm us':>9} {'fused us':>8} | "
            f"{'bf16 GB/s':>9} {'deq+mm GB/s':>11} {'fused GB/s':>10} | {'fused/bf16':>10}")
    print(head + "\n" + "-" * len(head))
    for name, m in itertools.product(names, ms):
        q0, w0 = weights[name]
        (n, k), nf4_b = q0.shape, nf4_nbytes(q0)
        qs, ws = copies(q0, nf4_b), copies(w0, w0.nbytes)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

        def deq_mm(q):
            return F.linear(x, K.dequantize_nf4(q, torch.bfloat16))

        t_bf16 = graph_time(lambda w: F.linear(x, w), ws)
        t_deq = graph_time(deq_mm, qs)
        t_fused = graph_time(lambda q: K.nf4_linear(x, q), qs) if m <= K.FUSED_MAX_M else float("nan")
        print(f"{name:13} {n:6} {k:6} {m:3} | {t_bf16:8.1f} {t_deq:9.1f} {t_fused:8.1f} | "
              f"{w0.nbytes / t_bf16 / 1e3:9.0f} {nf4_b / t_deq / 1e3:11.0f} {nf4_b / t_fused / 1e3:10.0f} | "
              f"{t_fused / t_bf16:10.2f}")
    print("GPU microseconds per call (CUDA-graph replays, weights rotated past L2). GB/s: the weight bytes each "
          "method reads (NF4 packed + statistics; bf16 2 bytes an element) over its time.")


if __name__ == "__main__":
    main()
