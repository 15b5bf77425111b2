"""4-bit loading: a transformers + bitsandbytes checkpoint loads as stored; plain ones quantize on load."""

import bitsandbytes.functional as bnbf
import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from gazelle.models.loading import load_model
from gazelle.quant.linear4bit import Linear4bit
from tests.tiny import tiny_hf_model

IDS = torch.tensor([[5, 17, 99, 3, 250, 41, 7, 128, 64, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])


@pytest.fixture(scope="module")
def bnb_folder(tmp_path_factory):
    """A tiny llama quantized to NF4 (double quant) by transformers + bitsandbytes and saved."""
    plain = tmp_path_factory.mktemp("plain")
    tiny_hf_model("llama").save_pretrained(plain)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(plain, quantization_config=quant, device_map="cpu", dtype=torch.float32)
    folder = tmp_path_factory.mktemp("bnb4bit")
    model.save_pretrained(folder)
    return plain, folder, model.eval()


def test_bnb_checkpoint_gives_transformers_logits(bnb_folder):
    _, folder, hf = bnb_folder
    ours = load_model(folder, dtype=torch.float32, load_in_4bit=True)
    four_bit = [n for n, m in ours.named_modules() if isinstance(m, Linear4bit)]
    assert len(four_bit) == 3 * 7 and not any("lm_head" in n for n in four_bit)
    with torch.no_grad():
        diff = (ours.logits(ours(IDS)) - hf(IDS).logits).abs().max().item()
    assert diff <= 1e-3, f"max abs logit diff {diff:.2e}"


def test_bnb_checkpoint_without_load_in_4bit_is_dequantized(bnb_folder):
    _, folder, hf = bnb_folder
    ours = load_model(folder, dtype=torch.float32)
    assert not any(isinstance(m, Linear4bit) for m in ours.modules())
    with torch.no_grad():
        assert (ours.logits(ours(IDS)) - hf(IDS).logits).abs().max() <= 1e-3


def test_quantize_on_load_matches_bitsandbytes_dequantized_weights(bnb_folder):
    """Each layer quantized while loading dequantizes to bitsandbytes' NF4 round trip of the same weight.

    bitsandbytes' CPU search picks a coarser 8-bit code for about 0.2% of the double-quantized block scales
    (tests/quant/test_nf4.py pins this down), so a few blocks differ slightly; everything else is identical.
    """
    plain, _, _ = bnb_folder
    ours = load_model(plain, dtype=torch.float32, load_in_4bit=True)
    source = tiny_hf_model("llama").state_dict()
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 3 * 7
    for name, layer in layers.items():
        packed, state = bnbf.quantize_4bit(source[name + ".weight"], blocksize=64, quant_type="nf4",
                                           compress_statistics=True)
        expected, got = bnbf.dequantize_4bit(packed, state), layer.dequantized_weight()
        same = (expected == got).float().mean().item()
        assert same >= 0.98, f"{name}: only {same:.1%} of the weights equal bitsandbytes'"
        assert (expected - got).abs().max() <= 0.02 * expected.abs().max(), name
    packed_bytes = sum(m.weight.numel() for m in layers.values())
    assert packed_bytes * 2 == sum(source[n + ".weight"].numel() for n in layers)  # two 4-bit codes per byte
