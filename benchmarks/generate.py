"""Sampling throughput: gazelle's engine on the anchor shapes, next to ../shared/bench/hf_baseline.py.

GPU only. From the repository root on the device machine, with the two baseline files copied to .bench/:

    python3 .bench/hf_baseline.py generate qwen1.5b 64 128 256     # writes /tmp/hf_baseline_qwen1.5b
    python3 benchmarks/generate.py qwen1.5b 64 128 256 [--4bit]

Same random weights (the folder the baseline saved), same sampling (temperature 1, no top-k/top-p, exactly
NEW tokens per sequence), same measure: BATCH * NEW / wall time of the whole call (prefill included), best
of two after a warm-up that also captures the CUDA graphs. Prints one line: RESULT {json}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gazelle.generation.engine import Engine  # noqa: E402
from gazelle.generation.sampling import SamplingParams  # noqa: E402
from gazelle.models.loading import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shape")
    ap.add_argument("batch", type=int)
    ap.add_argument("prompt", type=int)
    ap.add_argument("new", type=int)
    ap.add_argument("--4bit", dest="q4", action="store_true")
    ap.add_argument("--no-compile", dest="compile", action="store_false",
                    help="capture the eager decode step (default: torch.compile it first)")
    ap.add_argument("--prefill-tokens", type=int, default=None,
                    help="tokens per prefill forward (rows x chunk); default: the engine's")
    a = ap.parse_args()
    path = f"/tmp/hf_baseline_{a.shape}"
    model = load_model(path, dtype=torch.bfloat16, device="cuda", load_in_4bit=a.q4)
    weights = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    prompts = torch.randint(0, 150000, (a.batch, a.prompt)).tolist()
    params = SamplingParams(do_sample=True, temperature=1.0)
    engine = Engine(model, compile=a.compile, **({"prefill_tokens": a.prefill_tokens} if a.prefill_tokens else {}))
    engine.generate([p[:16] for p in prompts], 8, params, seed=0)  # warm-up: kernels, graphs of every bucket used
    engine.generate(prompts, a.new, params, seed=0)
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(2):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = engine.generate(prompts, a.new, params, seed=0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    assert all(len(o) == a.new for o in out)
    cfg = model.config
    kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * engine.cache.rows * engine.cache.max_len
    print("RESULT", json.dumps(dict(
        impl="gazelle" + ("" if a.compile else " (no compile)"), what="generate", shape=a.shape, q4=a.q4, batch=a.batch, prompt=a.prompt, new=a.new,
        s=round(min(times), 3), tok_s=round(a.batch * a.new / min(times)),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), weights_gib=round(weights / 2**30, 2),
        kv_cache_gib=round(kv_bytes / 2**30, 2), prefill_tokens=engine.prefill_tokens)), flush=True)


if __name__ == "__main__":
    main()
