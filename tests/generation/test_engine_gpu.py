"""The engine on a GPU, as the benchmarks run it (CUDA graphs, compiled decode step, the decode-attention and
grouped-product kernels), against the reference loop on the CPU: the same greedy tokens, in float32."""

import pytest

from gazelle.generation.engine import Engine
from gazelle.models import decoder
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
