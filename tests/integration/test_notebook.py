"""Unsloth's Alpaca notebook, cell by cell, with only the imports changed (and 5 steps on the CPU).

Two lines differ from the notebook for this machine and are marked: the model is the embedded
SmolLM2 GGUF instead of a hub id, and tensors go to `model.device` rather than "cuda".
"""

import torch

# --- the notebook's imports, changed to gazelle -----------------------------------------------
from gazelle import FastLanguageModel, SFTTrainer, TrainingArguments, is_bfloat16_supported
from gazelle.models.builtin import smollm2_gguf_path


def test_alpaca_notebook_pattern(tmp_path):
    from datasets import Dataset

    max_seq_length = 2048
    dtype = None
    load_in_4bit = False  # the notebook uses True on a GPU; QLoRA on the CPU is exercised by tests/quant

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=smollm2_gguf_path(),  # changed: no hub here
        max_seq_length=max_seq_length,
        dtype=dtype,
        load_in_4bit=load_in_4bit,
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_alpha=16,
        lora_dropout=0,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=3407,
        use_rslora=False,
        loftq_config=None,
    )

    alpaca_prompt = """Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.

### Instruction:
{}

### Input:
{}

### Response:
{}"""

    EOS_TOKEN = tokenizer.eos_token

    def formatting_prompts_func(examples):
        instructions = examples["instruction"]
        inputs = examples["input"]
        outputs = examples["output"]
        texts = []
        for instruction, input, output in zip(instructions, inputs, outputs):
            text = alpaca_prompt.format(instruction, input, output) + EOS_TOKEN
            texts.append(text)
        return {"text": texts}

    dataset = Dataset.from_list([  # changed: a local stand-in for load_dataset("yahma/alpaca-cleaned")
        {"instruction": "Add the numbers.", "input": f"{a} and {b}", "output": f"{a + b}"}
        for a, b in [(2, 3), (10, 5), (7, 8), (1, 1), (4, 9), (6, 6), (12, 30), (3, 14)]
    ])
    dataset = dataset.map(formatting_prompts_func, batched=True)

    trainer = SFTTrainer(
        model=model,
        tokenizer=tokenizer,
        train_dataset=dataset,
        dataset_text_field="text",
        max_seq_length=max_seq_length,
        dataset_num_proc=2,
        packing=False,
        args=TrainingArguments(
            per_device_train_batch_size=2,
            gradient_accumulation_steps=4,
            warmup_steps=5,
            max_steps=5,  # the notebook runs 60
            learning_rate=2e-4,
            fp16=not is_bfloat16_supported(),
            bf16=is_bfloat16_supported(),
            logging_steps=1,
            optim="adamw_8bit",
            weight_decay=0.01,
            lr_scheduler_type="linear",
            seed=3407,
            output_dir=str(tmp_path / "outputs"),
            report_to="none",
        ),
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer_stats = trainer.train()
    assert trainer_stats.metrics["train_runtime"] > 0
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)

    FastLanguageModel.for_inference(model)
    inputs = tokenizer(
        [alpaca_prompt.format("Continue the fibonnaci sequence.", "1, 1, 2, 3, 5, 8", "")], return_tensors="pt"
    ).to(model.device)  # changed: "cuda" in the notebook
    outputs = model.generate(**inputs, max_new_tokens=16, use_cache=True)
    first = tokenizer.batch_decode(outputs)

    model.save_pretrained(str(tmp_path / "lora_model"))
    tokenizer.save_pretrained(str(tmp_path / "lora_model"))

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=str(tmp_path / "lora_model"),
        max_seq_length=max_seq_length,
        dtype=dtype,
        load_in_4bit=load_in_4bit,
    )
    FastLanguageModel.for_inference(model)
    inputs = tokenizer(
        [alpaca_prompt.format("Continue the fibonnaci sequence.", "1, 1, 2, 3, 5, 8", "")], return_tensors="pt"
    ).to(model.device)
    outputs = model.generate(**inputs, max_new_tokens=16, use_cache=True)
    assert tokenizer.batch_decode(outputs) == first, "the reloaded adapter generates differently"
