"""GGUF export: every type reads back within its error, every family round-trips through gazelle's reader, the
k-quant mixes are llama.cpp's, SmolLM2's file matches its source GGUF, and llama.cpp itself runs what we write.

The llama.cpp tests need llama-cpp-python (a test extra built from source); they are slow-ish (SmolLM2 is
loaded once per module) but never skipped: a missing oracle is a failure.
"""

from __future__ import annotations

import copy
import errno
import os

import gguf
import numpy as np
import pytest
import torch
import transformers

from gazelle.errors import GazelleError
from gazelle.export.gguf_writer import (
    METHODS,
    choose_types,
    export_gguf,
    plan_tensors,
    write_gguf,
)
from gazelle.models.config import from_hf_config
from gazelle.models.decoder import Decoder
from gazelle.models.gguf_file import _deinterleave_rows
from gazelle.models.loading import load_model
from tests.tiny import COMMON, FAMILY_CONFIGS

Q = gguf.GGMLQuantizationType
# Relative error ||dequantized - source|| / ||source|| each stored type may have on Gaussian weights
# (measured: q8_0 0.005, q6_k 0.018, q5 0.04, q4 0.08, q3_k 0.15, q2_k 0.30).
RELATIVE_ERROR = {Q.F32: 0.0, Q.Q8_0: 0.01, Q.Q6_K: 0.03, Q.Q5_0: 0.06, Q.Q5_1: 0.06, Q.Q5_K: 0.06,
                  Q.Q4_0: 0.12, Q.Q4_1: 0.12, Q.Q4_K: 0.12, Q.Q3_K: 0.2, Q.Q2_K: 0.4}
# Rounding of 16-bit floats: (relative, absolute for subnormals: half of f16's smallest step 2**-24).
ROUNDING = {Q.F16: (2.0**-11, 2.0**-25), Q.BF16: (2.0**-8, 1e-38)}

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
# tests/tiny.py's configs, changed only where GGUF cannot express them (test_inexpressible_* checks the originals).
GGUF_CONFIGS = {
    **FAMILY_CONFIGS,
    # gazelle's reader recovers llama3 rope scaling only around Llama 3's 8192-token original context
    "llama": lambda: transformers.LlamaConfig(
        **{**COMMON, "max_position_embeddings": 16384}, rope_theta=500000.0,
        rope_scaling=LLAMA3_SCALING,
    ),
    # llama.cpp scales Gemma's queries by 1/sqrt(head_dim) and makes every 2nd (gemma2) / 6th (gemma3) layer global
    "gemma2": lambda: transformers.Gemma2Config(
        **{**COMMON, "tie_word_embeddings": True}, head_dim=32, query_pre_attn_scalar=32, sliding_window=5,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
    ),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **{**COMMON, "tie_word_embeddings": True, "num_hidden_layers": 6}, head_dim=32, query_pre_attn_scalar=32,
        sliding_window=5, sliding_window_pattern=6, rope_scaling={"rope_type": "linear", "factor": 8.0},
    ),
}
# GGUF's llama and qwen2 have no sliding window: compare these within their windows (5 and 6 tokens).
SEQUENCE = {"mistral": 5, "qwen2": 5}


