"""LoRA injection: gradients equal PEFT's on the same weights, trainable sets, init, merge and errors."""

import warnings

import pytest
import torch
from torch import nn

from gazelle.errors import GazelleError
from gazelle.lora import (
    LoraConfig, LoraEmbedding, LoraLinear, inject_lora, lora_parameters, merge_lora, remove_lora, trainable_summary,
)
from gazelle.lora.inject import lora_modules
from tests.lora import (
    ATTN_MLP, copy_lora_into_peft, gazelle_logits, lora_names, model_pair, next_token_loss, padded_batch, peft_config,
    peft_named, randomize_lora,
)
from tests.lora import one_thread  # noqa: F401  (an autouse fixture)

import peft


def peft_model_for(hf, config: LoraConfig):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about adapters on tied embeddings; stated in the tests below
        return peft.get_peft_model(hf, peft_config(config))


def assert_grads_match_peft(family: str, config: LoraConfig):
    hf, model = model_pair(family)
    inject_lora(model, config)
    randomize_lora(model)
    peft_model = peft_model_for(hf, config)
    copy_lora_into_peft(model, peft_model)
    ids, mask = padded_batch()
    ours, theirs = gazelle_logits(model, ids, mask), peft_model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-4, rtol=0)  # padded slots are unused
    next_token_loss(ours, ids, mask).backward()
    next_token_loss(theirs, ids, mask).backward()
    reference = peft_named(peft_model)
    names = lora_names(model)
    assert names and sorted(names) == sorted(n for n, p in reference.items() if p.requires_grad)
    for name in names:
        grad, expected = model.get_parameter(name).grad, reference[name].grad
        assert expected.abs().max() > 0, name
        rel = (grad - expected).abs().max() / expected.abs().max()
        assert rel <= 1e-5, f"{name}: relative gradient difference {rel:.2e}"
    return model


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_gradients_equal_peft(family, use_rslora):
    assert_grads_match_peft(family, LoraConfig(r=8, lora_alpha=16, target_modules=ATTN_MLP, use_rslora=use_rslora))


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_gradients_equal_peft_with_embed_tokens_and_lm_head(family):
    """llama is untied. gemma2 ties lm_head to embed_tokens: as in PEFT (ensure_weight_tying=False, its default),
    each gets its own independent adapter while the frozen base table stays one shared Parameter."""
    config = LoraConfig(r=8, lora_alpha=16, target_modules=ATTN_MLP + ["embed_tokens", "lm_head"])
    model = assert_grads_match_peft(family, config)
    embed, head = model.model.embed_tokens, model.lm_head
    assert isinstance(embed, LoraEmbedding) and isinstance(head, LoraLinear)
    assert (embed.base_layer.weight is head.base_layer.weight) == model.config.tie_word_embeddings
    assert embed.base_layer.weight.grad is None and head.base_layer.weight.grad is None


def test_tie_weights_after_inject_keeps_one_table():
    _, model = model_pair("gemma2")
    inject_lora(model, LoraConfig(target_modules=["embed_tokens", "lm_head"]))
    count = len(list(model.named_parameters(remove_duplicate=False)))
    model.tie_weights()  # must re-tie the base layers, not register a stray `weight` on the wrapper
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.base_layer.weight
    assert len(list(model.named_parameters(remove_duplicate=False))) == count


def test_starts_as_the_base_model_and_init_is_peft_default():
    _, model = model_pair("llama")
    ids, mask = padded_batch()
    with torch.no_grad():
        before = gazelle_logits(model, ids, mask)
    inject_lora(model, LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]))
    with torch.no_grad():
        torch.testing.assert_close(gazelle_logits(model, ids, mask), before, atol=0, rtol=0)
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_B.weight.abs().max() == 0 and q.lora_A.weight.std() > 0
    assert q.lora_A.weight.abs().max() <= q.in_features**-0.5  # kaiming-uniform(a=sqrt(5)) bound
    embed = model.model.embed_tokens
    assert embed.lora_embedding_A.abs().max() == 0 and abs(embed.lora_embedding_B.std() - 1) < 0.3
    assert all(p.dtype == torch.float32 for p in lora_parameters(model))


