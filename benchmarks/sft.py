"""SFT step speed and memory: gazelle next to HF+PEFT (+bitsandbytes) on the DESIGN.md training rows. GPU only.

From the repository root on the device machine, with ../shared/bench copied to .bench/ and bitsandbytes unpacked
(its CUDA 13 and CPU libraries only) in .bench/site:

    PYTHONPATH=. python3 benchmarks/sft.py                        # the four DESIGN rows, both libraries, a table
    PYTHONPATH=. python3 benchmarks/sft.py gazelle:llama8b:2x2048:4bit hf:llama8b:2x2048:4bit
    PYTHONPATH=. python3 benchmarks/sft.py --longest 65536,131072,262144,400000   # llama-8B QLoRA, batch 1

SPEC = impl:shape:BATCHxSEQ[:4bit][:ckpt=off|on|unsloth][:graphs=off][:profile][:memory][:FLAG=VALUE...]
- profile (gazelle only): one extra step's top CUDA ops;
- memory (gazelle only): what was allocated at the training's peak, by allocating site and its caller (the
  timings are slowed by the recording);
- graphs=off: gazelle's micro-batch eager, not replayed from a CUDA graph;
- embed=gpu: gazelle's embedding table and head stay on the GPU, not in host memory;
- tiles=off|MB: no light MLP tiles, or tiles of MB (MLP.light_tile_bytes; SFTConfig.mlp_tile_mb);
- chunk=MB: the linear cross-entropy's logits chunk;
- ring=MB, ahead=N: the device buffers of the head streamed from host memory (HostEmbeddings.ring_bytes), its
  copies started N layers before the loss (HostEmbeddings.prefetch_layers).
- stream=K: K decoder layers' frozen weights streamed from host memory through two device slots
  (gazelle.models.host_layers; SFTConfig.stream_layers);
- keep=N: the top N layers without checkpointing, their activations kept (SFTConfig.uncheckpointed_layers);
- fold=off: the residual adds as kernels of their own, not in the fused LoRA products (gazelle.kernels.lora.FOLD_RESIDUAL).
Each runs in a process of its own, so each peak is its own. Both libraries load the random weights that
../shared/bench/hf_baseline.py saves (/tmp/hf_baseline_SHAPE; built here the same way if missing), train LoRA r=32
alpha=32 dropout 0 on q,k,v,o,gate,up,down with AdamW lr 1e-4 (weight decay 0.01) on the same tokens
(torch.manual_seed(0); randint(0, 150000, (B, S)) on cuda, labels = the ids). HF: six steps, the step time the
median of steps 3-6 (hf_baseline.py). gazelle: seven steps (two eager warm-ups, the capture, four replays), the
median of steps 4-7. peak = torch.cuda.max_memory_allocated (gazelle also prints max_memory_reserved); the loss
printed is step 6's, HF's last (gazelle also prints every step's: the first is the base model's loss as the
adapters start at zero). gazelle trains as its SFTTrainer does (GazelleStep), with the checkpointing mode
get_peft_model defaults to ("unsloth": layer inputs offloaded to CPU) unless ckpt= says.

--longest: one process, gazelle QLoRA batch 1 on the llama-8B shape, one full training step (forward, backward,
optimizer) per length in the list, ascending, stopping at the first that runs out of memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, ".bench")
sys.path.insert(0, ROOT)
sys.path.insert(0, BENCH)

from shapes import LORA_TARGETS, SHAPES  # noqa: E402 (.bench/shapes.py, beside the baseline)

DEFAULT = [f"{impl}:{shape}:{size}{q}" for shape, size in (("llama8b", "2x2048"), ("qwen1.5b", "8x1024"))
           for q in ("", ":4bit") for impl in ("gazelle", "hf")]
GAZELLE_STEPS, GAZELLE_WARMUP = 7, 3  # two eager warm-ups and the capture, then four replays timed
HF_STEPS = 6  # hf_baseline.py's; the loss compared is the one of step 6 on both sides


def parse(spec: str) -> dict:
    impl, shape, size, *flags = spec.split(":")
    batch, seq = (int(n) for n in size.split("x"))
    if impl not in ("gazelle", "hf") or shape not in SHAPES:
        raise SystemExit(f"bad SPEC {spec!r}: impl gazelle|hf, shape one of {sorted(SHAPES)}")
    return dict(impl=impl, shape=shape, batch=batch, seq=seq, q4="4bit" in flags,
                ckpt=_flag(flags, "ckpt") or "unsloth", spec=spec, profile="profile" in flags, graphs="graphs=off" not in flags, memory="memory" in flags,
                host="embed=gpu" not in flags, tiles=_flag(flags, "tiles"), ring_mb=int(_flag(flags, "ring") or 0),
                ahead=int(_flag(flags, "ahead") or 0), chunk_mb=int(_flag(flags, "chunk") or 0),
                stream=int(_flag(flags, "stream") or 0), keep=int(_flag(flags, "keep") or 0),
                fold="fold=off" not in flags)


def _flag(flags: list[str], name: str) -> str | None:
    return next((f.split("=", 1)[1] for f in flags if f.startswith(name + "=")), None)


def model_dir(shape: str) -> str:
    """The baseline's saved random weights; written here exactly as hf_baseline.build writes them if missing."""
    path = f"/tmp/hf_baseline_{shape}"
    if not os.path.exists(f"{path}/config.json"):
        import transformers

        cfg = transformers.AutoConfig.for_model(**SHAPES[shape])
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        model.save_pretrained(path)
        del model
        torch.cuda.empty_cache()
    return path


