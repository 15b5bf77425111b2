"""Adapter files: gazelle's load in PEFT, PEFT's load in gazelle, with the same logits; atomic writes; errors."""

import json
import os
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from gazelle.errors import GazelleError
from gazelle.lora import LoraConfig, inject_lora, load_adapter, read_adapter_config, save_adapter
from gazelle.lora.inject import lora_modules
from gazelle.lora.peft_io import CONFIG_NAME, WEIGHTS_NAME
from gazelle.models.config import from_hf_config
from gazelle.models.decoder import Decoder
from tests.lora import ATTN_MLP, gazelle_logits, model_pair, padded_batch, peft_config, randomize_lora
from tests.lora import one_thread  # noqa: F401  (an autouse fixture)

import peft

CASES = {
    "llama-attn-mlp": ("llama", LoraConfig(r=8, lora_alpha=16, target_modules=ATTN_MLP)),
    "qwen2-tied-embed-head-lora-only-bias": (
        "qwen2",
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"], bias="lora_only"),
    ),
    "qwen2-all-bias-layers": (
        "qwen2", LoraConfig(r=4, target_modules=["q_proj", "o_proj"], bias="all", layers_to_transform=[1]),
    ),
    "phi3-all-linear-rslora": ("phi3", LoraConfig(r=8, lora_alpha=32, target_modules="all-linear", use_rslora=True)),
    "gemma2-regex": ("gemma2", LoraConfig(r=4, target_modules=r"model\.layers\.\d+\.mlp\.(gate|down)_proj")),
}
# Fields PEFT reads back from adapter_config.json and acts on.
COMPARED = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "layers_to_transform",
            "fan_in_fan_out", "init_lora_weights", "modules_to_save", "use_dora", "lora_bias", "rank_pattern",
            "alpha_pattern", "layers_pattern", "loftq_config", "base_model_name_or_path")


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tied-embedding and save_embedding_layers notices from PEFT
        return fn(*args, **kwargs)


def real_logits(logits, mask):
    return logits[mask.bool()]  # padded slots are unused and differ by convention


@pytest.mark.parametrize("case", CASES)
def test_gazelle_adapter_loads_in_peft(case, tmp_path):
    family, config = CASES[case]
    hf, model = model_pair(family)
    inject_lora(model, config)
    randomize_lora(model, biases=config.bias != "none")
    save_adapter(model, tmp_path, config, base_model_name_or_path="org/tiny-" + family)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]  # no temporary files left behind

    peft_model = quiet(peft.PeftModel.from_pretrained, hf, tmp_path)
    ids, mask = padded_batch()
    with torch.no_grad():
        ours, theirs = gazelle_logits(model, ids, mask), peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(real_logits(ours, mask), real_logits(theirs, mask), atol=1e-4, rtol=0)
    # PEFT wrapped exactly the modules gazelle did.
    peft_wrapped = {
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
        if getattr(m, "lora_A", None) or getattr(m, "lora_embedding_A", None)
    }
    assert peft_wrapped == {n for n, _ in lora_modules(model)}

    # The config reads back in PEFT as the same adapter PEFT itself would have configured.
    read_back = peft.PeftConfig.from_pretrained(tmp_path).to_dict()
    expected = peft_config(config).to_dict() | {"base_model_name_or_path": "org/tiny-" + family, "inference_mode": True}
    for field in COMPARED:
        assert read_back[field] == expected[field], field
    if isinstance(config.target_modules, str) and config.target_modules != "all-linear":
        assert read_back["target_modules"] == config.target_modules
    else:  # the resolved names ("all-linear" is written as what it selected)
        assert set(read_back["target_modules"]) == {n.rpartition(".")[2] for n, _ in lora_modules(model)}


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_gazelle(case, tmp_path):
    family, config = CASES[case]
    hf, model = model_pair(family)
    # init_lora_weights=False: PEFT starts B random too, so the loaded adapter really changes the logits.
    peft_model = quiet(peft.get_peft_model, hf, peft_config(config, init_lora_weights=False))
    if config.bias != "none":
        with torch.no_grad():
            for n, p in peft_model.named_parameters():
                if n.endswith("bias") and p.requires_grad:
                    p.add_(0.1)
    quiet(peft_model.save_pretrained, tmp_path)
    load_adapter(model, tmp_path)
    ids, mask = padded_batch()
    with torch.no_grad():
        ours, theirs = gazelle_logits(model, ids, mask), peft_model(input_ids=ids, attention_mask=mask).logits
        _, plain = model_pair(family)
        base = gazelle_logits(plain, ids, mask)
    assert (real_logits(theirs, mask) - real_logits(base, mask)).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(real_logits(ours, mask), real_logits(theirs, mask), atol=1e-4, rtol=0)
    loaded, _ = read_adapter_config(tmp_path)
    fields = lambda c: (c.r, c.lora_alpha, c.bias, c.use_rslora, c.layers_to_transform)  # noqa: E731
    assert fields(loaded) == fields(config)


