"""EAGLE drafting (EAGLE-1/2 chain, top-k 1): a one-layer head over the target's hidden states.

The head's row at position i takes token i + 1 and the target's feature (final hidden state) at
position i, and predicts token i + 2; each later draft step takes the draft token just proposed and the
head's own output as its feature. So the head runs every position the target kept, with the target's
features, before it drafts from there: its K/V at positions drafted from its own features is rewritten
from the target's once the target has run them (EAGLE's "stable" K/V).

The head follows the target (`follow`): right after each target forward, before its tokens reach the
host, it runs the same rows — a prefill chunk's, a plain decode's, a verify's last token and drafts —
at the same positions with the target's features (so no feature is stored, and the head's forward is
never larger than the target's). Each row's token is the one after it: the prompt's, known on the host,
or the target's choice at that row, still on the device. At a verify's row j that choice is the token
at the next position whenever the head's row is used at all: if the target accepts the drafts up to j,
the draft it accepted at j + 1 equals its choice at j. So the head needs no host round trip: its
forward runs while the host waits for the verify's tokens, and the row each request drafts from (its
last kept position: the verify's first row plus the drafts accepted, counted on the device as the
verify counts them on the host) is picked on the device too. What that row gives is kept: the
request's first draft token and the feature of the next draft step; a proposal goes on from there. The
rows past the accepted drafts wrote K/V at positions the target did not keep; the head's next forward
rewrites them before any row reads them.

The head's one-layer cache is indexed by the target's pages, like a draft model's (`draft_model.py`).
Positions the target never ran for a request (a prefix-cache hit) have no features here: the head
trusts the K/V an earlier request with the same tokens left in those shared pages, which only the
acceptance rate depends on.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from tessera.engine.batch import ForwardBatch, ScheduledBatch
from tessera.engine.model_runner import ModelRunner
from tessera.engine.sequence import Sequence
from tessera.engine.speculative import DRAFT_PLACEHOLDER, DeviceDrafts
from tessera.engine.speculative.chain import greedy, launch, request_major
from tessera.layers.host_copy import to_device


@dataclass(eq=False)
class _Observed:
    """One `follow` forward's outputs at each sampling request's last kept row, left on the device: the
    request's first draft token and the feature of the draft step after it."""

    tokens: torch.Tensor  # [n]
    features: torch.Tensor  # [n, hidden]


@dataclass
class _Next:
    """Where a request's first draft is (row `row` of `observed`), valid while the request's cached
    length is `num_cached`."""

    num_cached: int
    observed: _Observed
    row: int


