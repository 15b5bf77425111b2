"""Loading HF folders: sharded checkpoints, and a clear one-line error for every kind of bad input."""

import json
import os
import struct

import pytest
import torch

from gazelle.errors import GazelleError
from gazelle.models.decoder import Decoder
from gazelle.models.loading import load_model, resolve
from tests.tiny import tiny_hf_model


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    model = tiny_hf_model("llama")
    folder = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(folder, max_shard_size="250KB")
    return model, folder


def one_line_error(fn, *args, match: str, **kwargs) -> str:
    with pytest.raises(GazelleError) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message, f"error spans several lines: {message!r}"
    assert match in message, f"{match!r} not in {message!r}"
    return message


def test_three_shards_load_with_identical_logits(llama_folder):
    hf, folder = llama_folder
    shards = sorted(p for p in os.listdir(folder) if p.endswith(".safetensors"))
    assert len(shards) == 3, shards
    ours = load_model(folder, dtype=torch.float32)
    theirs = hf.state_dict()
    for name, p in ours.state_dict().items():
        assert torch.equal(p, theirs[name]), name
    # Logits identical to the same decoder given the weights in memory, and within fp32 noise of transformers.
    direct = Decoder(ours.config)
    direct.load_state_dict(theirs)
    ids = torch.randint(3, 256, (2, 17))
    with torch.no_grad():
        logits = ours.logits(ours(ids))
        assert torch.equal(logits, direct.eval().logits(direct(ids)))
        assert (logits - hf(ids).logits).abs().max() <= 1e-4


def test_loads_to_requested_dtype(llama_folder):
    hf, folder = llama_folder
    ours = load_model(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    assert torch.equal(ours.model.embed_tokens.weight, hf.model.embed_tokens.weight.to(torch.bfloat16))


def test_folder_without_config(tmp_path):
    one_line_error(load_model, tmp_path, match="has no config.json")


def test_missing_path_and_non_model_file(tmp_path):
    one_line_error(load_model, tmp_path / "nowhere", match="not found")
    (tmp_path / "notes.txt").write_text("hello")
    one_line_error(load_model, tmp_path / "notes.txt", match="neither a model folder nor a .gguf file")


def copy_folder(src, dst):
    dst.mkdir()
    for name in os.listdir(src):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def test_corrupt_safetensors_header(llama_folder, tmp_path):
    folder = copy_folder(llama_folder[1], tmp_path / "corrupt")
    shard = folder / "model-00002-of-00003.safetensors"
    data = bytearray(shard.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    data[8:8 + header_len] = b"#" * header_len  # not JSON any more
    shard.write_bytes(bytes(data))
    message = one_line_error(load_model, folder, match="corrupt safetensors header")
    assert "model-00002-of-00003.safetensors" in message
    shard.write_bytes(struct.pack("<Q", 10**12) + bytes(data[8:]))  # a length past the end of the file
    one_line_error(load_model, folder, match="exceeds the file")


def test_truncated_safetensors_data(llama_folder, tmp_path):
    folder = copy_folder(llama_folder[1], tmp_path / "truncated")
    shard = folder / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    one_line_error(load_model, folder, match="model-00003-of-00003.safetensors")


def test_missing_shard_and_pickle_only(llama_folder, tmp_path):
    folder = copy_folder(llama_folder[1], tmp_path / "missing")
    os.remove(folder / "model-00001-of-00003.safetensors")
    one_line_error(load_model, folder, match="model-00001-of-00003.safetensors")
    os.remove(folder / "model.safetensors.index.json")
    one_line_error(load_model, folder, match="pickle")


def test_config_that_does_not_match_the_weights(llama_folder, tmp_path):
    folder = copy_folder(llama_folder[1], tmp_path / "mismatch")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    one_line_error(load_model, folder, match="has shape (64, 128) but config.json implies (64, 96)")
    config["intermediate_size"], config["num_hidden_layers"] = 128, 2
    (folder / "config.json").write_text(json.dumps(config))
    one_line_error(load_model, folder, match="model.layers.2")
    config["num_hidden_layers"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    one_line_error(load_model, folder, match="checkpoint lacks model.layers.3")


def test_unknown_architecture_in_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "vocab_size": 10}))
    one_line_error(load_model, tmp_path, match="supported families: llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3")


def test_hub_id_while_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The hub client reads its offline switch at import; either way no network reaches this machine.
    message = one_line_error(resolve, "gazelle-tests/no-such-model", match="gazelle-tests/no-such-model")
    assert "pass a local model folder or a .gguf file" in message
