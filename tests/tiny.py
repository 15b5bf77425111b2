"""Tiny random transformers models of every supported family, built from configs (no download)."""

from __future__ import annotations

import torch
import transformers

COMMON = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, tie_word_embeddings=False,
)

# Each family with the features that set it apart switched on, sliding windows short enough to bite.
FAMILY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        **COMMON,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16),
        rope_theta=500000.0,
    ),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=5),
    "qwen2": lambda: transformers.Qwen2Config(
        **{**COMMON, "tie_word_embeddings": True}, use_sliding_window=True, sliding_window=6, max_window_layers=1,
        rope_scaling=dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=32),
    ),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=24),
    "gemma2": lambda: transformers.Gemma2Config(
        **{**COMMON, "tie_word_embeddings": True}, head_dim=32, query_pre_attn_scalar=24, sliding_window=5,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
    ),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **{**COMMON, "tie_word_embeddings": True, "num_hidden_layers": 4}, head_dim=32, query_pre_attn_scalar=24,
        sliding_window=5, sliding_window_pattern=2, rope_scaling=dict(rope_type="linear", factor=8.0),
    ),
    "phi3": lambda: transformers.Phi3Config(
        **COMMON, partial_rotary_factor=0.5, original_max_position_embeddings=16,
        rope_scaling=dict(type="longrope", short_factor=[1.0, 1.5, 2.0, 3.0],
                          long_factor=[2.0, 3.0, 5.0, 8.0]),
    ),
}
FAMILIES = tuple(FAMILY_CONFIGS)


def tiny_hf_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random transformers model whose every weight matters: unit-scale matrices, perturbed norms and biases."""
    torch.manual_seed(seed)
    config = FAMILY_CONFIGS[family]()
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
            else:  # norms (ones or gemma's zeros) and biases (zeros): move them off their init
                p.add_(torch.randn_like(p) * 0.2)
    return model.to(dtype).eval()
