"""gguf_file against transformers' own GGUF loader (SmolLM2) and against tiny GGUFs written here."""

import math
import os

import gguf
import numpy as np
import pytest
import torch
import transformers

from gazelle.errors import GazelleError
from gazelle.models.gguf_file import gguf_chat_template, gguf_file_type, iter_gguf_tensors, read_gguf_config


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> str:
    return smollm2_gguf


@pytest.fixture(scope="module")
def smollm2_config(smollm2) -> dict:
    return read_gguf_config(smollm2)


def test_config_matches_transformers(smollm2_config, hf_smollm2):
    hf = hf_smollm2.config
    compared = set()
    for key, value in smollm2_config.items():
        if key == "rope_theta":  # transformers 5 moved it into rope_parameters
            assert value == hf.rope_parameters["rope_theta"]
        elif hasattr(hf, key):
            assert value == getattr(hf, key), key
        else:
            continue
        compared.add(key)
    assert compared >= {
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
        "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
    }
    assert "rope_scaling" not in smollm2_config and "partial_rotary_factor" not in smollm2_config


def test_tensors_match_transformers(smollm2, smollm2_config, hf_smollm2):
    """Also the oracle for undoing the llama q/k row permutation on real (quantized) weights."""
    expected = hf_smollm2.state_dict()
    assert smollm2_config["tie_word_embeddings"]
    expected.pop("lm_head.weight")
    seen = set()
    for name, tensor in iter_gguf_tensors(smollm2, smollm2_config, torch.float32):
        assert name in expected, name
        assert tensor.dtype == torch.float32 and tensor.shape == expected[name].shape, name
        assert torch.equal(tensor, expected[name]) or (tensor - expected[name]).abs().max().item() <= 1e-6, name
        seen.add(name)
    assert seen == set(expected)


# --- unreadable files ---------------------------------------------------------------------------


def _read_everything(path: str) -> None:
    config = read_gguf_config(path)
    for _ in iter_gguf_tensors(path, config, torch.float32):
        pass


def _assert_one_line_error(path, excinfo) -> None:
    message = str(excinfo.value)
    assert str(path) in message and "\n" not in message


@pytest.mark.parametrize("where", ["first 1 MB", "middle of the tensor data"])
def test_truncated_gguf_raises(smollm2, tmp_path, where):
    # SmolLM2's metadata (vocabulary included) ends about 1.8 MB in; the tensors fill the rest.
    cut = 1_000_000 if where == "first 1 MB" else os.path.getsize(smollm2) // 2
    path = tmp_path / "cut.gguf"
    with open(smollm2, "rb") as source:
        path.write_bytes(source.read(cut))
    with pytest.raises(GazelleError, match="is not a readable GGUF file") as excinfo:
        _read_everything(str(path))
    _assert_one_line_error(path, excinfo)


@pytest.mark.parametrize("content", [b"", b"GGUF", b"not a model at all\n" * 100])
def test_non_gguf_file_raises(tmp_path, content):
    path = tmp_path / "model.gguf"
    path.write_bytes(content)
    for read in (read_gguf_config, gguf_chat_template):
        with pytest.raises(GazelleError, match="is not a readable GGUF file") as excinfo:
            read(str(path))
        _assert_one_line_error(path, excinfo)


def test_missing_file_raises(tmp_path):
    path = tmp_path / "absent.gguf"
    with pytest.raises(GazelleError, match="cannot open") as excinfo:
        read_gguf_config(str(path))
    _assert_one_line_error(path, excinfo)


# --- tiny GGUFs written here --------------------------------------------------------------------


