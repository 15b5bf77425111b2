"""Write a gazelle Decoder (LoRA merged on the fly) as one GGUF file for llama.cpp, Ollama and friends.

Everything llama.cpp's own converter and quantizer decide is decided here from the same facts: the
architecture name and hyperparameter keys, tensor names (the reader's table in gguf_file, inverted),
the interleaved q/k row order of the llama architecture, Gemma's (1 + w) norms, rope scaling stored as
tensors (llama3's rope_freqs, longrope's factor pairs), the tokenizer metadata, and for k-quants the
per-tensor type mix of llama.cpp's `llama_tensor_get_type` (q4_k_m: q6_k for half of attn_v and
ffn_down, q6_k for the output head, ...).

Tensors are read, converted, quantized and written one at a time into a temporary file that replaces
the target only once it is complete, so memory stays at one tensor beyond the model and a failure
(a full disk included) leaves nothing half-written behind.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from gazelle.errors import GazelleError
from gazelle.models.config import DecoderConfig
from gazelle.models.gguf_file import _FAMILIES, _TOP_NAMES, _open
from gazelle.models.rope import inverse_frequencies
from gazelle.utils.logging import get_logger

log = get_logger(__name__)
Q = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType

# quantization_method -> (llama.cpp file type, storage type of a plain 2-D weight).
METHODS: dict[str, tuple[gguf.LlamaFileType, gguf.GGMLQuantizationType]] = {
    "f32": (FT.ALL_F32, Q.F32),
    "f16": (FT.MOSTLY_F16, Q.F16),
    "bf16": (FT.MOSTLY_BF16, Q.BF16),
    "q8_0": (FT.MOSTLY_Q8_0, Q.Q8_0),
    "q4_0": (FT.MOSTLY_Q4_0, Q.Q4_0),
    "q4_1": (FT.MOSTLY_Q4_1, Q.Q4_1),
    "q5_0": (FT.MOSTLY_Q5_0, Q.Q5_0),
    "q5_1": (FT.MOSTLY_Q5_1, Q.Q5_1),
    "q2_k": (FT.MOSTLY_Q2_K, Q.Q2_K),
    "q3_k_s": (FT.MOSTLY_Q3_K_S, Q.Q3_K),
    "q3_k_m": (FT.MOSTLY_Q3_K_M, Q.Q3_K),
    "q3_k_l": (FT.MOSTLY_Q3_K_L, Q.Q3_K),
    "q4_k_s": (FT.MOSTLY_Q4_K_S, Q.Q4_K),
    "q4_k_m": (FT.MOSTLY_Q4_K_M, Q.Q4_K),
    "q5_k_s": (FT.MOSTLY_Q5_K_S, Q.Q5_K),
    "q5_k_m": (FT.MOSTLY_Q5_K_M, Q.Q5_K),
    "q6_k": (FT.MOSTLY_Q6_K, Q.Q6_K),
}
# Unsloth's names: not_quantized is the model's own 16-bit type (resolved in resolve_method).
ALIASES = {"fast_quantized": "q8_0", "quantized": "q4_k_m", "not_quantized": None}
# Types a tensor can be stored in (the `dynamic` option names them).
STORAGE_TYPES = {t.name.lower(): t for t in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K,
                                             Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)}
FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
# What llama.cpp substitutes when a row length is not a multiple of the chosen type's block (its
# tensor_type_fallback); a type with no entry, or a fallback that does not fit either, becomes F16.
FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                 "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}
ACTIVATION = {"llama": "silu", "qwen2": "silu", "qwen3": "silu", "phi3": "silu", "gemma2": "gelu_tanh",
              "gemma3": "gelu_tanh"}
# llama.cpp hard-codes Gemma's local/global layer pattern: every n-th layer attends globally.
GEMMA_GLOBAL_EVERY = {"gemma2": 2, "gemma3": 6}
GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3": 62}

# llama.cpp names a BPE pre-tokenizer by the sha256 of str(token ids) of this text (its
# convert_hf_to_gguf get_vocab_base_pre); the hashes below are the ones of the supported families.
PRE_TOKENIZER_CHECK = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM / SmolLM2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen 1.5 / 2 / 2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen 3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",  # Phi-4
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
TokenType = gguf.TokenType


def resolve_method(quantization_method: str, model: nn.Module | None = None) -> str:
    """A method name or alias -> a key of METHODS; unknown names raise, listing the valid ones."""
    name = str(quantization_method).lower()
    if name in ALIASES:
        resolved = ALIASES[name]
        if resolved is None:  # not_quantized: keep the model's own 16-bit format
            resolved = "bf16" if model is not None and _weight_dtype(model) == torch.bfloat16 else "f16"
        return resolved
    if name not in METHODS:
        raise GazelleError(
            f"quantization_method {quantization_method!r} is not supported; use one of "
            f"{', '.join(METHODS)} or the aliases {', '.join(ALIASES)}"
        )
    return name


def export_gguf(
    model,
    tokenizer,
    directory: str | os.PathLike,
    quantization_method: str | Sequence[str] = "q8_0",
    dynamic: Sequence[str] | dict[str, str] | None = None,
    name: str | None = None,
    modelfile: bool = True,
    base_weights: str | os.PathLike | None = None,
) -> list[str]:
    """One GGUF per method in `directory`, named `<name>.<QUANT>.gguf`; returns their paths.

    Arguments as write_gguf's; every method is checked before anything is written. With `modelfile` (and a
    tokenizer), an Ollama Modelfile pointing at the first file is written next to them (see write_modelfile).
    """
    methods = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
    if not methods:
        raise GazelleError("quantization_method is an empty list; give at least one, e.g. 'q8_0'")
    resolved = list(dict.fromkeys(resolve_method(m, model) for m in methods))
    directory = os.fspath(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise GazelleError(f"cannot create the output folder {directory}: {exc.strerror or exc}") from None
    stem = name or _model_name(model)
    paths = []
    for method in resolved:
        path = os.path.join(directory, f"{stem}.{method.upper()}.gguf")
        paths.append(write_gguf(model, tokenizer, path, method, dynamic, base_weights))
    if modelfile and tokenizer is not None:
        from gazelle.export.modelfile import write_modelfile

        write_modelfile(directory, os.path.basename(paths[0]), tokenizer)
    return paths


def write_gguf(
    model,
    tokenizer,
    path: str | os.PathLike,
    quantization_method: str = "q8_0",
    dynamic: Sequence[str] | dict[str, str] | None = None,
    base_weights: str | os.PathLike | None = None,
) -> str:
    """Write `model` (a gazelle Decoder, LoRA adapters merged as each tensor is read) and `tokenizer` to `path`.

    quantization_method: one of METHODS, or not_quantized (the model's 16-bit type), fast_quantized (q8_0),
        quantized (q4_k_m). K-quant methods mix types per tensor the way llama.cpp's llama-quantize does.
    dynamic: tensors kept at higher precision than the method gives them. A list of glob patterns keeps the
        matching tensors in f16; a dict maps patterns to a type name ({"blk.0.*": "q8_0", "*attn_v*": "f16"}).
        Patterns match either the GGUF name (blk.3.attn_v.weight) or the Hugging Face parameter name
        (model.layers.3.self_attn.v_proj.weight). 1-D tensors (norms, biases) are always f32.
    base_weights: for a 4-bit model, the folder of its 16-bit original, whose weights the adapters are merged
        onto (as in save_pretrained_merged); without it the dequantized 4-bit weights are used, with a warning.
    tokenizer: a transformers tokenizer; None writes a GGUF without vocabulary (llama.cpp can load it, but
        not tokenize text).
    Returns the path written.
    """
    from gazelle.models.decoder import Decoder

    if not isinstance(model, Decoder):
        raise GazelleError(f"write_gguf needs a gazelle model (a Decoder), got {type(model).__name__}")
    method = resolve_method(quantization_method, model)
    cfg = model.config
    arch = architecture(cfg)
    tensors = plan_tensors(model, arch, base_weights)
    types = choose_types(tensors, method, cfg, arch, _dynamic_types(dynamic))
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise GazelleError(f"cannot write {path}: the folder {folder} does not exist")

    writer = gguf.GGUFWriter(None, arch)
    add_model_metadata(writer, model, arch, method)
    if tokenizer is not None:
        add_tokenizer_metadata(writer, tokenizer, cfg.vocab_size, source=model.name_or_path)
    else:
        writer.add_tokenizer_model("none")
    for tensor, qtype in zip(tensors, types):
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), _nbytes(tensor.shape, qtype), qtype)

    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise GazelleError(f"cannot write {path}: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        writer.write_header_to_file(Path(tmp))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        with torch.no_grad():
            for tensor, qtype in zip(tensors, types):
                writer.write_tensor_data(encode(tensor.read(), qtype))
        writer.flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        os.replace(tmp, path)
    except OSError as exc:
        raise GazelleError(f"cannot write {path}: {exc.strerror or exc}; nothing was left behind") from None
    finally:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)
    log.info("wrote %s (%s, %d tensors)", path, method, len(tensors))
    return path


# ----------------------------------------------------------------------------------------------------------
# Architecture and metadata


def architecture(cfg: DecoderConfig) -> str:
    """The GGUF architecture for a config, after checking llama.cpp can run it as configured."""
    arch = ARCHITECTURES.get(cfg.family)
    if arch is None:
        raise GazelleError(f"model family {cfg.family!r} has no GGUF architecture gazelle can write")
    if cfg.hidden_act != ACTIVATION[arch]:
        raise GazelleError(f"GGUF's {arch} architecture uses {ACTIVATION[arch]}, but this model's hidden_act is "
                           f"{cfg.hidden_act}: llama.cpp cannot run it")
    if cfg.rope.rope_type == "longrope" and arch != "phi3":
        raise GazelleError(f"longrope rope scaling exists in GGUF only for phi3, not {arch}")
    if cfg.rope_local is not None and (cfg.rope_local.theta != 10000.0 or cfg.rope_local.rope_type != "default"):
        raise GazelleError("GGUF's gemma3 fixes the sliding layers' rope to base 10000 without scaling; this model's "
                           "rope_local_base_freq / sliding rope_scaling differ")
    if arch in GEMMA_GLOBAL_EVERY:
        every = GEMMA_GLOBAL_EVERY[arch]
        expected = tuple((i + 1) % every != 0 for i in range(cfg.num_layers))
        if cfg.sliding_window is not None and cfg.layer_sliding != expected:
            raise GazelleError(f"GGUF's {arch} makes every {every}th layer global and the rest sliding; this model's "
                               "layer_types differ, which llama.cpp cannot express")
        heads_dim = cfg.hidden_size // cfg.num_heads
        scalar = heads_dim if cfg.num_layers == GEMMA_27B_LAYERS[arch] else cfg.head_dim
        if abs(cfg.attn_scale - scalar**-0.5) > 1e-6 * scalar**-0.5:
            raise GazelleError(f"query_pre_attn_scalar {cfg.attn_scale ** -2:g} cannot be expressed in GGUF: "
                               f"llama.cpp's {arch} scales queries by 1/sqrt({scalar})")
    elif any(cfg.layer_sliding) and arch != "phi3":
        log.warning("%s GGUFs have no sliding-window attention: llama.cpp attends over the whole context, so outputs "
                    "differ from this model's once a sequence passes %d tokens", arch, cfg.sliding_window)
    return arch


def add_model_metadata(writer: gguf.GGUFWriter, model, arch: str, method: str) -> None:
    cfg = model.config
    writer.add_type("model")
    writer.add_name(_model_name(model))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    if cfg.head_dim != cfg.hidden_size // cfg.num_heads:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    rope = cfg.rope
    writer.add_rope_freq_base(rope.theta)
    writer.add_rope_dimension_count(rope.rotary_dim)
    if rope.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope.factor)
    elif rope.rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope.factor)
        writer.add_rope_scaling_orig_ctx_len(rope.original_max_position_embeddings)
        writer.add_rope_scaling_yarn_beta_fast(rope.beta_fast)
        writer.add_rope_scaling_yarn_beta_slow(rope.beta_slow)
    elif rope.rope_type == "longrope":
        writer.add_rope_scaling_attn_factors(rope.attention_factor)
    if arch == "phi3":
        original = cfg.hf_config.get("original_max_position_embeddings") or rope.original_max_position_embeddings
        writer.add_rope_scaling_orig_ctx_len(int(original))
        writer.add_sliding_window(cfg.sliding_window or 0)
    elif arch in GEMMA_GLOBAL_EVERY:
        if cfg.sliding_window is not None:
            writer.add_sliding_window(cfg.sliding_window)
        if cfg.attn_softcap is not None:
            writer.add_attn_logit_softcapping(cfg.attn_softcap)
        if cfg.final_softcap is not None:
            writer.add_final_logit_softcapping(cfg.final_softcap)
    writer.add_file_type(METHODS[method][0])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _model_name(model) -> str:
    source = os.path.basename(str(getattr(model, "name_or_path", None) or "model").rstrip("/"))
    source = re.sub(r"\.gguf$", "", source, flags=re.IGNORECASE)
    source = re.sub(r"\.(f16|bf16|f32|q\d\w*)$", "", source, flags=re.IGNORECASE)  # a quant suffix of a source GGUF
    return source or "model"


# ----------------------------------------------------------------------------------------------------------
# Tensors: which ones, how each is read, and which type each gets


@dataclasses.dataclass
class PlannedTensor:
    name: str  # GGUF name
    hf_name: str  # Hugging Face parameter name ("" for tensors derived from the config)
    shape: tuple[int, ...]  # torch order: (rows, row length)
    read: Callable[[], torch.Tensor]  # the float32 values as llama.cpp wants them (permuted, offset, merged)
    layer: int = -1


def plan_tensors(model, arch: str, base_weights: str | os.PathLike | None = None) -> list[PlannedTensor]:
    """Every tensor of the GGUF in writing order, each with a reader that materialises only itself."""
    from gazelle.export.merged import merged_entries

    cfg = model.config
    to_gguf = _gguf_names(arch)
    planned = []
    for entry in merged_entries(model, base_weights)[0]:  # LoRA merged, 4-bit bases 16-bit; a tied lm_head left out
        hf_name = entry.name
        stem = to_gguf.get(_stem(hf_name))
        if stem is None:
            raise GazelleError(f"parameter {hf_name} has no GGUF name for the {arch} architecture")
        layer = int(hf_name.split(".")[2]) if hf_name.startswith("model.layers.") else -1
        name = stem.replace("{n}", str(layer)) + "." + hf_name.rpartition(".")[2]
        read = _layout(lambda make=entry.make: make().float(), hf_name, arch, cfg)
        planned.append(PlannedTensor(name, hf_name, _shape(model, hf_name), read, layer))
    for name, values in _rope_tensors(cfg, arch).items():
        planned.append(PlannedTensor(name, "", tuple(values.shape), lambda v=values: v))
    return planned


def _gguf_names(arch: str) -> dict[str, str]:
    """HF stem (model.layers.{n}.self_attn.q_proj) -> GGUF stem (blk.{n}.attn_q): the reader's table inverted."""
    family = _FAMILIES[arch]
    names = {hf: gguf_stem for gguf_stem, hf in _TOP_NAMES.items()}
    names.update({f"model.layers.{{n}}.{hf}": f"blk.{{n}}.{stem}" for stem, hf in family.block_names.items()})
    return names


def _stem(hf_name: str) -> str:
    stem = hf_name.rpartition(".")[0]
    return re.sub(r"^model\.layers\.\d+\.", "model.layers.{n}.", stem)


def _layout(read: Callable[[], torch.Tensor], hf_name: str, arch: str, cfg: DecoderConfig):
    """Wrap a reader with llama.cpp's storage conventions for this tensor."""
    if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return lambda: interleave_rows(read(), cfg.num_heads)
    if arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return lambda: interleave_rows(read(), cfg.num_kv_heads)
    if cfg.norm_offset and hf_name.endswith("norm.weight"):
        return lambda: read() + cfg.norm_offset
    return read


def interleave_rows(weights: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's llama rotates adjacent pairs: within each head, HF rows [i] and [i + head_dim/2] become
    rows 2i and 2i+1. The inverse of gguf_file._deinterleave_rows."""
    rows = weights.shape[0]
    # (heads, 2 halves, head_dim/2, ...) -> (heads, head_dim/2, 2 halves, ...)
    return weights.reshape(n_heads, 2, rows // n_heads // 2, *weights.shape[1:]).transpose(1, 2).reshape(weights.shape)


def _rope_tensors(cfg: DecoderConfig, arch: str) -> dict[str, torch.Tensor]:
    """Rope scaling that GGUF stores as tensors: llama3's per-frequency divisors, longrope's two factor sets."""
    rope = cfg.rope
    if rope.rope_type == "llama3":
        plain = inverse_frequencies(dataclasses.replace(rope, rope_type="default"))
        return {"rope_freqs.weight": (plain / inverse_frequencies(rope)).float()}
    if rope.rope_type == "longrope":
        half = rope.rotary_dim // 2
        if len(rope.long_factor) != half or len(rope.short_factor) != half:
            raise GazelleError(f"longrope needs {half} long_factor and short_factor values (rotary_dim / 2)")
        return {"rope_factors_long.weight": torch.tensor(rope.long_factor, dtype=torch.float32),
                "rope_factors_short.weight": torch.tensor(rope.short_factor, dtype=torch.float32)}
    if rope.rope_type not in ("default", "linear", "yarn"):
        raise GazelleError(f"rope scaling {rope.rope_type!r} cannot be expressed in GGUF's {arch} architecture")
    return {}


def _shape(model, hf_name: str) -> tuple[int, ...]:
    """A parameter's logical shape without materialising it (LoRA wrappers and NF4 layers hide the real one)."""
    owner, _, leaf = hf_name.rpartition(".")
    module = model.get_submodule(owner)
    module = getattr(module, "base_layer", module)
    if leaf == "weight" and hasattr(module, "out_features"):
        return (module.out_features, module.in_features)
    if leaf == "weight" and hasattr(module, "num_embeddings"):
        return (module.num_embeddings, module.embedding_dim)
    return tuple(module.get_parameter(leaf).shape)


def _weight_dtype(model) -> torch.dtype:
    return model.model.norm.weight.dtype


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for stem in ("attn_qkv", "attn_v", "attn_output", "ffn_down"):
        if f".{stem}.weight" in name:
            return "attn_v" if stem == "attn_qkv" else stem
    return "other"


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# llama_tensor_get_type's k-quant mixes, per tensor category: method -> rule(layer, n_layers, gqa) -> type or None.
_MIX: dict[str, dict[str, Callable[[int, int, int], gguf.GGMLQuantizationType | None]]] = {
    "attn_v": {
        "q2_k": lambda i, n, gqa: Q.Q4_K if gqa >= 4 else Q.Q3_K,
        "q3_k_m": lambda i, n, gqa: Q.Q5_K if i < 2 else Q.Q4_K,
        "q3_k_l": lambda i, n, gqa: Q.Q5_K,
        "q4_k_m": lambda i, n, gqa: Q.Q6_K if _more_bits(i, n) else None,
        "q5_k_m": lambda i, n, gqa: Q.Q6_K if _more_bits(i, n) else None,
        "q4_k_s": lambda i, n, gqa: Q.Q5_K if i < 4 else None,
    },
    "ffn_down": {
        "q2_k": lambda i, n, gqa: Q.Q3_K,
        "q3_k_m": lambda i, n, gqa: Q.Q5_K if i < n // 16 else Q.Q4_K,
        "q3_k_l": lambda i, n, gqa: Q.Q5_K,
        "q4_k_m": lambda i, n, gqa: Q.Q6_K if _more_bits(i, n) else None,
        "q5_k_m": lambda i, n, gqa: Q.Q6_K if _more_bits(i, n) else None,
        "q4_k_s": lambda i, n, gqa: Q.Q5_K if i < n // 8 else None,
    },
    "attn_output": {
        "q2_k": lambda i, n, gqa: Q.Q3_K,
        "q3_k_m": lambda i, n, gqa: Q.Q4_K,
        "q3_k_l": lambda i, n, gqa: Q.Q5_K,
    },
}


def choose_types(tensors: list[PlannedTensor], method: str, cfg: DecoderConfig, arch: str,
                 dynamic: dict[str, gguf.GGMLQuantizationType]) -> list[gguf.GGMLQuantizationType]:
    """The storage type of each tensor, as llama.cpp's converter (float methods) or llama-quantize would pick it."""
    default = METHODS[method][1]
    has_output = any(t.name == "output.weight" for t in tensors)
    gqa = cfg.num_heads // cfg.num_kv_heads
    is_70b = cfg.num_layers == 80 and (arch == "qwen2" or (arch == "llama" and gqa > 1))
    types = []
    for tensor in tensors:
        if len(tensor.shape) < 2 or tensor.name.endswith("_norm.weight") or not tensor.name.endswith(".weight"):
            types.append(Q.F32)
            continue
        qtype = default
        category = _category(tensor.name)
        if default not in FLOAT_TYPES:
            if category == "output" or (category == "token_embd" and not has_output):
                block = gguf.GGML_QUANT_SIZES[default][0]
                qtype = Q.Q8_0 if tensor.shape[-1] % block else (default if default == Q.Q8_0 else Q.Q6_K)
            elif category in _MIX and method in _MIX[category]:
                qtype = _MIX[category][method](max(tensor.layer, 0), cfg.num_layers, gqa) or default
                if category == "attn_v" and is_70b and qtype in (Q.Q3_K, Q.Q4_K):
                    qtype = Q.Q5_K
        for pattern, kept in dynamic.items():
            if fnmatch.fnmatchcase(tensor.name, pattern) or fnmatch.fnmatchcase(tensor.hf_name, pattern):
                qtype = kept
                break
        types.append(_fit(qtype, tensor.shape[-1]))
    return types


def _fit(qtype: gguf.GGMLQuantizationType, row: int) -> gguf.GGMLQuantizationType:
    """The type itself when its block divides the row length, else llama.cpp's fallback for it (or F16)."""
    for candidate in (qtype, FALLBACK.get(qtype)):
        if candidate is not None and row % gguf.GGML_QUANT_SIZES[candidate][0] == 0:
            if candidate != qtype:
                log.debug("row length %d is not a multiple of %s's block: %s instead", row, qtype.name, candidate.name)
            return candidate
    return Q.F16


def _dynamic_types(dynamic: Sequence[str] | dict[str, str] | None) -> dict[str, gguf.GGMLQuantizationType]:
    """The `dynamic` option as pattern -> storage type (a list means f16 for each pattern)."""
    if dynamic is None:
        return {}
    if isinstance(dynamic, str):
        dynamic = [dynamic]
    pairs = dynamic.items() if isinstance(dynamic, dict) else ((pattern, "f16") for pattern in dynamic)
    result = {}
    for pattern, type_name in pairs:
        if str(type_name).lower() not in STORAGE_TYPES:
            raise GazelleError(f"dynamic type {type_name!r} for {pattern!r} is not a GGUF storage type; use one of "
                               f"{', '.join(STORAGE_TYPES)}")
        result[str(pattern)] = STORAGE_TYPES[str(type_name).lower()]
    return result


def _nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def encode(values: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """float32 (rows, n) -> the bytes (or 16/32-bit array) GGUF stores for `qtype`."""
    values = values.detach().to("cpu", torch.float32).contiguous()
    if qtype == Q.BF16:
        return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    if qtype in FLOAT_TYPES:
        return values.to(FLOAT_TYPES[qtype]).numpy()
    from gazelle.export.gguf_quants import quantize

    return quantize(values.numpy(), qtype)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer


def add_tokenizer_metadata(writer: gguf.GGUFWriter, tokenizer, vocab_rows: int, source: str | None = None) -> None:
    """Vocabulary, merges or scores, token types, special tokens and chat template of a transformers tokenizer."""
    state = _backend_state(tokenizer)
    model = state["model"]
    added = {t["id"]: t for t in state.get("added_tokens", [])}
    vocab = dict(model.get("vocab") or {})
    if model.get("type") != "BPE" or not vocab:
        raise GazelleError(f"the tokenizer's model is {model.get('type')}; gazelle writes GGUF vocabularies for BPE "
                           "tokenizers (byte-level or SentencePiece-style with byte fallback)")
    ids = {**{i: t for t, i in vocab.items()}, **{i: t["content"] for i, t in added.items()}}
    if max(ids) >= vocab_rows:
        raise GazelleError(f"the tokenizer has token id {max(ids)} but the model's embedding has {vocab_rows} rows; "
                           "resize the model's embeddings to the tokenizer first")
    byte_level = _is_byte_level(state)
    tokens, types = [], []
    for i in range(vocab_rows):
        if i not in ids:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
            continue
        token = ids[i]
        if i in added:
            special = added[i].get("special") or _looks_special(token)
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
            if not special and not byte_level:
                token = token.replace("\u2581", " ")  # llama.cpp expects user-defined SPM tokens pre-normalised
        elif not byte_level and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types.append(TokenType.BYTE)
        elif token == getattr(tokenizer, "unk_token", None):
            types.append(TokenType.UNKNOWN)
        else:
            types.append(TokenType.NORMAL)
        tokens.append(token)

    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if byte_level:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(tokenizer, source))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_add_space_prefix(False)
    elif model.get("byte_fallback"):
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(_spm_scores(tokens, merges))
        writer.add_token_types(types)
        writer.add_add_space_prefix(_adds_space_prefix(state))
    else:
        raise GazelleError("the tokenizer is a BPE without byte-level encoding or byte fallback; GGUF has no "
                           "vocabulary type for it")

    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{key}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    add_bos, add_eos = _added_specials(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        writer.add_chat_template(template)


def _backend_state(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GazelleError(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; load it with "
                           "AutoTokenizer (use_fast=True) to export its vocabulary to GGUF")
    return json.loads(backend.to_str())


def _is_byte_level(state: dict) -> bool:
    def kinds(part) -> list[str]:
        if not part:
            return []
        inner = part.get("pretokenizers") or part.get("decoders") or []
        return [part.get("type")] + [k for p in inner for k in kinds(p)]

    return "ByteLevel" in kinds(state.get("pre_tokenizer")) + kinds(state.get("decoder"))


def _looks_special(token: str) -> bool:
    """Added tokens some checkpoints forget to mark special (llama.cpp's converter treats them as control)."""
    return (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>")) \
        or (token.startswith("<unused") and token.endswith(">")) or token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")


def _added_specials(tokenizer) -> tuple[bool, bool]:
    """Whether encoding text adds BOS / EOS, observed rather than read from flags that differ per class."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and full[:1] == [bos] and plain[:1] != [bos]
    add_eos = eos is not None and full[-1:] == [eos] and plain[-1:] != [eos]
    return add_bos, add_eos


def _pre_tokenizer(tokenizer, source: str | None) -> str:
    """llama.cpp's name for the pre-tokenizer: by the hash of a check text's token ids, else the one the source
    GGUF named (a tokenizer rebuilt from a GGUF by transformers hashes differently from the original)."""
    ids = tokenizer.encode(PRE_TOKENIZER_CHECK)
    name = PRE_TOKENIZERS.get(hashlib.sha256(str(ids).encode()).hexdigest())
    if name is not None:
        return name
    if source and str(source).lower().endswith(".gguf") and os.path.isfile(source):
        field = _open(str(source)).get_field(gguf.Keys.Tokenizer.PRE)  # parsed when the model was loaded from it
        if field is not None:
            return field.contents()
    log.warning("llama.cpp does not know this tokenizer's pre-tokenizer (by its check hash): the GGUF says 'default' "
                "(GPT-2's split rules); text llama.cpp tokenizes may split differently from transformers")
    return "default"


def _spm_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece-style scores for llama.cpp's SPM tokenizer, which merges the adjacent pair whose joint token
    scores highest: minus the rank of the first merge that produces each token (0 for unmerged tokens)."""
    rank: dict[str, int] = {}
    for i, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), i)
    return [-float(rank[t]) if t in rank else 0.0 for t in tokens]


def _adds_space_prefix(state: dict) -> bool:
    text = json.dumps(state.get("normalizer")) + json.dumps(state.get("pre_tokenizer"))
    return '"Prepend"' in text or ('"Metaspace"' in text and '"prepend_scheme": "never"' not in text)
