"""SmolLM2 learns twenty made-up facts with LoRA r=16 within the CPU budget (5 minutes of training)."""

import time

import torch

from gazelle import FastLanguageModel, SFTConfig, SFTTrainer
from gazelle.chat_templates import train_on_responses_only
from tests.integration.facts import FACTS, KEYWORDS, conversations


def facts_known(model, tokenizer) -> tuple[int, list[str]]:
    FastLanguageModel.for_inference(model)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q, _ in FACTS]
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = model.generate(**batch, max_new_tokens=24)
    answers = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return sum(k.lower() in a.lower() for k, a in zip(KEYWORDS, answers)), answers


def test_lora_learns_made_up_facts(smollm2_gguf, tmp_path):
    model, tokenizer = FastLanguageModel.from_pretrained(smollm2_gguf, max_seq_length=256)
    known_before, _ = facts_known(model, tokenizer)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, use_gradient_checkpointing=False)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=36, per_device_train_batch_size=4, learning_rate=2e-3,
                     warmup_steps=3, logging_steps=6, save_strategy="no", disable_tqdm=True)
    trainer = SFTTrainer(model, tokenizer, conversations(), args)
    train_on_responses_only(trainer, "<|im_start|>user\n", "<|im_start|>assistant\n")
    started = time.perf_counter()
    trainer.train()
    minutes = (time.perf_counter() - started) / 60
    known_after, answers = facts_known(model, tokenizer)
    first, last = trainer.metrics[0]["loss"], trainer.metrics[-1]["loss"]
    print(f"known before {known_before}/20, after {known_after}/20; loss {first:.3f} -> {last:.4f}; "
          f"{minutes:.1f} min of training")
    assert minutes <= 5
    assert last <= first / 2
    assert known_before <= 2
    assert known_after >= 15, answers
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "metrics.jsonl").exists()
    assert torch.isfinite(torch.tensor([m["loss"] for m in trainer.metrics])).all()
