"""The scheduler's decisions, driven without a model: each step's `postprocess` commits the scheduled
tokens and hands one made-up token to every sequence whose tail is done."""

from __future__ import annotations

import itertools

import pytest

from tessera.engine.batch import ScheduledBatch
from tessera.engine.config import SchedulerConfig
from tessera.engine.kv_manager import KVManager
from tessera.engine.sampling import SamplingParams
from tessera.engine.scheduler import Scheduler
from tessera.engine.sequence import Sequence

Work = list[tuple[Sequence, int]]

PAGE = 4


def _seq(n: int, max_tokens: int = 4, start: int = 0) -> Sequence:
    return Sequence(list(range(start, start + n)), SamplingParams(max_tokens=max_tokens))


def _scheduler(pages: int, config: SchedulerConfig | None = None) -> Scheduler:
    config = config or SchedulerConfig()
    return Scheduler(config, KVManager(pages, PAGE, prefix_cache=not config.disable_radix_cache))


_tokens = itertools.count(1000)  # every made-up token differs from every other


def _step(s: Scheduler) -> Work:
    batch = s.schedule()
    for seq, n in batch.work:
        assert len(seq.pages) * PAGE >= seq.num_cached + n  # reserved before the forward
    tokens = [next(_tokens) for _ in batch.samplers]
    advanced = s.postprocess(batch, tokens, [0.0] * len(tokens))
    assert advanced == batch.samplers
    return batch.work


def _drain(s: Scheduler, limit: int = 200) -> list[Work]:
    steps = []
    while s.has_work and len(steps) < limit:
        steps.append(_step(s))
    assert not s.has_work, "scheduler did not finish"
    return steps


def test_chunked_prefill_respects_both_budgets_and_mixes_decodes() -> None:
    s = _scheduler(64, SchedulerConfig(max_num_batched_tokens=10, chunked_prefill_size=6))
    short, long = _seq(3, max_tokens=5), _seq(14, max_tokens=2, start=100)
    s.add(short)
    s.add(long)
    first = _step(s)
    assert first == [(short, 3), (long, 3)]  # prefill budget 6 shared by both prompts
    second = _step(s)
    assert second == [(short, 1), (long, 6)]  # a decode rides along with the next chunk
    _drain(s)
    assert short.finished and long.finished


def test_preemption_frees_pages_and_the_request_is_recomputed_later() -> None:
    # 8 usable pages of 4 tokens. The older request grows to 6 pages, the newer to 5: once the older
    # one needs a page the newer one holds, the newer one is preempted.
    s = _scheduler(9, SchedulerConfig(disable_radix_cache=True))
    a, b = _seq(12, max_tokens=12), _seq(12, max_tokens=8, start=50)
    s.add(a)
    s.add(b)
    steps = _drain(s)
    assert s.preemptions >= 1
    assert a.finished and b.finished and len(b.output_token_ids) == 8
    recomputed = [n for step in steps for seq, n in step if seq is b and n > 1]
    assert len(recomputed) >= 2  # its prompt and the outputs so far ran again after preemption
    assert s.kv.num_free == 8


def test_prefix_is_shared_and_every_page_is_accounted_for() -> None:
    s = _scheduler(32)
    first = _seq(10, max_tokens=2)
    s.add(first)
    _drain(s)
    second = Sequence([*range(10), 77, 78], SamplingParams(max_tokens=2))
    s.add(second)
    admitted = _step(s)
    assert admitted == [(second, 4)]  # 8 of 12 tokens (two full pages) came from the cache
    assert s.kv.cache is not None and s.kv.cache.hits == 8
    _drain(s)
    assert s.kv.num_free + s.kv.cache.num_pages == 31


def test_abort_anywhere_frees_everything() -> None:
    s = _scheduler(16, SchedulerConfig(max_running_requests=1))
    running, waiting = _seq(5, max_tokens=50), _seq(5, max_tokens=50, start=20)
    s.add(running)
    s.add(waiting)
    _step(s)
    assert s.running == [running] and list(s.waiting) == [waiting]  # max_running_requests=1
    assert s.abort(waiting) and s.abort(running) and not s.abort(running)
    assert running.finish_reason == "abort" and not s.has_work
    assert s.kv.num_free + (s.kv.cache.num_pages if s.kv.cache else 0) == 15


def test_a_request_larger_than_the_cache_is_refused() -> None:
    s = _scheduler(4)
    with pytest.raises(ValueError, match=r"needs 20 KV tokens"):
        s.add(_seq(10, max_tokens=10))


def test_sequence_token_slices_match_the_full_list() -> None:
    seq = _seq(5)
    seq.output_token_ids += [100, 101, 102]
    full = seq.token_ids
    for start in range(len(full) + 1):
        for end in range(start, len(full) + 1):
            assert seq.tokens(start, end) == full[start:end], (start, end)


