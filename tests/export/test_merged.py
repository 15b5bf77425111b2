"""Merged exports: transformers (and bitsandbytes) load gazelle's merged folders and give base + adapter's logits."""

import errno
import json
import os
import shutil
import subprocess
import sys

import bitsandbytes.functional as bnbf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from gazelle.errors import GazelleError
from gazelle.export import merged
from gazelle.export.merged import save_merged
from gazelle.lora import LoraConfig, inject_lora
from gazelle.lora.inject import lora_modules
from gazelle.models.loading import load_model
from gazelle.models.safetensors_io import iter_safetensors, read_header
from gazelle.quant.linear4bit import Linear4bit
from tests.lora import (
    gazelle_logits,
    model_pair,
    one_thread,  # noqa: F401  (an autouse fixture)
    padded_batch,
    randomize_lora,
)
from tests.tiny import FAMILIES, tiny_hf_model
from tests.trainers.helpers import word_tokenizer

# What each family's case adapts: qwen2 and gemma2 tie embed_tokens and lm_head and adapt both (the export unties
# them); gemma3 is tied with no adapter on either (lm_head stays out of the file); phi3 keeps qkv_proj fused.
TARGETS = {family: "all-linear" for family in FAMILIES} | {
    "qwen2": ["q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"],
    "gemma2": ["o_proj", "up_proj", "embed_tokens"],
}
LAYER = "model.layers.1.self_attn.q_proj"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository, for subprocesses


def lora_model(family: str, dtype: torch.dtype = torch.float32, targets="all-linear", seed: int = 1):
    _, model = model_pair(family)
    model.to(dtype)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets)
    inject_lora(model, config)
    model.lora_config = config
    randomize_lora(model, seed=seed)
    return model


def transformers_logits(folder, ids, mask, **kwargs) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", **kwargs).eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def max_diff(ours: torch.Tensor, theirs: torch.Tensor, mask: torch.Tensor) -> float:
    return (ours.float() - theirs.float())[mask.bool()].abs().max().item()  # padded slots are unused


def file_tensors(folder) -> dict[str, torch.Tensor]:
    names = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    return {n: t for f in names for n, t in iter_safetensors(os.path.join(folder, f), torch.float32,
                                                                keep_dtype=lambda n: True)}


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_16bit_loads_in_transformers_with_base_plus_adapter_logits(family, tmp_path):
    model = lora_model(family, targets=TARGETS[family])
    before = {n: t.clone() for n, t in model.state_dict().items()}
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = gazelle_logits(model, ids, mask)

    paths = save_merged(model, tmp_path / "out")
    assert sorted(os.path.basename(p) for p in paths) == ["config.json", "generation_config.json", "model.safetensors"]
    assert max_diff(ours, transformers_logits(tmp_path / "out", ids, mask), mask) <= 1e-4

    names = set(read_header(str(tmp_path / "out" / "model.safetensors"))[0])
    assert not any("lora" in n or "base_layer" in n for n in names)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config
    if family == "gemma3":  # tied and no adapter on either side: the file ties them as transformers does
        assert "lm_head.weight" not in names and config["tie_word_embeddings"] is True
    if family in ("qwen2", "gemma2"):  # LoRA changed one side of the tie: both are written, untied
        assert "lm_head.weight" in names and config["tie_word_embeddings"] is False
    if family == "phi3":
        assert "model.layers.0.self_attn.qkv_proj.weight" in names and "model.layers.0.mlp.gate_up_proj.weight" in names

    # The live model is untouched: same tensors, adapters still attached and tied weights still shared.
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[n], t) for n, t in before.items())
    assert len(lora_modules(model)) > 0
    if model.config.tie_word_embeddings:
        head, embed = (getattr(m, "base_layer", m) for m in (model.lm_head, model.model.embed_tokens))
        assert head.weight is embed.weight