def hf_model(config, seed: int = 0):
    """A random transformers model whose every weight matters (as tests/tiny.py makes them)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, p.shape[1] ** -0.5)
            else:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def gazelle_model(config, folder) -> Decoder:
    hf_model(config).save_pretrained(folder)
    return load_model(folder, dtype=torch.float32)


def f16_rounded(model: Decoder) -> Decoder:
    """The model with its matrices rounded through float16, as an f16 GGUF stores them."""
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    return rounded


def logits(model: Decoder, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model(ids))


# ------------------------------------------------------------------------------------------------------------
# (a) every type reads back within its error


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Decoder:
    """Rows of 256 and 512 values, so the k-quant block (256) fits and no tensor falls back to another type."""
    config = transformers.LlamaConfig(**{**COMMON, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                                         "max_position_embeddings": 16384}, rope_theta=500000.0,
                                      rope_scaling=LLAMA3_SCALING)
    return gazelle_model(config, tmp_path_factory.mktemp("wide_llama"))


def read_back(path) -> dict[str, tuple[gguf.GGMLQuantizationType, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    out = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))
        out[t.name] = (t.tensor_type, np.array(values, dtype=np.float32))
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_every_type_reads_back_within_its_error(method, wide_llama, tmp_path):
    path = write_gguf(wide_llama, None, tmp_path / f"m.{method}.gguf", method)
    stored = read_back(path)
    reader = gguf.GGUFReader(path)
    assert reader.get_field("general.file_type").contents() == METHODS[method][0]
    assert reader.get_field("general.architecture").contents() == "llama"
    source = {n: p.detach() for n, p in wide_llama.named_parameters()}
    names = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
             "output_norm.weight": "model.norm.weight"}
    stems = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for layer in range(2):
        names.update({f"blk.{layer}.{g}.weight": f"model.layers.{layer}.{h}.weight" for g, h in stems.items()})
    assert set(stored) == set(names) | {"rope_freqs.weight"}
    cfg = wide_llama.config
    for name, (qtype, values) in stored.items():
        if name == "rope_freqs.weight":
            assert qtype == Q.F32 and values.shape == (cfg.head_dim // 2,)
            continue
        expected = source[names[name]].numpy()
        if ".attn_q." in name or ".attn_k." in name:  # llama.cpp's interleaved rotary rows
            heads = cfg.num_heads if ".attn_q." in name else cfg.num_kv_heads
            values = _deinterleave_rows(torch.from_numpy(values), heads).numpy()
        assert values.shape == expected.shape, name
        if expected.ndim == 1:
            assert qtype == Q.F32 and np.array_equal(values, expected), name
        elif qtype in ROUNDING:
            rtol, atol = ROUNDING[qtype]
            np.testing.assert_allclose(values, expected, rtol=rtol, atol=atol, err_msg=name)
        else:
            error = np.linalg.norm(values - expected) / np.linalg.norm(expected)
            assert error <= RELATIVE_ERROR[qtype], f"{name} as {qtype.name}: relative error {error:.4f}"
        if method in ("f32", "f16", "bf16", "q8_0") and expected.ndim == 2:
            assert qtype == METHODS[method][1], name  # no mix: one type for every matrix


def test_rope_freqs_are_llama3_divisors(wide_llama, tmp_path):
    """llama.cpp divides each rotary frequency by rope_freqs[i]: 1 for short wavelengths, `factor` for long ones."""
    stored = read_back(write_gguf(wide_llama, None, tmp_path / "m.gguf", "f32"))
    divisors = stored["rope_freqs.weight"][1]
    rope = wide_llama.config.rope
    wavelength = 2 * np.pi * rope.theta ** (np.arange(0, rope.rotary_dim, 2) / rope.rotary_dim)
    assert np.allclose(divisors[wavelength < 8192 / 4], 1.0) and np.allclose(divisors[wavelength > 8192], 8.0)
    middle = (wavelength >= 8192 / 4) & (wavelength <= 8192)
    assert middle.any() and ((divisors[middle] > 1) & (divisors[middle] < 8)).all()


def test_gemma_norms_are_stored_plus_one_and_tied_embeddings_have_no_output(tmp_path):
    model = gazelle_model(GGUF_CONFIGS["gemma2"](), tmp_path / "gemma2")
    stored = read_back(write_gguf(model, None, tmp_path / "g.gguf", "f32"))
    assert "output.weight" not in stored
    assert np.allclose(stored["blk.0.post_ffw_norm.weight"][1],
                       model.model.layers[0].post_feedforward_layernorm.weight.detach().numpy() + 1, atol=1e-7)
    assert np.allclose(stored["output_norm.weight"][1], model.model.norm.weight.detach().numpy() + 1, atol=1e-7)


# ------------------------------------------------------------------------------------------------------------
# the k-quant mixes


def meta_decoder(**changes) -> Decoder:
    hf = {**COMMON, "model_type": "llama", "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 16,
          "num_attention_heads": 8, "num_key_value_heads": 2, **changes}
    with torch.device("meta"):
        return Decoder(from_hf_config(hf))


def types_by_name(model: Decoder, method: str) -> dict[str, str]:
    tensors = plan_tensors(model, "llama")
    return {t.name: q.name for t, q in zip(tensors, choose_types(tensors, method, model.config, "llama", {}))}


# llama.cpp's rule for "more bits" layers (use_more_bits), restated: first and last eighth, every third between.
MORE_BITS_16 = {0, 1, 4, 7, 10, 13, 14, 15}


@pytest.mark.parametrize("method", ["q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m",
                                    "q6_k", "q4_0", "q8_0"])
def test_k_quant_mix_is_llama_cpps(method):
    """Per-tensor types of a 16-layer, GQA-4 llama (rows of 256/512), as llama.cpp's llama_tensor_get_type picks them."""
    types = types_by_name(meta_decoder(), method)
    base = METHODS[method][1].name
    v = {"q2_k": ["Q4_K"] * 16, "q3_k_m": ["Q5_K"] * 2 + ["Q4_K"] * 14, "q3_k_l": ["Q5_K"] * 16,
         "q4_k_s": ["Q5_K"] * 4 + [base] * 12,
         "q4_k_m": ["Q6_K" if i in MORE_BITS_16 else base for i in range(16)],
         "q5_k_m": ["Q6_K" if i in MORE_BITS_16 else base for i in range(16)]}.get(method, [base] * 16)
    down = {"q2_k": ["Q3_K"] * 16, "q3_k_m": ["Q5_K"] + ["Q4_K"] * 15, "q3_k_l": ["Q5_K"] * 16,
            "q4_k_s": ["Q5_K"] * 2 + [base] * 14, "q4_k_m": v, "q5_k_m": v}.get(method, [base] * 16)
    out = {"q2_k": "Q3_K", "q3_k_m": "Q4_K", "q3_k_l": "Q5_K"}.get(method, base)
    for i in range(16):
        assert types[f"blk.{i}.attn_v.weight"] == v[i], (method, i)
        assert types[f"blk.{i}.ffn_down.weight"] == down[i], (method, i)
        assert types[f"blk.{i}.attn_output.weight"] == out, (method, i)
        assert types[f"blk.{i}.attn_q.weight"] == types[f"blk.{i}.ffn_up.weight"] == base
        assert types[f"blk.{i}.attn_norm.weight"] == "F32"
    assert types["output.weight"] == ("Q8_0" if method == "q8_0" else "Q6_K")
    assert types["token_embd.weight"] == base


