"""gazelle grpo [CONFIG.yaml] [section.field=value ...]: GRPO with built-in or file-based tasks and rewards.

Without a config file the built-in demo runs: SmolLM2-135M-Instruct learns two-digit additions in the
<think>/<answer> format, with a held-out evaluation before and after, a reward plot, and the adapter saved
under ./gazelle-grpo-demo/.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field

from gazelle.cli.config import section, to_yaml
from gazelle.cli.sft import LoraSection, ModelSection, load_with_lora, read_config
from gazelle.errors import GazelleError
from gazelle.trainers.grpo import GRPOConfig

HELP = "reinforcement learning with GRPO (no config: the built-in demo)"


@dataclass
class TaskSection:
    name: str = "arithmetic"
    """A built-in task (arithmetic, countdown, gsm8k), or empty with `path` set."""
    path: str | None = None
    """A local GSM8K-format file (.jsonl/.json/.parquet with question and "#### n" answers) for task gsm8k, or
    any .jsonl/.json/.csv/.parquet file with a prompt column (and the columns its rewards read)."""
    train_size: int = 256
    """Rows generated (built-in tasks) or read (files; 0 = all) for training."""
    eval_size: int = 48
    """Held-out rows scored greedily before and after training (0 = no evaluation)."""
    options: dict = field(default_factory=lambda: {"digits": 2, "operations": ["+"], "few_shot": 1})
    """Arguments of the built-in task (arithmetic: digits, operations, operands, few_shot; countdown:
    num_count, max_number, few_shot)."""
    rewards: list[str] = field(default_factory=list)
    """Reward function names (gazelle.rewards.get_reward); empty: the task's own set."""


@dataclass
class GRPORunConfig:
    model: ModelSection = section(ModelSection, max_seq_length=512)
    lora: LoraSection = section(LoraSection, r=16, lora_alpha=32, use_gradient_checkpointing=False)
    task: TaskSection = field(default_factory=TaskSection)
    train: GRPOConfig = section(
        GRPOConfig, output_dir="gazelle-grpo-demo", learning_rate=1e-4, max_steps=18, num_generations=8,
        per_device_train_batch_size=32, max_completion_length=40, max_prompt_length=256, temperature=1.0,
        logging_steps=1, save_steps=5, save_total_limit=1, log_completions=True, num_completions_to_print=1,
        lr_scheduler_type="constant", seed=3407)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default=None, help="YAML config (sections: model, lora, task, train)")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.max_steps=30")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in train.output_dir")


def task_rows(cfg: TaskSection) -> tuple[list[dict], list[dict] | None, list]:
    """(train rows, held-out rows or None, reward functions)."""
    from gazelle.rewards import get_reward
    from gazelle.tasks import get_task, task_rewards

    rewards = [get_reward(name) for name in cfg.rewards] or None
    if cfg.path and cfg.name != "gsm8k":
        from gazelle.data.formats import load_dataset_file

        rows = [dict(r) for r in load_dataset_file(cfg.path)]
        if not rows:
            raise GazelleError(f"{cfg.path} holds no rows")
        if rewards is None:
            raise GazelleError("task.rewards is empty: name the reward functions for a dataset file "
                               "(e.g. [think_format, answer_correctness])")
        held = rows[-cfg.eval_size:] if cfg.eval_size else None
        train = rows[: len(rows) - cfg.eval_size] if cfg.eval_size else rows
        return train[: cfg.train_size or None], held, rewards
    if cfg.name == "gsm8k":
        if not cfg.path:
            raise GazelleError("task gsm8k needs task.path: a local GSM8K-format .jsonl or .parquet file")
        rows = get_task("gsm8k", path=cfg.path, **cfg.options)
        held = rows[-cfg.eval_size:] if cfg.eval_size else None
        train = rows[: len(rows) - cfg.eval_size] if cfg.eval_size else rows
        return train[: cfg.train_size or None], held, rewards or task_rewards("gsm8k")
    train = get_task(cfg.name, n=cfg.train_size, split="train", **cfg.options)
    held = get_task(cfg.name, n=cfg.eval_size, split="eval", **cfg.options) if cfg.eval_size else None
    return train, held, rewards or task_rewards(cfg.name)


def _score_line(record: dict) -> str:
    return "  ".join(f"{k.removeprefix('eval_rewards/')} {v:.2f}" for k, v in record.items()
                     if k.startswith("eval_rewards/"))


def run(args: argparse.Namespace) -> None:
    from gazelle.trainers.grpo import GRPOTrainer

    started = time.perf_counter()
    cfg = read_config(GRPORunConfig, args)
    train_rows, held_out, rewards = task_rows(cfg.task)
    model, tokenizer = load_with_lora(cfg.model, cfg.lora)
    train_args = cfg.train
    trainer = GRPOTrainer(model, rewards, args=train_args, train_dataset=train_rows, eval_dataset=held_out,
                          processing_class=tokenizer)
    os.makedirs(train_args.output_dir, exist_ok=True)
    with open(os.path.join(train_args.output_dir, "run.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    before = trainer.evaluate() if held_out else {}
    if before:
        print(f"held-out before training ({len(held_out)} rows, greedy): {_score_line(before)}", flush=True)
    trainer.train(resume_from_checkpoint=args.resume)
    after = trainer.evaluate() if held_out else {}
    model.save_pretrained(train_args.output_dir, tokenizer=tokenizer)
    summary(trainer, before, after, train_args.output_dir, time.perf_counter() - started)


def summary(trainer, before: dict, after: dict, output_dir: str, seconds: float) -> None:
    """The learning check, printed: reward over the first and last quarter of steps, held-out before and after."""
    history = [h for h in trainer.reward_history if "reward" in h]
    if history:
        quarter = max(1, len(history) // 4)
        first = sum(h["reward"] for h in history[:quarter]) / quarter
        last = sum(h["reward"] for h in history[-quarter:]) / quarter
        print(f"mean reward per completion: first {quarter} steps {first:.3f}  ->  last {quarter} steps {last:.3f}")
    if before and after:
        print(f"held-out, greedy: before {_score_line(before)}  |  after {_score_line(after)}")
    print(f"plot: {os.path.join(output_dir, 'reward.png')}  adapter: {output_dir}  ({seconds / 60:.1f} min)")
