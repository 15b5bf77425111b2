"""The engine on a GPU, as the benchmarks run it (CUDA graphs, compiled decode step, the decode-attention and
grouped-product kernels), against the reference loop on the CPU: the same greedy tokens, in float32."""

import pytest
import torch

from gazelle.generation.engine import Engine
from gazelle.models import decoder
from gazelle.quant import quantize_model
from tests.generation.test_engine import prompts, reference_greedy
from tests.kernels.check import needs_gpu
from tests.models.test_packing import gazelle_model


@needs_gpu
@pytest.mark.parametrize("family, compile", [  # plain, biases + window, softcap + window; compiling takes a minute
    ("llama", False), ("qwen2", False), ("gemma2", False), ("llama", True)])
def test_gpu_engine_greedy_equals_the_cpu_reference(family, compile, monkeypatch):
    model = gazelle_model(family)
    batch = prompts(lengths=(7, 12, 3, 9))
    expected = reference_greedy(model, batch, 12)
    calls = []
    for name in ("decode_attention", "multi_linear", "glu_linear"):
        monkeypatch.setattr(decoder, name, _recording(getattr(decoder, name), name, calls))
    engine = Engine(model.cuda(), compile=compile)
    got = engine.generate(batch, max_new_tokens=12, n=2)
    assert got == [seq for seq in expected for _ in range(2)], family
    if not compile:  # eager capture: the decoder called the kernels (under compile they run inside the graph)
        assert {"decode_attention", "multi_linear", "glu_linear"} <= set(calls)


def _recording(fn, name: str, calls: list):
    def wrapped(*args, **kwargs):
        calls.append(name)
        return fn(*args, **kwargs)
    return wrapped


@needs_gpu
@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: q/k/v biases in the grouped NF4 launch
def test_gpu_engine_nf4_greedy_equals_the_cpu_reference(family, monkeypatch):
    """NF4 weights (float32 compute): q/k/v and gate/up each one fused NF4 launch in the captured decode step."""
    model = quantize_model(gazelle_model(family), torch.float32)
    batch = prompts(lengths=(7, 12, 3, 9))
    expected = reference_greedy(model, batch, 12)  # on the CPU: dequantize + F.linear
    calls = []
    monkeypatch.setattr(decoder, "grouped_forward", _recording(decoder.grouped_forward, "grouped_forward", calls))
    got = Engine(model.cuda(), compile=False).generate(batch, max_new_tokens=12, n=2)
    assert got == [seq for seq in expected for _ in range(2)], family
    assert calls.count("grouped_forward") >= 2 * model.config.num_layers  # q/k/v and gate/up, every layer


@needs_gpu
@pytest.mark.parametrize("compile", [False, True])
def test_gpu_engine_lora_greedy_equals_the_cpu_reference(compile):
    """LoRA adapters (unmerged, non-zero B) on every projection: the grouped products step aside for the adapted
    layers and the tokens stay the reference's."""
    from gazelle import FastLanguageModel

    model = FastLanguageModel.get_peft_model(gazelle_model("llama"), r=4, lora_alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    batch = prompts(lengths=(7, 12, 3, 9))
    expected = reference_greedy(model, batch, 12)
    engine = Engine(model.cuda(), compile=compile)
    got = engine.generate(batch, max_new_tokens=12, n=2)
    assert got == [seq for seq in expected for _ in range(2)]
    # An in-place update, as an optimizer step makes it: the captured graphs replay with the new adapters (the
    # fused path's cast adapters are kept between calls, but never inside a graph).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(-1.5)
    on_cpu = FastLanguageModel.get_peft_model(gazelle_model("llama"), r=4, lora_alpha=8)
    on_cpu.load_state_dict({k: v.cpu() for k, v in model.state_dict().items()})
    expected = reference_greedy(on_cpu, batch, 12)
    assert engine.generate(batch, max_new_tokens=12, n=2) == [seq for seq in expected for _ in range(2)]
