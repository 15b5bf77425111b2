"""Read a GGUF file (llama.cpp's single-file model format) as an HF config dict and HF-named tensors.

gazelle's model code uses Hugging Face parameter names and config keys, so everything llama.cpp's
converter changed on the way into GGUF is undone here: tensor names, the interleaved q/k row order of
the llama architecture, the +1 baked into Gemma norm weights, and rope scaling that only survives as
tensors. Quantized tensors are dequantized one at a time by the `gguf` package.
"""

from __future__ import annotations

import functools
import os
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

import gguf
import numpy as np
import torch

from gazelle.errors import GazelleError

# Tensor stems under `blk.N.` -> HF stems under `model.layers.N.`; `.weight` / `.bias` carry over.
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 2/3 have four norms per block; GGUF's ffn_norm is the one *before* the MLP there.
_GEMMA_BLOCK_NAMES = _BLOCK_NAMES | {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Phi-3 keeps its fused projections in both formats.
_PHI3_BLOCK_NAMES = _BLOCK_NAMES | {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
# Tensors that carry rope scaling; read_gguf_config turns them into config, they are not parameters.
_ROPE_TENSORS = {"rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"}


@dataclass(frozen=True)
class _Family:
    model_type: str
    block_names: dict[str, str]
    interleaved_qk: bool = False  # converter reordered q/k rows to llama.cpp's interleaved rotary layout
    norm_offset: float = 0.0  # GGUF norm weight = HF norm weight + norm_offset


_FAMILIES = {  # general.architecture -> family; Mistral GGUFs also say "llama"
    "llama": _Family("llama", _BLOCK_NAMES, interleaved_qk=True),
    "qwen2": _Family("qwen2", _BLOCK_NAMES),
    "qwen3": _Family("qwen3", _BLOCK_NAMES),
    "gemma2": _Family("gemma2", _GEMMA_BLOCK_NAMES, norm_offset=1.0),
    "gemma3": _Family("gemma3_text", _GEMMA_BLOCK_NAMES, norm_offset=1.0),
    "phi3": _Family("phi3", _PHI3_BLOCK_NAMES),
}
# Gemma 27B models scale queries by hidden/heads rather than head_dim; llama.cpp knows them by depth.
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}

# What GGUFReader raises on truncated or corrupt bytes (it parses with numpy views and struct).
_CORRUPT = (ValueError, IndexError, KeyError, OverflowError, struct.error)


def read_gguf_config(path: str) -> dict:
    """An HF-style config.json dict built from the GGUF metadata."""
    reader = _open(path)
    arch, family = _family(reader, path)
    tensors = {t.name: t for t in reader.tensors}

    def get(key: str, default=None):
        field = reader.get_field(key.format(arch=arch))
        return default if field is None else field.contents()

    def need(key: str):
        value = get(key)
        if value is None:
            raise GazelleError(f"{path} lacks the GGUF metadata key {key.format(arch=arch)}")
        return value

    if "token_embd.weight" not in tensors:
        raise GazelleError(f"{path} has no token_embd.weight tensor; it is not a complete {arch} model")
    hidden, heads = need("{arch}.embedding_length"), need("{arch}.attention.head_count")
    head_dim = get("{arch}.attention.key_length", hidden // heads)
    config = {
        "model_type": family.model_type,
        "vocab_size": _shape(tensors["token_embd.weight"])[0],
        "hidden_size": hidden,
        "intermediate_size": need("{arch}.feed_forward_length"),
        "num_hidden_layers": need("{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": need("{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": get("{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": need("{arch}.context_length"),
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    for key, field in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        if (value := get(f"tokenizer.ggml.{field}_token_id")) is not None:
            config[key] = value

    rope_dim = get("{arch}.rope.dimension_count", head_dim)
    if rope_dim < head_dim:
        config["partial_rotary_factor"] = rope_dim / head_dim
    if arch == "phi3" and (orig := get("{arch}.rope.scaling.original_context_length")) is not None:
        config["original_max_position_embeddings"] = orig  # HF Phi-3 keeps it at the top level
    if (scaling := _rope_scaling(get, tensors, config["rope_theta"], rope_dim, path)) is not None:
        config["rope_scaling"] = scaling
    # Phi-4 writes sliding_window 0 to mean "none".
    if window := get("{arch}.attention.sliding_window"):
        config["sliding_window"] = window

    if arch in _GEMMA_27B_LAYERS:
        config["hidden_activation"] = "gelu_pytorch_tanh"  # GGUF stores no activation: gemma's is GeGLU (tanh)
        depth_27b = config["num_hidden_layers"] == _GEMMA_27B_LAYERS[arch]
        config["query_pre_attn_scalar"] = hidden // heads if depth_27b else head_dim
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if (value := get(f"{{arch}}.{key}")) is not None:
                config[key] = value
    if arch == "gemma3":
        config["rope_local_base_freq"] = 10000.0  # sliding layers; GGUF only stores the global base
    return config


def iter_gguf_tensors(
    path: str, config: dict, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (hf_parameter_name, tensor) one tensor at a time, dequantized to `dtype` on `device`."""
    reader = _open(path)
    _, family = _family(reader, path)
    # Name every tensor before yielding any, so an unknown one fails before a model is half loaded.
    named = [(_hf_name(t.name, family, path), t) for t in reader.tensors if t.name not in _ROPE_TENSORS]
    for name, tensor in named:
        weights = torch.from_numpy(_dequantize(tensor, path))
        if family.interleaved_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            weights = _deinterleave_rows(weights, config["num_attention_heads"])
        elif family.interleaved_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            weights = _deinterleave_rows(weights, config["num_key_value_heads"])
        elif family.norm_offset and name.endswith("norm.weight"):
            weights = weights - family.norm_offset
        yield name, weights.to(device=device, dtype=dtype)


def gguf_chat_template(path: str) -> str | None:
    """tokenizer.chat_template from metadata, or None."""
    field = _open(path).get_field("tokenizer.chat_template")
    return None if field is None else field.contents()


def gguf_file_type(path: str) -> str:
    """The file's quantization as llama.cpp names it ("Q4_1", "Q4_K_M", "F16"), for display."""
    reader = _open(path)
    field = reader.get_field("general.file_type")
    known = {member.value: member.name for member in gguf.LlamaFileType}
    if field is not None and field.contents() in known:
        return known[field.contents()].removeprefix("MOSTLY_").removeprefix("ALL_")
    # Absent, or newer than this gguf package: name the storage type that holds the most values.
    values = Counter()
    for tensor in reader.tensors:
        values[tensor.tensor_type.name] += int(tensor.n_elements)
    return values.most_common(1)[0][0] if values else "unknown"


def _open(path: str) -> gguf.GGUFReader:
    """Memory-map and parse the file, turning parse failures into one-line GazelleErrors.

    Parsing the metadata (a whole vocabulary and merge list) takes seconds, and loading asks for the
    config, the tensors and the chat template in turn: the parsed reader is kept for an unchanged file.
    """
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise GazelleError(f"cannot open {path}: {exc.strerror or exc}") from exc
    return _parse(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _parse(path: str, size: int, mtime_ns: int) -> gguf.GGUFReader:
    try:
        reader = gguf.GGUFReader(path)
    except OSError as exc:
        raise GazelleError(f"cannot open {path}: {exc.strerror or exc}") from exc
    except _CORRUPT as exc:
        raise GazelleError(f"{path} is not a readable GGUF file (truncated or corrupt: {_reason(exc)})") from exc
    # The first part of a split GGUF parses fine but holds only some of the tensors.
    if (parts := reader.get_field("split.count")) is not None and parts.contents() > 1:
        raise GazelleError(f"{path} is one part of a split GGUF; merge the parts with llama-gguf-split --merge")
    return reader


def _reason(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:160] if lines else type(exc).__name__


def _family(reader: gguf.GGUFReader, path: str) -> tuple[str, _Family]:
    field = reader.get_field("general.architecture")
    if field is None:
        raise GazelleError(f"{path} does not say which model it holds (no general.architecture key)")
    arch = field.contents()
    if arch not in _FAMILIES:
        raise GazelleError(
            f"{path} holds a {arch!r} model, which gazelle does not support; "
            f"supported GGUF architectures: {', '.join(_FAMILIES)}"
        )
    return arch, _FAMILIES[arch]


def _hf_name(gguf_name: str, family: _Family, path: str) -> str:
    stem, _, kind = gguf_name.rpartition(".")
    block, _, layer_stem = stem.partition(".")
    layer, _, layer_stem = layer_stem.partition(".")
    if kind in ("weight", "bias"):
        if stem in _TOP_NAMES:
            return f"{_TOP_NAMES[stem]}.{kind}"
        if block == "blk" and layer.isdigit() and layer_stem in family.block_names:
            return f"model.layers.{layer}.{family.block_names[layer_stem]}.{kind}"
    raise GazelleError(f"{path} has a tensor gazelle does not know for {family.model_type}: {gguf_name!r}")


def _shape(tensor) -> tuple[int, ...]:
    # GGUFReader reports shapes in ggml order (fastest-varying dimension first): reversed from torch.
    return tuple(int(n) for n in reversed(tensor.shape))


def _dequantize(tensor, path: str) -> np.ndarray:
    """The tensor as a float32 array that owns its memory (not a view of the memory-mapped file)."""
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise GazelleError(
            f"{path}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the gguf package "
            "cannot dequantize; use a GGUF with another quantization"
        ) from exc
    except _CORRUPT as exc:
        raise GazelleError(f"{path} is not a readable GGUF file (truncated or corrupt: {_reason(exc)})") from exc
    if not values.flags.writeable:  # F32 comes back as a view of the read-only map: own a copy
        values = np.array(values)
    return values.reshape(_shape(tensor))


def _deinterleave_rows(weights: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo the converter's q/k row order for the llama architecture.

    HF lays each head's rows out as [first rotary half, second half]; llama.cpp rotates adjacent
    pairs, so the converter interleaved them: row 2*i of a head is HF row i, row 2*i+1 is HF row
    i + head_dim/2. Viewing a head's rows as (head_dim/2, 2) and transposing restores the halves.
    """
    rows = weights.shape[0]
    return weights.reshape(n_heads, rows // n_heads // 2, 2, *weights.shape[1:]).transpose(1, 2).reshape(weights.shape)


def _rope_scaling(get, tensors: dict, rope_theta: float, rope_dim: int, path: str) -> dict | None:
    """HF rope_scaling from GGUF metadata (linear, yarn) or from rope tensors (longrope, llama3)."""
    if "rope_factors_long.weight" in tensors:  # Phi-3 long context: per-frequency factors as tensors
        return {
            "rope_type": "longrope",
            "long_factor": _dequantize(tensors["rope_factors_long.weight"], path).tolist(),
            "short_factor": _dequantize(tensors["rope_factors_short.weight"], path).tolist(),
        }
    if "rope_freqs.weight" in tensors:
        return _llama3_scaling(_dequantize(tensors["rope_freqs.weight"], path), rope_theta, rope_dim, path)

    kind, factor = get("{arch}.rope.scaling.type"), get("{arch}.rope.scaling.factor")
    if kind is None and (factor := get("{arch}.rope.scale_linear")) is not None:  # older converters
        kind = "linear"
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": factor}
        for hf_key, key in (
            ("original_max_position_embeddings", "original_context_length"),
            ("beta_fast", "yarn_beta_fast"),
            ("beta_slow", "yarn_beta_slow"),
        ):
            if (value := get(f"{{arch}}.rope.scaling.{key}")) is not None:
                scaling[hf_key] = value
        return scaling
    raise GazelleError(f"{path} uses rope scaling {kind!r}, which gazelle cannot express as an HF config")


def _llama3_scaling(divisors: np.ndarray, rope_theta: float, rope_dim: int, path: str) -> dict:
    """Recover HF's "llama3" rope scaling from rope_freqs.weight (one frequency divisor per pair).

    GGUF keeps only the divisors. Every Llama 3.x release uses low/high frequency factors 1 and 4
    around an 8192-token original context, so rebuild the divisors from those and accept them only
    if they reproduce the stored ones.
    """
    factor, low, high, original = float(divisors.max()), 1.0, 4.0, 8192
    wavelength = 2 * np.pi * rope_theta ** (np.arange(0, rope_dim, 2, dtype=np.float64) / rope_dim)
    smooth = (original / wavelength - low) / (high - low)
    expected = np.where(
        wavelength < original / high, 1.0,
        np.where(wavelength > original / low, factor, 1 / ((1 - smooth) / factor + smooth)),
    )
    if expected.shape != divisors.shape or not np.allclose(expected, divisors, rtol=1e-3):
        raise GazelleError(
            f"{path} has rope frequency factors (rope_freqs.weight) that do not match Llama 3 rope scaling; "
            "gazelle cannot express them as an HF config"
        )
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }
