import os

import torch

# Without a GPU, Triton kernels run in Triton's interpreter; it must be chosen before triton.jit decorates them,
# that is before gazelle's kernel modules are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# GPU runs of the parity tests: GAZELLE_TEST_DEVICE=cuda GAZELLE_TEST_DTYPE=bfloat16 python -m pytest tests/models
DEVICE = torch.device(os.environ.get("GAZELLE_TEST_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("GAZELLE_TEST_DTYPE", "float32"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    from gazelle.models.builtin import smollm2_gguf_path

    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """transformers loading the same GGUF: the oracle for SmolLM2 (it takes ~25 s, so it is shared)."""
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(smollm2_gguf)
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
