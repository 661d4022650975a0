"""Speculative verification on synthetic logits: a greedy verify emits token for token what plain decoding
emits from the same rows, and rejection sampling emits every token with the plain sampler's distribution
(checked with Pearson's chi-square test over many independent verifies)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from tessera.engine.sampling import SamplingParams, Verified, probabilities, sample_batch
from tessera.engine.sequence import Sequence
from tessera.engine.speculative import DRAFT_PLACEHOLDER, DeviceDrafts, verify
from tessera.engine.speculative.verify import verify_batch
from tessera.engine.stopping import StopChecker

V = 50
EOS = 3
PROMPT = (40, 41, 42)  # clear of EOS and the boosted tokens below, so the repetition penalty leaves them
K = 4


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # NOTE: these tensors are tiny ([3, 6] per verify): on a busy CPU, handing each op to a thread pool
    # cost 10x the op itself (1 ms a sequence instead of 0.1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _logits(rows: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, V, generator=torch.Generator().manual_seed(seed)) * 3  # [rows, V]


def _stops() -> StopChecker:
    # NOTE: `banned` reads only the EOS ids and the sequence; the tokenizer is for stop strings
    return StopChecker(None, (EOS,), 4096)  # type: ignore[arg-type]


def _seq(params: SamplingParams, drafts: list[int], output: list[int] | None = None) -> Sequence:
    seq = Sequence(list(PROMPT), params, output_token_ids=list(output or []))
    seq.draft_token_ids = list(drafts)
    return seq


def _seeded(params: SamplingParams, drafts: list[int]) -> Sequence:
    seq = _seq(params, drafts)
    seq.generator = torch.Generator()  # as the engine gives a seeded request
    return seq


def _plain_decode(rows: torch.Tensor, params: SamplingParams, output: list[int], stops: StopChecker | None):
    """The greedy tokens decoding one at a time emits from `rows` [n, V], row j read after the first j."""
    sim = _seq(params, [], output)
    for row in rows:
        banned = [stops.banned(sim)] if stops is not None else None
        history = [(sim.prompt_token_ids, sim.output_token_ids)]
        tokens, logprobs, _ = sample_batch(row[None], [params], [None], history, banned)
        sim.append(tokens[0], logprobs[0])
    return sim.output_token_ids[len(output) :]


def _with_wrong(tokens: list[int], at: int | None) -> list[int]:
    drafts = tokens[:K]
    if at is not None:
        drafts[at] = (drafts[at] + 1) % V
    return drafts


def _assert_emits(out: Verified, rows: torch.Tensor, expected: list[int]) -> None:
    """`out` emits `expected`, each with its log-probability under the unpenalized model row."""
    assert out.tokens == expected
    logprobs = torch.log_softmax(rows, dim=-1)[torch.arange(len(expected)), expected]
    torch.testing.assert_close(torch.tensor(out.logprobs, dtype=torch.float32), logprobs)


@pytest.mark.parametrize("wrong_at", [None, 0, 2, K - 1])
def test_greedy_accepts_drafts_while_they_are_the_argmax(wrong_at: int | None) -> None:
    logits = _logits(K + 1, seed=0)
    best = logits.argmax(-1).tolist()
    [out] = verify_batch(logits, [_seq(SamplingParams(), _with_wrong(best, wrong_at))], None)
    n = K + 1 if wrong_at is None else wrong_at + 1
    _assert_emits(out, logits, best[:n])
    assert out.tops == [()] * n


def _penalized_case() -> tuple[torch.Tensor, SamplingParams, list[int]]:
    """Rows where penalties and `min_tokens` bans change the greedy choice, the params and the output."""
    params = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.8, min_tokens=4, stop_token_ids=(9,))
    logits = _logits(K + 1, seed=1)
    top = logits.amax(-1)
    logits[:, 20] = top + 0.5  # the raw argmax everywhere, until the penalties push it down once emitted
    logits[0, 9] = top[0] + 5  # a stop token, banned: 2 outputs + 0 ahead < min_tokens
    logits[1, EOS] = top[1] + 5  # banned too (2 + 1 < 4)
    logits[3, EOS] = top[3] + 5  # not any more (2 + 3 >= 4)
    return logits, params, [11, 12]


@pytest.mark.parametrize("wrong_at", [None, 0, 1, 2, K - 1])
def test_greedy_with_penalties_and_bans_emits_what_plain_decoding_does(wrong_at: int | None) -> None:
    logits, params, output = _penalized_case()
    stops = _stops()
    plain = _plain_decode(logits, params, output, stops)
    assert plain[0] == 20 and plain[1] not in (20, EOS) and plain[3] == EOS  # the case tests something
    assert plain != logits.argmax(-1).tolist()
    [out] = verify_batch(logits, [_seq(params, _with_wrong(plain, wrong_at), output)], stops)
    _assert_emits(out, logits, plain[: K + 1 if wrong_at is None else wrong_at + 1])


def test_greedy_bans_alone_leave_the_one_argmax_path_and_hold_only_until_min_tokens() -> None:
    logits, _, output = _penalized_case()
    params = SamplingParams(min_tokens=4, stop_token_ids=(9,))  # plain: no penalty, only bans
    plain = _plain_decode(logits, params, output, _stops())
    assert plain[:4] == [20, 20, 20, EOS]
    [out] = verify_batch(logits, [_seq(params, [9, EOS, 20, EOS], output)], _stops())
    assert out.tokens == [20]  # the banned stop token is no draft a verify accepts
    [out] = verify_batch(logits, [_seq(params, plain[:K], output)], _stops())
    _assert_emits(out, logits, plain)


def test_greedy_rejects_the_unpenalized_argmax_where_penalties_change_it() -> None:
    logits, params, output = _penalized_case()
    stops = _stops()
    raw, plain = logits.argmax(-1).tolist(), _plain_decode(logits, params, output, stops)
    first = next(j for j in range(K) if raw[j] != plain[j])
    [out] = verify_batch(logits, [_seq(params, plain[:first] + raw[first:K], output)], stops)
    assert out.tokens == plain[: first + 1]


def _batch(cases: list[tuple[SamplingParams, list[int], torch.Tensor]]) -> list[Verified]:
    """Verify (params, drafts, rows) cases in one batch; the drafts are given over the plain tokens."""
    seqs = [_seq(p, drafts) for p, drafts, _ in cases]
    return verify_batch(torch.cat([rows for _, _, rows in cases]), seqs, None)


def _mixed_cases() -> list[tuple[SamplingParams, list[int], torch.Tensor, list[int]]]:
    """(params, drafts, rows, expected tokens): plain greedy verifies, one without drafts, one penalized."""
    plain, penalized = SamplingParams(), SamplingParams(frequency_penalty=1.5, repetition_penalty=1.2)
    cases = []
    for i, (params, wrong_at, k) in enumerate(
        [(plain, None, K), (plain, 1, K), (plain, None, 0), (penalized, 2, K), (plain, 0, 2)]
    ):
        rows = _logits(k + 1, seed=10 + i)
        if params.penalized:  # 5 leads every row until the penalties push it down once emitted
            rows[:, 5] = rows.amax(-1) + 0.3
        expected = _plain_decode(rows, params, [], None)
        drafts = _with_wrong(expected, wrong_at)[:k]
        n = k + 1 if wrong_at is None else wrong_at + 1
        cases.append((params, drafts, rows, expected[:n]))
    assert cases[3][3][0] == 5 and cases[3][3][1] != 5
    return cases


def test_a_mixed_batch_gives_each_sequence_its_own_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    cases = _mixed_cases()
    calls = []
    choose = verify._choose
    monkeypatch.setattr(verify, "_choose", lambda *a: calls.append(1) or choose(*a))
    outs = _batch([(p, d, rows) for p, d, rows, _ in cases])  # the penalized one: per-sequence path
    assert len(calls) == len(cases)
    for out, (_, _, rows, expected) in zip(outs, cases, strict=True):
        _assert_emits(out, rows, expected)
    plain_only = [c for c in cases if c[0].plain]
    outs = _batch([(p, d, rows) for p, d, rows, _ in plain_only])  # one argmax for the batch
    assert len(calls) == len(cases)
    for out, (_, _, rows, expected) in zip(outs, plain_only, strict=True):
        _assert_emits(out, rows, expected)


@pytest.mark.parametrize(
    "params", [SamplingParams(top_logprobs=3), SamplingParams(top_logprobs=3, presence_penalty=1.0)]
)
def test_top_logprobs_come_with_every_emitted_token(params: SamplingParams) -> None:
    rows = _logits(K + 1, seed=3)
    others = _logits(3, seed=4)
    plain = _plain_decode(rows, params, [], None)
    outs = _batch(
        [(params, _with_wrong(plain, 2), rows), (SamplingParams(), [int(others[0].argmax())] * 2, others)]
    )
    assert len(outs[0].tops) == 3 and outs[1].tops == [()] * len(outs[1].tokens)
    values, ids = torch.log_softmax(rows, dim=-1).topk(3, dim=-1)
    for j, top in enumerate(outs[0].tops):
        assert [t for t, _ in top] == ids[j].tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in top], dtype=torch.float32), values[j])


# Pearson chi-square critical values at p = 0.001 by degrees of freedom (scipy.stats.chi2.isf(0.001, dof);
# scipy is no dependency). With a fixed seed the tests are deterministic; p = 0.001 keeps them robust to
# a change of seed or of the order in which verify draws its random numbers.
CHI2_CRITICAL = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515}
TRIALS = 10_000


def _chi2(tokens: list[int], probs: torch.Tensor) -> float:
    """Pearson's statistic of the tokens' counts against `probs` [V]; none lies outside the support."""
    counts, n = Counter(tokens), len(tokens)
    support = [t for t in range(probs.numel()) if probs[t] > 0]
    assert set(counts) <= set(support), f"tokens {set(counts) - set(support)} have probability 0"
    return sum((counts[t] - n * probs[t].item()) ** 2 / (n * probs[t].item()) for t in support)


def _fits(tokens: list[int], probs: torch.Tensor) -> bool:
    dof = int((probs > 0).sum()) - 1
    return _chi2(tokens, probs) < CHI2_CRITICAL[dof]


def _verify_many(rows: torch.Tensor, params: SamplingParams, drafts: list[int], n: int, seed: int):
    """The tokens each of `n` independent verifies of `drafts` over the same `rows` emits (requests of
    seeds seed * n + i)."""
    seqs = [_seeded(replace(params, seed=seed * n + i), drafts) for i in range(n)]
    return [v.tokens for v in verify_batch(rows.repeat(n, 1), seqs, None)]


# target logits over 6 tokens at the last token and after each of the two drafts
TARGET = torch.tensor(
    [[1.0, 0.2, 0.6, -0.5, 0.0, 0.4], [0.3, -0.2, 0.9, 0.5, 1.1, -1.0], [-0.4, 0.8, 0.0, 0.3, 0.6, 0.1]]
)
SAMPLING_CASES = [
    (SamplingParams(temperature=1.0), [2, 4]),  # drafts of probability ~0.21 and ~0.31
    # top-k then top-p keep 3 tokens in row 0 ({0, 2, 5}) and row 1 ({2, 3, 4}): the second draft is out
    (SamplingParams(temperature=0.8, top_k=4, top_p=0.75), [2, 5]),
    (SamplingParams(temperature=1.3, min_p=0.38), [4, 3]),  # drops 3 in row 0, 1 and 5 in row 1
]


def test_probabilities_of_a_batch_are_those_of_each_row() -> None:
    logits = torch.randn(2, 3, V, generator=torch.Generator().manual_seed(8))
    for params, _ in SAMPLING_CASES:
        batched = probabilities(logits, params)  # [2, 3, V]
        rows = torch.stack([probabilities(row, params) for row in logits.view(-1, V)]).view(2, 3, V)
        torch.testing.assert_close(batched, rows)
        torch.testing.assert_close(batched.sum(-1), torch.ones(2, 3))


@pytest.mark.parametrize(("params", "drafts"), SAMPLING_CASES)
def test_rejection_sampling_emits_each_token_with_the_targets_distribution(
    params: SamplingParams, drafts: list[int]
) -> None:
    emitted = _verify_many(TARGET, params, drafts, TRIALS, seed=0)
    probs = probabilities(TARGET, params)  # [3, 6]
    assert all(len(t) <= len(drafts) + 1 and t[:-1] == drafts[: len(t) - 1] for t in emitted)
    # (a) the first token, (b) the second where the first was the accepted draft, (c) the third likewise
    assert _fits([t[0] for t in emitted], probs[0])
    second = [t[1] for t in emitted if t[0] == drafts[0]]
    assert len(second) > TRIALS * probs[0, drafts[0]] * 0.9
    assert _fits(second, probs[1])
    third = [t[2] for t in emitted if t[:2] == drafts]
    if probs[1, drafts[1]] > 0:
        assert _fits(third, probs[2])
    else:
        assert third == []


def test_the_chi_square_check_rejects_a_naive_acceptance_rule() -> None:
    # accept the draft with probability p(d), else draw from p itself (with d left in): d comes out with
    # probability p(d) (2 - p(d)), not p(d). The check must see that at this many trials.
    params, [d, _] = SAMPLING_CASES[0]
    probs = probabilities(TARGET[0], params)
    gen = torch.Generator().manual_seed(0)
    accept = torch.rand(TRIALS, generator=gen) < probs[d]
    redraw = torch.multinomial(probs.expand(TRIALS, -1), 1, generator=gen)[:, 0]
    assert not _fits(torch.where(accept, d, redraw).tolist(), probs)
    # and a distribution somewhat off: temperature 1.25 instead of 1 (a statistic of ~90, not ~5)
    hot = probabilities(TARGET[0] / 1.25, params)
    assert not _fits(torch.multinomial(hot, TRIALS, replacement=True, generator=gen).tolist(), probs)
    fair = torch.multinomial(probs, TRIALS, replacement=True, generator=gen)
    assert _fits(fair.tolist(), probs)


def test_a_draft_holding_all_the_mass_is_always_accepted() -> None:
    rows = _logits(K + 1, seed=5)
    best = rows.argmax(-1).tolist()
    one_hot = torch.full_like(rows, float("-inf")).scatter(1, torch.tensor(best)[:, None], 0.0)
    for params, target in [
        (SamplingParams(temperature=1.0, top_k=1), rows),
        (SamplingParams(temperature=1.0), one_hot),
    ]:
        emitted = _verify_many(target, params, best[:K], 500, seed=1)
        assert all(t == best for t in emitted)


def test_a_draft_of_probability_zero_is_never_accepted() -> None:
    rows = _logits(K + 1, seed=6)
    low = rows.argsort(-1)[:, 0].tolist()  # outside the top 5
    emitted = _verify_many(rows, SamplingParams(temperature=1.0, top_k=5), low[:K], 2000, seed=2)
    assert all(len(t) == 1 and t[0] != low[0] for t in emitted)
    assert len({t[0] for t in emitted}) == 5


def test_a_banned_draft_is_never_accepted_even_when_likely() -> None:
    rows = _logits(K + 1, seed=7)
    rows[:, EOS] = rows.amax(-1) + 3  # ~95% of the mass, but min_tokens bans it
    params = SamplingParams(temperature=1.0, min_tokens=2)
    seqs = [_seeded(replace(params, seed=i), [EOS] * K) for i in range(500)]
    emitted = [v.tokens for v in verify_batch(rows.repeat(len(seqs), 1), seqs, _stops())]
    assert all(len(t) == 1 and t[0] != EOS for t in emitted)
    # two outputs later the ban is over: EOS is then accepted far more often than not
    for seq in seqs:
        seq.output_token_ids = [7, 8]
    emitted = [v.tokens for v in verify_batch(rows.repeat(len(seqs), 1), seqs, _stops())]
    assert sum(t[0] == EOS for t in emitted) > 0.8 * len(seqs)


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(repetition_penalty=1.3)])
def test_drafts_still_on_the_device_verify_as_drafts_on_the_host(params: SamplingParams) -> None:
    """Greedy: they come back with the choices; with penalties (which read them), before."""
    logits = _logits(2 * (K + 1), seed=5)
    best = logits.argmax(-1).tolist()
    host = [_with_wrong(best[: K + 1], 1), _with_wrong(best[K + 1 :], None)]
    want = verify_batch(logits, [_seq(params, d) for d in host], None)
    seqs = [_seq(params, [DRAFT_PLACEHOLDER] * K) for _ in host]
    got = verify_batch(logits, seqs, None, DeviceDrafts([K, K], torch.tensor(host[0] + host[1]), seqs))
    assert [s.draft_token_ids for s in seqs] == host
    assert [(v.tokens, v.logprobs) for v in got] == [(v.tokens, v.logprobs) for v in want]
    if params.plain:  # (penalties change the target's choices)
        assert len(got[0].tokens) == 2 and len(got[1].tokens) == K + 1
