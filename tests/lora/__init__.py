"""Shared helpers of the LoRA tests: a transformers model and the gazelle model with the same weights, a padded
batch, the loss both sides compute, and moving adapter tensors between gazelle and PEFT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gazelle.lora import LoraConfig, lora_parameters
from gazelle.lora.inject import lora_modules
from gazelle.lora.peft_io import PREFIX
from gazelle.models.config import from_hf_config
from gazelle.models.decoder import Decoder
from tests.tiny import tiny_hf_model

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is fastest, and immune to oversubscription on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ATTN_MLP = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_pair(family: str, seed: int = 0):
    """(transformers model, gazelle Decoder) holding the same weights."""
    hf = tiny_hf_model(family, seed)
    model = Decoder(from_hf_config(hf.config.to_dict()))
    model.load_state_dict(hf.state_dict(), strict=False)
    model.tie_weights()
    return hf, model.eval()


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows of 10 tokens, the second right-padded after 6 (pad id 0; real ids avoid the special ids 0-2)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (2, 10), generator=g)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    return ids, mask


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-mean cross-entropy of predicting each next real token."""
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def gazelle_logits(model, ids, mask):
    return model.logits(model(ids, attention_mask=mask))


def randomize_lora(model, seed: int = 1, biases: bool = False) -> None:
    """Non-zero adapters everywhere (B starts at zero, which would make A's gradient zero and tests weak)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        if biases:
            for name, p in model.named_parameters():
                if name.endswith("bias") and p.requires_grad:  # the trained ones, which the adapter carries
                    p.add_(torch.randn(p.shape, generator=g) * 0.1)


def peft_config(config: LoraConfig, **extra):
    import peft

    return peft.LoraConfig(
        r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=config.target_modules, bias=config.bias, use_rslora=config.use_rslora,
        layers_to_transform=config.layers_to_transform,
        task_type="CAUSAL_LM", **extra,
    )


def copy_lora_into_peft(model, peft_model) -> None:
    """gazelle's adapter values (and biases) into the PEFT model, by PEFT's own state-dict loader."""
    from peft import set_peft_model_state_dict

    state = {PREFIX + n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n or n.endswith("bias")}
    result = set_peft_model_state_dict(peft_model, state)
    assert not result.unexpected_keys, result.unexpected_keys


def peft_named(peft_model) -> dict[str, torch.Tensor]:
    """PEFT's parameters under gazelle's names (prefix and adapter name dropped)."""
    return {
        n.removeprefix(PREFIX).replace(".default", ""): p
        for n, p in peft_model.named_parameters(remove_duplicate=False)
    }


def lora_names(model) -> list[str]:
    return [f"{w}.{n}" for w, m in lora_modules(model) for n, _ in m.named_parameters() if "base_layer" not in n]
