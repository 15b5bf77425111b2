"""The command line: help, info, generate, and one-line errors with exit code 2."""

import subprocess
import sys

import pytest

from gazelle.cli.main import main
from tests.tiny import tiny_hf_model


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_folder(request, tmp_path_factory):
    model = tiny_hf_model(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder)
    return model, folder


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gazelle.cli.main", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_the_verbs():
    out = run_cli("--help")
    assert out.returncode == 0
    assert "info" in out.stdout and "generate" in out.stdout


def test_info_reports_family_and_exact_parameter_count(tiny_folder, capsys):
    hf, folder = tiny_folder
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    assert hf.config.model_type in out
    assert f"{hf.num_parameters():,}" in out  # qwen2's tied embeddings counted once, as transformers counts them
    assert "float32" in out and "GiB" in out


def test_info_on_the_gguf_reads_metadata_only(smollm2_gguf, capsys):
    assert main(["info", smollm2_gguf]) == 0
    out = capsys.readouterr().out
    assert "llama" in out and "134,515,008" in out and "Q4_1" in out


def test_generate_without_chat_template_is_a_one_line_error(tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path / "llama"
    tiny_hf_model("llama").save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(256)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0").save_pretrained(folder)
    out = run_cli("generate", "--model", str(folder), "--chat", "--prompt", "t5 t6")
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "has no chat template" in out.stderr
    plain = run_cli("generate", "--model", str(folder), "--prompt", "t5 t6", "--max-new-tokens", "4")
    assert plain.returncode == 0, plain.stderr
    assert len(plain.stdout.split()) == 4  # four word-level tokens streamed


@pytest.mark.parametrize("args, expected", [
    (["info", "gazelle-tests/no-such-model"], "pass a local model folder or a .gguf file"),
    (["info", "/nowhere/model.gguf"], "not found"),
    (["generate", "--model", "/nowhere", "--prompt", "x"], "not found"),
])
def test_bad_models_are_one_line_errors(args, expected):
    out = subprocess.run([sys.executable, "-m", "gazelle.cli.main", *args], capture_output=True, text=True,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and out.stderr.strip().count("\n") == 0, out.stderr
    assert expected in out.stderr


def test_truncated_gguf_is_a_one_line_error(smollm2_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        cut.write_bytes(f.read(1 << 20))
    out = run_cli("generate", "--model", str(cut), "--prompt", "hello")
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0, out.stderr
    assert "cut.gguf" in out.stderr and "truncated" in out.stderr