def test_init_is_seeded_and_leaves_the_global_rng_alone():
    def init_values(seed):
        _, model = model_pair("llama")
        state = torch.random.get_rng_state()
        inject_lora(model, LoraConfig(r=4, random_state=seed))
        assert torch.equal(torch.random.get_rng_state(), state)
        return torch.cat([p.flatten() for p in lora_parameters(model)])

    assert torch.equal(init_values(1), init_values(1))
    assert not torch.equal(init_values(1), init_values(2))


def test_only_lora_params_train_and_summary_equals_peft(capsys):
    hf, model = model_pair("qwen2")
    config = LoraConfig(r=8, lora_alpha=16, target_modules=ATTN_MLP + ["lm_head", "embed_tokens"],
                        layers_to_transform=[0, 2])
    inject_lora(model, config)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == lora_names(model)
    assert [id(p) for p in lora_parameters(model)] == [id(model.get_parameter(n)) for n in trainable]
    # layers_to_transform, with PEFT's rules: layer 1 stays plain; so does model.embed_tokens (outside the numbered
    # layers), but lm_head, named in full by its target, is wrapped.
    assert not lora_modules(model.model.layers[1]) and isinstance(model.model.embed_tokens, nn.Embedding)
    assert isinstance(model.lm_head, LoraLinear)
    peft_model_for(hf, config).print_trainable_parameters()
    assert trainable_summary(model) == capsys.readouterr().out.strip()


@pytest.mark.parametrize("bias", ["none", "lora_only", "all"])
def test_bias_modes(bias, capsys):
    """qwen2 has q/k/v biases; LoRA on q_proj and v_proj only."""
    hf, model = model_pair("qwen2")
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], bias=bias)
    inject_lora(model, config)
    trainable_biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    wrapped = {f"model.layers.{i}.self_attn.{m}.base_layer.bias" for i in range(3) for m in ("q_proj", "v_proj")}
    every = {n for n, _ in model.named_parameters() if n.endswith("bias")}
    assert len(every) == 9
    assert trainable_biases == {"none": set(), "lora_only": wrapped, "all": every}[bias]
    peft_model_for(hf, config).print_trainable_parameters()
    assert trainable_summary(model) == capsys.readouterr().out.strip()


def test_all_linear_on_phi3_wraps_the_fused_projections():
    _, model = model_pair("phi3")
    inject_lora(model, LoraConfig(r=4, target_modules="all-linear"))
    wrapped = {name.rpartition(".")[2] for name, _ in lora_modules(model)}
    assert wrapped == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert isinstance(model.lm_head, nn.Linear)  # "all-linear" leaves the output head alone, as in PEFT


@pytest.mark.parametrize("family,targets", [
    ("llama", "all-linear"), ("gemma2", ATTN_MLP + ["embed_tokens", "lm_head"]),
])
def test_merge_equals_unmerged(family, targets):
    _, model = model_pair(family)
    inject_lora(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_rslora=True))
    randomize_lora(model)
    ids, mask = padded_batch()
    with torch.no_grad():
        before = gazelle_logits(model, ids, mask)
        merge_lora(model)
        after = gazelle_logits(model, ids, mask)
    torch.testing.assert_close(after, before, atol=1e-4, rtol=0)  # fp32 parity tolerance of DESIGN.md; summation order differs
    assert not lora_modules(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("proj", "lm_head")))
    if family == "gemma2":
        # Different adapters were merged into the tied table's two users: the merged model is untied, and says so.
        assert model.lm_head.weight is not model.model.embed_tokens.weight
        assert not model.config.tie_word_embeddings and not model.config.hf_config["tie_word_embeddings"]