def _write_gguf(path, arch: str, metadata: dict, tensors: dict[str, np.ndarray]) -> str:
    """Write a GGUF of float32 tensors; metadata keys may contain {arch}."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in metadata.items():
        key = key.format(arch=arch)
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    for name, array in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


HIDDEN, HEADS, KV_HEADS, FFN, VOCAB, LAYERS = 16, 4, 2, 24, 32, 2
# Gemma and Qwen3 declare head_dim apart from hidden/heads; the others derive it.
HEAD_DIM = {"gemma2": 8, "gemma3": 8, "qwen3": 8}


def _tiny_model(arch: str, *, tied: bool = True, seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """Metadata and GGUF-named tensors of a random 2-layer model laid out the way llama.cpp writes `arch`."""
    rng = np.random.default_rng(seed)
    head_dim = HEAD_DIM.get(arch, HIDDEN // HEADS)
    q_rows, kv_rows = HEADS * head_dim, KV_HEADS * head_dim
    metadata = {
        "{arch}.context_length": 256,
        "{arch}.embedding_length": HIDDEN,
        "{arch}.feed_forward_length": FFN,
        "{arch}.block_count": LAYERS,
        "{arch}.attention.head_count": HEADS,
        "{arch}.attention.head_count_kv": KV_HEADS,
        "{arch}.attention.key_length": head_dim,
        "{arch}.attention.layer_norm_rms_epsilon": 1e-6,
        "{arch}.rope.freq_base": 10000.0,
        "{arch}.rope.dimension_count": head_dim,
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 0,  # else HF's Phi-3 default (32000) lies outside this vocabulary
    }
    tensors = {"token_embd.weight": rng.standard_normal((VOCAB, HIDDEN)), "output_norm.weight": rng.random(HIDDEN)}
    if not tied:
        tensors["output.weight"] = rng.standard_normal((VOCAB, HIDDEN))
    shapes = {
        "attn_norm.weight": (HIDDEN,),
        "ffn_norm.weight": (HIDDEN,),
        "attn_output.weight": (HIDDEN, q_rows),
        "ffn_down.weight": (HIDDEN, FFN),
    }
    if arch == "phi3":
        shapes |= {"attn_qkv.weight": (q_rows + 2 * kv_rows, HIDDEN), "ffn_up.weight": (2 * FFN, HIDDEN)}
    else:
        shapes |= {
            "attn_q.weight": (q_rows, HIDDEN),
            "attn_k.weight": (kv_rows, HIDDEN),
            "attn_v.weight": (kv_rows, HIDDEN),
            "ffn_gate.weight": (FFN, HIDDEN),
            "ffn_up.weight": (FFN, HIDDEN),
        }
    if arch == "qwen2":
        shapes |= {"attn_q.bias": (q_rows,), "attn_k.bias": (kv_rows,), "attn_v.bias": (kv_rows,)}
    if arch in ("qwen3", "gemma3"):
        shapes |= {"attn_q_norm.weight": (head_dim,), "attn_k_norm.weight": (head_dim,)}
    if arch in ("gemma2", "gemma3"):
        shapes |= {"post_attention_norm.weight": (HIDDEN,), "post_ffw_norm.weight": (HIDDEN,)}
        metadata["{arch}.attention.sliding_window"] = 64
    if arch == "gemma2":
        metadata |= {"{arch}.attn_logit_softcapping": 50.0, "{arch}.final_logit_softcapping": 30.0}
    for layer in range(LAYERS):
        for stem, shape in shapes.items():
            tensors[f"blk.{layer}.{stem}"] = rng.standard_normal(shape)
    return metadata, tensors


@pytest.mark.parametrize(
    "arch, tied",
    [("llama", True), ("qwen2", False), ("qwen3", True), ("gemma2", True), ("gemma3", True), ("phi3", False)],
)
def test_tiny_model_layout_matches_transformers(tmp_path, arch, tied):
    """Names and shapes equal those of the transformers model built from read_gguf_config's dict."""
    path = _write_gguf(tmp_path / f"{arch}.gguf", arch, *_tiny_model(arch, tied=tied))
    config = read_gguf_config(path)
    assert config["tie_word_embeddings"] is tied
    fields = {key: value for key, value in config.items() if key != "model_type"}
    hf_config = transformers.AutoConfig.for_model(config["model_type"], **fields)
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    expected = {name: tuple(t.shape) for name, t in hf_model.state_dict().items()}
    if tied:
        expected.pop("lm_head.weight")
    got = {name: tuple(t.shape) for name, t in iter_gguf_tensors(path, config, torch.bfloat16)}
    assert got == expected


