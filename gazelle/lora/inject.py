"""Putting LoRA into a model, taking it out, folding it in, and counting what trains."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import torch
from torch import nn

from gazelle.errors import GazelleError
from gazelle.lora.layers import LoraConfig, LoraEmbedding, LoraLinear
from gazelle.quant.linear4bit import Linear4bit

LORA_MODULES = (LoraLinear, LoraEmbedding)
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def linear_types() -> tuple[type, ...]:
    """The layers LoRA can wrap: plain and NF4 linear layers."""
    return (nn.Linear, Linear4bit)


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LORA_MODULES)]


def target_names(model: nn.Module) -> list[str]:
    """The distinct last name components of the wrapped modules: the resolved target_modules."""
    return sorted({name.rpartition(".")[2] for name, _ in lora_modules(model)})


def _family(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "family", type(model).__name__)


def _select(model: nn.Module, config: LoraConfig) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs to wrap, with PEFT's matching rules; GazelleError when the config cannot apply."""
    linears = linear_types()
    adaptable = linears + (nn.Embedding,)
    modules = list(model.named_modules())
    targets = config.target_modules
    if targets == "all-linear":  # PEFT's meaning: every linear layer but the output head
        chosen = [(n, m) for n, m in modules if isinstance(m, linears) and LAYER_INDEX.search(n)]
    elif isinstance(targets, str):
        if config.layers_to_transform:
            # PEFT ignores layers_to_transform with a regex; refusing beats silently adapting every layer.
            raise GazelleError(
                "layers_to_transform cannot be combined with a regex target_modules; put the layer numbers in the regex"
            )
        chosen = [(n, m) for n, m in modules if re.fullmatch(targets, n)]
        if not chosen:
            raise GazelleError(
                f"target_modules regex {targets!r} matches no module name in this {_family(model)} model"
            )
    else:
        hits = {t: [(n, m) for n, m in modules if n == t or n.endswith("." + t)] for t in targets}
        missing = [t for t, found in hits.items() if not found]
        if missing:
            names = dict.fromkeys(n.rpartition(".")[2] for n, m in modules if isinstance(m, adaptable))
            raise GazelleError(
                f"target_modules {missing} match nothing in this {_family(model)} model; its linear and embedding "
                f"layers are: {', '.join(names)} (or use target_modules='all-linear')"
            )
        chosen = list({n: (n, m) for found in hits.values() for n, m in found}.values())
    for name, module in chosen:
        if not isinstance(module, adaptable):
            raise GazelleError(
                f"target_modules selects {name}, a {type(module).__name__}; LoRA wraps linear and embedding layers only"
            )
    if config.layers_to_transform:
        count = len(getattr(getattr(model, "model", None), "layers", ()))
        outside = [i for i in config.layers_to_transform if count and i >= count]
        if outside:
            raise GazelleError(f"layers_to_transform {outside} are outside this model's layers 0..{count - 1}")
        wanted, exact = set(config.layers_to_transform), set(targets) if isinstance(targets, list) else set()
        # PEFT's rule, kept so it wraps the same modules when it reads the adapter: a module outside the numbered
        # layers is then skipped (model.embed_tokens), unless a target names it in full (lm_head).
        chosen = [(n, m) for n, m in chosen if n in exact or (i := LAYER_INDEX.search(n)) and int(i.group(1)) in wanted]
        if not chosen:
            raise GazelleError(f"target_modules {targets!r} select nothing in layers {config.layers_to_transform}")
    return chosen


def inject_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Freeze the model and wrap the modules config selects; returns the same model, modified in place.

    LoRA parameters (and the biases config.bias names) are the only ones left trainable. Initial values come
    from a generator seeded with config.random_state, so the global RNG is neither used nor advanced.
    """
    if lora_modules(model):
        raise GazelleError("this model already has LoRA adapters; call merge_lora or remove_lora before injecting anew")
    chosen = _select(model, config)
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(config.random_state)
    for name, module in chosen:
        parent_name, _, leaf = name.rpartition(".")
        if isinstance(module, nn.Embedding):
            wrapper = LoraEmbedding(module, config.r, config.lora_alpha, config.use_rslora,
                                    init_lora_weights=config.init_lora_weights, generator=generator)
        else:
            wrapper = LoraLinear(
                module, config.r, config.lora_alpha, config.lora_dropout, config.use_rslora, config.bias,
                init_lora_weights=config.init_lora_weights, generator=generator,
            )
        wrapper.train(module.training)  # a new Dropout is in training mode; an eval model must stay deterministic
        # The wrapper holds the base module itself, so a tied embedding/lm_head weight stays one Parameter.
        setattr(model.get_submodule(parent_name), leaf, wrapper)
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name.rpartition(".")[2] == "bias":
                p.requires_grad_(True)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter weights (lora_A/lora_B, lora_embedding_A/B) in model order; trainable biases are not included."""
    return [p for _, m in lora_modules(model) for n, p in m.named_parameters() if not n.startswith("base_layer.")]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the model as its base alone (no second copy of the weights): the reference policy of RL."""
    modules = [m for _, m in lora_modules(model)]
    for m in modules:
        m.disabled = True
    try:
        yield
    finally:
        for m in modules:
            m.disabled = False


def _unwrap(model: nn.Module) -> None:
    for name, module in lora_modules(model):
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, module.base_layer)


def remove_lora(model: nn.Module) -> nn.Module:
    """Put the base modules back and drop the adapters; base parameters stay frozen."""
    _unwrap(model)
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold each adapter into its base weight (W += B @ A * scaling) and unwrap; returns the model.

    The merged weight is a new tensor, not an in-place update: a base weight shared by a tied embedding and
    lm_head must not receive one module's delta on behalf of both. When that unties them, config says so.
    """
    modules = lora_modules(model)
    four_bit = linear_types()[1:]
    for name, module in modules:
        base = module.base_layer
        plain = isinstance(base, (nn.Linear, nn.Embedding)) and not isinstance(base, four_bit)
        if not plain or not base.weight.is_floating_point():
            raise GazelleError(
                f"cannot merge LoRA into {name}: its base is a {type(base).__name__}, not a 16/32-bit layer; "
                "merging into a 4-bit model comes with the merged export; save the adapter with save_adapter meanwhile"
            )
    with torch.no_grad():
        for _, module in modules:
            w = module.base_layer.weight
            merged = (w.float() + module.delta_weight().to(w.device)).to(w.dtype)
            module.base_layer.weight = nn.Parameter(merged, requires_grad=w.requires_grad)
    _unwrap(model)
    config = getattr(model, "config", None)
    if getattr(config, "tie_word_embeddings", False) and model.lm_head.weight is not model.model.embed_tokens.weight:
        hf_config = {**config.hf_config, "tie_word_embeddings": False}  # a merged export must not re-tie them
        model.config = config.with_overrides(tie_word_embeddings=False, hf_config=hf_config)
    return model


def trainable_summary(model: nn.Module) -> str:
    """PEFT's print_trainable_parameters line; shared (tied) parameters count once, as there."""
    linears4 = linear_types()[1:]
    trainable = total = 0
    counted: set[int] = set()
    for module in model.modules():
        if isinstance(module, linears4):
            # Count a 4-bit layer by its logical size, whatever its packed storage looks like.
            bias = getattr(module, "bias", None)
            n = module.in_features * module.out_features + (bias.numel() if bias is not None else 0)
            total += n
            trainable += bias.numel() if bias is not None and bias.requires_grad else 0
            counted.update(id(t) for t in module.parameters())
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in counted:
                counted.add(id(p))
                total += p.numel()
                trainable += p.numel() if p.requires_grad else 0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
