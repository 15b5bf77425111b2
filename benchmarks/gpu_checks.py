"""GPU checks of the training path (not a benchmark of record): python benchmarks/gpu_checks.py

On CUDA, for a random qwen2.5-1.5B-shaped model cut to 4 layers (full vocabulary), bf16, LoRA r=16 on every
projection, with and without NF4 base weights: the loss and LoRA gradients with gradient checkpointing
off, on, and "unsloth" (inputs offloaded to CPU) agree, and the peak memory of each is printed.
"""

from __future__ import annotations

import time

import torch

from gazelle import FastLanguageModel
from gazelle.losses.cross_entropy import cross_entropy_sum
from gazelle.models.config import from_hf_config
from gazelle.models.decoder import Decoder
from gazelle.quant.linear4bit import quantize_model

QWEN_1_5B = dict(model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                 num_hidden_layers=4, num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6,
                 rope_theta=1000000.0, max_position_embeddings=32768, tie_word_embeddings=True)


def build(four_bit: bool) -> Decoder:
    torch.manual_seed(0)
    model = Decoder(from_hf_config(QWEN_1_5B))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.ndim == 2 else p.fill_(1.0)
    model = model.to("cuda", torch.bfloat16)
    if four_bit:
        quantize_model(model, torch.bfloat16, skip_modules=("lm_head", "embed_tokens"))
    return FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, random_state=1,
                                            use_gradient_checkpointing=False)


def step(model, ids, mode) -> tuple[float, dict, float, float]:
    model.train()
    model.gradient_checkpointing = mode is not False
    model.checkpoint_offload = mode == "unsloth"
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    hidden = model(ids)
    loss, n = cross_entropy_sum(model.logits, hidden[:, :-1], ids[:, 1:], model.config.vocab_size)
    (loss / n).backward()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    grads = {k: p.grad.float().clone() for k, p in model.named_parameters() if p.requires_grad}
    return (loss / n).item(), grads, torch.cuda.max_memory_allocated() / 2**30, elapsed


def main() -> None:
    ids = torch.randint(0, 151936, (4, 1024), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    rows = []
    for four_bit in (False, True):
        model = build(four_bit)
        step(model, ids, False)  # warm-up
        results = {mode: step(model, ids, mode) for mode in (False, True, "unsloth")}
        base_loss, base_grads = results[False][0], results[False][1]
        for mode, (loss, grads, mem, secs) in results.items():
            worst = max(((g - base_grads[k]).norm() / base_grads[k].norm().clamp_min(1e-12)).item()
                        for k, g in grads.items())
            rows.append((("nf4" if four_bit else "bf16"), str(mode), loss, abs(loss - base_loss), worst, mem, secs))
        del model
        torch.cuda.empty_cache()
    print(f"{'base':5} {'checkpointing':13} {'loss':>8} {'|dloss|':>9} {'max rel dgrad':>13} {'peak GiB':>9} {'step s':>7}")
    for base, mode, loss, dloss, dgrad, mem, secs in rows:
        print(f"{base:5} {mode:13} {loss:8.4f} {dloss:9.2e} {dgrad:13.2e} {mem:9.2f} {secs:7.3f}")
    bad = [r for r in rows if r[3] > 1e-3 or r[4] > 2e-2]
    print("OK" if not bad else f"MISMATCH: {bad}")


if __name__ == "__main__":
    main()