def test_bf16_model_exports_one_rounding_of_the_fp32_merge(tmp_path):
    """The file holds exactly bf16(W + B @ A * scaling) and transformers' bf16 logits from it agree with gazelle's
    bf16 base + adapter to 2% of their norm, the parity tests' bf16 bound. (1e-2 absolute is out of reach even without
    LoRA: these tiny unit-scale models turn one-ulp differences into ~0.05 of logit, gazelle vs transformers alike.)"""
    model = lora_model("llama", dtype=torch.bfloat16)
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = gazelle_logits(model, ids, mask)
        exact = gazelle_logits(lora_model("llama"), ids, mask)  # the same adapters on the fp32 base
    save_merged(model, tmp_path / "out")
    written = file_tensors(tmp_path / "out")
    assert {t.dtype for t in written.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    module = model.get_submodule(LAYER)
    assert torch.equal(written[LAYER + ".weight"], (module.base_layer.weight.float() + module.delta_weight()).bfloat16())

    theirs = transformers_logits(tmp_path / "out", ids, mask, dtype=torch.bfloat16)
    valid = mask.bool()
    ours, theirs, exact = ours[valid].float(), theirs[valid].float(), exact[valid].float()
    assert (ours - theirs).norm() / theirs.norm() <= 2e-2
    assert (theirs - exact).norm() <= 2 * (ours - exact).norm()  # the export adds no error beyond bf16's own


def test_sharded_export_loads_in_transformers(tmp_path):
    model = lora_model("llama")
    ids, mask = padded_batch()
    with torch.no_grad():
        ours = gazelle_logits(model, ids, mask)
    paths = save_merged(model, tmp_path / "out", max_shard_size="100KB")
    shards = sorted(os.path.basename(p) for p in paths if p.endswith(".safetensors"))
    count = len(shards)
    assert count > 1 and shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    for shard in shards:  # a shard grows past the limit only by being a single tensor
        header = read_header(str(tmp_path / "out" / shard))[0]
        size = sum(i["data_offsets"][1] - i["data_offsets"][0] for i in header.values())
        assert size <= 100_000 or len(header) == 1
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in file_tensors(tmp_path / "out").values())
    assert max_diff(ours, transformers_logits(tmp_path / "out", ids, mask), mask) <= 1e-4


# --- 4-bit bases ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plain_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plain")
    tiny_hf_model("llama").save_pretrained(folder)
    return folder


def qlora_model(folder, seed: int = 1):
    model = load_model(folder, dtype=torch.float32, load_in_4bit=True)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    inject_lora(model, config)
    model.lora_config = config
    randomize_lora(model, seed=seed)
    return model


def exact_merged(folder, qlora) -> torch.nn.Module:
    """The 16-bit base from its folder with the QLoRA model's adapters: the exact merged model."""
    model = load_model(folder, dtype=torch.float32)
    inject_lora(model, qlora.lora_config)
    model.load_state_dict({n: p for n, p in qlora.named_parameters() if "lora_" in n}, strict=False)
    return model


def test_merged_4bit_forced_loads_in_bitsandbytes_within_nf4_error(plain_folder, tmp_path):
    qlora = qlora_model(plain_folder)
    exact = exact_merged(plain_folder, qlora)
    ids, mask = padded_batch()
    save_merged(qlora, tmp_path / "out", save_method="merged_4bit_forced")

    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float32"}.items() \
        <= config["quantization_config"].items()
    names = set(read_header(str(tmp_path / "out" / "model.safetensors"))[0])
    assert {f"{LAYER}.weight.{s}" for s in ("absmax", "quant_map", "nested_absmax", "nested_quant_map",
                                           "quant_state.bitsandbytes__nf4")} <= names

    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "out", device_map="cpu").eval()
    assert type(theirs.get_submodule(LAYER)).__name__ == "Linear4bit"
    # The reference error: the exact merged weights quantized by bitsandbytes itself.
    reference = load_model(plain_folder, dtype=torch.float32)
    with torch.no_grad():
        for name, module in lora_modules(exact):
            packed, state = bnbf.quantize_4bit(module.base_layer.weight + module.delta_weight(), blocksize=64,
                                               quant_type="nf4", compress_statistics=True)
            reference.get_submodule(name).weight.copy_(bnbf.dequantize_4bit(packed, state))
        exact_logits = gazelle_logits(exact, ids, mask)
        reference_error = max_diff(gazelle_logits(reference, ids, mask), exact_logits, mask)
        exported = theirs(input_ids=ids, attention_mask=mask).logits
        live = gazelle_logits(qlora, ids, mask)
    assert reference_error > 0
    assert max_diff(exported, exact_logits, mask) <= 1.5 * reference_error
    assert max_diff(exported, live, mask) <= 3 * reference_error  # both one NF4 rounding away from exact