def test_mix_rules_for_tied_embeddings_gqa_and_short_rows():
    # tied: token_embd is the output head, so it gets the head's type
    assert types_by_name(meta_decoder(tie_word_embeddings=True), "q4_k_m")["token_embd.weight"] == "Q6_K"
    # q2_k gives attn_v q3_k below 4 query heads per key/value head
    assert types_by_name(meta_decoder(num_key_value_heads=4), "q2_k")["blk.0.attn_v.weight"] == "Q3_K"
    # SmolLM2's 576-wide rows do not hold 256-blocks: llama.cpp's fallbacks (Q4_K->Q5_0, Q6_K->Q8_0, head->Q8_0)
    types = types_by_name(meta_decoder(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                                       num_key_value_heads=3, tie_word_embeddings=True), "q4_k_m")
    assert types["blk.1.attn_q.weight"] == "Q5_0" and types["blk.0.attn_v.weight"] == "Q8_0"
    assert types["blk.0.ffn_down.weight"] == "Q6_K" and types["blk.2.ffn_down.weight"] == "Q4_K"  # 1536 = 6 * 256
    assert types["token_embd.weight"] == "Q8_0"


def test_dynamic_keeps_chosen_tensors_at_higher_precision(wide_llama, tmp_path):
    path = write_gguf(wide_llama, None, tmp_path / "d.gguf", "q4_k_m",
                      dynamic={"blk.0.*": "q8_0", "model.layers.1.mlp.down_proj.weight": "f16"})
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_up.weight"] == "Q8_0"
    assert types["blk.1.ffn_down.weight"] == "F16" and types["blk.1.attn_q.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    listed = write_gguf(wide_llama, None, tmp_path / "l.gguf", "q4_0", dynamic=["*attn_v*"])
    assert {t.tensor_type.name for t in gguf.GGUFReader(listed).tensors if "attn_v" in t.name} == {"F16"}


# ------------------------------------------------------------------------------------------------------------
# (b) every family round-trips through gazelle's own GGUF reader


@pytest.mark.parametrize("family", list(GGUF_CONFIGS))
def test_f16_round_trip_through_gazelles_reader(family, tmp_path):
    model = gazelle_model(GGUF_CONFIGS[family](), tmp_path / family)
    path = write_gguf(model, None, tmp_path / f"{family}.gguf", "f16")
    loaded = load_model(path, dtype=torch.float32)
    assert loaded.config.family == model.config.family.replace("mistral", "llama")
    ids = torch.randint(3, 256, (2, SEQUENCE.get(family, 20)), generator=torch.Generator().manual_seed(1))
    ours, reference = logits(loaded, ids), logits(f16_rounded(model), ids)
    diff = (ours - reference).abs().max().item()
    assert diff <= 1e-4, f"{family}: GGUF-loaded logits differ from the f16-rounded model's by {diff:.2e}"
    assert (ours - logits(model, ids)).abs().max().item() <= 2e-2  # and f16 storage costs little


@pytest.mark.parametrize("family", list(GGUF_CONFIGS))
def test_llama_cpp_logits_match_gazelles_for_every_family(family, tmp_path):
    """llama.cpp itself runs each family's f32 file (no vocabulary: token ids in, logits out) and agrees with gazelle:
    tensor names, q/k order, Gemma's +1, fused phi3 tensors, rope_freqs, longrope factors, softcaps, windows."""
    model = gazelle_model(GGUF_CONFIGS[family](), tmp_path / family)
    llm = llama_cpp_model(write_gguf(model, None, tmp_path / f"{family}.gguf", "f32"), logits_all=True)
    ids = torch.randint(3, 256, (1, SEQUENCE.get(family, 20)), generator=torch.Generator().manual_seed(1))
    llm.eval(ids[0].tolist())
    theirs = torch.from_numpy(np.array(llm.scores[: ids.shape[1]]))
    llm.close()
    diff = (theirs - logits(model, ids)[0]).abs().max().item()
    assert diff <= 1e-2, f"{family}: llama.cpp's logits differ from gazelle's by {diff:.2e}"  # measured <= 3.2e-3


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_lora_is_merged_into_the_written_tensors(family, tmp_path):
    """qwen2 is tied: an adapter on embed_tokens unties it, so the file gets its own output tensor."""
    from gazelle.lora import LoraConfig
    from gazelle.lora.inject import inject_lora

    model = gazelle_model(GGUF_CONFIGS[family](), tmp_path / family)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]
    inject_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    loaded = load_model(write_gguf(model, None, tmp_path / "lora.gguf", "f32"), dtype=torch.float32)
    assert not loaded.config.tie_word_embeddings
    ids = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(2))
    diff = (logits(loaded, ids) - logits(model, ids)).abs().max().item()
    assert diff <= 1e-4, f"{family}: GGUF of a LoRA model differs from the adapted model by {diff:.2e}"


