"""Decode attention's launch configs on the GPU (not a test):
python benchmarks/decode_attention.py [--shapes llama8b,qwen1.5b] [--positions 192,320] [--budget 200]
python benchmarks/decode_attention.py --dry-run   (CPU: every config of the sweep in Triton's interpreter)

gazelle.kernels.decode_attention at the decode shapes of the sampling benchmark (benchmarks/generate.py: a cache of
128 + 256 slots, every row at the same position), with the default launch (the split rule, BLOCK_S, NUM_WARPS,
NUM_STAGES) and then a sweep of key splits x BLOCK_S x warps x stages until --budget seconds have passed. Each
config is checked against the float32 reference once, then timed as GPU microseconds per call from CUDA-graph
replays over several copies of the cache (more bytes than twice the L2), at each position of --positions; the
table gives the mean over positions and TB/s of the visible keys and values read.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

if __name__ == "__main__" and "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (with gazelle's kernels)

import torch

from benchmarks.graph_timing import graph_time, rotations
from gazelle.kernels import decode_attention as DA

SHAPES = {  # rows, query heads, kv heads, head dim, cache slots
    "llama8b": (32, 32, 8, 128, 384),
    "qwen1.5b": (64, 12, 2, 128, 384),
}
SPLITS = (1, 2, 4, 6)
BLOCKS = (32, 64, 128)
WARPS = (2, 4)
STAGES = (2, 3)


def configs(slots: int) -> list[dict]:
    """The sweep: every split count that leaves each split a key block, for each block size, warps and stages."""
    out = []
    for block_s, splits, warps, stages in itertools.product(BLOCKS, SPLITS, WARPS, STAGES):
        if splits <= -(-slots // block_s):
            out.append({"block_s": block_s, "splits": splits, "num_warps": warps, "num_stages": stages})
    return out


def make(shape, device, dtype=torch.bfloat16, seed=0):
    """q (B, H, 1, D) and the k, v cache (B, KV, S, D) ~ N(0, 1)."""
    B, H, KV, D, S = shape
    gen = torch.Generator(device).manual_seed(seed)
    q = torch.randn(B, H, 1, D, generator=gen, device=device).to(dtype)
    k = torch.randn(B, KV, S, D, generator=gen, device=device).to(dtype)
    v = torch.randn(B, KV, S, D, generator=gen, device=device).to(dtype)
    return q, k, v


def run(q, k, v, positions, cfg: dict | None):
    scale = q.shape[-1] ** -0.5
    if cfg is None:
        return DA.decode_attention(q, k, v, positions, scale)
    return DA._decode_attention_triton(q, k, v, positions, scale, None, None, **cfg)


def check(out, q, k, v, positions, what: str) -> None:
    ref = DA.decode_attention_ref(q.float(), k.float(), v.float(), positions, q.shape[-1] ** -0.5)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    if not err < 2e-2:
        raise AssertionError(f"{what}: relative error {err:.2e} against the float32 reference")


def dry_run() -> None:
    """Each (block_s, splits) of the sweep in Triton's interpreter on a small cache with the shapes' head groups;
    the interpreter ignores warps and stages."""
    for name, (B, H, KV, D, S) in SHAPES.items():
        shape = (3, H, KV, 32, 96)
        q, k, v = make(shape, "cpu", torch.float32)
        positions = torch.tensor([0, 50, 95])
        tilings = {(c["block_s"], c["splits"]) for c in configs(shape[-1])}
        for block_s, splits in sorted(tilings):
            cfg = {"block_s": block_s, "splits": splits}
            check(run(q, k, v, positions, cfg), q, k, v, positions, f"{name} {cfg}")
        print(f"{name}: {len(tilings)} tilings of {len(configs(S))} configs run and checked")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--positions", default="192,320", help="the rows' position (every row the same), averaged")
    parser.add_argument("--budget", type=float, default=200.0, help="seconds after which the sweep stops")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.dry_run:
        dry_run()
        return
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (--dry-run checks the sweep's configs on the CPU)")
    import triton

    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
    begin = time.perf_counter()
    names = args.shapes.split(",")
    positions = [int(p) for p in args.positions.split(",")]
    cases = {}
    for name in names:
        shape = SHAPES[name]
        q, k, v = make(shape, "cuda")
        B, _, KV, D, S = shape
        items = [(q, k.clone(), v.clone()) for _ in range(rotations(2 * k.numel() * k.element_size()))]
        pos = [torch.full((B,), p, device="cuda", dtype=torch.long) for p in positions]
        read = sum(2 * B * KV * (p + 1) * D * 2 for p in positions) / len(positions)  # bytes of visible k and v

        def timed(cfg, q=q, k=k, v=v, items=items, pos=pos, name=name):
            for p in pos:
                check(run(q, k, v, p, cfg), q, k, v, p, f"{name} {cfg}")
            return sum(graph_time(lambda it, p=p: run(*it, p, cfg), items) for p in pos) / len(pos)

        default = timed(None)
        splits = DA.num_splits(B, KV, S, DA._block_s(D), q.device)
        print(f"{name}: default (splits {splits}, block_s {DA._block_s(D)}, warps {DA.NUM_WARPS}, stages "
              f"{DA.NUM_STAGES}) {default:6.2f} us {read / default / 1e6:4.2f} TB/s", flush=True)
        cases[name] = (timed, default, read, [])
    todo = [(name, cfg) for cfgs in zip(*(configs(SHAPES[n][-1]) for n in names)) for name, cfg in zip(names, cfgs)]
    untimed = 0
    for name, cfg in todo:
        if time.perf_counter() - begin > args.budget:
            untimed += 1
            continue
        timed, default, read, results = cases[name]
        try:
            t = timed(cfg)
        except Exception as e:  # noqa: BLE001 (a config the compiler or the GPU rejects: report it, go on)
            print(f"  {name} {cfg}: {type(e).__name__}: {str(e)[:100]}")
            continue
        results.append((t, cfg))
    if untimed:
        print(f"{untimed} configs not timed: the budget was spent")
    for name, (_, default, read, results) in cases.items():
        print(f"\n{name}: default {default:.2f} us; the best of {len(results)} configs:")
        for t, cfg in sorted(results, key=lambda r: r[0])[:8]:
            print(f"  {t:6.2f} us {read / t / 1e6:4.2f} TB/s {default / t:4.2f}x  {cfg}")
    print(f"GPU microseconds per call (CUDA-graph replays, caches rotated past L2), mean over positions {positions}; "
          f"{time.perf_counter() - begin:.0f} s in all")


if __name__ == "__main__":
    main()
