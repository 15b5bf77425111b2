"""Unsloth's Qwen2.5 GRPO notebook pattern with only the imports changed (2 steps on the CPU, SmolLM2).

Marked lines differ for this machine: the embedded SmolLM2 GGUF instead of a hub id, a small local GSM8K-format
file instead of the hub dataset, and step counts and lengths cut to fit a CPU test.
"""

import json

# --- the notebook's imports, changed to gazelle -----------------------------------------------
from gazelle import FastLanguageModel, GRPOConfig, GRPOTrainer, PatchFastRL, SamplingParams, is_bfloat16_supported
from gazelle.models.builtin import smollm2_gguf_path
from gazelle.rewards.gsm8k import (
    SYSTEM_PROMPT,
    correctness_reward_func,
    int_reward_func,
    soft_format_reward_func,
    strict_format_reward_func,
    xmlcount_reward_func,
)

PatchFastRL("GRPO", FastLanguageModel)

QUESTIONS = [
    ("Tom has 3 apples and buys 4 more. How many apples does he have?", "Tom has 3 + 4 = 7.\n#### 7"),
    ("A box holds 6 eggs. How many eggs are in 2 boxes?", "2 * 6 = 12.\n#### 12"),
    ("Sara had 10 pens and gave away 3. How many are left?", "10 - 3 = 7.\n#### 7"),
]


def extract_hash_answer(text):
    return text.split("####")[1].strip() if "####" in text else None


def test_grpo_notebook_pattern(tmp_path):
    from datasets import load_dataset

    data_file = tmp_path / "gsm8k.jsonl"  # changed: a local file instead of openai/gsm8k
    data_file.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in QUESTIONS))

    max_seq_length = 512
    lora_rank = 8
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=smollm2_gguf_path(),  # changed: no hub here
        max_seq_length=max_seq_length,
        load_in_4bit=False,
        fast_inference=True,
        max_lora_rank=lora_rank,
        gpu_memory_utilization=0.6,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=lora_rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=lora_rank,
        use_gradient_checkpointing="unsloth",
        random_state=3407,
    )

    data = load_dataset("json", data_files=str(data_file))["train"]  # changed: the local file
    dataset = data.map(lambda x: {
        "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": x["question"]}],
        "answer": extract_hash_answer(x["answer"]),
    })

    training_args = GRPOConfig(
        use_vllm=True,
        learning_rate=5e-6,
        adam_beta1=0.9,
        adam_beta2=0.99,
        weight_decay=0.1,
        warmup_ratio=0.1,
        lr_scheduler_type="cosine",
        optim="paged_adamw_8bit",
        logging_steps=1,
        bf16=is_bfloat16_supported(),
        fp16=not is_bfloat16_supported(),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        num_generations=4,  # changed from 6: CPU time
        max_prompt_length=256,
        max_completion_length=24,  # changed from 200: CPU time
        max_steps=2,  # changed from 250
        save_steps=250,
        max_grad_norm=0.1,
        report_to="none",
        output_dir=str(tmp_path / "outputs"),
    )
    trainer = GRPOTrainer(
        model=model,
        processing_class=tokenizer,
        reward_funcs=[xmlcount_reward_func, soft_format_reward_func, strict_format_reward_func, int_reward_func,
                      correctness_reward_func],
        args=training_args,
        train_dataset=dataset,
    )
    trainer.train()

    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                         add_generation_prompt=True)
    sampling_params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=16)
    output = model.fast_generate([text], sampling_params=sampling_params, lora_request=None)[0].outputs[0].text

    model.save_lora(str(tmp_path / "grpo_saved_lora"))
    text = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM_PROMPT},
                                          {"role": "user", "content": "What is 2+2?"}],
                                         tokenize=False, add_generation_prompt=True)
    output = model.fast_generate(text, sampling_params=sampling_params,
                                 lora_request=model.load_lora(str(tmp_path / "grpo_saved_lora")))[0].outputs[0].text
    # --- end of the notebook's code ---------------------------------------------------------

    assert isinstance(output, str) and output
    records = [json.loads(line) for line in open(tmp_path / "outputs" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2]
    for name in ("xmlcount_reward_func", "correctness_reward_func"):
        assert f"rewards/{name}/mean" in records[0]
    assert trainer.args.per_device_train_batch_size == 4  # batch 1 means one prompt's group, as in Unsloth
    # The saved adapter is the live one: greedy output with it equals greedy output on the live weights.
    greedy = SamplingParams(temperature=0, max_tokens=12)
    live = model.fast_generate(text, sampling_params=greedy)[0]
    saved = model.fast_generate(text, sampling_params=greedy,
                                lora_request=model.load_lora(str(tmp_path / "grpo_saved_lora")))[0]
    assert live == saved
