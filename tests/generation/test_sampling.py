"""The sync-free sampler: right distribution, right support, seeded, repetition penalty, capturable."""

import inspect
import math

import pytest
import torch

from gazelle.errors import GazelleError
from gazelle.generation import sampling
from gazelle.generation.sampling import SamplingParams, apply_repetition_penalty, filter_logits, mark_seen, next_token, sample

# Probabilities 0.090 0.403 0.020 0.148 0.007 0.244 0.055 0.033: ranked 1 5 3 0 6 7 2 4, shuffled so
# that "the first k" and "the k most likely" differ.
LOGITS = torch.tensor([0.5, 2.0, -1.0, 1.0, -2.0, 1.5, 0.0, -0.5])
# Chi-square critical values at significance 0.001 by degrees of freedom (standard table).
CHI2_CRITICAL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32}
N = 20_000


def renormalised(probs: torch.Tensor, allowed: list[int]) -> torch.Tensor:
    out = torch.zeros_like(probs)
    out[allowed] = probs[allowed] / probs[allowed].sum()
    return out


def assert_follows(tokens: torch.Tensor, expected: torch.Tensor) -> None:
    """Pearson chi-square goodness of fit; tokens of zero expected probability must not appear at all."""
    counts = torch.bincount(tokens, minlength=expected.numel()).double()
    support = expected > 0
    assert counts[~support].sum() == 0, f"drew a forbidden token: {counts.tolist()}"
    want = expected[support].double() * tokens.numel()
    statistic = float(((counts[support] - want) ** 2 / want).sum())
    assert statistic < CHI2_CRITICAL[int(support.sum()) - 1], (statistic, counts.tolist(), want.tolist())


def penalised_reference(logits: torch.Tensor, sequences: torch.Tensor, penalty: float) -> torch.Tensor:
    """Token by token, as the CTRL paper states it."""
    out = logits.clone()
    for row, sequence in enumerate(sequences.tolist()):
        for token in set(sequence):
            value = float(out[row, token])
            out[row, token] = value / penalty if value > 0 else value * penalty
    return out


SOFTMAX = LOGITS.softmax(-1)
SEQUENCE = torch.tensor([[1, 5, 1, 6]])  # for the repetition-penalty case
DISTRIBUTIONS = {
    "t1": (SamplingParams(True), SOFTMAX),
    "t0.7": (SamplingParams(True, temperature=0.7), (LOGITS / 0.7).softmax(-1)),
    "top_k": (SamplingParams(True, top_k=3), renormalised(SOFTMAX, [1, 5, 3])),
    "top_p": (SamplingParams(True, top_p=0.8), renormalised(SOFTMAX, [1, 5, 3, 0])),  # 0.795 < 0.8 before token 0
    "min_p": (SamplingParams(True, min_p=0.1), renormalised(SOFTMAX, [1, 5, 3, 0, 6])),  # 0.055 / 0.403 >= 0.1
    "penalty": (SamplingParams(True, repetition_penalty=1.5), penalised_reference(LOGITS[None], SEQUENCE, 1.5)[0].softmax(-1)),
}


@pytest.mark.parametrize("name", DISTRIBUTIONS)
@pytest.mark.parametrize("draw", [sample, next_token])
def test_draws_follow_the_filtered_distribution(draw, name):
    params, expected = DISTRIBUTIONS[name]
    seen = mark_seen(torch.zeros(N, 8, dtype=torch.bool), SEQUENCE.expand(N, -1))
    tokens = draw(LOGITS.expand(N, -1), params, torch.Generator().manual_seed(1), seen=seen)
    assert tokens.shape == (N,)
    assert_follows(tokens, expected)


def allowed_set(row: list[float], params: SamplingParams) -> set[int]:
    """The tokens params may emit for one row of logits, in plain Python."""
    weights = [math.exp(x / params.temperature) for x in row]
    ranked = sorted(range(len(row)), key=lambda t: -weights[t])
    if params.top_k:
        ranked = ranked[: params.top_k]
    ranked = [t for t in ranked if weights[t] >= params.min_p * weights[ranked[0]]]
    total, mass, kept = sum(weights[t] for t in ranked), 0.0, []
    for t in ranked:  # the smallest prefix whose renormalised mass reaches top_p
        kept.append(t)
        mass += weights[t] / total
        if mass >= params.top_p:
            break
    return set(kept)


