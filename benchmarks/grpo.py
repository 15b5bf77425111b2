"""GRPO step time and memory: gazelle's GRPOTrainer next to TRL's, on the DESIGN.md GRPO row.

GPU only. From the repository root on the device machine, with ../shared/bench copied to .bench/ and trl,
datasets and what they import that the machine lacks carried as wheels in .bench/wheels:

    python3 -m pip install -q --no-index --find-links .bench/wheels trl==1.16.0
    PYTHONPATH=. python3 benchmarks/grpo.py                        # gazelle:64x1 then trl:8x8, then the table
    PYTHONPATH=. python3 benchmarks/grpo.py gazelle:8x8 trl:64x1 gazelle:64x1+profile

Each SPEC (mode:BATCHxACCUM, BATCH = per_device_train_batch_size in completions, ACCUM =
gradient_accumulation_steps) runs in a process of its own, so each peak is its own. The workload: the qwen-1.5B
shape with the random weights ../shared/bench/hf_baseline.py saves (built here if missing, loaded by both), bf16,
LoRA r=32 alpha=32 dropout 0 on q,k,v,o,gate,up,down, 8 prompts of 128 random tokens x 8 generations x exactly 256
completion tokens (the EOS id lies outside the model's vocabulary, so no completion stops early), beta 0,
temperature 1, loss_type dapo (both libraries' default), one optimizer step per generation batch of 64
completions, gradient checkpointing as each library recommends (TRL: its default, on; gazelle: "unsloth",
get_peft_model's default), reward = fraction of even token ids in the completion (so advantages are not zero).

A step's time is the wall time between the ends of consecutive optimizer steps (generation, scoring, the
log-prob forward and backward, the optimizer, logging); the median of the steps after two warm-up steps
(gazelle's first compiles and captures the decode step). Peak = torch.cuda.max_memory_allocated over the whole
run. Each mode prints one line RESULT {json}; the parent prints the table last. +profile adds one step under
torch.profiler after the timed ones (not timed) and prints its top CUDA ops.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, ".bench"))

from shapes import LORA_TARGETS  # noqa: E402 (.bench/shapes.py, beside the baseline)

SHAPE = "qwen1.5b"
PROMPTS, GENERATIONS, PROMPT_LEN, COMPLETION_LEN = 8, 8, 128, 256
WARMUP, TIMED = 2, 5
LORA = dict(r=32, lora_alpha=32, lora_dropout=0.0)


def word_tokenizer(vocab_size: int):
    """A real Hugging Face tokenizer over the random model's ids: token i is the word "t<i>", so a prompt of
    random ids is the text of those words and both trainers tokenize it back to exactly those ids. Its EOS
    (id vocab_size) is no logit of the model: sampling never emits it, every completion runs to full length."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    vocab["<eos>"] = vocab_size
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="t0", unk_token="t0")


def prompt_rows(steps: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 150000, (PROMPTS * steps, PROMPT_LEN), generator=generator)
    return [{"prompt": " ".join(f"t{i}" for i in row)} for row in ids.tolist()]


def even_tokens(prompts, completions, completion_ids, **kwargs) -> list[float]:
    """Fraction of even token ids: cheap, and it differs between completions of one prompt."""
    return [sum(1 for t in c if t % 2 == 0) / max(len(c), 1) for c in completion_ids]


def model_dir() -> str:
    """The baseline's saved random weights (hf_baseline.build writes them the first time)."""
    path = f"/tmp/hf_baseline_{SHAPE}"
    if not os.path.exists(f"{path}/config.json"):
        from hf_baseline import build

        build(SHAPE, False)  # saves, then loads a copy this process drops
        torch.cuda.empty_cache()
    return path


class StepClock:
    """Synchronised wall times between the ends of consecutive optimizer steps."""

    def __init__(self):
        self.last = None
        self.steps: list[float] = []

    def start(self):
        torch.cuda.synchronize()
        self.last = time.perf_counter()

    def step_end(self):
        torch.cuda.synchronize()
        now = time.perf_counter()
        self.steps.append(now - self.last)
        self.last = now

    def median(self) -> float:
        timed = self.steps[WARMUP : WARMUP + TIMED]
        return statistics.median(timed)


def start_profiler():
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    prof.start()
    return prof


def stop_profiler(prof, label: str) -> None:
    """Print the top CUDA ops of the profiled step."""
    torch.cuda.synchronize()
    prof.stop()
    print(f"--- profile of one {label} step (generation included): top CUDA ops ---")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))


