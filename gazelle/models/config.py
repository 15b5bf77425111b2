"""DecoderConfig: every supported family described as data for the one Decoder.

`from_hf_config` reads a transformers config.json (old `rope_theta`/`rope_scaling` keys or the newer
`rope_parameters`) and turns the family's conventions into flags; the Decoder never asks which family
it is running.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any

from gazelle.errors import GazelleError

ROPE_TYPES = ("default", "linear", "llama3", "longrope", "yarn")
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu"}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of one attention kind (gemma3's local layers have their own)."""

    theta: float = 10000.0
    rope_type: str = "default"
    """One of ROPE_TYPES."""
    rotary_dim: int = 0
    """Leading dimensions of each head that rotate (phi-4-mini: 0.75 of head_dim); the rest pass through."""
    factor: float = 1.0
    """linear: positions divided by it; llama3 / yarn / longrope: the context extension factor."""
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 0
    """llama3 / yarn / longrope: the pretraining context length."""
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    """longrope: per-frequency divisors, the long set used once a position passes the original length."""
    attention_factor: float = 1.0
    """cos and sin are multiplied by it (longrope, yarn)."""
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True


@dataclass(frozen=True)
class DecoderConfig:
    """Shapes and conventions of a decoder-only transformer, one field per difference between families."""

    family: str
    """The transformers model_type it came from (llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3)."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    norm_offset: float = 0.0
    """RMSNorm scales by (norm_offset + weight): gemma stores w for a (1 + w) norm."""
    hidden_act: str = "silu"
    """Gate activation of the gated MLP: silu (SwiGLU), gelu_tanh (GeGLU) or gelu."""
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    """RMSNorm over each head of q and k before rotary (qwen3, gemma3)."""
    sandwich_norm: bool = False
    """Norms after attention and around the MLP as well (gemma2/3)."""
    embed_scale: float = 1.0
    """Embeddings are multiplied by it (gemma: sqrt(hidden_size), rounded to the model dtype)."""
    attn_scale: float = 0.0
    """Softmax scale of q.k; head_dim ** -0.5 unless the family says otherwise (gemma: query_pre_attn_scalar)."""
    attn_softcap: float | None = None
    """Attention scores become softcap * tanh(scores / softcap) (gemma2)."""
    final_softcap: float | None = None
    """Logits become softcap * tanh(logits / softcap) (gemma2)."""
    sliding_window: int | None = None
    layer_sliding: tuple[bool, ...] = ()
    """Per layer: True when it attends only to the last `sliding_window` positions."""
    rope: RopeConfig = field(default_factory=RopeConfig)
    rope_local: RopeConfig | None = None
    """Rotary of sliding-window layers when it differs from `rope` (gemma3)."""
    fused_qkv: bool = False
    fused_gate_up: bool = False
    """phi3 keeps qkv_proj and gate_up_proj fused, as its checkpoints and adapters name them."""
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    hf_config: dict = field(default_factory=dict, compare=False, repr=False)
    """The config.json it was read from, kept for saving merged models."""

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS.values():
            raise GazelleError(f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(set(ACTIVATIONS.values()))}")
        if self.num_heads % self.num_kv_heads:
            raise GazelleError(f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})")
        if len(self.layer_sliding) != self.num_layers:
            object.__setattr__(self, "layer_sliding", tuple(self.layer_sliding) or (False,) * self.num_layers)
            if len(self.layer_sliding) != self.num_layers:
                raise GazelleError(f"layer_types has {len(self.layer_sliding)} entries for {self.num_layers} layers")
        if not self.attn_scale:
            object.__setattr__(self, "attn_scale", self.head_dim**-0.5)

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_sliding[layer] else None

    def rope_for(self, layer: int) -> RopeConfig:
        return self.rope_local if self.layer_sliding[layer] and self.rope_local is not None else self.rope

    def with_overrides(self, **changes) -> DecoderConfig:
        return replace(self, **changes)


def _qwen_sliding(hf: dict, n: int) -> list[bool]:
    if not hf.get("use_sliding_window"):
        return [False] * n
    first = hf.get("max_window_layers", n)
    return [i >= first for i in range(n)]


# Family conventions: flags that are implied by the model_type rather than written in config.json.
# "sliding" gives the per-layer pattern when config.json has no layer_types.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(sliding=lambda hf, n: [False] * n),
    "mistral": dict(sliding=lambda hf, n: [True] * n),
    "qwen2": dict(qkv_bias=True, sliding=_qwen_sliding),
    "qwen3": dict(qk_norm=True, sliding=_qwen_sliding),
    "gemma2": dict(
        norm_offset=1.0, sandwich_norm=True, gemma_embed=True, tied_default=True,
        sliding=lambda hf, n: [(i + 1) % 2 == 1 for i in range(n)],
    ),
    "gemma3_text": dict(
        norm_offset=1.0, sandwich_norm=True, gemma_embed=True, qk_norm=True, tied_default=True, local_rope=True,
        sliding=lambda hf, n: [(i + 1) % hf.get("sliding_window_pattern", 6) != 0 for i in range(n)],
    ),
    "phi3": dict(fused_qkv=True, fused_gate_up=True, sliding=lambda hf, n: [True] * n),
}
FAMILY_NAMES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3")


def _rope_params(hf: dict, kind: str | None) -> dict:
    """Merge old-style (rope_theta + rope_scaling) and new-style (rope_parameters) keys into one dict."""
    params = dict(hf.get("rope_parameters") or {})
    if kind is not None and isinstance(params.get(kind), dict):  # per-layer-type form (gemma3)
        params = dict(params[kind])
    elif any(isinstance(v, dict) for v in params.values()):
        params = dict(params.get("full_attention") or {})
    if kind != "sliding_attention":
        params.update({k: v for k, v in (hf.get("rope_scaling") or {}).items() if k not in params})
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    if "rope_theta" not in params:
        theta_key = "rope_local_base_freq" if kind == "sliding_attention" else "rope_theta"
        params["rope_theta"] = hf.get(theta_key, 10000.0)
    if "partial_rotary_factor" not in params and "partial_rotary_factor" in hf:
        params["partial_rotary_factor"] = hf["partial_rotary_factor"]
    return params


def _rope_config(hf: dict, head_dim: int, kind: str | None = None) -> RopeConfig:
    p = _rope_params(hf, kind)
    rope_type = p.get("rope_type") or "default"
    if rope_type not in ROPE_TYPES:
        raise GazelleError(f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    rotary_dim = int(head_dim * float(p.get("partial_rotary_factor") or 1.0))
    max_pos = int(hf.get("max_position_embeddings") or 4096)
    original = int(p.get("original_max_position_embeddings") or hf.get("original_max_position_embeddings") or max_pos)
    factor = p.get("factor")
    if factor is None:
        factor = max_pos / original if rope_type in ("longrope", "yarn") else 1.0
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        attention_factor = _default_attention_factor(rope_type, float(factor), original, p)
    return RopeConfig(
        theta=float(p["rope_theta"]),
        rope_type=rope_type,
        rotary_dim=rotary_dim,
        factor=float(factor),
        low_freq_factor=float(p.get("low_freq_factor", 1.0)),
        high_freq_factor=float(p.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        short_factor=tuple(p.get("short_factor") or ()),
        long_factor=tuple(p.get("long_factor") or ()),
        attention_factor=float(attention_factor),
        beta_fast=float(p.get("beta_fast") or 32.0),
        beta_slow=float(p.get("beta_slow") or 1.0),
        truncate=bool(p.get("truncate", True)),
    )


def _default_attention_factor(rope_type: str, factor: float, original: int, p: dict) -> float:
    import math

    if rope_type == "longrope":  # LongRoPE: sqrt(1 + ln(s) / ln(L_original))
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    if rope_type == "yarn":  # YaRN: 0.1 * m * ln(s) + 1, optionally a ratio of two such terms

        def mscale(m: float) -> float:
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

        if p.get("mscale") and p.get("mscale_all_dim"):
            return mscale(p["mscale"]) / mscale(p["mscale_all_dim"])
        return mscale(1.0)
    return 1.0


def from_hf_config(source: dict | str | os.PathLike) -> DecoderConfig:
    """DecoderConfig from a transformers config dict, a config.json path, or a folder holding one."""
    if isinstance(source, dict):
        hf = source
    else:
        path = os.fspath(source)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise GazelleError(f"{path} not found: a model folder needs the config.json that transformers writes")
        try:
            with open(path) as f:
                hf = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise GazelleError(f"{path} is not valid JSON ({e})") from None
    model_type = hf.get("model_type")
    if model_type == "gemma3" and "text_config" in hf:  # the multimodal checkpoint: use its language model
        hf = {**hf["text_config"], "model_type": "gemma3_text", **{k: hf[k] for k in ("eos_token_id",) if k in hf}}
        model_type = "gemma3_text"
    if model_type not in FAMILIES:
        raise GazelleError(
            f"model_type {model_type!r} is not supported; supported families: {', '.join(FAMILY_NAMES)}"
        )
    fam = FAMILIES[model_type]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in hf:
            raise GazelleError(f"config.json of this {model_type} model has no {key!r}")
    if hf.get("use_bidirectional_attention"):
        raise GazelleError("use_bidirectional_attention is set: gazelle trains causal decoders only")

    n_layers = hf["num_hidden_layers"]
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    layer_types = hf.get("layer_types")
    window = hf.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not hf.get("use_sliding_window"):
        window = None
    if window is None:
        sliding = [False] * n_layers
    elif layer_types:
        sliding = [t == "sliding_attention" for t in layer_types]
    else:
        sliding = fam["sliding"](hf, n_layers)
    if not any(sliding):
        window = None

    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if act not in ACTIVATIONS:
        raise GazelleError(f"hidden_act {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
    attn_bias = bool(hf.get("attention_bias", False))
    scalar = hf.get("query_pre_attn_scalar")
    return DecoderConfig(
        family=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        norm_offset=fam.get("norm_offset", 0.0),
        hidden_act=ACTIVATIONS[act],
        qkv_bias=fam.get("qkv_bias", attn_bias),
        o_bias=attn_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=fam.get("qk_norm", False),
        sandwich_norm=fam.get("sandwich_norm", False),
        embed_scale=hf["hidden_size"] ** 0.5 if fam.get("gemma_embed") else 1.0,
        attn_scale=scalar**-0.5 if scalar else 0.0,
        attn_softcap=hf.get("attn_logit_softcapping"),
        final_softcap=hf.get("final_logit_softcapping"),
        sliding_window=window,
        layer_sliding=tuple(sliding),
        rope=_rope_config(hf, head_dim, "full_attention" if fam.get("local_rope") else None),
        rope_local=_rope_config(hf, head_dim, "sliding_attention") if fam.get("local_rope") else None,
        fused_qkv=fam.get("fused_qkv", False),
        fused_gate_up=fam.get("fused_gate_up", False),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", fam.get("tied_default", False))),
        max_position_embeddings=int(hf.get("max_position_embeddings") or 4096),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=hf.get("eos_token_id"),
        pad_token_id=hf.get("pad_token_id"),
        hf_config=dict(hf),
    )
