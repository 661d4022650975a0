"""The sampler's filters on synthetic logits: each filter removes exactly the tokens it should."""

from __future__ import annotations

import math

import pytest
import torch

from tessera.engine.sampling import SamplingParams, sample, sample_batch

# probabilities 0.5, 0.25, 0.15, 0.07, 0.03
PROBS = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
LOGITS = PROBS.log()


def _draws(params: SamplingParams, n: int = 400) -> set[int]:
    gen = torch.Generator().manual_seed(0)
    return {sample(LOGITS, params, gen)[0] for _ in range(n)}


def test_greedy_takes_the_argmax_and_reports_its_logprob() -> None:
    token, logprob = sample(LOGITS, SamplingParams(), None)
    assert token == 0 and math.isclose(logprob, math.log(0.5), rel_tol=1e-5)


def test_top_k_keeps_the_k_most_likely() -> None:
    assert _draws(SamplingParams(temperature=1.0, top_k=2)) == {0, 1}


def test_top_p_keeps_the_smallest_prefix_reaching_p() -> None:
    assert _draws(SamplingParams(temperature=1.0, top_p=0.8)) == {0, 1, 2}  # 0.5 + 0.25 < 0.8
    assert _draws(SamplingParams(temperature=1.0, top_p=0.5)) == {0}


def test_min_p_drops_tokens_below_a_fraction_of_the_best() -> None:
    assert _draws(SamplingParams(temperature=1.0, min_p=0.2)) == {0, 1, 2}  # 0.07 < 0.2 * 0.5


def test_plain_temperature_sampling_reaches_every_token_and_logprobs_are_unscaled() -> None:
    assert _draws(SamplingParams(temperature=1.0), n=2000) == {0, 1, 2, 3, 4}
    gen = torch.Generator().manual_seed(1)
    token, logprob = sample(LOGITS, SamplingParams(temperature=2.0), gen)
    assert math.isclose(logprob, math.log(PROBS[token].item()), rel_tol=1e-5)


def test_a_batch_samples_each_row_as_it_would_alone() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=t, top_k=k, seed=7) for t, k in ((0, 0), (1.0, 5), (0, 0), (0.7, 0))]
    params += [SamplingParams(logprobs=True), SamplingParams(temperature=1.5, top_p=0.5, seed=3)]

    def gens() -> list[torch.Generator | None]:
        return [None if p.greedy else torch.Generator().manual_seed(p.seed or 0) for p in params]

    tokens, logprobs, _ = sample_batch(logits, params, gens())
    alone = [sample(row, p, g) for row, p, g in zip(logits, params, gens(), strict=True)]
    assert tokens == [t for t, _ in alone]
    assert logprobs == [lp for _, lp in alone]
    assert tokens[0] == int(logits[0].argmax()) and tokens[2] == int(logits[2].argmax())


def test_presence_and_frequency_penalties_lower_tokens_already_in_the_output() -> None:
    # token 0 leads by log(0.5/0.25) = 0.69 over token 1
    assert sample(LOGITS, SamplingParams(presence_penalty=0.5), None, ([], [0]))[0] == 0
    assert sample(LOGITS, SamplingParams(presence_penalty=1.0), None, ([], [0]))[0] == 1
    assert sample(LOGITS, SamplingParams(presence_penalty=1.0), None, ([0], []))[0] == 0  # not the prompt
    assert sample(LOGITS, SamplingParams(frequency_penalty=0.3), None, ([], [0]))[0] == 0  # 0.3 < 0.69
    assert sample(LOGITS, SamplingParams(frequency_penalty=0.3), None, ([], [0, 0, 0]))[0] == 1  # 0.9
    # the logprob reported is the model's, before the penalty
    token, logprob = sample(LOGITS, SamplingParams(presence_penalty=2.0), None, ([], [0]))
    assert token == 1 and math.isclose(logprob, math.log(0.25), rel_tol=1e-5)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    logits = torch.tensor([2.0, 1.5, -1.0, -1.2])
    assert sample(logits, SamplingParams(repetition_penalty=1.5), None, ([0], []))[0] == 1  # 2 / 1.5 < 1.5
    assert sample(logits, SamplingParams(repetition_penalty=1.2), None, ([1], [1]))[0] == 0
    negative = torch.tensor([-1.0, -1.1, -5.0])
    assert sample(negative, SamplingParams(repetition_penalty=1.2), None, ([], [0]))[0] == 1  # -1.2 < -1.1


def test_a_batch_penalizes_only_its_penalized_rows() -> None:
    logits = LOGITS.repeat(3, 1)
    params = [SamplingParams(), SamplingParams(presence_penalty=2.0)]
    params.append(SamplingParams(temperature=1.0, top_k=1))
    history = ([], [0])
    tokens, _, _ = sample_batch(logits, params, [None, None, torch.Generator().manual_seed(0)], [history] * 3)
    assert tokens == [0, 1, 0]


def test_penalties_out_of_range_are_refused() -> None:
    for bad in ({"presence_penalty": 2.5}, {"frequency_penalty": -3.0}, {"repetition_penalty": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)


def test_banned_tokens_are_never_taken_and_logprobs_stay_the_models() -> None:
    logits = LOGITS.repeat(2, 1)
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=0)]
    gens = [None, torch.Generator().manual_seed(0)]
    for _ in range(50):
        tokens, logprobs, _ = sample_batch(logits, params, gens, banned=[(0,), (0, 1)])
        assert tokens[0] == 1 and tokens[1] not in (0, 1)
    assert math.isclose(logprobs[0], math.log(0.25), rel_tol=1e-5)


def test_min_tokens_must_fit_max_tokens() -> None:
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