def test_gemma2_config_and_norm_offset(tmp_path):
    metadata, tensors = _tiny_model("gemma2")
    path = _write_gguf(tmp_path / "gemma2.gguf", "gemma2", metadata, tensors)
    config = read_gguf_config(path)
    assert config["model_type"] == "gemma2"
    assert config["head_dim"] == config["query_pre_attn_scalar"] == 8  # key_length, not hidden/heads = 4
    assert config["attn_logit_softcapping"] == 50.0 and config["final_logit_softcapping"] == 30.0
    assert config["sliding_window"] == 64
    got = dict(iter_gguf_tensors(path, config, torch.float32))
    # GGUF stores Gemma norm weights as w + 1: every norm comes back 1 lower, everything else as stored.
    for gguf_name, hf_name in [
        ("blk.1.attn_norm.weight", "model.layers.1.input_layernorm.weight"),
        ("blk.1.post_attention_norm.weight", "model.layers.1.post_attention_layernorm.weight"),
        ("blk.1.ffn_norm.weight", "model.layers.1.pre_feedforward_layernorm.weight"),
        ("blk.1.post_ffw_norm.weight", "model.layers.1.post_feedforward_layernorm.weight"),
        ("output_norm.weight", "model.norm.weight"),
    ]:
        torch.testing.assert_close(got[hf_name], torch.tensor(tensors[gguf_name] - 1, dtype=torch.float32))
    for gguf_name, hf_name in [
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
        ("blk.0.attn_k.weight", "model.layers.0.self_attn.k_proj.weight"),
        ("token_embd.weight", "model.embed_tokens.weight"),
    ]:
        assert torch.equal(got[hf_name], torch.tensor(tensors[gguf_name], dtype=torch.float32))


def _interleave_rows(weights: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to llama q/k rows: per head, [half A, half B] -> [a0, b0, a1, b1, ...]."""
    rows = weights.shape[0]
    per_head = weights.reshape(n_heads, 2, rows // n_heads // 2, *weights.shape[1:])
    return per_head.swapaxes(1, 2).reshape(weights.shape)


def test_llama_qk_rows_are_deinterleaved(tmp_path):
    metadata, tensors = _tiny_model("llama")
    hf_q, hf_k = tensors["blk.0.attn_q.weight"], tensors["blk.0.attn_k.weight"]
    tensors["blk.0.attn_q.weight"] = _interleave_rows(hf_q, HEADS)
    tensors["blk.0.attn_k.weight"] = _interleave_rows(hf_k, KV_HEADS)
    assert not np.array_equal(tensors["blk.0.attn_q.weight"], hf_q)
    path = _write_gguf(tmp_path / "llama.gguf", "llama", metadata, tensors)
    got = dict(iter_gguf_tensors(path, read_gguf_config(path), torch.float32))
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], torch.tensor(hf_q, dtype=torch.float32))
    assert torch.equal(got["model.layers.0.self_attn.k_proj.weight"], torch.tensor(hf_k, dtype=torch.float32))
    # v is not rotated, so it is not reordered
    v = tensors["blk.0.attn_v.weight"]
    assert torch.equal(got["model.layers.0.self_attn.v_proj.weight"], torch.tensor(v, dtype=torch.float32))


def test_qwen2_keeps_rows_and_maps_biases(tmp_path):
    metadata, tensors = _tiny_model("qwen2")
    path = _write_gguf(tmp_path / "qwen2.gguf", "qwen2", metadata, tensors)
    got = dict(iter_gguf_tensors(path, read_gguf_config(path), torch.float32))
    for stem, hf_stem in [("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj")]:
        for kind in ("weight", "bias"):
            stored = torch.tensor(tensors[f"blk.1.{stem}.{kind}"], dtype=torch.float32)
            assert torch.equal(got[f"model.layers.1.self_attn.{hf_stem}.{kind}"], stored)


def test_unknown_architecture_lists_supported(tmp_path):
    path = _write_gguf(tmp_path / "mamba.gguf", "mamba", {}, {"token_embd.weight": np.zeros((4, 2))})
    with pytest.raises(GazelleError) as excinfo:
        read_gguf_config(path)
    message = str(excinfo.value)
    assert path in message and "'mamba'" in message and "\n" not in message
    for family in ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"):
        assert family in message


def test_unknown_tensor_is_named(tmp_path):
    metadata, tensors = _tiny_model("llama")
    tensors["blk.0.ssm_conv1d.weight"] = np.zeros((4, 4))
    path = _write_gguf(tmp_path / "odd.gguf", "llama", metadata, tensors)
    with pytest.raises(GazelleError, match="blk.0.ssm_conv1d.weight") as excinfo:
        next(iter_gguf_tensors(path, read_gguf_config(path), torch.float32))
    assert path in str(excinfo.value)


def test_chat_template(tmp_path):
    metadata, tensors = _tiny_model("llama")
    plain = _write_gguf(tmp_path / "plain.gguf", "llama", metadata, tensors)
    template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
    chat = _write_gguf(tmp_path / "chat.gguf", "llama", metadata | {"tokenizer.chat_template": template}, tensors)
    assert gguf_chat_template(plain) is None
    assert gguf_chat_template(chat) == template


def test_file_type(tmp_path):
    metadata, tensors = _tiny_model("llama")
    untyped = _write_gguf(tmp_path / "untyped.gguf", "llama", metadata, tensors)
    typed = _write_gguf(tmp_path / "typed.gguf", "llama", metadata | {"general.file_type": 3}, tensors)
    assert gguf_file_type(untyped) == "F32"  # from the tensors
    assert gguf_file_type(typed) == "Q4_1"  # from the metadata: llama.cpp's file type 3


# --- rope scaling -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        (
            {"{arch}.rope.scaling.type": "linear", "{arch}.rope.scaling.factor": 4.0},
            {"rope_type": "linear", "factor": 4.0},
        ),
        (
            {"{arch}.rope.scaling.type": "yarn", "{arch}.rope.scaling.factor": 4.0,
             "{arch}.rope.scaling.original_context_length": 64},
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
        ),
        ({"{arch}.rope.scaling.type": "none"}, None),
    ],
)
def test_rope_scaling_from_metadata(tmp_path, extra, expected):
    metadata, tensors = _tiny_model("qwen2")
    path = _write_gguf(tmp_path / "m.gguf", "qwen2", metadata | extra, tensors)
    assert read_gguf_config(path).get("rope_scaling") == expected


def test_unexpressible_rope_scaling_raises(tmp_path):
    metadata, tensors = _tiny_model("qwen2")
    path = _write_gguf(tmp_path / "m.gguf", "qwen2", metadata | {"{arch}.rope.scaling.type": "mystery"}, tensors)
    with pytest.raises(GazelleError, match="mystery"):
        read_gguf_config(path)


def _llama3_divisors(theta: float, dim: int, factor: float) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter computes it for Llama 3.1+ (low 1, high 4, 8192 tokens)."""
    divisors = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * theta ** (i / dim)
        if wavelength < 8192 / 4:
            divisors.append(1.0)
        elif wavelength > 8192 / 1:
            divisors.append(factor)
        else:
            smooth = (8192 / wavelength - 1) / (4 - 1)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors)


