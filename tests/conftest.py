import os

import pytest
import torch

# GPU runs of the parity tests: GAZELLE_TEST_DEVICE=cuda GAZELLE_TEST_DTYPE=bfloat16 python -m pytest tests/models
DEVICE = torch.device(os.environ.get("GAZELLE_TEST_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("GAZELLE_TEST_DTYPE", "float32"))


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    from gazelle.models.builtin import smollm2_gguf_path

    return smollm2_gguf_path()
