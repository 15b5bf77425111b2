"""from_hf_config: family conventions as flags, both rope config formats, clear errors."""

import pytest

from gazelle.errors import GazelleError
from gazelle.models.config import from_hf_config
from gazelle.models.rope import inverse_frequencies

LLAMA = dict(model_type="llama", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=131072)


def test_unknown_model_type_lists_supported_families():
    with pytest.raises(GazelleError) as e:
        from_hf_config({**LLAMA, "model_type": "mamba"})
    message = str(e.value)
    assert "'mamba'" in message and "\n" not in message
    for family in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"):
        assert family in message


def test_missing_field_is_named():
    config = dict(LLAMA)
    del config["hidden_size"]
    with pytest.raises(GazelleError, match="hidden_size"):
        from_hf_config(config)


def test_old_and_new_rope_formats_agree():
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
    old = from_hf_config({**LLAMA, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **scaling}})
    new = from_hf_config({**LLAMA, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **scaling}})
    legacy_key = from_hf_config({**LLAMA, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **scaling}})
    assert old.rope == new.rope == legacy_key.rope
    assert old.rope.rope_type == "llama3" and old.rope.theta == 500000.0
    # llama3 scaling leaves the highest frequencies alone and divides the lowest by the factor.
    base = inverse_frequencies(from_hf_config({**LLAMA, "rope_theta": 500000.0}).rope)
    scaled = inverse_frequencies(old.rope)
    assert scaled[0] == base[0] and abs(scaled[-1] * 8 - base[-1]) < 1e-12


def test_gemma3_local_and_global_rope_and_sliding_pattern():
    cfg = from_hf_config(dict(
        model_type="gemma3_text", vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=12,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=512,
        rope_theta=1000000.0, rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
    ))
    assert cfg.layer_sliding == tuple((i + 1) % 6 != 0 for i in range(12))
    assert cfg.rope_for(0).theta == 10000.0 and cfg.rope_for(0).rope_type == "default"
    assert cfg.rope_for(5).theta == 1000000.0 and cfg.rope_for(5).factor == 8.0
    assert cfg.norm_offset == 1.0 and cfg.sandwich_norm and cfg.qk_norm and cfg.tie_word_embeddings
    assert cfg.embed_scale == 64**0.5 and cfg.attn_scale == 32**-0.5


def test_multimodal_gemma3_reads_its_text_config():
    cfg = from_hf_config({"model_type": "gemma3", "text_config": dict(
        vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, sliding_window=16)})
    assert cfg.family == "gemma3_text" and cfg.num_layers == 6


def test_qwen_window_only_when_enabled():
    qwen = {**LLAMA, "model_type": "qwen2", "sliding_window": 4096, "max_window_layers": 1}
    assert from_hf_config(qwen).sliding_window is None
    cfg = from_hf_config({**qwen, "use_sliding_window": True})
    assert cfg.layer_sliding == (False, True) and cfg.qkv_bias and not cfg.o_bias


def test_unsupported_rope_type_is_named():
    with pytest.raises(GazelleError, match="'dynamic'"):
        from_hf_config({**LLAMA, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})


def test_config_path_errors(tmp_path):
    with pytest.raises(GazelleError, match="config.json"):
        from_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(GazelleError, match="not valid JSON"):
        from_hf_config(tmp_path)
