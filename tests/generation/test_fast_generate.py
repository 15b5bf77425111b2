"""fast_generate's request vocabulary: vLLM-style SamplingParams, outputs, stop strings and LoRA requests."""

import torch

from gazelle.generation.requests import SamplingParams
from gazelle.lora import lora_parameters
from tests.lora import model_pair, randomize_lora
from tests.trainers.helpers import word_tokenizer


def lora_model():
    from gazelle import FastLanguageModel

    _, model = model_pair("llama")
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    randomize_lora(model, seed=1)
    model.tokenizer = word_tokenizer()
    return model


GREEDY = SamplingParams(temperature=0, max_tokens=8)
PROMPT = "w10 w11 w12 w13"


def test_saved_adapter_request_is_used_for_the_call_only(tmp_path):
    model = lora_model()
    with_saved = model.fast_generate(PROMPT, sampling_params=GREEDY)[0]
    model.save_lora(str(tmp_path / "saved"))
    randomize_lora(model, seed=2)  # training moves on
    moved = [p.detach().clone() for p in lora_parameters(model)]
    now = model.fast_generate(PROMPT, sampling_params=GREEDY)[0]
    again = model.fast_generate(PROMPT, sampling_params=GREEDY, lora_request=model.load_lora(str(tmp_path / "saved")))
    assert again[0] == with_saved and now != with_saved
    assert all(torch.equal(p, q) for p, q in zip(lora_parameters(model), moved))  # the live values came back


def test_lora_request_none_is_the_base_model():
    model = lora_model()
    _, base = model_pair("llama")
    base.tokenizer = word_tokenizer()
    assert model.fast_generate(PROMPT, sampling_params=GREEDY, lora_request=None)[0] == \
        base.fast_generate(PROMPT, sampling_params=GREEDY)[0]


def test_outputs_read_like_vllm_and_stop_strings_cut():
    model = lora_model()
    params = SamplingParams(temperature=1.0, n=3, seed=4, max_tokens=6)
    out = model.fast_generate([PROMPT, "w40 w41"], sampling_params=params)
    assert len(out) == 6 and all(len(o.outputs) == 3 for o in out)
    assert [o.text for o in out[0].outputs] == list(out[:3]) and out[3].prompt == "w40 w41"
    assert out == model.fast_generate([PROMPT, "w40 w41"], sampling_params=params)  # seeded
    full = model.fast_generate(PROMPT, sampling_params=GREEDY)[0]
    word = full.split()[2]
    cut = model.fast_generate(PROMPT, sampling_params=SamplingParams(temperature=0, max_tokens=8, stop=[word]))[0]
    assert cut == full[: full.index(word)] and cut.outputs[0].finish_reason == "stop"
