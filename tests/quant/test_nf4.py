"""NF4 against bitsandbytes (CPU), the test-only oracle: codes, statistics, serialization, checkpoints.

Parity rules (see gazelle/quant/nf4.py): packed 4-bit codes, float absmax, offset, nested absmax and every
dequantized value are bitwise bitsandbytes'. Its CPU 8-bit search for the double-quantized absmax is coarse,
so there gazelle's code must equal it or be the nearer level.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gazelle.errors import GazelleError
from gazelle.quant import (
    Linear4bit,
    NF4Tensor,
    dequantize_nf4,
    nf4_bytes,
    nf4_from_state,
    nf4_to_state,
    quantize_model,
    quantize_nf4,
)
from gazelle.quant.nf4 import dequantize_absmax, dynamic_map

import bitsandbytes as bnb
bnbF = bnb.functional

SHAPES = [(5, 128), (123, 192), (256, 64), (3, 100), (7, 33), (1, 64)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
PREFIX = "model.layers.0.mlp.up_proj."


def bnb_quant_state(state: dict[str, torch.Tensor]):
    """bitsandbytes reading a serialized state (keys "weight.absmax", ...) into its QuantState."""
    tensors = {k.removeprefix("weight."): v for k, v in state.items() if k not in ("weight", "bias")}
    return bnbF.QuantState.from_dict(tensors, torch.device("cpu"))


def assert_absmax_codes_close(q: NF4Tensor, bnb_codes: torch.Tensor, float_absmax: torch.Tensor):
    """q's 8-bit absmax codes equal bitsandbytes' but where its coarse CPU search missed the nearest level."""
    if q.nested_absmax.max() == 0:  # one block: absmax == offset, any code decodes to it
        assert torch.equal(dequantize_absmax(q), float_absmax)
        return
    differ = (q.absmax != bnb_codes).nonzero().view(-1)
    assert differ.numel() <= max(3, bnb_codes.numel() // 20), f"{differ.numel()} of {bnb_codes.numel()} differ"
    nested = q.nested_absmax.repeat_interleave(256)[: float_absmax.numel()]
    scaled = ((float_absmax - q.offset) * (1.0 / nested))[differ].double()  # what the codes quantize
    level = dynamic_map().double()
    ours, theirs = level[q.absmax[differ].long()], level[bnb_codes[differ].long()]
    assert ((scaled - ours).abs() <= (scaled - theirs).abs()).all()


def bnb_linear4bit(linear: nn.Linear, double_quant: bool):
    """A bitsandbytes Linear4bit holding `linear`, quantized on the CPU (Params4bit quantizes on .to(device))."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=double_quant, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=double_quant, blocksize=64)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    layer = layer.to("cpu")
    assert layer.weight.bnb_quantized
    return layer


