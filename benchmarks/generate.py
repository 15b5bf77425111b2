"""Sampling throughput: gazelle's engine on the anchor shapes, next to ../shared/bench/hf_baseline.py.

GPU only. From the repository root on the device machine, with the two baseline files copied to .bench/:

    python3 .bench/hf_baseline.py generate qwen1.5b 64 128 256     # writes /tmp/hf_baseline_qwen1.5b
    python3 benchmarks/generate.py qwen1.5b 64 128 256 [--4bit] [--lora]

Same random weights (the folder the baseline saved), same sampling (temperature 1, no top-k/top-p, exactly
NEW tokens per sequence), same measure: BATCH * NEW / wall time of the whole call (prefill included), best
of two after a warm-up that also captures the CUDA graphs. Prints one line: RESULT {json}.

--lora: generation between optimizer steps, as GRPO does it. LoRA r=32 on every projection, unmerged; the
warm-up and each timed call follow one AdamW step on 8 x 256 random tokens. Memory is then judged against
what the model holds between steps (weights, adapters, optimizer state: `resident_gib`, allocated just before
generating, the KV cache included, which the engine keeps between calls). `overhead_vs_weights_and_kv` =
(peak during generation - resident) / (parameter and buffer bytes + KV cache bytes).
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
from gazelle.models import decoder  # noqa: E402
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
                    help="the prefill's MLP tile in tokens (a forward takes up to 4x as many); default: the "
                         "engine's")
    ap.add_argument("--lora", action="store_true", help="a LoRA model, one optimizer step before each call")
    ap.add_argument("--no-grouped", dest="grouped", action="store_false",
                    help="decode q/k/v and gate/up as separate products (cuBLAS, or an NF4 launch a weight), not "
                         "one grouped launch each (gazelle.kernels.multi_linear, the grouped NF4 kernel)")
    ap.add_argument("--prefill-check", action="store_true",
                    help="only a prefill (and first token) with the eager engine: where it synchronises with the "
                         "host, and its host-side time by op")
    ap.add_argument("--profile", action="store_true",
                    help="after the timed calls, profile one more and print the CUDA kernels by total time")
    a = ap.parse_args()
    decoder.GROUPED_DECODE = a.grouped
    path = f"/tmp/hf_baseline_{a.shape}"
    model = load_model(path, dtype=torch.bfloat16, device="cuda", load_in_4bit=a.q4)
    weights = torch.cuda.memory_allocated()
    train_step = (lambda: None)
    if a.lora:
        from gazelle import FastLanguageModel
        from gazelle.losses.cross_entropy import cross_entropy_sum

        model = FastLanguageModel.get_peft_model(model, r=32, lora_alpha=32)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        tokens = torch.randint(0, 150000, (8, 256), device="cuda")

        def train_step():
            model.train()
            loss, n = cross_entropy_sum(model.logits, model(tokens)[:, :-1], tokens[:, 1:], model.config.vocab_size)
            (loss / n).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    prompts = torch.randint(0, 150000, (a.batch, a.prompt)).tolist()
    params = SamplingParams(do_sample=True, temperature=1.0)
    engine = Engine(model, compile=a.compile, **({"prefill_tokens": a.prefill_tokens} if a.prefill_tokens else {}))
    if a.prefill_check:
        prefill_check(engine, prompts, params)
        return
    began = time.perf_counter()
    engine.generate([p[:16] for p in prompts], 8, params, seed=0)  # warm-up: kernels, graphs of every bucket used
    train_step()
    engine.generate(prompts, a.new, params, seed=0)
    print(f"warm-up (compile, capture, first calls) {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)
    times, overheads = [], []
    for _ in range(2):
        train_step()
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = engine.generate(prompts, a.new, params, seed=0)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        overheads.append(torch.cuda.max_memory_allocated() - resident)
    assert all(len(o) == a.new for o in out)
    cfg = model.config
    kv_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * engine.cache.rows * engine.cache.max_len
    # The cache exists before the timed calls, so it is inside `resident`; the peak above it is the overhead.
    over = max(overheads)
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}.values()
    weights_and_kv = sum(t.numel() * t.element_size() for t in tensors) + kv_bytes
    print("RESULT", json.dumps(dict(
        impl="gazelle" + ("" if a.compile else " (no compile)") + ("" if a.grouped else " (separate products)"), what="generate", shape=a.shape, q4=a.q4, batch=a.batch, prompt=a.prompt, new=a.new,
        s=round(min(times), 3), tok_s=round(a.batch * a.new / min(times)),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2), weights_gib=round(weights / 2**30, 2),
        kv_cache_gib=round(kv_bytes / 2**30, 2), prefill_tokens=engine.prefill_tokens, lora=a.lora,
        resident_gib=round(resident / 2**30, 2), weights_and_kv_gib=round(weights_and_kv / 2**30, 2),
        overhead_vs_weights_and_kv=round(over / weights_and_kv, 4))), flush=True)
    if a.profile:
        profile(lambda: engine.generate(prompts, a.new, params, seed=0), a.new)
        phases(engine, prompts, a.new, params)
        if engine.cuda_graphs:
            replays(engine, a.batch, a.prompt, params)


def prefill_check(engine: Engine, prompts: list, params: SamplingParams) -> None:
    """A call that stops after the first token, three ways: its wall time; the places where it waits for the GPU
    (torch.cuda.set_sync_debug_mode); the host time of its ops and its kernel time (torch.profiler)."""
    import warnings
    from collections import Counter

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    call = lambda: engine.generate(prompts, 1, params, seed=0)  # noqa: E731
    call()
    torch.cuda.synchronize()
    start = time.perf_counter()
    call()
    torch.cuda.synchronize()
    print(f"PREFILL wall {(time.perf_counter() - start) * 1e3:.1f} ms")
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    torch.cuda.set_sync_debug_mode(0)
    where = Counter(f"{w.filename.split('/work/')[-1]}:{w.lineno} {str(w.message)[:60]}" for w in caught)
    print(f"PREFILL {sum(where.values())} synchronising calls")
    for place, count in where.most_common(12):
        print(f"PREFILL   {count:5d}x {place}")
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    events = prof.key_averages()
    cuda = sum(e.self_device_time_total for e in events) / 1e3
    print(f"PREFILL under the profiler: kernel time {cuda:.1f} ms; host ops by self time:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:22]:
        print(f"PREFILL   {e.self_cpu_time_total / 1e3:8.2f} ms {e.count:6d}x  {e.key[:90]}")


def phases(engine: Engine, prompts: list, new: int, params: SamplingParams) -> None:
    """Wall time of a call that stops after the first token (prefill, first sample) against the whole call: the
    rest is the decode loop, per step."""
    def best(n: int) -> float:
        times = []
        for _ in range(2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            engine.generate(prompts, n, params, seed=0)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return min(times)

    first, whole = best(1), best(new)
    print(f"PROFILE wall: prefill and first token {first * 1e3:.1f} ms, whole call {whole * 1e3:.1f} ms, the "
          f"{new - 1} decode steps {(whole - first) / (new - 1) * 1e3:.3f} ms a step")


def replays(engine: Engine, rows: int, prompt: int, params: SamplingParams, steps: int = 200) -> None:
    """The captured decode step alone, replayed back to back (no engine bookkeeping between steps): its wall time
    per step against the kernel time per step of the profile tells GPU-side gaps from host time."""
    from gazelle.generation.engine import bucket

    n = min(steps, engine.cache.max_len - prompt)
    with torch.inference_mode():  # the engine's buffers are inference tensors
        replay = engine._graph_step(bucket(rows), params)
        engine._lengths[:rows] = prompt  # from the prompt's end again: the cache has room for `new` more slots
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(n):
            replay()
            if i == 7:
                host = (time.perf_counter() - start) / 8  # the first calls return before the GPU is done
        torch.cuda.synchronize()
    print(f"PROFILE {n} graph replays back to back: {(time.perf_counter() - start) / n * 1e3:.3f} ms a step; "
          f"host time of one replay() call {host * 1e6:.0f} us")


def profile(call, steps: int, rows: int = 25) -> None:
    """One call under torch.profiler: CUDA kernels by total time, with launches per decode step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in kernels)
    launches = sum(e.count for e in kernels)
    print(f"PROFILE kernel time {total / 1e3:.1f} ms in {launches} launches "
          f"({total / 1e3 / steps:.3f} ms and {launches / steps:.0f} launches per step of {steps})")
    for e in sorted(kernels, key=lambda e: -e.device_time_total)[:rows]:
        print(f"PROFILE {e.device_time_total / 1e3:9.2f} ms {e.count:7d}x {e.device_time_total / e.count:8.2f} us  "
              f"{e.key[:110]}")


if __name__ == "__main__":
    main()
