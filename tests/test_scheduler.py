"""The scheduler's decisions, driven without a model: each step commits the scheduled tokens and
'samples' one token for every sequence whose tail is done."""

from __future__ import annotations

import pytest

from tessera.engine.kv_cache import PagePool
from tessera.engine.sampling import SamplingParams
from tessera.engine.scheduler import Scheduler, SchedulerConfig, Work
from tessera.engine.sequence import Sequence

PAGE = 4


def _seq(n: int, max_tokens: int = 4, start: int = 0) -> Sequence:
    return Sequence(list(range(start, start + n)), SamplingParams(max_tokens=max_tokens))


def _step(s: Scheduler) -> Work:
    work = s.schedule()
    for seq, n in work:
        seq.num_cached += n
        assert len(seq.pages) * PAGE >= seq.num_cached
        if seq.num_cached == seq.num_tokens:
            seq.output_token_ids.append(1000 + len(seq.output_token_ids))
            if len(seq.output_token_ids) >= seq.params.max_tokens:
                seq.finish_reason = "length"
                s.finish(seq)
    return work


def _drain(s: Scheduler, limit: int = 200) -> list[Work]:
    steps = []
    while s.has_work and len(steps) < limit:
        steps.append(_step(s))
    assert not s.has_work, "scheduler did not finish"
    return steps


def test_chunked_prefill_respects_both_budgets_and_mixes_decodes() -> None:
    s = Scheduler(PagePool(64), PAGE, SchedulerConfig(max_num_batched_tokens=10, chunked_prefill_size=6))
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
    s = Scheduler(PagePool(9), PAGE, SchedulerConfig(disable_radix_cache=True))
    a, b = _seq(12, max_tokens=12), _seq(12, max_tokens=8, start=50)
    s.add(a)
    s.add(b)
    steps = _drain(s)
    assert s.preemptions >= 1
    assert a.finished and b.finished and len(b.output_token_ids) == 8
    recomputed = [n for step in steps for seq, n in step if seq is b and n > 1]
    assert len(recomputed) >= 2  # its prompt and the outputs so far ran again after preemption
    assert s.pool.num_free == 8


def test_prefix_is_shared_and_every_page_is_accounted_for() -> None:
    s = Scheduler(PagePool(32), PAGE)
    first = _seq(10, max_tokens=2)
    s.add(first)
    _drain(s)
    second = Sequence([*range(10), 77, 78], SamplingParams(max_tokens=2))
    s.add(second)
    admitted = _step(s)
    assert admitted == [(second, 4)]  # 8 of 12 tokens (two full pages) came from the cache
    assert s.cache is not None and s.cache.hits == 8
    _drain(s)
    assert s.pool.num_free + s.cache.num_pages == 31


def test_abort_anywhere_frees_everything() -> None:
    s = Scheduler(PagePool(16), PAGE, SchedulerConfig(max_running_requests=1))
    running, waiting = _seq(5, max_tokens=50), _seq(5, max_tokens=50, start=20)
    s.add(running)
    s.add(waiting)
    _step(s)
    assert s.running == [running] and list(s.waiting) == [waiting]  # max_running_requests=1
    assert s.abort(waiting) and s.abort(running) and not s.abort(running)
    assert running.finish_reason == "abort" and not s.has_work
    assert s.pool.num_free + (s.cache.num_pages if s.cache else 0) == 15


def test_a_request_larger_than_the_cache_is_refused() -> None:
    s = Scheduler(PagePool(4), PAGE)
    with pytest.raises(ValueError, match=r"needs 20 KV tokens"):
        s.add(_seq(10, max_tokens=10))


def test_sequence_token_slices_match_the_full_list() -> None:
    seq = _seq(5)
    seq.output_token_ids += [100, 101, 102]
    full = seq.token_ids
    for start in range(len(full) + 1):
        for end in range(start, len(full) + 1):
            assert seq.tokens(start, end) == full[start:end], (start, end)
