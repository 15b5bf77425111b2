"""The reference loop: cached decoding equals full forwards; sampling filters and seeds behave."""

import pytest
import torch

from gazelle.errors import GazelleError
from gazelle.generation.reference import generate
from gazelle.generation.sampling import SamplingParams, filter_logits, next_token
from tests.models.test_packing import gazelle_model


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_cached_steps_equal_full_forward(family):
    """Each generated token is the argmax of a full, uncached forward over the sequence so far."""
    model = gazelle_model(family)
    prompt = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(3))
    out = generate(model, prompt, max_new_tokens=10)
    with torch.no_grad():
        full = model.logits(model(out[:, :-1]))
    assert torch.equal(full[:, prompt.shape[1] - 1:].argmax(-1), out[:, prompt.shape[1]:])


def test_stops_at_eos_and_pads_after():
    model = gazelle_model("llama")
    prompt = torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(0))
    free = generate(model, prompt, max_new_tokens=8)
    eos = int(free[0, -1])
    stop = 5 + int((free[0, 5:] == eos).nonzero()[0])  # where that token is first generated
    out = generate(model, prompt, max_new_tokens=8, eos_token_ids=[eos], pad_token_id=0)
    assert torch.equal(out, free[:, : stop + 1])

    two = torch.cat([prompt, torch.randint(3, 256, (1, 5), generator=torch.Generator().manual_seed(1))])
    out = generate(model, two, max_new_tokens=8, eos_token_ids=[eos], pad_token_id=0)
    assert torch.equal(out[0, : stop + 1], free[0, : stop + 1])
    assert (out[0, stop + 1:] == 0).all(), "a finished sequence is padded while the other goes on"


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    model = gazelle_model("llama")
    prompt = torch.randint(3, 256, (2, 5), generator=torch.Generator().manual_seed(0))
    params = SamplingParams(do_sample=True, temperature=1.5)
    runs = [generate(model, prompt, max_new_tokens=12, params=params, generator=torch.Generator().manual_seed(s))
            for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_right_padded_prompts_are_refused():
    model = gazelle_model("llama")
    with pytest.raises(GazelleError, match="left-padded"):
        generate(model, torch.ones(2, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))


def test_filters_never_allow_tokens_outside_their_set():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g) * 3
    probs = logits.softmax(-1)
    ranked = probs.argsort(-1, descending=True)
    for params in (SamplingParams(True, top_k=5), SamplingParams(True, top_p=0.6), SamplingParams(True, min_p=0.2)):
        allowed = torch.zeros_like(probs, dtype=torch.bool)
        for row in range(64):
            if params.top_k:
                allowed[row, ranked[row, :5]] = True
            elif params.top_p < 1:  # smallest prefix of the ranking whose mass reaches top_p
                mass = probs[row, ranked[row]].cumsum(0)
                allowed[row, ranked[row, : int((mass < 0.6).sum()) + 1]] = True
            else:
                allowed[row] = probs[row] >= 0.2 * probs[row].max()
        assert torch.equal(torch.isfinite(filter_logits(logits, params)), allowed), params
        for _ in range(20):
            tokens = next_token(logits, params, generator=g)
            assert allowed[torch.arange(64), tokens].all(), params


def test_bad_sampling_values_are_named():
    with pytest.raises(GazelleError, match="top_p"):
        SamplingParams(True, top_p=1.5)
    with pytest.raises(GazelleError, match="temperature"):
        SamplingParams(True, temperature=-1)