def test_gazelle_roundtrip_and_config(tmp_path):
    _, model = model_pair("llama")
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", layers_to_transform=[0, 2], lora_dropout=0.05)
    inject_lora(model, config)
    randomize_lora(model)
    save_adapter(model, tmp_path, config, "org/tiny-llama")
    read, base = read_adapter_config(tmp_path)
    assert base == "org/tiny-llama"
    assert read == LoraConfig(
        r=4, lora_alpha=8, target_modules=sorted(ATTN_MLP), layers_to_transform=[0, 2], lora_dropout=0.05
    )
    _, fresh = model_pair("llama")
    load_adapter(fresh, tmp_path)
    ids, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(gazelle_logits(fresh, ids, mask), gazelle_logits(model, ids, mask), atol=0, rtol=0)
    raw = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert raw["peft_type"] == "LORA" and raw["task_type"] == "CAUSAL_LM" and raw["inference_mode"] is True
    assert load_file(tmp_path / WEIGHTS_NAME).keys() == {
        f"base_model.model.model.layers.{i}.{m}.{ab}.weight"
        for i in (0, 2) for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] for ab in ("lora_A", "lora_B")
    }


def test_embedding_keys_follow_peft(tmp_path):
    _, model = model_pair("llama")
    config = LoraConfig(r=4, target_modules=["embed_tokens"])
    inject_lora(model, config)
    save_adapter(model, tmp_path, config, "x")
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "base_model.model.model.embed_tokens.lora_embedding_A": (4, 256),
        "base_model.model.model.embed_tokens.lora_embedding_B": (64, 4),
    }


def test_save_is_atomic(tmp_path, monkeypatch):
    _, model = model_pair("llama")
    config = LoraConfig(r=4, target_modules=["q_proj"])
    inject_lora(model, config)
    save_adapter(model, tmp_path, config, "x")
    before = {name: (tmp_path / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
    randomize_lora(model)

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path, config, "x")
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]  # the temporary file is gone
    assert {name: (tmp_path / name).read_bytes() for name in before} == before  # the old adapter is intact


def test_adapter_of_another_model_names_a_tensor(tmp_path):
    hf, model = model_pair("llama")
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    inject_lora(model, config)
    save_adapter(model, tmp_path, config, "x")
    narrower = Decoder(from_hf_config({**hf.config.to_dict(), "hidden_size": 32, "head_dim": 8}))
    tensor = r"base_model\.model\.model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight"
    with pytest.raises(GazelleError, match=tensor + r" has shape \(4, 64\).*\(4, 32\): the adapter belongs to another"):
        load_adapter(narrower, tmp_path)
    assert not lora_modules(narrower)  # left as it came

    # A tensor the config does not explain (a hand-edited or mismatched file).
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight"] = torch.zeros(4, 64)
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    with pytest.raises(GazelleError, match=r"k_proj\.lora_A\.weight has no place in this llama model"):
        load_adapter(model_pair("llama")[1], tmp_path)

    # A phi3 adapter (fused qkv_proj) on llama: its target modules do not exist.
    _, phi = model_pair("phi3")
    inject_lora(phi, LoraConfig(r=4, target_modules=["qkv_proj"]))
    save_adapter(phi, tmp_path / "phi", LoraConfig(r=4, target_modules=["qkv_proj"]), "x")
    with pytest.raises(GazelleError, match=r"\['qkv_proj'\] match nothing in this llama model"):
        load_adapter(model_pair("llama")[1], tmp_path / "phi")


def test_missing_files(tmp_path):
    _, model = model_pair("llama")
    with pytest.raises(GazelleError, match="adapter_config.json not found"):
        load_adapter(model, tmp_path / "nowhere")
    config = LoraConfig(r=4, target_modules=["q_proj"])
    inject_lora(model, config)
    save_adapter(model, tmp_path, config, "x")
    (tmp_path / WEIGHTS_NAME).unlink()
    with pytest.raises(GazelleError, match="adapter_model.safetensors not found"):
        load_adapter(model_pair("llama")[1], tmp_path)
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(GazelleError, match="pickle adapter_model.bin"):
        load_adapter(model_pair("llama")[1], tmp_path)


@pytest.mark.parametrize("change,match", [
    ({"use_dora": True}, "use_dora=True, which gazelle does not support"),
    ({"peft_type": "IA3"}, "IA3 adapter; gazelle loads LoRA adapters only"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights 'pissa' is not supported"),
    ({"loftq_config": {"loftq_bits": 4}}, "LoftQ is not supported yet"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_unsupported_peft_options_are_refused(change, match, tmp_path):
    _, model = model_pair("llama")
    config = LoraConfig(r=4, target_modules=["q_proj"])
    inject_lora(model, config)
    save_adapter(model, tmp_path, config, "x")
    raw = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps(raw | change))
    with pytest.raises(GazelleError, match=match):
        load_adapter(model_pair("llama")[1], tmp_path)


def test_save_checks_the_config_against_the_model(tmp_path):
    _, model = model_pair("llama")
    with pytest.raises(GazelleError, match="no LoRA adapters to save"):
        save_adapter(model, tmp_path, LoraConfig(), "x")
    inject_lora(model, LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(GazelleError, match="pass the LoraConfig the adapters were injected with"):
        save_adapter(model, tmp_path, LoraConfig(r=8, target_modules=["q_proj"]), "x")
