"""gazelle export: an adapter folder to merged 16-bit, NF4, adapter and GGUF outputs; one-line errors."""

import json
import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from gazelle.cli.main import main
from gazelle.fast import FastLanguageModel
from gazelle.models.safetensors_io import iter_safetensors
from tests.lora import (
    gazelle_logits,
    one_thread,  # noqa: F401  (an autouse fixture)
    padded_batch,
    randomize_lora,
)
from tests.tiny import tiny_hf_model


def letter_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (letters and the space marker, no merges): a vocabulary GGUF can store, small
    enough for the tiny model's 256 embedding rows."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "\u0120": 3, **{chr(ord("a") + i): 4 + i for i in range(26)}}
    backend = Tokenizer(models.BPE(vocab, [], unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<pad>")


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """(adapter folder, the gazelle model it was saved from): a tiny llama with trained-looking LoRA weights."""
    root = tmp_path_factory.mktemp("export-cli")
    tiny_hf_model("llama").save_pretrained(root / "base")
    letter_tokenizer().save_pretrained(root / "base")
    model, tokenizer = FastLanguageModel.from_pretrained(str(root / "base"), dtype=torch.float32, device_map="cpu")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8)
    randomize_lora(model)
    model.save_pretrained(root / "adapter", tokenizer)
    return root / "adapter", model


def export(*args) -> int:
    return main(["export", *map(str, args)])


def test_adapter_folder_exports_merged_16bit(adapter, tmp_path, capsys):
    folder, model = adapter
    assert export("--model", folder, "--to", "merged_16bit", "--out", tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "out" / "model.safetensors") in out and "wrote" in out
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(
        os.listdir(tmp_path / "out"))
    ids, mask = padded_batch()
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        diff = (gazelle_logits(model, ids, mask) - theirs(input_ids=ids, attention_mask=mask).logits)[mask.bool()]
    assert diff.abs().max() <= 1e-4


def test_adapter_folder_exports_nf4_and_the_adapter(adapter, tmp_path):
    folder, _ = adapter
    assert export("--model", folder, "--to", "merged_4bit_forced", "--out", tmp_path / "nf4") == 0
    config = json.loads((tmp_path / "nf4" / "config.json").read_text())
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    assert export("--model", folder, "--to", "lora", "--out", tmp_path / "lora") == 0
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "lora"))


def test_gguf_with_two_quantizations_and_a_modelfile(adapter, tmp_path, capsys):
    folder, _ = adapter
    assert export("--model", folder, "--to", "gguf", "--quant", "q8_0", "f16", "--out", tmp_path / "gguf") == 0
    written = sorted(os.listdir(tmp_path / "gguf"))
    assert len([f for f in written if f.endswith(".gguf")]) == 2 and "Modelfile" in written
    first = next(line for line in capsys.readouterr().out.splitlines() if line.endswith(".gguf"))
    assert (tmp_path / "gguf" / "Modelfile").read_text().startswith(f"FROM ./{os.path.basename(first)}")


def test_adapter_on_a_4bit_checkpoint_merges_onto_base_weights(adapter, tmp_path):
    """An adapter trained on a bitsandbytes 4-bit base: --base-weights gives the 16-bit weights to merge onto."""
    base = adapter[0].parent / "base"
    plain, tokenizer = FastLanguageModel.from_pretrained(str(base), dtype=torch.float32, device_map="cpu")
    plain.save_pretrained_merged(tmp_path / "bnb", tokenizer, save_method="merged_4bit_forced")
    qlora, tokenizer = FastLanguageModel.from_pretrained(str(tmp_path / "bnb"), dtype=torch.float32,
                                                         device_map="cpu", load_in_4bit=True)
    qlora = FastLanguageModel.get_peft_model(qlora, r=4, lora_alpha=8)
    randomize_lora(qlora)
    qlora.save_pretrained(tmp_path / "qlora-adapter", tokenizer)

    assert export("--model", tmp_path / "qlora-adapter", "--to", "merged_16bit", "--base-weights", base,
                  "--out", tmp_path / "out") == 0
    name = "model.layers.2.mlp.down_proj"
    original = dict(iter_safetensors(str(base / "model.safetensors"), torch.float32))[name + ".weight"]
    written = dict(iter_safetensors(str(tmp_path / "out" / "model.safetensors"), torch.float32))[name + ".weight"]
    torch.testing.assert_close(written, original + qlora.get_submodule(name).delta_weight(), atol=1e-6, rtol=0)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_errors_are_one_line(adapter, tmp_path, capsys):
    folder, _ = adapter
    assert export("--model", folder, "--to", "merged_4bit", "--out", tmp_path / "a") == 2
    assert "merged_4bit_forced" in one_line_error(capsys)
    assert export("--model", folder, "--to", "merged_16bit", "--quant", "q4_k_m", "--out", tmp_path / "b") == 2
    assert "--quant and --system apply to --to gguf" in one_line_error(capsys)
    assert export("--model", folder, "--to", "gguf", "--quant", "q9_9", "--out", tmp_path / "c") == 2
    assert "q9_9" in one_line_error(capsys)

    # An adapter whose base_model_name_or_path names another model (different shapes).
    other = tmp_path / "qwen3"
    tiny_hf_model("qwen3").save_pretrained(other)
    letter_tokenizer().save_pretrained(other)
    wrong = tmp_path / "wrong-base"
    wrong.mkdir()
    for name in os.listdir(folder):
        (wrong / name).write_bytes((folder / name).read_bytes())
    config = json.loads((wrong / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(other)}))
    capsys.readouterr()  # transformers' progress bars while saving the other model
    assert export("--model", wrong, "--to", "merged_16bit", "--out", tmp_path / "d") == 2
    assert "the adapter belongs to another model" in one_line_error(capsys)
    assert not any((tmp_path / name).exists() for name in "abcd")
