"""multi_linear / glu_linear against cuBLAS on the GPU (not a test):
python benchmarks/multi_linear.py [--groups "qkv 8b,gate/up 8b"] [--m 32,64] [--sweep small|wide|none] [--budget 75]
python benchmarks/multi_linear.py --dry-run   (CPU: every config the sweep would time, run in Triton's interpreter)

For the projection groups of llama-3-8B and qwen2.5-1.5B at decode sizes (M = 32, 64 rows), times
- cuBLAS: the group's separate F.linear calls (q, k, v; or gate and up then the torch glu, act(gate) * up), as
  the decoder runs them, and the F.linear calls alone (the glu is a fused elementwise op under torch.compile);
- fused: gazelle.kernels.multi_linear.multi_linear / glu_linear with config()'s default,
after checking the kernel against the float32 reference on this GPU. Times are GPU microseconds per call from
CUDA-graph replays (no Python launch cost, as in the graph-captured decode step); each graph calls the op on
several copies of the group's weights in turn, more bytes in all than twice the L2 cache (50 MB on an H100), so
every call reads its weights from HBM. TB/s: the group's weight bytes (and biases) over the time.
Then the sweep: the default config with one knob moved at a time (alternatives()), per case, until --budget
seconds have passed since the start (Triton compiles each config once: ~1 s); the summary ends with the best.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from dataclasses import dataclass

if __name__ == "__main__" and "--dry-run" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (with gazelle's kernels)

import torch
import torch.nn.functional as F

from benchmarks.graph_timing import graph_time, rotations
from gazelle.kernels import multi_linear as ML
from gazelle.kernels.glu import glu_ref

ACT = "silu"
MS = (32, 64)
H100_SMS = 132
MAX_SMEM = 220 << 10  # configs whose pipeline needs more shared memory than an H100 SM offers are not timed


@dataclass(frozen=True)
class Group:
    ns: tuple[int, ...]  # rows of each weight
    k: int
    bias: bool
    glu: bool


GROUPS = {
    "qkv 8b": Group((4096, 1024, 1024), 4096, False, False),
    "gate/up 8b": Group((14336, 14336), 4096, False, True),
    "qkv 1.5b": Group((1536, 256, 256), 1536, True, False),
    "gate/up 1.5b": Group((8960, 8960), 1536, False, True),
    # single products of the decode step (cuBLAS in the decoder today): o, down and the lm_head
    "o 8b": Group((4096,), 4096, False, False),
    "down 8b": Group((4096,), 14336, False, False),
    "head 8b": Group((151936,), 4096, False, False),
    "o 1.5b": Group((1536,), 1536, False, False),
    "down 1.5b": Group((1536,), 8960, False, False),
    "head 1.5b": Group((151936,), 1536, False, False),
}


def alternatives(default: dict, group: Group, wide: bool = False) -> list[dict]:
    """The sweep for one case: config overrides, each moving one knob of the default (more knobs when wide), minus
    duplicates and configs whose pipeline does not fit an SM's shared memory. 8 warps where 4 would hold more
    than 64 accumulator registers a thread (ptxas spills at BN 128, BM 64 with glu's two accumulators)."""
    bn, bk, stages, split = default["BN"], default["BK"], default["num_stages"], default["split"]
    alts = [{"BN": 32 if bn != 32 else 64}, {"BN": 128, "BK": 64}, {"BK": 64 if bk != 64 else 128},
            {"num_stages": stages + 1}, {"split": split + 1}, {"split": 1 if split > 1 else 4}]
    if wide:
        alts += [{"num_warps": 8}, {"BN": 128}, {"num_stages": stages - 1}, {"BK": 256}, {"split": 2 * split},
                 {"BN": 32, "split": 2 * split}, {"BN": 128, "BK": 64, "num_warps": 8}]
    out = []
    for alt in alts:
        cfg = default | alt
        if cfg["BN"] * cfg["BM"] * (2 if group.glu else 1) > 64 * 32 * cfg["num_warps"]:
            alt = alt | {"num_warps": 8}
            cfg = default | alt
        smem = cfg["num_stages"] * ML.stage_bytes(cfg["BM"], cfg["BN"], cfg["BK"], group.glu, torch.bfloat16)
        if cfg != default and cfg["num_stages"] >= 2 and smem <= MAX_SMEM and alt not in out:
            out.append(alt)
    return out


def make_weights(group: Group, device, dtype=torch.bfloat16, seed=0):
    """Weights (n, k) ~ N(0, 0.02^2) (a trained layer's scale) and biases ~ N(0, 1), made on the device."""
    gen = torch.Generator(device).manual_seed(seed)
    ws = [(torch.randn(n, group.k, generator=gen, device=device) * 0.02).to(dtype) for n in group.ns]
    bs = [torch.randn(n, generator=gen, device=device).to(dtype) if group.bias else None for n in group.ns]
    return ws, bs


def nbytes(ws, bs) -> int:
    return sum(t.numel() * t.element_size() for t in [*ws, *bs] if t is not None)


def copies(ws, bs) -> list:
    """Enough copies of the group (fresh storage each) to cover ROTATE_BYTES."""
    n = rotations(nbytes(ws, bs))
    return [([w.clone() for w in ws], [b if b is None else b.clone() for b in bs]) for _ in range(n)]


def fused(x, group: Group, cfg: dict | None = None):
    """fn(item) running the kernel on one copy of the group: the public op (cfg None) or a given config."""
    act = ACT if group.glu else None
    if cfg is None:
        if group.glu:
            return lambda item: ML.glu_linear(x, *item[0], ACT)
        return lambda item: ML.multi_linear(x, *item)
    return lambda item: ML.multi_linear_fused(x, *item, act, cfg)


def reference(x, group: Group, ws, bs) -> torch.Tensor:
    """The float32 reference of the kernel's output."""
    ws32 = [w.float() for w in ws]
    if group.glu:
        return ML.glu_linear_ref(x.float(), *ws32, ACT)
    return ML.multi_linear_ref(x.float(), ws32, [b if b is None else b.float() for b in bs])


def check(y: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = ((y.float() - ref).norm() / ref.norm()).item()
    if not err < 1e-2:
        raise AssertionError(f"{what}: relative error {err:.2e} against the float32 reference")


def cublas(x, group: Group, matmuls_only: bool = False):
    """fn(item) running the group as the decoder does: separate F.linear calls (+ the torch glu)."""
    if group.glu:
        if matmuls_only:
            return lambda item: (F.linear(x, item[0][0]), F.linear(x, item[0][1]))
        return lambda item: glu_ref(F.linear(x, item[0][0]), F.linear(x, item[0][1]), ACT)
    return lambda item: [F.linear(x, w, b) for w, b in zip(*item)]


def dry_run(wide: bool = True) -> None:
    """Every config the sweep would time on an H100 (M in MS), run in Triton's interpreter on tiny shapes of the
    same group structure; raises on an invalid config or a wrong result. The interpreter ignores warps and
    stages, so configs differing only in those run once."""
    tiny = {name: Group(tuple(max(16, n // 256) + 3 for n in g.ns), 192, g.bias, g.glu) for name, g in GROUPS.items()}
    for (name, group), m in itertools.product(GROUPS.items(), MS):
        default = ML.config(m, group.ns, group.k, torch.device("cuda"), group.glu, sms=H100_SMS)
        small = tiny[name]
        ws, bs = make_weights(small, "cpu", torch.float32)
        x = torch.randn(m, small.k)
        ref = reference(x, small, ws, bs)
        alts = [{}, *alternatives(default, group, wide)]
        tiles = {tuple((default | alt)[key] for key in ("BN", "BK", "split")): alt for alt in alts}
        for alt in tiles.values():
            y = fused(x, small, default | alt)((ws, bs))
            what = f"{name} M={m} {alt}"
            torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5, msg=lambda s, what=what: f"{what}: {s}")
        print(f"{name:13} M={m}: default {default} and {len(alts) - 1} alternatives ({len(tiles)} tilings) run")


def sweep_one(name: str, m: int, alt: dict, row: list, data: tuple) -> None:
    """Check and time one alternative config of one case; a better time goes to row's best."""
    group, (x, default, t_cublas) = GROUPS[name], row[:3]
    ws, bs, items = data
    cfg = default | alt
    try:
        check(ML.multi_linear_fused(x, ws, bs, ACT if group.glu else None, cfg), reference(x, group, ws, bs),
              f"{name} M={m} {cfg}")
        t = graph_time(fused(x, group, cfg), items)
    except Exception as e:  # noqa: BLE001 (a config the compiler or the GPU rejects: report it, go on)
        print(f"  {name:13} M={m:2} {alt!s:40} {type(e).__name__}: {str(e)[:100]}")
        return
    print(f"  {name:13} M={m:2} {alt!s:40} {t:6.1f} us {nbytes(ws, bs) / t / 1e6:4.2f} TB/s "
          f"{t_cublas / t:4.2f}x (default {row[4]:.1f} us)", flush=True)
    if t < row[5]:
        row[5], row[6] = t, cfg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--groups", default=",".join(GROUPS), help="comma-separated names of GROUPS")
    parser.add_argument("--m", default=",".join(map(str, MS)), help="comma-separated rows of x (<= 64)")
    parser.add_argument("--sweep", choices=("none", "small", "wide"), default="small",
                        help="alternatives to the default config timed per case")
    parser.add_argument("--budget", type=float, default=75.0, help="seconds after which the sweep stops")
    parser.add_argument("--dry-run", action="store_true", help="CPU: run every sweep config in the interpreter")
    args = parser.parse_args()
    if args.dry_run:
        dry_run()
        return
    names, ms = args.groups.split(","), [int(m) for m in args.m.split(",")]
    if any(n not in GROUPS for n in names):
        parser.error(f"--groups: names of {list(GROUPS)}")
    if not all(1 <= m <= ML.MAX_M for m in ms):
        parser.error(f"--m: rows of x from 1 to {ML.MAX_M}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (--dry-run checks the sweep's configs on the CPU)")
    begin = time.perf_counter()
    torch.manual_seed(0)
    import triton

    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    data = {}  # name -> (weights, biases, copies)
    rows = {}  # (name, m) -> [x, default config, cuBLAS us, cuBLAS matmuls us, default us, best us, best config]
    for name in names:
        group = GROUPS[name]
        ws, bs = make_weights(group, "cuda")
        data[name] = ws, bs, copies(ws, bs)
        gbytes = nbytes(ws, bs)
        for m in ms:
            x = torch.randn(m, group.k, device="cuda", dtype=torch.bfloat16)
            check(fused(x, group)((ws, bs)), reference(x, group, ws, bs), f"{name} M={m}")
            t_cublas = graph_time(cublas(x, group), data[name][2])
            t_mm = graph_time(cublas(x, group, matmuls_only=True), data[name][2]) if group.glu else t_cublas
            t_fused = graph_time(fused(x, group), data[name][2])
            default = ML.config(m, group.ns, group.k, x.device, group.glu, x.dtype)
            rows[name, m] = [x, default, t_cublas, t_mm, t_fused, t_fused, default]
            print(f"{name:13} M={m:2} | cuBLAS {t_cublas:6.1f} us {gbytes / t_cublas / 1e6:4.2f} TB/s"
                  f" (matmuls {t_mm:6.1f}) | fused {t_fused:6.1f} us {gbytes / t_fused / 1e6:4.2f} TB/s"
                  f" {t_cublas / t_fused:4.2f}x | {default}  [{time.perf_counter() - begin:.0f} s]", flush=True)
    if args.sweep != "none":
        print(f"sweep ({args.sweep}): the default with one knob moved, the cases in turn; stops {args.budget:.0f} s "
              "after the start")
        sweeps = {case: alternatives(row[1], GROUPS[case[0]], wide=args.sweep == "wide") for case, row in rows.items()}
        untimed = 0
        for i in range(max(map(len, sweeps.values()))):
            for (name, m), alts in sweeps.items():
                if i < len(alts) and time.perf_counter() - begin < args.budget:
                    sweep_one(name, m, alts[i], rows[name, m], data[name])
                elif i < len(alts):
                    untimed += 1
        if untimed:
            print(f"  {untimed} configs not timed: the budget was spent (--budget, --groups, --m)")
    head = (f"{'group':13} {'M':>3} | {'cuBLAS us':>9} {'matmuls us':>10} | {'fused us':>8} {'speedup':>7} | "
            f"{'best us':>7} {'speedup':>7} | best config")
    print("\n" + head + "\n" + "-" * len(head))
    for (name, m), (_, _, t_cublas, t_mm, t_fused, t_best, cfg) in rows.items():
        print(f"{name:13} {m:3} | {t_cublas:9.1f} {t_mm:10.1f} | {t_fused:8.1f} {t_cublas / t_fused:6.2f}x | "
              f"{t_best:7.1f} {t_cublas / t_best:6.2f}x | {cfg}")
    print(f"GPU microseconds per call (CUDA-graph replays, weights rotated past L2); speedup: cuBLAS (F.linear calls "
          f"+ torch glu) over the kernel; {time.perf_counter() - begin:.0f} s in all.")


if __name__ == "__main__":
    main()