# 1. Quantization and dequantization against bitsandbytes.functional


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_quantize_matches_bitsandbytes(shape, dtype, double_quant):
    torch.manual_seed(sum(shape))
    w = torch.randn(shape).to(dtype)
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    q = quantize_nf4(w, 64, double_quant)
    float_absmax = quantize_nf4(w, 64, double_quant=False).absmax

    assert q.packed.dtype == torch.uint8 and q.packed.shape == ((w.numel() + 1) // 2, 1)
    assert torch.equal(q.packed, packed)
    assert (q.shape, q.dtype, q.blocksize) == (w.shape, dtype, 64)
    if double_quant:
        assert q.offset == qs.offset.item()
        assert torch.equal(q.nested_absmax, qs.state2.absmax)
        assert torch.equal(q.nested_quant_map, qs.state2.code)
        assert_absmax_codes_close(q, qs.absmax, float_absmax)
    else:
        assert torch.equal(q.absmax, qs.absmax) and q.absmax.dtype == torch.float32

    # Decoding: ours of bitsandbytes' state, and bitsandbytes' of ours (through our serialization).
    theirs = NF4Tensor(packed, w.shape, dtype, 64, qs.absmax, qs.offset.item() if double_quant else None,
                       *((qs.state2.absmax, qs.state2.code) if double_quant else (None, None)))
    assert torch.equal(dequantize_nf4(theirs), bnbF.dequantize_4bit(packed, qs))
    ours = dequantize_nf4(q)
    assert ours.dtype == dtype and ours.shape == w.shape
    assert torch.equal(ours, bnbF.dequantize_4bit(q.packed, bnb_quant_state(nf4_to_state(q))))
    assert torch.equal(dequantize_nf4(q, torch.float32).to(dtype), ours)  # float32 first, one cast


def test_odd_element_count_pads_with_the_zero_code():
    w = torch.randn(3, 5)
    q = quantize_nf4(w, double_quant=False)
    assert q.packed.shape == (8, 1) and q.packed[-1, 0] & 15 == 7  # low nibble of the last byte: the code of 0.0
    assert torch.equal(q.packed, bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")[0])


@pytest.mark.parametrize("blocksize", [32, 128, 256, 4096])
def test_other_blocksizes_match_bitsandbytes(blocksize):
    torch.manual_seed(blocksize)
    w = torch.randn(96, 160, dtype=torch.bfloat16)
    packed, qs = bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    q = quantize_nf4(w, blocksize)
    assert torch.equal(q.packed, packed) and torch.equal(q.nested_absmax, qs.state2.absmax)
    assert_absmax_codes_close(q, qs.absmax, quantize_nf4(w, blocksize, double_quant=False).absmax)
    assert torch.equal(dequantize_nf4(q), bnbF.dequantize_4bit(q.packed, bnb_quant_state(nf4_to_state(q))))


def test_zero_blocks_and_extremes():
    w = torch.zeros(4, 64)
    w[1] = torch.linspace(-3, 3, 64)
    w[2, 5] = -7.0  # a block whose absmax is negative-signed: -1.0 level
    q = quantize_nf4(w, double_quant=False)
    packed, _ = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    assert torch.equal(q.packed, packed)
    assert torch.equal(dequantize_nf4(q)[0], torch.zeros(64)) and dequantize_nf4(q)[2, 5] == -7.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU and bitsandbytes' CUDA library")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_matches_bitsandbytes_cuda(dtype):
    """On the GPU: decoding is bitwise; bitsandbytes' fast-math reciprocal flips a boundary value rarely."""
    torch.manual_seed(7)
    w = torch.randn(4096, 4096, device="cuda").to(dtype)
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    q = quantize_nf4(w)
    nibbles = [torch.stack([p.view(-1) >> 4, p.view(-1) & 15], 1).view(-1).int() for p in (q.packed, packed)]
    assert (nibbles[0] - nibbles[1]).abs().max() <= 1 and (nibbles[0] != nibbles[1]).sum() <= 10
    assert q.offset == qs.offset.item() and torch.equal(q.nested_absmax, qs.state2.absmax)
    assert torch.equal(q.nested_quant_map, qs.state2.code)
    assert (q.absmax.int() - qs.absmax.int()).abs().max() <= 1 and (q.absmax != qs.absmax).sum() <= 10
    theirs = NF4Tensor(packed, w.shape, dtype, 64, qs.absmax, qs.offset.item(), qs.state2.absmax, qs.state2.code)
    assert torch.equal(dequantize_nf4(theirs), bnbF.dequantize_4bit(packed, qs))


# 2. Serialization: bitsandbytes' Linear4bit state_dict, tensor for tensor


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_state_dict_matches_bitsandbytes_linear4bit(double_quant, bias):
    torch.manual_seed(3)
    linear = nn.Linear(192, 96, bias=bias)
    theirs = bnb_linear4bit(linear, double_quant).state_dict()
    ours = Linear4bit.from_linear(linear, torch.float32, double_quant=double_quant).state_dict()
    assert set(ours) == set(theirs)
    for key, t in theirs.items():
        assert ours[key].dtype == t.dtype and ours[key].shape == t.shape, key
        if key != "weight.absmax" or not double_quant:
            assert torch.equal(ours[key], t), key
    meta = json.loads(bytes(ours["weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert meta["shape"] == [96, 192] and meta["quant_type"] == "nf4"


@pytest.mark.parametrize("double_quant", [False, True])
def test_bitsandbytes_state_round_trips(double_quant):
    torch.manual_seed(4)
    linear = nn.Linear(128, 80).to(torch.bfloat16)
    layer = bnb_linear4bit(linear, double_quant)
    theirs = layer.state_dict()
    q = nf4_from_state({k: v for k, v in theirs.items() if k != "bias"}, PREFIX)
    assert q.dtype == torch.bfloat16 and q.shape == (80, 128) and q.double_quant == double_quant
    assert torch.equal(dequantize_nf4(q), bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
    wide = theirs["weight"].reshape(-1).view(torch.bfloat16).unsqueeze(1)  # the same bytes in quant_storage=bf16
    assert torch.equal(nf4_from_state({**theirs, "weight": wide}).packed, q.packed)
    again = nf4_to_state(q)  # writing what was read reproduces every tensor, JSON bytes included
    assert set(again) == set(theirs) - {"bias"}
    for key, t in again.items():
        assert t.dtype == theirs[key].dtype and torch.equal(t, theirs[key]), key

    # load_state_dict into a layer quantized differently takes bitsandbytes' tensors exactly.
    module = Linear4bit.from_linear(nn.Linear(128, 80), torch.float32, blocksize=128, double_quant=not double_quant)
    module.load_state_dict(theirs)
    for key, t in module.state_dict().items():
        assert torch.equal(t, theirs[key]), key


# 3. Linear4bit and quantize_model


def test_forward_equals_linear_with_bitsandbytes_weight():
    torch.manual_seed(5)
    linear = nn.Linear(192, 72)
    module = Linear4bit.from_linear(linear, torch.float32)
    weight = bnbF.dequantize_4bit(module.weight, bnb_quant_state(nf4_to_state(module.nf4)))
    x = torch.randn(2, 7, 192)
    torch.testing.assert_close(module(x), F.linear(x, weight, linear.bias), atol=1e-6, rtol=0)
    assert torch.equal(module.dequantized_weight(), weight)
    with torch.no_grad():
        assert torch.allclose(module(x), bnb_linear4bit(linear, True)(x), atol=1e-5)

    half = Linear4bit.from_linear(linear.to(torch.bfloat16), torch.bfloat16)
    assert half(x.bfloat16()).dtype == torch.bfloat16 and half(x).dtype == torch.float32  # output in the input's dtype


def test_buffers_move_but_statistics_stay_float32():
    module = Linear4bit.from_linear(nn.Linear(64, 48), torch.float32)
    assert [n for n, _ in module.named_parameters()] == ["bias"] and not module.bias.requires_grad
    assert {n for n, _ in module.named_buffers()} == {"weight", "absmax", "nested_absmax", "nested_quant_map"}
    before = module.state_dict()
    module.to(torch.float16)
    assert module.bias.dtype == torch.float16 and module.nested_absmax.dtype == torch.float32
    assert module.nested_quant_map.dtype == torch.float32 and module.absmax.dtype == torch.uint8
    for key, t in module.state_dict().items():
        assert key == "bias" or torch.equal(t, before[key]), key
    plain = Linear4bit.from_linear(nn.Linear(64, 48), torch.float32, double_quant=False).bfloat16()
    assert plain.absmax.dtype == torch.float32
    assert sum(b.numel() * b.element_size() for b in module.buffers()) == nf4_bytes(64 * 48)
    assert sum(b.numel() * b.element_size() for b in plain.buffers()) == nf4_bytes(64 * 48, double_quant=False)


def test_quantize_model_replaces_exactly_the_non_skipped_linears():
    from tests.tiny import tiny_hf_model

    model = tiny_hf_model("llama")
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        before = model(ids).logits
    quantize_model(model, torch.float32)
    quantized = {n for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    assert quantized == linears - {"lm_head"} and len(quantized) == 3 * 7
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    with torch.no_grad():
        after = model(ids).logits
    assert torch.isfinite(after).all() and F.cosine_similarity(after.flatten(), before.flatten(), dim=0) > 0.9

    seq = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8)))
    quantize_model(seq, torch.bfloat16, skip_modules=["2.1"])
    assert [type(m).__name__ for m in (seq[0], seq[2][0], seq[2][1])] == ["Linear4bit", "Linear4bit", "Linear"]
    assert seq(torch.randn(3, 64)).shape == (3, 8)


def test_nf4_bytes_counts_a_quarter_of_bf16_and_some():
    numel = 4096 * 4096
    assert nf4_bytes(numel) == numel // 2 + numel // 64 + 4 * numel // (64 * 256) + 1024
    assert nf4_bytes(numel, double_quant=False) == numel // 2 + 4 * numel // 64
    assert nf4_bytes(101, blocksize=64) == 51 + 2 + 4 + 1024


# 4. A transformers 4-bit checkpoint (transformers + bitsandbytes quantize on the CPU with device_map="cpu")


def test_transformers_4bit_checkpoint_reads_and_writes_exactly(tmp_path):
    import transformers
    from safetensors.torch import load_file

    torch.manual_seed(6)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    full = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    full.save_pretrained(tmp_path / "full")
    bnb_config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full", quantization_config=bnb_config,
                                                              device_map="cpu")
    model.save_pretrained(tmp_path / "nf4")
    saved = load_file(tmp_path / "nf4" / "model.safetensors")

    prefixes = sorted(k.removesuffix("weight.quant_state.bitsandbytes__nf4") for k in saved if k.endswith("__nf4"))
    linears = {n + "." for n, m in full.named_modules() if isinstance(m, nn.Linear)}
    assert set(prefixes) == linears - {"lm_head."} and len(prefixes) == 2 * 7
    for prefix in prefixes:
        state = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix + "weight")}
        q = nf4_from_state(state, prefix)
        layer = model.get_submodule(prefix[:-1])
        assert torch.equal(dequantize_nf4(q), bnbF.dequantize_4bit(layer.weight.data, layer.weight.quant_state))

        module = Linear4bit.from_state(state, q.shape[1], q.shape[0], None, torch.bfloat16, prefix)
        written = module.state_dict()
        assert set(written) == set(state)
        for key, t in state.items():
            assert written[key].dtype == t.dtype and torch.equal(written[key], t), prefix + key

        # Quantizing the original bf16 weight ourselves gives the checkpoint's codes and statistics.
        original = full.get_submodule(prefix[:-1]).weight
        ours = quantize_nf4(original)
        assert torch.equal(ours.packed, q.packed) and torch.equal(ours.nested_absmax, q.nested_absmax)
        assert ours.offset == q.offset
        assert_absmax_codes_close(ours, q.absmax, quantize_nf4(original, double_quant=False).absmax)


# 5. Bad input


def test_fp4_state_is_refused_with_a_clear_error():
    packed, qs = bnbF.quantize_4bit(torch.randn(8, 64), blocksize=64, quant_type="fp4", compress_statistics=True)
    state = {"weight": packed, **{"weight." + k: v for k, v in qs.as_dict(packed=True).items()}}
    with pytest.raises(GazelleError, match="fp4 is not supported") as e:
        nf4_from_state(state, PREFIX)
    assert PREFIX + "weight.quant_state.bitsandbytes__fp4" in str(e.value) and "\n" not in str(e.value)


def test_missing_or_cast_tensors_are_named():
    state = nf4_to_state(quantize_nf4(torch.randn(8, 64)))
    for key in ["weight.absmax", "weight.nested_absmax", "weight.quant_state.bitsandbytes__nf4", "weight"]:
        with pytest.raises(GazelleError, match=f"lacks {PREFIX}{key}:") as e:
            nf4_from_state({k: v for k, v in state.items() if k != key}, PREFIX)
        assert "\n" not in str(e.value)
    plain = nf4_to_state(quantize_nf4(torch.randn(8, 64), double_quant=False))
    with pytest.raises(GazelleError, match="weight.absmax is torch.bfloat16 .* stored dtype"):
        nf4_from_state({**plain, "weight.absmax": plain["weight.absmax"].bfloat16()})
    with pytest.raises(GazelleError, match="not the NF4 table"):
        nf4_from_state({**plain, "weight.quant_map": -plain["weight.quant_map"]})
    with pytest.raises(GazelleError, match=r"\[8, 64\] .* layer is \[64, 8\]"):
        Linear4bit.from_state(plain, 8, 64, None, torch.float32)
    broken = torch.tensor(list(b'{"quant_type": "nf4"'), dtype=torch.uint8)
    with pytest.raises(GazelleError, match="not bitsandbytes' JSON"):
        nf4_from_state({**plain, "weight.quant_state.bitsandbytes__nf4": broken})


def test_bad_quantize_arguments():
    with pytest.raises(GazelleError, match="blocksize"):
        quantize_nf4(torch.randn(4, 64), blocksize=48)
    with pytest.raises(GazelleError, match="meta device"):
        quantize_nf4(torch.empty(4, 64, device="meta"))
    with pytest.raises(GazelleError, match="not torch.int64"):
        quantize_nf4(torch.ones(4, 64, dtype=torch.int64))
    with pytest.raises(GazelleError, match="compute_dtype"):
        Linear4bit.from_linear(nn.Linear(64, 8), torch.int8)


def test_gazelle_does_not_import_bitsandbytes():
    code = "import sys, gazelle.quant; assert 'bitsandbytes' not in sys.modules"
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