# -- gazelle ----------------------------------------------------------------------------------------
def run_gazelle(batch: int, accum: int, profile: bool) -> dict:
    from gazelle.fast import FastLanguageModel
    from gazelle.trainers.grpo import GRPOConfig, GRPOTrainer

    path = model_dir()
    tokenizer = word_tokenizer(151936)
    model, _ = FastLanguageModel.from_pretrained(path, dtype=torch.bfloat16, max_seq_length=1024)
    model = FastLanguageModel.get_peft_model(model, target_modules=LORA_TARGETS, use_gradient_checkpointing="unsloth",
                                             **LORA)
    steps = WARMUP + TIMED
    args = GRPOConfig(output_dir="/tmp/grpo_gazelle", per_device_train_batch_size=batch,
                      gradient_accumulation_steps=accum, num_generations=GENERATIONS,
                      max_completion_length=COMPLETION_LEN, max_prompt_length=PROMPT_LEN, beta=0.0, bf16=True,
                      max_steps=steps + profile, logging_steps=1, save_strategy="no", report_to="none",
                      disable_tqdm=True, seed=0)
    clock, parts, profiler = StepClock(), {"train": []}, []

    class Clock:
        def on_step_begin(self, trainer):
            if profile and len(clock.steps) == steps:  # the extra step, whole, under the profiler
                profiler.append(start_profiler())

        def on_step_end(self, trainer):
            if len(clock.steps) < steps:
                clock.step_end()
            elif profiler:
                stop_profiler(profiler.pop(), f"gazelle_{batch}x{accum}")

    trainer = GRPOTrainer(model, reward_funcs=[even_tokens], args=args, train_dataset=prompt_rows(steps + profile),
                          processing_class=tokenizer, callbacks=[Clock()])
    inner_step = trainer._step

    def timed_step(*a, **kw):  # log-prob forward + backward of every micro-batch, clipping, optimizer step
        parts.setdefault("peak_before_train", torch.cuda.max_memory_allocated())  # weights + first rollout
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = inner_step(*a, **kw)
        torch.cuda.synchronize()
        parts["train"].append(time.perf_counter() - t)
        return out

    trainer._step = timed_step
    torch.cuda.reset_peak_memory_stats()
    clock.start()
    try:
        trainer.train()
    except ModuleNotFoundError as error:  # the end-of-run plot needs matplotlib; the steps are done by then
        if error.name != "matplotlib":
            raise
    records = [m for m in trainer.metrics if "generation_seconds" in m]
    timed = slice(WARMUP, WARMUP + TIMED)
    return dict(step_s=round(clock.median(), 3), steps_s=[round(s, 3) for s in clock.steps],
                generation_s=round(statistics.median(r["generation_seconds"] for r in records[timed]), 3),
                rest_s=round(clock.median() - statistics.median(r["generation_seconds"] for r in records[timed]), 3),
                train_step_s=round(statistics.median(parts["train"][timed]), 3),
                gen_tok_s=round(statistics.median(r["generation_tokens_per_second"] for r in records[timed])),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                peak_before_train_gib=round(parts["peak_before_train"] / 2**30, 2),
                completion_len=statistics.mean(r["completions/mean_length"] for r in records),
                reward=round(statistics.mean(r["reward"] for r in records), 4),
                loss=[float(f"{m['loss']:.4g}") for m in trainer.metrics][:steps])


