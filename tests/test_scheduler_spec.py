"""The scheduler under speculative decoding, driven without a model: draft room comes after every
running request's own token and never preempts, the pages of rejected drafts go back, and the
accepted-tokens histogram counts what requests kept."""

from __future__ import annotations

import itertools

from tessera.engine.batch import ScheduledBatch
from tessera.engine.config import SchedulerConfig
from tessera.engine.kv_manager import KVManager
from tessera.engine.sampling import SamplingParams, Verified
from tessera.engine.scheduler import Scheduler
from tessera.engine.sequence import Sequence
from tessera.engine.stopping import StopChecker

PAGE = 4
K = 3
STOP = 7  # a stop token none of the made-up tokens is
_tokens = itertools.count(1000)


def _scheduler(pages: int, budget: int = 64) -> Scheduler:
    config = SchedulerConfig(
        max_num_batched_tokens=budget, chunked_prefill_size=budget, disable_radix_cache=True
    )
    stops = StopChecker(None, (), max_model_len=1024)  # type: ignore[arg-type]  # no stop strings here
    return Scheduler(config, KVManager(pages, PAGE, prefix_cache=False), stops, lookahead=K)


def _seq(n: int, max_tokens: int = 32) -> Sequence:
    return Sequence(list(range(100, 100 + n)), SamplingParams(max_tokens=max_tokens, stop_token_ids=(STOP,)))


def _plain(s: Scheduler, batch: ScheduledBatch) -> None:
    tokens = [next(_tokens) for _ in batch.samplers]
    s.postprocess(batch, tokens, [0.0] * len(tokens))


def _decoding(s: Scheduler, *prompts: int, max_tokens: int = 32) -> list[Sequence]:
    """Requests admitted and prefilled, each with its first token: decodes from the next step on."""
    seqs = [_seq(n, max_tokens) for n in prompts]
    for seq in seqs:
        s.add(seq)
    while any(not seq.output_token_ids for seq in seqs):
        _plain(s, s.schedule())
    return seqs


def _verify(s: Scheduler, batch: ScheduledBatch, kept: dict[Sequence, list[int]]) -> None:
    """Every sampling sequence takes `kept[seq]` (its accepted drafts, then the target's token), or one
    made-up token."""
    verified = []
    for seq in batch.samplers:
        tokens = kept.get(seq) or [next(_tokens)]
        verified.append(Verified(tokens, [0.0] * len(tokens), [()] * len(tokens)))
    s.postprocess_verified(batch, verified)


def test_every_decode_gets_its_token_before_any_draft_room() -> None:
    s = _scheduler(64, budget=5)
    a, b, c = _decoding(s, 1, 1, 1)  # prefilled together in one step
    batch = s.schedule()
    assert batch.work == [(a, 1), (b, 1), (c, 1)]
    assert batch.draft_room == {0: 2}  # the oldest takes what the budget has left; the others none


def test_draft_room_never_preempts_and_a_decode_without_pages_verifies_nothing() -> None:
    s = _scheduler(4)  # 3 usable pages of 4 slots
    a, b = _decoding(s, 3, 3, max_tokens=8)  # a page each: 3 tokens cached, the 4th runs next
    batch = s.schedule()
    assert batch.work == [(a, 1), (b, 1)]
    # the one free page goes to the oldest's room; the other decode runs plain, nobody is preempted
    assert batch.draft_room == {0: K} and s.preemptions == 0 and s.running == [a, b]
    assert (len(a.pages), len(b.pages), s.kv.num_free) == (2, 1, 0)


def test_rejected_drafts_give_their_pages_back() -> None:
    s = _scheduler(64)
    (a,) = _decoding(s, 4)  # 5 tokens, 4 cached: the 5th runs next
    batch = s.schedule()
    assert batch.draft_room == {0: K}
    s.attach_drafts(batch, [[11, 12, 13]])
    assert batch.verifies and len(a.pages) == 2  # room for 4 + 1 + 3 tokens
    _verify(s, batch, {})  # every draft rejected: the target's own token only
    assert (a.num_tokens, a.num_cached, len(a.pages)) == (6, 5, 2)  # 5 cached, the 6th next: 2 pages
    batch = s.schedule()
    s.attach_drafts(batch, [[]])  # a proposer with nothing to say: a plain decode, its room trimmed
    assert not batch.verifies
    _plain(s, batch)
    assert (a.num_cached, len(a.pages)) == (6, 2)


def test_the_histogram_counts_what_requests_kept_and_a_stop_mid_chain_cuts_it() -> None:
    s = _scheduler(64)
    a, b = _decoding(s, 4, 8)
    batch = s.schedule()
    s.attach_drafts(batch, [[11, 12, 13], [21, 22, 23]])
    # a accepts two drafts and adds its own token; b's second draft is a stop token it accepts
    _verify(s, batch, {a: [11, 12, 99], b: [21, STOP, 23, 98]})
    assert a.output_token_ids[-3:] == [11, 12, 99] and not a.finished
    assert b.output_token_ids[-2:] == [21, STOP] and b.finish_reason == "stop"
    assert s.spec_accepted == [0, 0, 2, 0]  # a kept 2 drafts, b 2 (the stop token its last)
    assert b.pages == [] and len(a.pages) == 2  # b released; a's rejected room trimmed


def test_drafts_on_the_device_hold_placeholders_until_the_verify_brings_them() -> None:
    import torch

    from tessera.engine.speculative import DRAFT_PLACEHOLDER, DeviceDrafts

    s = _scheduler(64)
    a, b, c = _decoding(s, 4, 8, 2)
    batch = s.schedule()
    drafts = DeviceDrafts([2, 0, 3], torch.tensor([11, 12, 31, 32, 33]))
    s.attach_drafts(batch, drafts)
    assert batch.device_drafts is drafts and drafts.seqs == [a, b, c]
    assert batch.work == [(a, 3), (b, 1), (c, 4)]
    assert a.draft_token_ids == [DRAFT_PLACEHOLDER] * 2 and not b.draft_token_ids
    drafts.resolve(drafts.tokens.tolist())
    assert (a.draft_token_ids, b.draft_token_ids, c.draft_token_ids) == ([11, 12], [], [31, 32, 33])
    _verify(s, batch, {a: [11, 99]})
    assert a.output_token_ids[-2:] == [11, 99]
    batch = s.schedule()
    s.attach_drafts(batch, DeviceDrafts([0, 0, 0], torch.tensor([], dtype=torch.long)))
    assert not batch.verifies and batch.device_drafts is None
