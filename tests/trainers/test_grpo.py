"""GRPOTrainer: packed log-probs, one step against transformers + PEFT, learning, resume, bad inputs."""

import itertools
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from gazelle.errors import GazelleError
from gazelle.trainers.grpo import GRPOConfig, GRPOTrainer
from tests.lora import (  # one_thread: an autouse fixture, used by being imported
    copy_lora_into_peft,
    model_pair,
    one_thread,  # noqa: F401
    peft_config,
    peft_named,
    randomize_lora,
)
from tests.trainers.helpers import word_tokenizer


class FixedEngine:
    """Stands in for the generation engine: returns given completions, records what it was asked."""

    def __init__(self, completions):
        self.completions, self.calls = completions, []

    def generate(self, prompts, max_new_tokens, params, n=1, eos_token_ids=(), seed=None, **_):
        self.calls.append((prompts, n, seed))
        return [list(c) for c in self.completions[: len(prompts) * n]]


def lora_model(family="llama", seed=0):
    from gazelle import FastLanguageModel

    hf, model = model_pair(family, seed)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora(model)
    return hf, model


def rows_and_completions():
    """Two prompts of different lengths (word ids 3..255) and three completions each, some ending in EOS (2)."""
    rows = [{"prompt": "w10 w11 w12 w13 w14", "score": [0.0, 1.0, 0.5]},
            {"prompt": "w20 w21", "score": [2.0, 2.0, -1.0]}]
    completions = [[30, 31, 2], [32, 33, 34, 35], [36], [40, 41, 42, 43, 44, 2], [45, 2], [46, 47]]
    return rows, completions


def given_scores(completions, score, **_):
    """Reward = the row's listed score for the k-th completion of its group."""
    return [float(s[k % 3]) for k, s in enumerate(score)]


def config(tmp_path, **overrides):
    fields = dict(output_dir=str(tmp_path), num_generations=3, per_device_train_batch_size=3,
                  gradient_accumulation_steps=2, max_steps=1, learning_rate=1e-3, save_strategy="no", seed=1,
                  disable_tqdm=True, max_completion_length=8, temperature=0.7)
    return GRPOConfig(**{**fields, **overrides})