# -- TRL --------------------------------------------------------------------------------------------
def run_trl(batch: int, accum: int, profile: bool) -> dict:
    import datasets
    import peft
    import transformers
    import trl
    from hf_baseline import build

    model_dir()
    tokenizer = word_tokenizer(151936)
    model = build(SHAPE, False)
    steps = WARMUP + TIMED
    args = trl.GRPOConfig(output_dir="/tmp/grpo_trl", per_device_train_batch_size=batch,
                          gradient_accumulation_steps=accum, num_generations=GENERATIONS,
                          max_completion_length=COMPLETION_LEN, beta=0.0, bf16=True, use_vllm=False,
                          max_steps=steps, logging_steps=1, save_strategy="no", report_to="none",
                          disable_tqdm=True, seed=0)
    clock, generation, logged = StepClock(), [], []

    class Clock(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.step_end()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs:
                logged.append(dict(logs))

    lora = peft.LoraConfig(target_modules=LORA_TARGETS, task_type="CAUSAL_LM", **LORA)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=[even_tokens], args=args,
                              train_dataset=datasets.Dataset.from_list(prompt_rows(steps)),
                              processing_class=tokenizer, peft_config=lora, callbacks=[Clock()])
    inner_generate = trainer._generate

    def timed_generate(*a, **kw):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = inner_generate(*a, **kw)
        torch.cuda.synchronize()
        generation.append(time.perf_counter() - t)
        return out

    trainer._generate = timed_generate
    torch.cuda.reset_peak_memory_stats()
    clock.start()
    trainer.train()
    timed = slice(WARMUP, WARMUP + TIMED)
    lengths = [r.get("completions/mean_length", float("nan")) for r in logged]
    result = dict(step_s=round(clock.median(), 3), steps_s=[round(s, 3) for s in clock.steps],
                  generation_s=round(statistics.median(generation[timed]), 3),
                  gen_tok_s=round(PROMPTS * GENERATIONS * COMPLETION_LEN / statistics.median(generation[timed])),
                  peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                  completion_len=statistics.mean(lengths) if lengths else None,
                  reward=round(statistics.mean(r["reward"] for r in logged), 4) if logged else None,
                  loss=[float(f"{r.get('loss', float('nan')):.4g}") for r in logged],
                  versions=dict(trl=trl.__version__, transformers=transformers.__version__, peft=peft.__version__,
                                datasets=datasets.__version__))
    result["rest_s"] = round(result["step_s"] - result["generation_s"], 3)
    if profile:
        print("(+profile is for gazelle only)")
    return result


RUNNERS = {"gazelle": run_gazelle, "trl": run_trl}


def parse(spec: str) -> tuple[str, int, int, bool]:
    profile = spec.endswith("+profile")
    spec = spec.removesuffix("+profile")
    mode, _, sizes = spec.partition(":")
    batch, accum = (int(x) for x in (sizes or ("64x1" if mode == "gazelle" else "8x8")).split("x"))
    if mode not in RUNNERS or batch * accum != PROMPTS * GENERATIONS:
        raise SystemExit(f"bad spec {spec!r}: mode:BATCHxACCUM with mode in {sorted(RUNNERS)} and BATCH*ACCUM = 64")
    return mode, batch, accum, profile


def table(results: list[dict]) -> str:
    rows = [("| implementation | batch x accum | step s (median) | generation s | rest s | gen tok/s | peak GiB "
             "| mean reward | completion len |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['impl']} | {r['batch']}x{r['accum']} | failed: {r['error']} |||||||")
            continue
        rows.append(f"| {r['impl']} | {r['batch']}x{r['accum']} | {r['step_s']:.2f} | {r['generation_s']:.2f} | "
                    f"{r['rest_s']:.2f} | {r['gen_tok_s']:,} | {r['peak_gib']:.2f} | {r['reward']} | "
                    f"{r['completion_len']} |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("specs", nargs="*", default=["gazelle:64x1", "trl:8x8"])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=int, default=420, help="seconds per mode")
    a = ap.parse_args()
    if a.child:
        mode, batch, accum, profile = parse(a.specs[0])
        result = dict(impl=mode, shape=SHAPE, batch=batch, accum=accum, prompts=PROMPTS, generations=GENERATIONS,
                      prompt=PROMPT_LEN, completion=COMPLETION_LEN, lora=LORA, torch=torch.__version__,
                      device=torch.cuda.get_device_name())
        result.update(RUNNERS[mode](batch, accum, profile))
        print("RESULT", json.dumps(result), flush=True)
        return
    for spec in a.specs:
        parse(spec)
    results = []
    for spec in a.specs:
        mode, batch, accum, _ = parse(spec)
        started = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec], timeout=a.timeout,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            output, code = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as expired:
            output, code = expired.stdout or "", "timeout"
            output = output.decode() if isinstance(output, bytes) else output
        print(f"===== {spec} ({time.perf_counter() - started:.0f} s, exit {code}) =====")
        print(output, flush=True)
        lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
        if lines:
            results.append(json.loads(lines[-1][len("RESULT "):]))
        else:
            tail = [line for line in output.strip().splitlines() if line.strip()][-1:] or [str(code)]
            results.append(dict(impl=mode, batch=batch, accum=accum, error=tail[0][:200]))
    print(table(results))
    for r in results:
        print("RESULT", json.dumps(r))


if __name__ == "__main__":
    main()
