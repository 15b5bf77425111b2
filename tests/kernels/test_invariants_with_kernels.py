"""The training invariants hold with the kernels on: GAZELLE_KERNELS=triton runs every op of the decoder through
its Triton kernel (in Triton's interpreter on the CPU) and through the fused LoRA autograd; the oracles are the
same as on the reference path (transformers, PEFT, accumulation and checkpointing equivalence)."""

from __future__ import annotations

import pytest

from gazelle.kernels import dispatch
from tests.kernels.check import GPU
from tests.lora import one_thread  # noqa: F401  (an autouse fixture)

pytestmark = pytest.mark.skipif(GPU, reason="the CPU interpreter run of these invariants")


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    monkeypatch.setenv("GAZELLE_KERNELS", "triton")
    assert dispatch.interpreting()


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_lora_gradients_equal_peft(family):
    from gazelle.lora import LoraConfig
    from tests.lora.test_lora import ATTN_MLP, assert_grads_match_peft

    targets = "all-linear" if family == "phi3" else ATTN_MLP  # phi3's projections are fused (qkv, gate_up)
    assert_grads_match_peft(family, LoraConfig(r=8, lora_alpha=16, target_modules=targets))


def test_lora_batch_4_equals_batch_1_times_accumulation_4(tmp_path):
    from tests.trainers.test_sft import (
        test_lora_batch_4_equals_batch_1_times_accumulation_4 as invariant,
    )

    invariant(tmp_path)


def test_qlora_trains_adapters_over_nf4_layers(tmp_path):
    from tests.trainers.test_sft import (
        test_qlora_trains_adapters_over_nf4_layers as invariant,
    )

    invariant(tmp_path)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])  # phi3: a fused gate_up; gemma2: sandwich norms
def test_offloaded_checkpointing_gives_the_same_gradients(family):
    from tests.models.test_offload import (
        test_offloaded_checkpointing_gives_the_same_gradients as invariant,
    )

    invariant(family, 0.0)


@pytest.mark.parametrize("family", ["qwen2", "gemma3", "phi3"])
def test_logits_match_transformers(family):
    import torch

    from tests.lora import model_pair, padded_batch

    hf, model = model_pair(family)
    ids, mask = padded_batch()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        ours = model.logits(model(ids, attention_mask=mask))
    valid = mask.bool()
    assert (ours[valid] - theirs[valid]).abs().max() <= 1e-4