def test_merge_keeps_the_tie_when_no_adapter_touches_it():
    _, model = model_pair("gemma2")
    inject_lora(model, LoraConfig(target_modules=["q_proj"]))
    merge_lora(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings


class Fake4bit(nn.Module):
    """Stands in for a 4-bit linear: uint8 storage, a forward, in/out features."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features, self.bias = linear.in_features, linear.out_features, None
        self.register_buffer("packed", torch.zeros(linear.out_features, linear.in_features, dtype=torch.uint8))

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], self.out_features)


def test_lora_over_a_4bit_base_runs_but_does_not_merge():
    _, model = model_pair("llama")
    attn = model.model.layers[0].self_attn
    attn.q_proj = LoraLinear(Fake4bit(attn.q_proj), r=4, lora_alpha=8)
    randomize_lora(model)
    ids, mask = padded_batch()
    next_token_loss(gazelle_logits(model, ids, mask), ids, mask).backward()
    assert attn.q_proj.lora_A.weight.grad.abs().max() > 0
    with pytest.raises(GazelleError, match="merged export"):
        merge_lora(model)
    assert isinstance(attn.q_proj, LoraLinear)  # nothing was changed


def test_remove_lora_restores_the_base_model():
    _, model = model_pair("qwen3")
    ids, mask = padded_batch()
    with torch.no_grad():
        before = gazelle_logits(model, ids, mask)
    inject_lora(model, LoraConfig(target_modules=ATTN_MLP + ["embed_tokens"]))
    randomize_lora(model)
    remove_lora(model)
    assert not lora_modules(model) and not any("lora" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(gazelle_logits(model, ids, mask), before, atol=0, rtol=0)


def test_dropout_applies_in_training_only():
    _, model = model_pair("llama")
    inject_lora(model, LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5))
    randomize_lora(model)
    q = model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        q.train()
        assert not torch.equal(q(x), q(x))
        q.eval()
        assert torch.equal(q(x), q(x))


def test_unknown_target_lists_existing_names():
    _, model = model_pair("llama")
    with pytest.raises(GazelleError) as e:
        inject_lora(model, LoraConfig(target_modules=["q_prj", "v_proj"]))
    message = str(e.value)
    assert "['q_prj']" in message and "llama" in message
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in message and "\n" not in message
    assert not lora_modules(model) and all(p.requires_grad for p in model.parameters())  # untouched


@pytest.mark.parametrize("kwargs,match", [
    (dict(loftq_config={"loftq_bits": 4}), "LoftQ is not supported yet; use init_lora_weights=True"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(r=0), "r must be a positive integer"),
    (dict(lora_alpha=0), "lora_alpha"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(bias="some"), "bias must be one of"),
    (dict(init_lora_weights="pissa"), "init_lora_weights"),
    (dict(target_modules=[]), "target_modules"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(GazelleError, match=match):
        LoraConfig(**kwargs)


@pytest.mark.parametrize("config,match", [
    (LoraConfig(target_modules=["self_attn"]), "Attention; LoRA wraps linear and embedding layers only"),
    (LoraConfig(layers_to_transform=[5]), r"outside this model's layers 0\.\.2"),
    (LoraConfig(target_modules=r".*\.q_proj", layers_to_transform=[0]), "regex"),
])
def test_inject_errors(config, match):
    _, model = model_pair("llama")
    with pytest.raises(GazelleError, match=match):
        inject_lora(model, config)


def test_inject_twice_is_refused():
    _, model = model_pair("llama")
    inject_lora(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(GazelleError, match="already has LoRA adapters"):
        inject_lora(model, LoraConfig(target_modules=["v_proj"]))


def test_regex_targets_match_full_names():
    _, model = model_pair("llama")
    inject_lora(model, LoraConfig(target_modules=r"model\.layers\.[01]\.self_attn\.(q|v)_proj"))
    expected = [f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")]
    assert [n for n, _ in lora_modules(model)] == expected


def test_all_linear_wraps_linear4bit_layers():
    from gazelle.quant import linear4bit
    _, model = model_pair("llama")
    _, reference = model_pair("llama")
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and ".layers." in name:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, linear4bit.Linear4bit.from_linear(module, torch.float32))
    config = LoraConfig(r=8, target_modules="all-linear")
    inject_lora(model, config)
    inject_lora(reference, config)
    assert len(lora_modules(model)) == 21
    assert all(isinstance(m.base_layer, linear4bit.Linear4bit) for _, m in lora_modules(model))
    assert trainable_summary(model) == trainable_summary(reference)  # 4-bit layers count at their logical size
    randomize_lora(model)
    ids, mask = padded_batch()
    next_token_loss(gazelle_logits(model, ids, mask), ids, mask).backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in lora_parameters(model))
    with pytest.raises(GazelleError, match="merged export"):
        merge_lora(model)