@pytest.mark.parametrize("params", [
    SamplingParams(True, top_k=5), SamplingParams(True, top_p=0.6), SamplingParams(True, min_p=0.2),
    SamplingParams(True, temperature=0.8, top_k=10, top_p=0.9, min_p=0.05), SamplingParams(True, top_k=1),
], ids=["top_k", "top_p", "min_p", "combined", "top_k1"])
def test_filters_never_emit_a_token_outside_the_allowed_set(params):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(256, 50, generator=g) * 3
    allowed = torch.zeros(256, 50, dtype=torch.bool)
    for row, values in enumerate(logits.tolist()):
        allowed[row, list(allowed_set(values, params))] = True
    assert torch.equal(torch.isfinite(filter_logits(logits, params)), allowed)
    tokens = sample(logits.repeat(50, 1), params, g).view(50, 256)
    assert allowed[torch.arange(256), tokens].all()


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = torch.randn(1000, 50, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(True, top_p=0.95)
    runs = [sample(logits, params, torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_greedy_is_argmax_and_draws_nothing():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    for params in (SamplingParams(), SamplingParams(True, temperature=0), SamplingParams(False, top_k=3, top_p=0.5)):
        assert torch.equal(sample(logits, params, g), logits.argmax(-1))
    assert torch.equal(g.get_state(), state)
    sequences = torch.randint(0, 50, (64, 12), generator=g)
    seen = mark_seen(torch.zeros(64, 50, dtype=torch.bool), sequences)
    greedy = sample(logits, SamplingParams(repetition_penalty=2.0), seen=seen)
    assert torch.equal(greedy, penalised_reference(logits, sequences, 2.0).argmax(-1))


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_the_per_token_rule(penalty):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 40, generator=g)
    logits[:, :4] = 0.0  # a zero logit stays zero either way
    prompt, generated = torch.randint(0, 40, (8, 10), generator=g), torch.randint(0, 40, (8, 5), generator=g)
    seen = mark_seen(torch.zeros(8, 40, dtype=torch.bool), prompt)
    for step in generated.T:  # one (B,) token per decode step
        mark_seen(seen, step)
    assert torch.equal(seen, mark_seen(torch.zeros(8, 40, dtype=torch.bool), torch.cat([prompt, generated], 1)))
    expected = penalised_reference(logits, torch.cat([prompt, generated], 1), penalty)
    assert torch.allclose(apply_repetition_penalty(logits, seen, penalty), expected, rtol=1e-6, atol=0)
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_repetition_penalty_is_validated_and_needs_seen():
    with pytest.raises(GazelleError, match="repetition_penalty"):
        SamplingParams(True, repetition_penalty=0.0)
    with pytest.raises(GazelleError, match="seen="):
        sample(torch.randn(2, 10), SamplingParams(True, repetition_penalty=1.2))
    sample(torch.randn(2, 10), SamplingParams(True, repetition_penalty=1.0))  # off: no mask needed


def test_sample_has_no_host_sync():
    """Nothing in the sampling path reads a tensor value on the host or sizes a tensor by one."""
    path = (sample, sampling._penalised, apply_repetition_penalty, filter_logits, mark_seen)
    source = "".join(inspect.getsource(f) for f in path)
    for name in (".item(", ".tolist(", "multinomial", "nonzero", "masked_select", ".cpu(", "bool(", "int("):
        assert name not in source, name
    # Dynamo refuses, under fullgraph, anything that needs a tensor value in Python (.item(), `if tensor`).
    params = SamplingParams(True, temperature=0.8, top_k=10, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    compiled = torch.compile(lambda logits, seen: sample(logits, params, seen=seen), fullgraph=True, backend="eager")
    logits = torch.randn(4, 50)
    seen = mark_seen(torch.zeros(4, 50, dtype=torch.bool), torch.randint(0, 50, (4, 6)))
    assert compiled(logits, seen).shape == (4,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_replays_in_a_cuda_graph():
    params = SamplingParams(True, temperature=0.8, top_k=20, top_p=0.9, min_p=0.02, repetition_penalty=1.2)
    logits = torch.randn(512, 1000, device="cuda") * 3
    seen = mark_seen(torch.zeros(512, 1000, dtype=torch.bool, device="cuda"), torch.randint(0, 1000, (512, 8), device="cuda"))
    allowed = torch.isfinite(filter_logits(apply_repetition_penalty(logits, seen, 1.2), params))
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the graph, as capture requires
        sample(logits, params, seen=seen)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tokens = sample(logits, params, seen=seen)
    draws = []
    for _ in range(2):
        graph.replay()
        draws.append(tokens.clone())
    assert all(allowed[torch.arange(512, device="cuda"), d].all() for d in draws)
    assert not torch.equal(draws[0], draws[1]), "each replay draws fresh noise"


def test_first_argmax_equals_argmax_with_ties_and_masked_tokens():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (32, 23), generator=g).float()  # many ties, in and across chunks
    scores[torch.rand(32, 23, generator=g) < 0.3] = float("-inf")
    scores[0] = float("-inf")
    scores[0, 22] = 1.0  # the only allowed token in the last, partial chunk
    for chunk in (1, 3, 5, 22, 23, 64):
        assert torch.equal(sampling.first_argmax(scores, chunk), scores.argmax(-1)), chunk


def test_draws_over_a_large_vocabulary_follow_the_softmax():
    """A vocabulary past first_argmax's chunk: the 8 allowed tokens sit in different chunks."""
    vocab, where = 4_100, torch.tensor([5, 1000, 2047, 2048, 3000, 4095, 4096, 4099])
    logits = torch.full((N // 4, vocab), float("-inf"))
    logits[:, where] = LOGITS
    g = torch.Generator().manual_seed(1)
    tokens = torch.cat([sample(logits, SamplingParams(True), g) for _ in range(4)])
    assert torch.isin(tokens, where).all()
    assert_follows(torch.searchsorted(where, tokens), LOGITS.softmax(-1))