# ------------------------------------------------------------------------------------------------------------
# (e) bad inputs


def test_unknown_method_lists_the_valid_ones(wide_llama, tmp_path):
    with pytest.raises(GazelleError, match=r"quantization_method 'q4_k_x' is not supported; use one of f32, f16.*"
                                           r"q4_k_m.*not_quantized"):
        write_gguf(wide_llama, None, tmp_path / "m.gguf", "q4_k_x")
    with pytest.raises(GazelleError, match="'q7' is not supported"):
        export_gguf(wide_llama, None, tmp_path / "out", ["q8_0", "q7"])
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # checked before writing


@pytest.mark.parametrize("family, message", [
    ("gemma2", r"query_pre_attn_scalar 24 cannot be expressed in GGUF"),
    ("gemma3", r"every 6th layer global"),
])
def test_inexpressible_architectures_are_refused(family, message, tmp_path):
    model = gazelle_model(FAMILY_CONFIGS[family](), tmp_path / family)
    with pytest.raises(GazelleError, match=message):
        write_gguf(model, None, tmp_path / "x.gguf", "f16")
    assert not (tmp_path / "x.gguf").exists()


def test_activation_and_rope_llama_cpp_cannot_run_are_refused(tmp_path):
    gelu = gazelle_model(transformers.LlamaConfig(**COMMON, hidden_act="gelu"), tmp_path / "gelu")
    with pytest.raises(GazelleError, match="llama architecture uses silu, but this model's hidden_act is gelu"):
        write_gguf(gelu, None, tmp_path / "x.gguf", "f16")