class EagleProposer:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self._next: weakref.WeakKeyDictionary[Sequence, _Next] = weakref.WeakKeyDictionary()
        # the last `follow`'s outputs and the sampling requests they belong to, until `observe`
        self._followed: tuple[_Observed, list[Sequence]] | None = None

    @torch.no_grad()
    def follow(self, batch: ScheduledBatch, target: ModelRunner, choices: torch.Tensor) -> None:
        forward, hidden = target.last_batch, target.last_hidden
        assert forward is not None and hidden is not None
        t = forward.num_tokens
        # each row's next token: the row after it in the same request; at a request's last row the
        # prompt's next token, or a placeholder that the target's choice there replaces (`feed_at`)
        host = forward.host.copy()
        ids = host[:t]
        ids[:-1] = forward.host[1:t]
        for (seq, n), last in zip(batch.work, forward.last_rows.tolist(), strict=True):
            end = seq.num_cached + n  # NOTE: before postprocess: num_cached is the chunk's start
            ids[last] = seq.tokens(end, end + 1)[0] if end < seq.num_tokens else DRAFT_PLACEHOLDER
        head = ForwardBatch(host, forward.host_pages, self.runner.device)
        head.feed_at(forward.host_logits, choices)
        head.select_logits(forward.host_logits)
        head.features = hidden[:t]
        # NOTE: logits at every row the target has them for, not just the kept ones: which rows are
        # kept is known on the device alone, and under tensor parallelism the other ranks run this same
        # forward (its lm_head's gather included); at a few rows the lm_head costs its weights' read
        logits = self.runner.forward(head)
        out = self.runner.last_logits_hidden
        assert out is not None
        seqs = batch.samplers
        if not seqs:  # a prefill chunk alone: the head's K/V is all it leaves
            self._followed = None
            return
        kept = _kept_rows(batch, forward, choices)
        self._followed = (_Observed(greedy(self.runner, logits[kept]), out[kept]), seqs)

    def observe(self, work: list[tuple[Sequence, int]], starts: list[int], target: ModelRunner) -> None:
        """After postprocess: each sampling request that goes on drafts next from what `follow` kept
        for it, valid while its cached length is what the verify left."""
        for seq, _ in work:
            if seq.finished:
                self._next.pop(seq, None)
        followed, self._followed = self._followed, None
        if followed is None:
            return
        observed, seqs = followed
        for j, seq in enumerate(seqs):
            if not seq.finished:
                self._next[seq] = _Next(seq.num_cached, observed, j)

    @torch.no_grad()
    def propose(self, seqs: list[Sequence], rooms: list[int]) -> DeviceDrafts | list[list[int]]:
        have: list[int] = []  # the requests the head has run the last position of, and where
        nexts: list[_Next] = []
        for i, seq in enumerate(seqs):
            nxt = self._next.get(seq)
            if nxt is not None and nxt.num_cached == seq.num_cached:
                have.append(i)
                nexts.append(nxt)
        if not have:
            return [[] for _ in seqs]  # no draft this step for requests the head has not caught up on
        first, feats = self._gather(nexts)
        tokens, actives = [first], [have]
        chained = [i for i in have if rooms[i] > 1]
        if chained:
            if len(chained) < len(have):
                keep = [k for k, i in enumerate(have) if rooms[i] > 1]
                pick = to_device(np.array(keep, dtype=np.int64), self.runner.device)
                ids, feats = first[pick], feats[pick]
            else:
                ids = first
            # each chained request's first draft runs at its next position (placeholders: `ids` on device)
            rows = [([0], seqs[i].num_cached, seqs[i].pages) for i in chained]
            chain = launch(self.runner, rows, [rooms[i] - 1 for i in chained], feats, ids)
            tokens += chain.tokens
            actives += [[chained[k] for k in active] for _, active in chain.steps]
        return request_major(tokens, actives, len(seqs))

    def _gather(self, nexts: list[_Next]) -> tuple[torch.Tensor, torch.Tensor]:
        """The first draft tokens [n] and features [n, hidden] of `nexts`, on the device (one gather
        from each observe forward they come from: usually the last one alone, taken whole)."""
        sources = {id(nx.observed): nx.observed for nx in nexts}
        tokens, feats = [], []
        for observed in sources.values():
            rows = [nx.row for nx in nexts if nx.observed is observed]
            if len(sources) == 1 and rows == list(range(len(observed.tokens))):
                return observed.tokens, observed.features
            pick = to_device(np.array(rows, dtype=np.int64), self.runner.device)
            tokens.append(observed.tokens[pick])
            feats.append(observed.features[pick])
        if len(sources) == 1:
            return tokens[0], feats[0]
        # requests from several observe forwards: back to `nexts`' order
        order = [k for observed in sources.values() for k, nx in enumerate(nexts) if nx.observed is observed]
        back = to_device(np.argsort(np.array(order)), self.runner.device)
        return torch.cat(tokens)[back], torch.cat(feats)[back]


def _kept_rows(batch: ScheduledBatch, forward: ForwardBatch, choices: torch.Tensor) -> torch.Tensor:
    """Each sampling request's logits row (an index into `choices`) at its last kept position, on the
    device: a verify's first plus the drafts the target accepts (the leading drafts equal to its choice
    at the row before, counted as `verify_batch` counts them on the host), or its only one."""
    counts = np.array(batch.logits_rows, dtype=np.int64)  # 1 + drafts, each sampling request
    drafts = counts - 1
    first = np.cumsum(counts) - counts
    device = choices.device
    if not drafts.any():
        return to_device(first, device)
    # for draft j of request s: the index of the choice before it, and its row of `forward`
    s = np.repeat(np.arange(len(counts)), drafts)
    j = np.arange(drafts.sum()) - np.repeat(np.cumsum(drafts) - drafts, drafts)
    at = np.repeat(first, drafts) + j
    packed = to_device(np.concatenate((s, j, at, forward.host_logits[at] + 1, drafts, first)), device)
    s_d, j_d, at_d, draft_rows, drafts_d, first_d = packed.split([len(s)] * 4 + [len(counts)] * 2)
    agree = choices[at_d] == forward.input_ids[draft_rows]
    # the first disagreement of each request (its drafts, where none)
    miss = torch.where(agree, drafts_d[s_d], j_d)
    return first_d + drafts_d.scatter_reduce(0, s_d, miss, "amin")