def gazelle_model(shape: str, q4: bool, ckpt: str):
    from gazelle import FastLanguageModel
    from gazelle.models.loading import load_model

    model = load_model(model_dir(shape), dtype=torch.bfloat16, device="cuda", load_in_4bit=q4)
    mode = {"off": False, "on": True, "unsloth": "unsloth"}[ckpt]
    return FastLanguageModel.get_peft_model(model, r=32, lora_alpha=32, lora_dropout=0.0,
                                            target_modules=LORA_TARGETS, use_gradient_checkpointing=mode)


class GazelleStep:
    """One optimizer step as gazelle's SFTTrainer takes it: token-mean next-token cross-entropy through the
    trainer's capturable loss (every position through the chunked head, the last one without a target), the
    micro-batch replayed from a CUDA graph after two eager warm-ups (graphs=off: always eager), the trainer's
    optimizer (fused AdamW on CUDA; weight decay 0.01 as torch's AdamW default, which the HF side uses)."""

    def __init__(self, model, graphs: bool = True, host_embeddings: bool = True):
        from gazelle.losses.cross_entropy import cross_entropy_sum
        from gazelle.models.host_embeddings import HostEmbeddings
        from gazelle.trainers.config import TrainingArguments
        from gazelle.trainers.graphed import GraphedStep
        from gazelle.trainers.loop import make_optimizer

        self.model = model
        self.optimizer = make_optimizer(model, TrainingArguments(learning_rate=1e-4, weight_decay=0.01))

        self.host = None
        if host_embeddings:  # as the trainer: the embedding table and head in host memory while training
            self.host = HostEmbeddings(model)
            self.host.enable()

        def loss(batch):
            hidden = model(batch["input_ids"], inputs_embeds=batch.get("inputs_embeds"))
            return cross_entropy_sum(model.logits, hidden, batch["targets"], model.config.vocab_size)

        self.loss = loss
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.runner = GraphedStep(loss, params) if graphs else None

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        tokens = targets.shape[0] * (targets.shape[1] - 1)
        batch = {"input_ids": ids, "targets": targets}
        if self.host is not None:
            batch = self.host.inputs(batch)
        if self.runner is not None:
            loss_sum, _ = self.runner(batch, 1.0 / tokens)
            loss = loss_sum / tokens  # a new tensor: the graph's output is overwritten by the next replay
        else:
            loss_sum, _ = self.loss({k: v.to("cuda", non_blocking=True) for k, v in batch.items()})
            loss = loss_sum / tokens
            loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=self.runner is None)
        return loss.detach()