def test_failed_write_leaves_nothing_behind(wide_llama, tmp_path, monkeypatch):
    """A full disk in the middle of the tensor data: an error naming the file, no temporary, the old file intact."""
    target = tmp_path / "m.gguf"
    target.write_bytes(b"previous export")
    calls = []

    def disk_full(self, tensor, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, tensor, *args, **kwargs)

    original = gguf.GGUFWriter.write_tensor_data
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", disk_full)
    with pytest.raises(GazelleError, match=r"cannot write .*m\.gguf: No space left on device"):
        write_gguf(wide_llama, None, target, "q8_0")
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"] and target.read_bytes() == b"previous export"


def test_unwritable_destination_is_an_error(wide_llama, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(GazelleError, match="does not exist"):
        write_gguf(wide_llama, None, blocker / "m.gguf", "f16")
    with pytest.raises(GazelleError, match="cannot create the output folder"):
        export_gguf(wide_llama, None, blocker / "sub", "f16")
    if os.geteuid() != 0:  # root writes into read-only folders anyway
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(GazelleError, match="cannot write"):
            write_gguf(wide_llama, None, locked / "m.gguf", "f16")
    assert sorted(os.listdir(tmp_path)) in (["file"], ["file", "locked"])


def test_other_bad_inputs(wide_llama, tmp_path):
    with pytest.raises(GazelleError, match="needs a gazelle model"):
        write_gguf(torch.nn.Linear(2, 2), None, tmp_path / "m.gguf")
    with pytest.raises(GazelleError, match="dynamic type 'q9' for 'blk.*' is not a GGUF storage type"):
        write_gguf(wide_llama, None, tmp_path / "m.gguf", "q4_k_m", dynamic={"blk.*": "q9"})
    with pytest.raises(GazelleError, match="empty list"):
        export_gguf(wide_llama, None, tmp_path, [])
    assert os.listdir(tmp_path) == []


def test_export_names_files_and_resolves_aliases(wide_llama, tmp_path):
    paths = export_gguf(wide_llama, None, tmp_path / "out", ["not_quantized", "fast_quantized", "quantized", "q8_0"],
                        name="tiny")
    assert [os.path.basename(p) for p in paths] == ["tiny.F16.gguf", "tiny.Q8_0.gguf", "tiny.Q4_K_M.gguf"]
    bf16 = copy.deepcopy(wide_llama).to(torch.bfloat16)
    assert export_gguf(bf16, None, tmp_path / "bf", "not_quantized", name="tiny")[0].endswith("tiny.BF16.gguf")


# ------------------------------------------------------------------------------------------------------------
# (c) SmolLM2: the f16 file we write carries the source GGUF's metadata and vocabulary; (d) llama.cpp runs it


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from gazelle.models.loading import load

    return load(smollm2_gguf, dtype=torch.float32)


@pytest.fixture(scope="module")
def smollm2_files(smollm2, tmp_path_factory):
    """SmolLM2 exported once per type the tests below need (f16, q8_0, q4_k_m)."""
    model, tokenizer = smollm2
    paths = export_gguf(model, tokenizer, tmp_path_factory.mktemp("smollm2"), ["f16", "q8_0", "q4_k_m"])
    return dict(zip(["f16", "q8_0", "q4_k_m"], paths))


def fields(path) -> dict:
    from gazelle.models.gguf_file import _open

    # gazelle's reader keeps the parse (a 49k-token vocabulary takes seconds): the source is parsed once
    return {name: field.contents() for name, field in _open(str(path)).fields.items()}


# What legitimately differs from the source: descriptive general.* keys its converter took from the model card,
# the file type, and the key count that follows from those.
DESCRIPTIVE = {"general.name", "general.organization", "general.finetune", "general.basename", "general.size_label",
               "general.license", "general.languages", "general.file_type", "GGUF.kv_count"}


def test_smollm2_metadata_and_vocabulary_match_the_source_gguf(smollm2_gguf, smollm2_files):
    source, ours = fields(smollm2_gguf), fields(smollm2_files["f16"])
    missing = set(source) - set(ours) - DESCRIPTIVE
    assert not missing, f"keys of the source GGUF we do not write: {sorted(missing)}"
    assert set(ours) - set(source) <= {"tokenizer.ggml.add_eos_token"}
    for key in sorted(set(source) & set(ours) - DESCRIPTIVE):
        assert ours[key] == source[key], key  # tokens, token types, merges, pre ("smollm"), ids, template, shapes
    assert ours["tokenizer.ggml.pre"] == "smollm" and len(ours["tokenizer.ggml.merges"]) == 48900
    assert ours["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    modelfile = (smollm2_files["f16"].rpartition("/")[0]) + "/Modelfile"
    with open(modelfile) as f:
        assert f.read().startswith(f"FROM ./{os.path.basename(smollm2_files['f16'])}\n")


def llama_cpp_model(path, **options):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=512, verbose=False, **options)


def chat_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_llama_cpp_greedy_tokens_equal_gazelles_on_our_f16(smollm2, smollm2_files):
    from gazelle.generation.reference import generate

    model, tokenizer = smollm2
    llm = llama_cpp_model(smollm2_files["f16"])
    for prompt in ("The capital of France is", None):
        ids = tokenizer(prompt)["input_ids"] if prompt else chat_ids(tokenizer, "What is 2+2?")
        text = tokenizer.decode(ids)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids  # same tokenizer in llama.cpp
        ours = generate(model, torch.tensor([ids]), max_new_tokens=20)[0, len(ids):].tolist()
        theirs = []
        for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
            if token == llm.token_eos() or len(theirs) == 20:
                break
            theirs.append(token)
        ours = ours[: ours.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in ours else ours
        print(f"llama.cpp f16 greedy for {prompt or 'chat: What is 2+2?'!r}: {theirs} = {tokenizer.decode(theirs)!r}")
        assert theirs == ours, f"llama.cpp {tokenizer.decode(theirs)!r} vs gazelle {tokenizer.decode(ours)!r}"


@pytest.mark.parametrize("method", ["q8_0", "q4_k_m"])
def test_llama_cpp_answers_from_our_quantized_files(method, smollm2_files):
    llm = llama_cpp_model(smollm2_files[method])
    reply = llm.create_chat_completion(messages=[{"role": "user", "content": "What is 2+2?"}], temperature=0.0,
                                       max_tokens=24)  # formatted with the chat template the GGUF carries
    answer = reply["choices"][0]["message"]["content"]
    print(f"llama.cpp {method}: {answer!r}")
    assert "4" in answer, f"{method}: {answer!r}"


def test_llama_cpp_tokenizes_like_transformers_with_a_sentencepiece_vocabulary(tmp_path):
    """The SPM ("llama") vocabulary path: a small SentencePiece BPE model with byte fallback, trained here, written
    with scores derived from its merges; llama.cpp must split text exactly as transformers does."""
    import io

    import sentencepiece

    corpus = ["The quick brown fox jumps over the lazy dog.", "Hello world! How are you today?",
              "Numbers 12345 and symbols #@!", "llama.cpp loads GGUF files written by gazelle."] * 50
    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=proto, vocab_size=400, model_type="bpe", byte_fallback=True,
        character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    folder = tmp_path / "spm"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(proto.getvalue())
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", '
                                                  '"eos_token": "</s>", "unk_token": "<unk>"}')
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = gazelle_model(transformers.LlamaConfig(**{**COMMON, "vocab_size": 400}), tmp_path / "llama")
    path = write_gguf(model, tokenizer, tmp_path / "spm.gguf", "f16")
    assert fields(path)["tokenizer.ggml.model"] == "llama"
    llm = llama_cpp_model(path)
    # (Text starting with a space is left out: there llama.cpp always adds the "▁" prefix, as SentencePiece itself
    # does, while transformers' Metaspace skips it; that is a transformers/SentencePiece difference, not the file's.)
    for text in ["Hello world! The lazy dog jumps.", "two  spaces, tabs\tand newlines\n", "12345 #@! über 🦙",
                 "gazelle writes GGUF files."]:
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == expected, text


def byte_level_tokenizer(n_bytes: int):
    """A GPT-2-style byte-level BPE over `n_bytes` byte symbols, one merge, and two special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())[:n_bytes] + ["Ġ", "t"]
    vocab = {symbol: i for i, symbol in enumerate(dict.fromkeys(alphabet))}
    vocab["Ġt"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab, [("Ġ", "t")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>",
                                                additional_special_tokens=["<|bos|>", "<|eos|>"])


def test_vocabulary_is_padded_typed_and_its_problems_named(wide_llama, tmp_path, capsys):
    tokenizer = byte_level_tokenizer(200)
    path = write_gguf(wide_llama, tokenizer, tmp_path / "v.gguf", "f16")
    meta = fields(path)
    n = len(tokenizer)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.merges"] == ["Ġ t"]
    assert len(meta["tokenizer.ggml.tokens"]) == 256 and meta["tokenizer.ggml.tokens"][-1] == "[PAD255]"
    types = meta["tokenizer.ggml.token_type"]
    assert types[tokenizer.bos_token_id] == types[tokenizer.eos_token_id] == gguf.TokenType.CONTROL
    assert set(types[n:]) == {gguf.TokenType.UNUSED} and types[0] == gguf.TokenType.NORMAL
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert meta["tokenizer.ggml.pre"] == "default" and "pre-tokenizer" in capsys.readouterr().err
    with pytest.raises(GazelleError, match=r"token id 258 but the model.s embedding has 256 rows; resize"):
        write_gguf(wide_llama, byte_level_tokenizer(256), tmp_path / "x.gguf", "f16")
    with pytest.raises(GazelleError, match="tokenizer's model is WordLevel"):
        from tokenizers import Tokenizer, models

        word_level = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0},
                                                                                                      unk_token="a")))
        write_gguf(wide_llama, word_level, tmp_path / "x.gguf", "f16")
    assert sorted(os.listdir(tmp_path)) == ["v.gguf"]


def test_llama_cpp_greedy_tokens_equal_gazelles_on_a_merged_fine_tune(smollm2_gguf, tmp_path):
    """SmolLM2 with a LoRA adapter that moves its logits: the adapter merged into the f16 GGUF, llama.cpp's 20
    greedy tokens equal gazelle's from base + adapter (unmerged)."""
    from gazelle.generation.reference import generate
    from gazelle.lora import LoraConfig, lora_parameters
    from gazelle.lora.inject import inject_lora
    from gazelle.models.loading import load

    model, tokenizer = load(smollm2_gguf, dtype=torch.float32)
    ids = chat_ids(tokenizer, "Name a fruit.")
    before = model.logits(model(torch.tensor([ids])))[0, -1]
    inject_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                  init_lora_weights=False))
    with torch.no_grad():
        for p in lora_parameters(model):
            if p.shape[1] == 8:  # lora_B: small, so the model still speaks, but not zero
                p.mul_(0.05)
        after = model.logits(model(torch.tensor([ids])))[0, -1]
    assert (after - before).abs().max() > 0.3  # the adapter changes what the model says
    path = export_gguf(model, tokenizer, tmp_path, "f16")[0]
    llm = llama_cpp_model(path)
    ours = generate(model, torch.tensor([ids]), max_new_tokens=20)[0, len(ids):].tolist()
    ours = ours[: ours.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in ours else ours
    theirs = []
    for token in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        if token == llm.token_eos() or len(theirs) == 20:
            break
        theirs.append(token)
    print(f"llama.cpp merged fine-tune: {tokenizer.decode(theirs)!r}")
    assert theirs == ours, f"llama.cpp {tokenizer.decode(theirs)!r} vs gazelle {tokenizer.decode(ours)!r}"