def test_4bit_base_merges_onto_the_original_weights_when_available(plain_folder, tmp_path, capfd):
    qlora = qlora_model(plain_folder)
    exact = exact_merged(plain_folder, qlora)
    save_merged(qlora, tmp_path / "from-original")
    assert "dequantized" not in capfd.readouterr().err
    written = file_tensors(tmp_path / "from-original")
    for name, module in lora_modules(exact):
        expected = module.base_layer.weight + module.delta_weight()
        torch.testing.assert_close(written[name + ".weight"], expected, atol=1e-6, rtol=0)

    # A model loaded from a bitsandbytes 4-bit checkpoint has no 16-bit weights to go back to ...
    save_merged(load_model(plain_folder, dtype=torch.float32), tmp_path / "bnb", save_method="merged_4bit_forced")
    prequantized = qlora_model(tmp_path / "bnb")
    assert isinstance(prequantized.get_submodule(LAYER).base_layer, Linear4bit)
    save_merged(prequantized, tmp_path / "from-dequantized")
    err = capfd.readouterr().err
    assert err.count("merging onto the dequantized 4-bit weights") == 1 and "base_weights=" in err
    written = file_tensors(tmp_path / "from-dequantized")
    module = prequantized.get_submodule(LAYER)
    expected = module.base_layer.dequantized_weight() + module.delta_weight()
    torch.testing.assert_close(written[LAYER + ".weight"], expected, atol=1e-6, rtol=0)

    # ... unless base_weights names them.
    save_merged(prequantized, tmp_path / "from-base-weights", base_weights=plain_folder)
    assert "dequantized" not in capfd.readouterr().err
    original = dict(iter_safetensors(str(plain_folder / "model.safetensors"), torch.float32))[LAYER + ".weight"]
    expected = original + module.delta_weight()
    torch.testing.assert_close(file_tensors(tmp_path / "from-base-weights")[LAYER + ".weight"], expected,
                               atol=1e-6, rtol=0)


def test_base_weights_of_another_model_are_refused(plain_folder, tmp_path):
    qlora = qlora_model(plain_folder)
    other = tmp_path / "other-seed"
    tiny_hf_model("llama", seed=7).save_pretrained(other)
    with pytest.raises(GazelleError, match="is not the weight this 4-bit layer was quantized from"):
        save_merged(qlora, tmp_path / "out", base_weights=other)
    other_shape = tmp_path / "qwen3"
    tiny_hf_model("qwen3").save_pretrained(other_shape)
    with pytest.raises(GazelleError, match=r"is not this model's base: it has it with shape \(96, 64\)"):
        save_merged(qlora, tmp_path / "out", base_weights=other_shape)
    with pytest.raises(GazelleError, match="base_weights: .*not found"):
        save_merged(qlora, tmp_path / "out", base_weights=tmp_path / "missing")
    assert sorted(os.listdir(tmp_path)) == ["other-seed", "qwen3"]  # nothing written, no temporary left


# --- SmolLM2, tokenizer and generation config ----------------------------------------------------------------------

def test_smollm2_lora_merged_16bit_matches_in_transformers(smollm2_gguf, tmp_path):
    from gazelle.fast import FastLanguageModel

    model, tokenizer = FastLanguageModel.from_pretrained(smollm2_gguf, dtype=torch.float32, device_map="cpu")
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16)
    ids = torch.tensor([tokenizer("The capital of France is")["input_ids"]])
    mask = torch.ones_like(ids)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        base = gazelle_logits(model, ids, mask)  # B starts at zero: the adapters do nothing yet
        for _, module in lora_modules(model)[::5]:  # a few adapters trained away from zero
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=g) * 0.02)
        ours = gazelle_logits(model, ids, mask)
    assert (ours - base).abs().max() > 1e-2

    model.save_pretrained_merged(tmp_path / "out", tokenizer)
    assert max_diff(ours, transformers_logits(tmp_path / "out", ids, mask), mask) <= 1e-4
    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert saved.chat_template == tokenizer.chat_template and saved.eos_token == tokenizer.eos_token
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert tokenizer.eos_token_id in ([generation["eos_token_id"]] if isinstance(generation["eos_token_id"], int)
                                      else generation["eos_token_id"])


def test_generation_config_and_tokenizer_keep_the_trained_tokens(tmp_path):
    model = lora_model("llama")
    tokenizer = word_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["the"]})  # an end-of-turn token of the chat template
    tokenizer.eos_token = "the"
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} the {% endfor %}"
    model.save_pretrained_merged(tmp_path / "out", tokenizer)
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [2, tokenizer.eos_token_id]  # the config's eos and the trained one
    assert generation["pad_token_id"] == 0 and generation["bos_token_id"] == 1
    saved = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert saved.eos_token == "the" and saved.chat_template == tokenizer.chat_template


# --- bad inputs -----------------------------------------------------------------------------------------------------