def run_gazelle(case: dict) -> dict:
    if case["memory"]:
        torch.cuda.memory._record_memory_history(max_entries=3_000_000)
    model = gazelle_model(case["shape"], case["q4"], case["ckpt"]).train()
    if not case["fold"]:
        from gazelle.kernels import lora

        lora.FOLD_RESIDUAL = False
    if case["tiles"] is not None:
        for layer in model.model.layers:
            layer.mlp.light_tile_bytes = None if case["tiles"] == "off" else int(case["tiles"]) * 2**20
    if case["chunk_mb"]:
        from gazelle.kernels import linear_cross_entropy

        linear_cross_entropy.CHUNK_BYTES = case["chunk_mb"] * 2**20
    step_fn = GazelleStep(model, graphs=case["graphs"], host_embeddings=case["host"])
    if case["ring_mb"]:
        step_fn.host.ring_bytes = case["ring_mb"] * 2**20
    if case["ahead"]:
        step_fn.host.prefetch_layers = case["ahead"]
    model.uncheckpointed_layers = case["keep"]
    if case["stream"]:
        from gazelle.models.host_layers import HostLayers

        HostLayers(model, case["stream"]).enable()
    torch.manual_seed(0)
    ids = torch.randint(0, 150000, (case["batch"], case["seq"]), device="cuda").cpu()  # batches come from the host
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    # the recorded history's events before training (loading, quantizing) set the live bytes but not the peak
    start_event = len(torch.cuda.memory._snapshot()["device_traces"][0]) if case["memory"] else 0
    times, losses = [], []
    for _ in range(GAZELLE_STEPS):
        torch.cuda.synchronize()
        start = time.perf_counter()
        losses.append(step_fn(ids))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    steady = times[GAZELLE_WARMUP:]
    step = sorted(steady)[len(steady) // 2]
    peak = torch.cuda.max_memory_allocated()
    if case["profile"]:  # one more step, untimed, under the profiler: where the time goes
        profile_step(lambda: step_fn(ids), case["spec"])
    if case["memory"]:
        memory_at_peak(torch.cuda.memory._snapshot(), case["spec"], start_event)
    runner = step_fn.runner
    return dict(step_s=round(step, 4), tok_s=round(case["batch"] * case["seq"] / step), loss_last=round(losses[-1].item(), 4),
                loss=round(losses[HF_STEPS - 1].item(), 4), first_loss=round(losses[0].item(), 4),
                peak_gib=round(peak / 2**30, 2), reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
                replays=runner.replays if runner else 0, graph_failure=runner.failure if runner else None,
                step_times=[round(t, 4) for t in times], losses=[round(x.item(), 4) for x in losses])


def memory_at_peak(snapshot: dict, spec: str, start_event: int = 0) -> None:
    """What was allocated at the training's peak, from the allocator's recorded history (every allocation since
    the model was loaded; peaks before event `start_event`, the loading's, do not count): bytes by the innermost
    gazelle (or benchmark) frame that allocated them and its caller, to stderr."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for index, event in enumerate(snapshot["device_traces"][0]):
        if event["action"] == "alloc":
            frames = event.get("frames") or []
            ours = [f"{os.path.relpath(f['filename'], ROOT)}:{f['line']} {f['name']}" for f in frames
                    if f["filename"].startswith(ROOT) and "/.bench/" not in f["filename"]]
            where = " <- ".join(ours[:2]) or "(outside gazelle)"
            live[event["addr"]] = (event["size"], where)
            total += event["size"]
            if total > peak and index >= start_event:
                peak, at_peak = total, dict(live)
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]
    by_site: dict[str, list[int]] = {}
    for size, where in at_peak.values():
        by_site.setdefault(where, []).append(size)
    lines = [f"MEMORY {spec}: {peak / 2**30:.2f} GiB live at the peak of the recorded history, by allocating site:"]
    for where, sizes in sorted(by_site.items(), key=lambda kv: -sum(kv[1]))[:25]:
        lines.append(f"  {sum(sizes) / 2**30:7.3f} GiB {len(sizes):5d}  {where}")
    print("\n".join(lines), file=sys.stderr, flush=True)


def profile_step(step, spec: str) -> None:
    """One step under torch.profiler (host and CUDA): kernel time against the step's wall time, the GPU's idle
    gaps, the kernels by total time and the host ops by self time, to stderr. With SFT_TRACE_DIR set, the
    Chrome trace is written there too (gzipped)."""
    import gzip
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        name = "".join(c if c.isalnum() or c in "._-" else "_" for c in spec)
        path = os.path.join(os.environ.get("SFT_TRACE_DIR") or tmp, name + ".json.gz")
        prof.export_chrome_trace(path)  # gzipped by torch for a .gz name
        with gzip.open(path, "rt") as f:
            events = json.load(f)["traceEvents"]
    kernels = sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events if e.get("cat") == "kernel")
    if not kernels:
        raise SystemExit("the profile holds no CUDA kernels")
    busy, end = 0.0, float("-inf")  # union of the kernel intervals (the side stream's copies are not kernels)
    for lo, hi, _ in kernels:
        busy += max(0.0, hi - max(lo, end))
        end = max(end, hi)
    span = kernels[-1][1] - kernels[0][0]
    by_name: dict[str, list[float]] = {}
    for lo, hi, name in kernels:
        by_name.setdefault(name[:90], []).append(hi - lo)
    lines = [f"PROFILE {spec}: wall {wall * 1e3:.1f} ms, {len(kernels)} kernels, kernel time {busy / 1e3:.1f} ms "
             f"busy of a {span / 1e3:.1f} ms span (GPU idle {(span - busy) / 1e3:.1f} ms)",
             "PROFILE kernels by total time (ms, count):"]
    for name, durs in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:30]:
        lines.append(f"  {sum(durs) / 1e3:8.2f} {len(durs):6d}  {name}")
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60)
    print("\n".join(lines) + "\nPROFILE host ops by self time:\n" + table, file=sys.stderr, flush=True)


def run_case(case: dict) -> dict:
    """Runs one SPEC in a child process and returns its RESULT."""
    if case["impl"] == "hf":
        model_dir(case["shape"])
        cmd = [sys.executable, "hf_baseline.py", "sft", case["shape"], str(case["batch"]), str(case["seq"])]
        cmd += ["--4bit"] if case["q4"] else []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(BENCH, "site"), os.environ.get("PYTHONPATH", "")])}
        cwd = BENCH
    else:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", case["spec"]]
        env, cwd = os.environ, ROOT
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if case["profile"]:
        print(proc.stderr[-12000:], flush=True)
    elif case["memory"]:
        print("\n".join(ln for ln in proc.stderr.splitlines() if ln.startswith(("MEMORY", "  "))), flush=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        tail = (proc.stdout + proc.stderr)[-1500:]
        return dict(spec=case["spec"], error=tail.strip().splitlines()[-1] if tail.strip() else "no output",
                    log=tail)
    return {**json.loads(line[len("RESULT "):]), "spec": case["spec"]}


def longest(lengths: list[int]) -> None:
    """Full QLoRA steps at batch 1 on the llama-8B shape at each length until one runs out of memory."""
    model = gazelle_model("llama8b", True, "unsloth").train()
    step_fn = GazelleStep(model, graphs=False)  # one step per length: nothing to replay
    for length in lengths:
        torch.manual_seed(0)
        ids = torch.randint(0, 150000, (1, length), device="cuda").cpu()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            loss = step_fn(ids).item()
        except torch.OutOfMemoryError:
            step_fn.optimizer.zero_grad(set_to_none=True)
            print("RESULT", json.dumps(dict(length=length, fits=False)), flush=True)
            break
        torch.cuda.synchronize()
        print("RESULT", json.dumps(dict(length=length, fits=True, loss=round(loss, 4),
                                        step_s=round(time.perf_counter() - start, 1),
                                        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                                        host_pinned_gib=round(model._offloader.pinned_bytes / 2**30, 2))), flush=True)
        del ids


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("specs", nargs="*", default=DEFAULT)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--longest", help="comma-separated context lengths for the llama-8B QLoRA batch-1 search")
    a = ap.parse_args()
    if a.child:
        case = parse(a.child)
        res = dict(impl="gazelle", shape=case["shape"], q4=case["q4"], batch=case["batch"], seq=case["seq"],
                   ckpt=case["ckpt"])
        print("RESULT", json.dumps({**res, **run_gazelle(case)}), flush=True)
        return
    if a.longest:
        longest([int(n) for n in a.longest.split(",")])
        return
    results = []
    for spec in a.specs:
        res = run_case(parse(spec))
        print(json.dumps(res), flush=True)
        results.append(res)
    print("\n| spec | tok/s | peak GiB | loss | step s |\n|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            print(f"| {r['spec']} | error: {r['error'][:80]} | | | |")
        else:
            print(f"| {r['spec']} | {r['tok_s']:,} | {r['peak_gib']} | {r['loss']} | {r['step_s']} |")
    def workload(r):
        return r.get("shape"), r.get("q4"), r.get("batch"), r.get("seq")

    baselines = {workload(r): r for r in results if r.get("impl") == "hf+peft"}
    for r in results:
        ref = baselines.get(workload(r))
        if r.get("impl") == "gazelle" and ref:
            print(f"{r['spec']}: {r['tok_s'] / ref['tok_s']:.2f}x HF tokens/s, {r['peak_gib'] / ref['peak_gib']:.2f}x its "
                  f"memory, loss {r['loss']} vs {ref['loss']} ({abs(r['loss'] / ref['loss'] - 1):.2%})")


if __name__ == "__main__":
    main()
