"""The NGRAM proposer: which earlier occurrence of the context's suffix it continues, against hand-made
token lists and a brute-force reference on random ones."""

from __future__ import annotations

import random

import pytest

from tessera.engine.sampling import SamplingParams
from tessera.engine.sequence import Sequence
from tessera.engine.speculative.ngram import NgramProposer


def _reference(tokens: list[int], k: int, min_match: int, max_match: int) -> list[int]:
    """The definition, tried in the obvious order: the longest suffix (min_match..max_match tokens) that
    occurs earlier, and up to k tokens after its latest earlier occurrence with k tokens after it, or
    after its latest earlier occurrence if none has."""
    n = len(tokens)
    for length in range(min(max_match, n - 1), min_match - 1, -1):
        suffix = tokens[n - length :]
        # latest first; an occurrence ends before the last token
        ends = [e for e in range(n - 2, length - 2, -1) if tokens[e - length + 1 : e + 1] == suffix]
        if ends:
            end = next((e for e in ends if n - 1 - e >= k), ends[0])
            return tokens[end + 1 : end + 1 + k]
    return []


def test_the_longest_match_wins_over_a_shorter_later_one() -> None:
    tokens = [1, 2, 3, 9, 8, 5, 3, 7, 6, 1, 2, 3]  # "1 2 3" then "9 8"; later only "3" then "7"
    assert NgramProposer().draft(tokens, 2) == [9, 8]
    assert NgramProposer(max_match=1).draft(tokens, 2) == [7, 6]  # all matches are 1 long: the latest


def test_among_equal_matches_the_latest_wins() -> None:
    tokens = [1, 2, 4, 1, 2, 5, 1, 2]
    assert NgramProposer().draft(tokens, 1) == [5]
    assert NgramProposer().draft(tokens, 3) == [5, 1, 2]


def test_a_match_shorter_than_min_match_proposes_nothing() -> None:
    tokens = [1, 2, 4, 5, 2]  # only "2" occurred before
    assert NgramProposer(min_match=1).draft(tokens, 3) == [4, 5, 2]
    assert NgramProposer(min_match=2).draft(tokens, 3) == []
    assert NgramProposer(min_match=2).draft([1, 2, 4, 5, 1, 2], 3) == [4, 5, 1]


def test_max_match_caps_the_compared_length() -> None:
    tokens = [1, 2, 3, 7, 9, 2, 3, 8, 1, 2, 3]  # "1 2 3" then 7; later "2 3" then 8
    assert NgramProposer(max_match=3).draft(tokens, 1) == [7]
    assert NgramProposer(max_match=2).draft(tokens, 1) == [8]  # both match 2 tokens: the later


def test_among_equal_matches_the_latest_that_fills_the_room_wins() -> None:
    tokens = [1, 2, 3, 4, 5, 6, 1, 2, 3, 1, 2]  # "1 2" then 3 4 5 6 ..., later "1 2" then 3 and the end
    assert NgramProposer().draft(tokens, 2) == [3, 1]  # the later one has 2 tokens after it
    assert NgramProposer().draft(tokens, 4) == [3, 4, 5, 6]  # only the earlier one has 4
    assert NgramProposer().draft([1, 2, 3, 1, 2, 9, 1, 2], 9) == [9, 1, 2]  # none has 9: the latest


def test_at_most_k_tokens_and_fewer_near_the_end() -> None:
    proposer = NgramProposer()
    assert proposer.draft([1, 2, 3, 4, 5, 1, 2], 2) == [3, 4]
    assert proposer.draft([1, 2, 3, 4, 5, 1, 2], 10) == [3, 4, 5, 1, 2]
    assert proposer.draft([6, 6, 6, 6], 5) == [6]  # the match ending just before the last token
    assert proposer.draft([1, 2, 3, 4, 5, 1, 2], 0) == []


@pytest.mark.parametrize("tokens", [[], [5], [1, 2, 3], [4, 5, 6, 7, 8, 9]])
def test_no_earlier_occurrence_proposes_nothing(tokens: list[int]) -> None:
    assert NgramProposer().draft(tokens, 4) == []


def test_bad_match_bounds_are_refused() -> None:
    for low, high in ((0, 3), (4, 3)):
        with pytest.raises(ValueError, match="n-gram"):
            NgramProposer(min_match=low, max_match=high)


def _seq(prompt: list[int], output: list[int]) -> Sequence:
    seq = Sequence(prompt, SamplingParams(), output_token_ids=output)
    seq.draft_token_ids = [99, 98]  # a previous step's drafts are no context
    return seq


def test_propose_drafts_each_sequence_within_its_room() -> None:
    seqs = [_seq([1, 2, 3, 4, 5], [6, 1, 2]), _seq([7, 8, 9], [7, 8]), _seq([1, 1], [1]), _seq([3, 4], [5])]
    assert NgramProposer().propose(seqs, [2, 5, 0, 3]) == [[3, 4], [9, 7, 8], [], []]


def test_the_window_limits_the_search() -> None:
    seq = _seq([1, 2, 3, 4], [9, 9, 9, 9, 1, 2])
    assert NgramProposer(window=10).propose([seq], [2]) == [[3, 4]]
    assert NgramProposer(window=8).propose([seq], [2]) == [[]]  # "1 2" at the start is out of reach
    seq = _seq([1, 2, 3, 4, 5, 6], [9, 3, 7, 1, 2, 3])  # "1 2 3" leads to 4, the later "3" to 7
    assert NgramProposer(window=12).propose([seq], [2]) == [[4, 5]]
    assert NgramProposer(window=6).propose([seq], [2]) == [[7, 1]]  # only the shorter match is in reach


def test_draft_matches_a_brute_force_reference_on_random_lists() -> None:
    rng = random.Random(0)
    hits = 0
    for _ in range(600):
        vocab, n = rng.randint(2, 4), rng.randint(0, 24)
        tokens = [rng.randrange(vocab) for _ in range(n)]
        low = rng.randint(1, 3)
        high, k = rng.randint(low, 5), rng.randint(0, 5)
        want = _reference(tokens, k, low, high)
        assert NgramProposer(low, high).draft(tokens, k) == want, (tokens, k, low, high)
        hits += bool(want)
    assert 200 < hits < 550  # most lists propose something, but not all: both outcomes are exercised
