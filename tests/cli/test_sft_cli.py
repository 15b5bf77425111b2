"""gazelle sft: YAML config with dotted overrides, the resolved config saved, an adapter at the end."""

import json
import subprocess
import sys

import yaml

from tests.tiny import tiny_hf_model
from tests.trainers.helpers import text_rows, word_tokenizer


def test_sft_from_yaml_with_overrides(tmp_path):
    tiny_hf_model("llama").save_pretrained(tmp_path / "model")
    word_tokenizer().save_pretrained(tmp_path / "model")
    with open(tmp_path / "data.jsonl", "w") as f:
        for row in text_rows(10):
            f.write(json.dumps(row) + "\n")
    config = {
        "model": {"name": str(tmp_path / "model"), "max_seq_length": 64},
        "lora": {"r": 4, "lora_alpha": 8},
        "data": {"path": str(tmp_path / "data.jsonl")},
        "train": {"output_dir": str(tmp_path / "run"), "max_steps": 5, "learning_rate": 1e-3, "disable_tqdm": True},
    }
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, "-m", "gazelle.cli.main", "sft", str(tmp_path / "sft.yaml"),
                          "train.max_steps=2", "lora.target_modules=[q_proj, v_proj]"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())
    assert resolved["train"]["max_steps"] == 2 and resolved["lora"]["target_modules"] == ["q_proj", "v_proj"]
    adapter = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"] and adapter["r"] == 4
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_sft_config_errors_name_the_key(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  learnig_rate: 0.1\n")
    out = subprocess.run([sys.executable, "-m", "gazelle.cli.main", "sft", str(tmp_path / "bad.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown config key train.learnig_rate" in out.stderr
    out = subprocess.run([sys.executable, "-m", "gazelle.cli.main", "sft", "train.learning_rate=-1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "learning_rate must be > 0" in out.stderr
