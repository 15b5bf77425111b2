"""gazelle grpo: a dataset file with named rewards, overrides on top of the demo's defaults, the summary printed."""

import json
import os
import subprocess
import sys

import yaml

from tests.tiny import tiny_hf_model
from tests.trainers.helpers import word_tokenizer


def test_grpo_from_a_dataset_file_keeps_the_demo_defaults_it_does_not_override(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "model")
    with open(tmp_path / "data.jsonl", "w") as f:
        for i in range(10):
            f.write(json.dumps({"prompt": f"w{10 + i} w{20 + i} w{30 + i}", "answer": str(i)}) + "\n")
    out = subprocess.run(
        [sys.executable, "-m", "gazelle.cli.main", "grpo", f"model.name={tmp_path / 'model'}",
         f"task.path={tmp_path / 'data.jsonl'}", "task.rewards=[answer_tag, answer_correctness]", "task.eval_size=2",
         f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.num_generations=4",
         "train.per_device_train_batch_size=8", "train.max_completion_length=4", "train.disable_tqdm=true"],
        capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())
    assert resolved["train"]["max_steps"] == 2 and resolved["train"]["learning_rate"] == 1e-4  # the demo's rate
    assert resolved["lora"]["r"] == 16 and resolved["lora"]["lora_alpha"] == 32
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert "rewards/answer_tag_reward/mean" in records[0] and "completions/mean_length" in records[0]
    assert (tmp_path / "run" / "reward.png").is_file() and (tmp_path / "run" / "adapter_config.json").is_file()
    assert "held-out before training (2 rows, greedy)" in out.stdout
    assert "mean reward per completion: first 1 steps" in out.stdout and "held-out, greedy: before" in out.stdout


def test_grpo_config_errors_name_the_key(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gazelle.cli.main", "grpo", "train.num_generations=3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "not divisible by num_generations=3" in out.stderr
    out = subprocess.run([sys.executable, "-m", "gazelle.cli.main", "grpo", "task.name=sudoku"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown task 'sudoku'" in out.stderr and "arithmetic" in out.stderr


def test_example_config_is_valid():
    from gazelle.cli.config import load_config
    from gazelle.cli.grpo import GRPORunConfig

    example = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "grpo_gsm8k.yaml")
    cfg = load_config(GRPORunConfig, example, ["task.path=train.jsonl"])
    assert cfg.task.name == "gsm8k" and cfg.train.generation_batch_size == 64 and cfg.lora.r == 32
