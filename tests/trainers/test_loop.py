"""Loop mechanics: schedules, optimizer groups, checkpoint pruning, and the NaN stop."""

import math
import os

import pytest
import torch

from gazelle.errors import GazelleError
from gazelle.trainers.config import TrainingArguments
from gazelle.trainers.loop import make_optimizer, make_scheduler
from gazelle.trainers.sft import SFTTrainer
from tests.trainers.helpers import text_rows, word_tokenizer
from tests.trainers.test_sft import config, lora_model


def lrs(kind: str, warmup: int, total: int = 10) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = make_scheduler(optimizer, TrainingArguments(lr_scheduler_type=kind, warmup_steps=warmup,
                                                            learning_rate=1.0), total)
    rates = []
    for _ in range(total):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def test_schedules():
    assert lrs("constant", 0) == [1.0] * 10
    assert lrs("constant_with_warmup", 3)[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    linear = lrs("linear", 2)
    assert linear[:2] == pytest.approx([1 / 3, 2 / 3]) and linear[2] == 1.0
    assert linear[2:] == pytest.approx([1 - i / 8 for i in range(8)])
    cosine = lrs("cosine", 0)
    assert cosine == pytest.approx([0.5 * (1 + math.cos(math.pi * i / 10)) for i in range(10)])


def test_embedding_learning_rate_gets_its_own_group():
    from gazelle import FastLanguageModel
    from tests.models.test_packing import gazelle_model

    model = FastLanguageModel.get_peft_model(gazelle_model("llama"), r=4,
                                             target_modules=["q_proj", "embed_tokens", "lm_head"])
    optimizer = make_optimizer(model, TrainingArguments(learning_rate=1e-4, embedding_learning_rate=1e-5))
    by_param = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            expected = 1e-5 if ("embed_tokens" in name or "lm_head" in name) else 1e-4
            assert by_param[id(p)] == expected, name


def test_save_total_limit_keeps_the_newest(tmp_path):
    trainer = SFTTrainer(lora_model(), word_tokenizer(), text_rows(8),
                         config(tmp_path, max_steps=5, save_strategy="steps", save_steps=1, save_total_limit=2))
    trainer.train()
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith("checkpoint")) == ["checkpoint-4", "checkpoint-5"]


def test_nan_loss_stops_with_a_checkpoint(tmp_path):
    class Poison:
        def on_step_begin(self, trainer):
            if trainer.global_step == 2:
                with torch.no_grad():
                    next(p for n, p in trainer.model.named_parameters() if "lora_B" in n).fill_(float("nan"))

    trainer = SFTTrainer(lora_model(), word_tokenizer(), text_rows(8), config(tmp_path, max_steps=5),
                         callbacks=[Poison()])
    with pytest.raises(GazelleError, match=r"loss became nan at step 3; the state before it is saved in .*checkpoint-2"):
        trainer.train()
    assert os.path.isfile(tmp_path / "checkpoint-2" / "adapter_model.safetensors")