def trainer_with(model, tmp_path, completions, rows=None, rewards=(given_scores,), **overrides):
    rows = rows or rows_and_completions()[0]
    trainer = GRPOTrainer(model, list(rewards), args=config(tmp_path, **overrides), train_dataset=rows,
                          processing_class=word_tokenizer())
    model._engine = FixedEngine(completions)
    return trainer


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "qwen2"])
def test_packed_log_probs_equal_one_row_per_completion(family, tmp_path):
    """Prompt once + its completions in one row (tree mask) gives each completion's log-probs as if run alone."""
    _, model = lora_model(family)
    rows, completions = rows_and_completions()
    trainer = trainer_with(model, tmp_path, completions, shuffle_dataset=False, per_device_train_batch_size=6,
                           gradient_accumulation_steps=1)
    batch = next(trainer.batches(0))
    packed = trainer._log_probs(model, batch)
    tok = word_tokenizer()
    for j, i in enumerate(batch["completion_index"].tolist()):
        c, prompt = completions[i], tok(rows[i // 3]["prompt"])["input_ids"]
        ids = torch.tensor([prompt + c])
        logits = model.logits(model(ids))[0, len(prompt) - 1 : -1].double() / 0.7
        expected = logits.log_softmax(-1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        torch.testing.assert_close(packed[j, : len(c)].double(), expected, atol=2e-5, rtol=0)
        assert (packed[j, len(c):] == 0).all()
    assert batch["input_ids"].shape[0] == 2  # two prompts: two packed rows for six completions


def reference_step(hf, model, rows, completions, loss_type, beta, temperature=0.7):
    """The GRPO loss and adapter gradient written out independently on transformers + PEFT, one row per completion."""
    import peft

    peft_model = peft.get_peft_model(hf, peft_config(model.lora_config))
    copy_lora_into_peft(model, peft_model)
    tok = word_tokenizer()
    rewards = torch.tensor([float(r["score"][k]) for r in rows for k in range(3)], dtype=torch.float64)
    groups = rewards.view(2, 3)
    adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).reshape(-1)
    terms, lengths = [], []
    for j, c in enumerate(completions):
        ids = torch.tensor([tok(rows[j // 3]["prompt"])["input_ids"] + c])
        P = ids.shape[1] - len(c)
        logits = peft_model(ids).logits[0, P - 1 : -1].double() / temperature
        logp = logits.log_softmax(-1).gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
        per_token = -torch.exp(logp - logp.detach()) * adv[j]
        if beta:
            with peft_model.disable_adapter():
                ref = (peft_model(ids).logits[0, P - 1 : -1].double() / temperature).log_softmax(-1)
                ref = ref.gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
            per_token = per_token + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
        terms.append(per_token)
        lengths.append(len(c))
    if loss_type == "dapo":
        loss = sum(t.sum() for t in terms) / sum(lengths)
    else:  # grpo: the mean over completions of each one's token mean
        loss = sum(t.mean() for t in terms) / len(terms)
    loss.backward()
    grads = {n: p.grad for n, p in peft_named(peft_model).items() if p.grad is not None}
    return loss.item(), grads


@pytest.mark.parametrize("loss_type,beta,iterations", [("dapo", 0.0, 1), ("grpo", 0.04, 2)])
def test_one_step_equals_transformers_peft_reference(loss_type, beta, iterations, tmp_path):
    hf, model = lora_model("llama")
    rows, completions = rows_and_completions()
    trainer = trainer_with(model, tmp_path, completions, loss_type=loss_type, beta=beta, num_iterations=iterations,
                           shuffle_dataset=False)
    model.train()
    micro = list(itertools.islice(trainer.batches(0), 2))  # one optimizer step: two micro-batches of 3
    normalizer = trainer.step_normalizer(micro)
    loss = sum(trainer.loss(b)[0] for b in micro) / normalizer
    loss.backward()
    expected_loss, expected_grads = reference_step(hf, model, rows, completions, loss_type, beta)
    assert abs(loss.item() - expected_loss) < 1e-4
    checked = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad.double(), expected_grads[name].double(), atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked == 2 * 7 * 3  # A and B of 7 projections in 3 layers
    assert torch.stack([g.norm() for g in expected_grads.values()]).norm() > 1e-2  # a gradient worth comparing


def test_rollout_seeds_and_columns_reach_rewards(tmp_path):
    _, model = lora_model()
    seen = {}

    def spy(prompts, completions, completion_ids, score, **rest):
        seen.update(prompts=prompts, completions=completions, ids=completion_ids, score=score, rest=rest)
        return [0.0] * len(completions)

    rows, completions = rows_and_completions()
    trainer = trainer_with(model, tmp_path, completions, rewards=(spy,), shuffle_dataset=False)
    next(trainer.batches(0))
    assert seen["prompts"] == [rows[0]["prompt"]] * 3 + [rows[1]["prompt"]] * 3
    assert seen["ids"] == completions
    assert seen["completions"][0] == "w30 w31" and seen["score"][3] == rows[1]["score"]
    seeds = [call[2] for call in model._engine.calls]
    next(trainer.batches(0))
    assert [call[2] for call in model._engine.calls][-1] == seeds[0]  # a rollout's seed depends on its position only


# -- bad inputs --------------------------------------------------------------------------------------------------
def raises_on_second(completions, **_):
    if any("w45" in c for c in completions):
        raise ValueError("cannot parse")
    return [1.0] * len(completions)


def wrong_length(completions, **_):
    return [1.0]


def nan_on_fourth(completions, **_):
    return [float("nan") if i == 4 else 0.0 for i in range(len(completions))]


@pytest.mark.parametrize("fn,words", [
    (raises_on_second, ["raises_on_second", "ValueError", "cannot parse", "completion 4", "train row 1"]),
    (wrong_length, ["wrong_length", "returned 1 values for 6 completions"]),
    (nan_on_fourth, ["nan_on_fourth", "NaN", "completion 4", "train row 1"]),
])
def test_bad_reward_functions_stop_with_their_name_and_row(fn, words, tmp_path):
    _, model = lora_model()
    trainer = trainer_with(model, tmp_path, rows_and_completions()[1], rewards=(fn,), shuffle_dataset=False,
                           per_device_train_batch_size=6, gradient_accumulation_steps=1)
    with pytest.raises(GazelleError) as error:
        next(trainer.batches(0))
    for word in words:
        assert word in str(error.value)


def test_reward_errors_none_scores_failing_rows_none_and_counts_them(tmp_path):
    _, model = lora_model()
    trainer = trainer_with(model, tmp_path, rows_and_completions()[1], rewards=(raises_on_second, given_scores),
                           shuffle_dataset=False, per_device_train_batch_size=6, gradient_accumulation_steps=1,
                           reward_errors="none")
    next(trainer.batches(0))
    extras = trainer.log_extras()
    assert extras["reward_failures"] == {"raises_on_second": 1}
    assert extras["rewards/raises_on_second/mean"] == 1.0  # the five rows that succeeded


def test_bad_datasets_and_configs(tmp_path):
    _, model = lora_model()
    tok = word_tokenizer()
    with pytest.raises(GazelleError, match="no 'prompt' column.*question"):
        GRPOTrainer(model, [given_scores], args=config(tmp_path), train_dataset=[{"question": "w3"}],
                    processing_class=tok)
    with pytest.raises(GazelleError, match="not divisible by num_generations=4"):
        GRPOConfig(num_generations=4, per_device_train_batch_size=6)
    with pytest.raises(GazelleError, match="loss_type 'ppo' is not one of grpo, bnpo, dr_grpo, dapo"):
        GRPOConfig(loss_type="ppo")
    rows, completions = rows_and_completions()
    trainer = trainer_with(model, tmp_path, completions, max_prompt_length=3, overlong_prompts="error",
                           shuffle_dataset=False)
    with pytest.raises(GazelleError, match="train row 0: the prompt has 5 tokens, more than max_prompt_length=3"):
        next(trainer.batches(0))


def test_long_prompts_are_truncated_from_the_left_and_counted(tmp_path, capfd):
    _, model = lora_model()
    rows, completions = rows_and_completions()
    trainer = trainer_with(model, tmp_path, completions, max_prompt_length=3, shuffle_dataset=False,
                           per_device_train_batch_size=6, gradient_accumulation_steps=1)
    next(trainer.batches(0))
    prompts = model._engine.calls[0][0]
    assert prompts[0] == word_tokenizer()("w12 w13 w14")["input_ids"] and len(prompts[1]) == 2
    assert "1 of 2 prompts were longer than max_prompt_length=3" in capfd.readouterr().err


def test_unsloth_batch_size_one_means_one_group():
    args = GRPOConfig(per_device_train_batch_size=1, num_generations=6)
    assert args.per_device_train_batch_size == 6 and args.generation_batch_size == 6


# -- training on the real engine -------------------------------------------------------------------------------
def low_ids(completion_ids, **_):
    """The share of completion tokens from the lower half of the vocabulary: about 0.5 for a random model."""
    return [sum(t < 128 for t in ids) / len(ids) for ids in completion_ids]


def word_rows(n=8):
    return [{"prompt": " ".join(f"w{10 + (i * 7 + k) % 200}" for k in range(3 + i % 4))} for i in range(n)]


def test_grpo_raises_the_reward_it_is_given(tmp_path):
    _, model = lora_model()
    args = config(tmp_path, num_generations=8, per_device_train_batch_size=16, gradient_accumulation_steps=1,
                  max_steps=30, learning_rate=0.1, temperature=1.0, max_completion_length=6, logging_steps=1)
    trainer = GRPOTrainer(model, [low_ids], args=args, train_dataset=word_rows(), processing_class=word_tokenizer())
    trainer.train()
    rewards = [h["reward"] for h in trainer.reward_history]
    assert len(rewards) == 30
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert 0.35 < first < 0.65 and last > first + 0.25, rewards
    assert os.path.isfile(tmp_path / "reward.png")


KILLED_GRPO = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    import torch
    torch.set_num_threads(1)
    from gazelle.trainers.grpo import GRPOConfig, GRPOTrainer
    from tests.trainers.test_grpo import lora_model, low_ids, word_rows, word_tokenizer

    class KillDuringStep:
        def on_step_begin(self, trainer):
            if trainer.global_step == 5:  # step 6 is starting; the last checkpoint is step 4
                os.kill(os.getpid(), signal.SIGKILL)

    callbacks = [KillDuringStep()] if {kill} else []
    args = GRPOConfig(output_dir=sys.argv[1], max_steps=8, save_steps=2, learning_rate=1e-2, seed=5,
                      num_generations=4, per_device_train_batch_size=8, max_completion_length=5, disable_tqdm=True)
    trainer = GRPOTrainer(lora_model()[1], [low_ids], args=args, train_dataset=word_rows(6),
                          processing_class=word_tokenizer(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=True)
""")


def run_grpo(output_dir, kill: bool) -> subprocess.CompletedProcess:
    script = KILLED_GRPO.format(root=os.getcwd(), kill=kill)
    return subprocess.run([sys.executable, "-c", script, str(output_dir)], capture_output=True, text=True, timeout=300)


def test_resume_after_sigkill_restores_adapter_optimizer_data_and_metrics(tmp_path):
    straight = run_grpo(tmp_path / "straight", kill=False)
    assert straight.returncode == 0, straight.stderr
    killed = run_grpo(tmp_path / "killed", kill=True)
    assert killed.returncode == -signal.SIGKILL
    steps = [json.loads(line)["step"] for line in open(tmp_path / "killed" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4, 5]  # step 5 was logged, but its checkpoint never written
    resumed = run_grpo(tmp_path / "killed", kill=False)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "checkpoint-4" in resumed.stderr
    records = {name: [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
               for name in ("straight", "killed")}
    assert [r["step"] for r in records["killed"]] == list(range(1, 9))  # the stream continues from step 4
    for a, b in zip(records["straight"], records["killed"]):
        assert a["reward"] == b["reward"] and a["loss"] == b["loss"]  # same prompts, samples and updates
    final_a = load_file(tmp_path / "straight" / "checkpoint-8" / "adapter_model.safetensors")
    final_b = load_file(tmp_path / "killed" / "checkpoint-8" / "adapter_model.safetensors")
    assert final_a.keys() == final_b.keys() and len(final_a) == 2 * 7 * 3
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), f"{name} differs after resume"


def test_an_epoch_visits_every_prompt_once_per_group(tmp_path):
    _, model = lora_model()
    seen = []

    def spy(prompts, completions, **_):
        seen.extend(prompts)
        return [0.0] * len(completions)

    rows = word_rows(7)  # 7 prompts, 2 per rollout: the last rollout holds one
    args = config(tmp_path, num_generations=3, per_device_train_batch_size=6, gradient_accumulation_steps=1,
                  max_completion_length=3)
    trainer = GRPOTrainer(model, [spy], args=args, train_dataset=rows, processing_class=word_tokenizer())
    batches = list(trainer.batches(0))
    assert sorted(seen) == sorted(r["prompt"] for r in rows for _ in range(3))
    assert len(batches) == trainer.num_batches() == 4


def test_async_reward_functions_are_awaited_together(tmp_path):
    import asyncio
    import time

    async def slow_ones(completions, **_):
        await asyncio.sleep(0.4)
        return [1.0] * len(completions)

    async def slow_twos(completions, **_):
        await asyncio.sleep(0.4)
        return [2.0] * len(completions)

    _, model = lora_model()
    trainer = trainer_with(model, tmp_path, rows_and_completions()[1], rewards=(slow_ones, slow_twos, given_scores),
                           shuffle_dataset=False, per_device_train_batch_size=6, gradient_accumulation_steps=1)
    started = time.perf_counter()
    next(trainer.batches(0))
    assert time.perf_counter() - started < 0.75  # 0.4 s each, awaited at once
    extras = trainer.log_extras()
    assert extras["rewards/slow_ones/mean"] == 1.0 and extras["rewards/slow_twos/mean"] == 2.0
    assert abs(extras["reward"] - (3.0 + sum([0.0, 1.0, 0.5, 2.0, 2.0, -1.0]) / 6)) < 1e-6


def test_reward_weights_scale_each_function_in_the_total(tmp_path):
    def ones(completions, **_):
        return [1.0] * len(completions)

    _, model = lora_model()
    trainer = trainer_with(model, tmp_path, rows_and_completions()[1], rewards=(ones, given_scores),
                           shuffle_dataset=False, per_device_train_batch_size=6, gradient_accumulation_steps=1,
                           reward_weights=[0.5, 2.0])
    next(trainer.batches(0))
    expected = 0.5 + 2.0 * sum([0.0, 1.0, 0.5, 2.0, 2.0, -1.0]) / 6
    assert abs(trainer.log_extras()["reward"] - expected) < 1e-6
    with pytest.raises(GazelleError, match="reward_weights has 1 values for 2 reward functions"):
        trainer_with(model, tmp_path, [], rewards=(ones, given_scores), reward_weights=[1.0])


def test_full_fine_tuning_with_beta_keeps_a_frozen_reference(tmp_path):
    _, model = model_pair("llama")
    model.requires_grad_(True)
    rows, completions = rows_and_completions()
    trainer = trainer_with(model, tmp_path, completions, beta=0.1, shuffle_dataset=False,
                           per_device_train_batch_size=6, gradient_accumulation_steps=1, max_steps=1,
                           learning_rate=1e-2)
    assert trainer.ref_model is not None and not any(p.requires_grad for p in trainer.ref_model.parameters())
    before = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    trainer.train()
    moved = any(not torch.equal(p, trainer.ref_model.get_parameter(n)) for n, p in model.named_parameters())
    assert moved and all(torch.equal(before[n], p) for n, p in trainer.ref_model.named_parameters())
    assert trainer.metrics[-1]["kl"] >= 0.0 and "kl" in trainer.reward_history[-1]