def test_llama3_rope_freqs_become_llama3_scaling(tmp_path):
    """The recovered rope_scaling gives transformers the same frequencies llama.cpp would use."""
    theta, head_dim = 500000.0, 64
    metadata, tensors = _tiny_model("llama")
    metadata |= {"{arch}.rope.freq_base": theta, "{arch}.context_length": 131072}
    metadata |= {"{arch}.attention.key_length": head_dim, "{arch}.rope.dimension_count": head_dim}
    divisors = _llama3_divisors(theta, head_dim, 32.0)
    path = _write_gguf(tmp_path / "llama3.gguf", "llama", metadata, tensors | {"rope_freqs.weight": divisors})
    config = read_gguf_config(path)
    assert config["rope_scaling"]["rope_type"] == "llama3" and config["rope_scaling"]["factor"] == 32.0

    fields = {key: value for key, value in config.items() if key != "model_type"}
    hf_config = transformers.LlamaConfig(**fields)
    hf_inv_freq, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    plain_inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    torch.testing.assert_close(hf_inv_freq.double(), plain_inv_freq / torch.tensor(divisors), rtol=1e-5, atol=0)
    # rope_freqs.weight is config, not a parameter
    names = [name for name, _ in iter_gguf_tensors(path, config, torch.float32)]
    assert not any("rope" in name for name in names)


def test_foreign_rope_freqs_raise(tmp_path):
    metadata, tensors = _tiny_model("llama")
    tensors["rope_freqs.weight"] = np.linspace(1, 3, 2)
    path = _write_gguf(tmp_path / "m.gguf", "llama", metadata, tensors)
    with pytest.raises(GazelleError, match="rope_freqs"):
        read_gguf_config(path)