def _run_until(s: Scheduler, seq: Sequence, outputs: int) -> None:
    while len(seq.output_token_ids) < outputs:
        _step(s)


def test_rollback_frees_emptied_pages_and_the_sequence_runs_on() -> None:
    s = _scheduler(16, SchedulerConfig(disable_radix_cache=True))
    seq = _seq(6, max_tokens=8)
    s.add(seq)
    _run_until(s, seq, 4)  # 9 tokens cached, the 4th output not yet: 3 pages of 4
    assert (seq.num_cached, len(seq.pages), s.kv.num_free) == (9, 3, 12)
    s.rollback(seq, 3)
    # 7 tokens left; the last is the next to run, so 6 stay cached: 2 pages, the third back in the pool
    assert seq.num_tokens == 7 and len(seq.output_logprobs) == 1
    assert (seq.num_cached, len(seq.pages), s.kv.num_free) == (6, 2, 13)
    assert _step(s) == [(seq, 1)]  # it runs on from its last kept token
    _drain(s)
    assert len(seq.output_token_ids) == 8 and s.kv.num_free == 15


def test_rollback_never_reaches_shared_pages_and_the_cache_holds_only_committed_tokens() -> None:
    s = _scheduler(32)
    first = _seq(9, max_tokens=4)
    s.add(first)
    _drain(s)  # its prompt and 3 of its 4 outputs: three full pages stay in the prefix cache
    resumed = _seq(9, max_tokens=12)  # as if preempted after the same 4 outputs: all of it is recomputed
    resumed.output_token_ids += first.output_token_ids
    resumed.output_logprobs += [0.0] * 4
    s.add(resumed)
    _step(s)
    assert len(resumed.prefix_nodes) == 3  # 12 tokens shared, 3 of them outputs
    with pytest.raises(ValueError, match="shared prefix"):
        s.rollback(resumed, 3)  # its new last token would lie in a shared page
    s.abort(resumed)
    seq = _seq(9, max_tokens=12)
    s.add(seq)
    assert _step(s) == [(seq, 1)] and len(seq.prefix_nodes) == 2  # 8 prompt tokens from the cache
    _run_until(s, seq, 6)
    rejected = seq.output_token_ids[-4:]
    s.rollback(seq, 4)
    assert seq.num_tokens == 11 and seq.num_cached == 10
    # what runs from here differs from the rolled-back tokens, so a cached rejected token would show
    seq.params = SamplingParams(max_tokens=4)
    _drain(s)
    assert not set(seq.output_token_ids) & set(rejected)
    node, cached = s.kv.cache.root, []  # the cache's pages along the finished sequence's tokens
    while node.children:
        key = tuple(seq.token_ids[len(cached) : len(cached) + PAGE])
        if key not in node.children:
            break
        node = node.children[key]
        cached += node.tokens
    assert len(cached) == 12 and cached == seq.token_ids[:12]
    with pytest.raises(ValueError, match="finished"):
        s.rollback(seq, 1)


def test_postprocess_finishes_on_max_tokens_and_frees_the_pages() -> None:
    s = _scheduler(8, SchedulerConfig(disable_radix_cache=True))
    seq = _seq(5, max_tokens=2)
    s.add(seq)
    batch = s.schedule()
    assert isinstance(batch, ScheduledBatch) and batch.samplers == [seq]
    s.postprocess(batch, [7], [-0.5])
    assert seq.output_token_ids == [7] and seq.output_logprobs == [-0.5] and not seq.finished
    s.postprocess(s.schedule(), [8], [-0.25])
    assert seq.finish_reason == "length" and not s.running and s.kv.num_free == 7


def test_an_admission_that_waits_for_pages_counts_its_cache_hit_once() -> None:
    s = _scheduler(8)  # 7 usable pages of 4 tokens
    first = _seq(9, max_tokens=1)
    s.add(first)
    _drain(s)  # two full pages cached
    hog = _seq(20, max_tokens=8, start=100)  # the other 5 pages, and more as it decodes
    s.add(hog)
    _step(s)
    late = _seq(10, max_tokens=2)  # shares the two cached pages, needs a third: none is free
    s.add(late)
    cache = s.kv.cache
    queries, hits = cache.queries, cache.hits
    _step(s)
    _step(s)
    assert late in s.waiting and late.cached_prompt_tokens is None  # matched twice, admitted never
    assert (cache.queries, cache.hits) == (queries, hits)
    _drain(s)
    assert cache.queries - queries == len(late.prompt_token_ids)  # counted once, on admission
    assert cache.hits - hits == late.cached_prompt_tokens