def test_save_method_errors(tmp_path):
    model = lora_model("llama")
    with pytest.raises(GazelleError, match="'merged_8bit' is not one of merged_16bit, merged_4bit_forced, merged_4bit, lora"):
        save_merged(model, tmp_path / "out", save_method="merged_8bit")
    with pytest.raises(GazelleError, match="merged_4bit_forced"):
        model.save_pretrained_merged(tmp_path / "out", save_method="merged_4bit")
    with pytest.raises(GazelleError, match="max_shard_size '5 gigs'"):
        save_merged(model, tmp_path / "out", max_shard_size="5 gigs")
    model.save_pretrained_merged(tmp_path / "adapter", save_method="lora")
    assert sorted(os.listdir(tmp_path / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
    with pytest.raises(GazelleError, match="holds a LoRA adapter"):
        save_merged(model, tmp_path / "adapter")
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def disk_full_after(calls: int):
    real = merged.write_safetensors
    count = 0

    def write(path, tensors):
        nonlocal count
        count += 1
        if count > calls:
            with open(path, "wb") as f:
                f.write(b"\0" * 100)  # part of the shard reached the disk
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(path, tensors)

    return write


def test_full_disk_leaves_nothing_half_written(tmp_path, monkeypatch):
    model = lora_model("llama")
    monkeypatch.setattr(merged, "write_safetensors", disk_full_after(2))
    with pytest.raises(GazelleError, match=r"saving to .*new failed: the disk is full; nothing was written"):
        save_merged(model, tmp_path / "new", max_shard_size="100KB")
    assert os.listdir(tmp_path) == []

    monkeypatch.undo()
    save_merged(model, tmp_path / "old")
    before = {f: (tmp_path / "old" / f).read_bytes() for f in os.listdir(tmp_path / "old")}
    monkeypatch.setattr(merged, "write_safetensors", disk_full_after(0))
    with pytest.raises(GazelleError, match="the disk is full"):
        save_merged(lora_model("llama", seed=5), tmp_path / "old")
    assert {f: (tmp_path / "old" / f).read_bytes() for f in os.listdir(tmp_path / "old")} == before
    assert os.listdir(tmp_path) == ["old"]


UNWRITABLE = """
import sys
from gazelle.errors import GazelleError
from gazelle.export.merged import save_merged
from gazelle.lora import LoraConfig, inject_lora
from tests.lora import model_pair
model = model_pair("llama")[1]
inject_lora(model, LoraConfig(r=4, target_modules="all-linear"))
for target in sys.argv[1:]:
    try:
        save_merged(model, target)
        print("saved")
    except GazelleError as e:
        print("error:", e)
"""


def test_unwritable_output_folder_leaves_nothing_behind(tmp_path):
    """A read-only parent, and a read-only existing folder (the merge is written beside it, then cannot move in)."""
    command = [sys.executable, "-c", UNWRITABLE]
    if os.geteuid() == 0:  # root ignores permission bits unless it gives up the capability to
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: permission bits cannot be enforced")
        command = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", *command]
    (tmp_path / "locked").mkdir()
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "old.txt").write_text("kept")
    for folder in ("locked", "existing"):
        os.chmod(tmp_path / folder, 0o555)
    try:
        out = subprocess.run([*command, str(tmp_path / "locked" / "new"), str(tmp_path / "existing")],
                             capture_output=True, text=True, timeout=300, check=False, cwd=ROOT)
    finally:
        for folder in ("locked", "existing"):
            os.chmod(tmp_path / folder, 0o755)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"error: cannot write to {tmp_path / 'locked'}: Permission denied"
    assert lines[1].startswith(f"error: saving to {tmp_path / 'existing'} failed: Permission denied")
    assert lines[1].endswith("nothing was written")
    assert os.listdir(tmp_path / "locked") == [] and os.listdir(tmp_path / "existing") == ["old.txt"]
    assert sorted(os.listdir(tmp_path)) == ["existing", "locked"]  # no temporary folder left beside them


def test_resaving_into_a_folder_replaces_the_old_weights(tmp_path):
    model = lora_model("llama")
    save_merged(model, tmp_path / "out", max_shard_size="100KB")
    (tmp_path / "out" / "notes.txt").write_text("mine")
    save_merged(model, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == ["config.json", "generation_config.json", "model.safetensors",
                                                    "notes.txt"]


def test_push_to_hub_merged_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = lora_model("llama")
    with pytest.raises(GazelleError, match="cannot push to the Hugging Face hub repository me/tiny-merged"):
        model.push_to_hub_merged("me/tiny-merged", save_method="merged_16bit", token="hf_x")
    with pytest.raises(GazelleError, match="merged_4bit_forced"):  # checked before any network access
        model.push_to_hub_merged("me/tiny-merged", save_method="merged_4bit")
    assert os.listdir(tmp_path) == []
