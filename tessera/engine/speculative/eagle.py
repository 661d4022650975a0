"""EAGLE drafting (EAGLE-1/2 chain, top-k 1): a one-layer head over the target's hidden states.

The head's row at position i takes token i + 1 and the target's feature (final hidden state) at
position i, and predicts token i + 2; each later draft step takes the draft token just proposed and the
head's own output as its feature. So the head runs every position the target kept, with the target's
features, before it drafts from there: its K/V at positions drafted from its own features is rewritten
from the target's once the target has run them (EAGLE's "stable" K/V).

The head follows the target (`observe`): after each target forward it runs the positions the target
kept — a prefill chunk's, a plain decode's, a verify's last token and accepted drafts — with the
target's features, in the same step (so no feature is stored, and the head's forward is never larger
than the target's), and keeps what its last row gave: the request's first draft token and the feature
of the next draft step. A proposal goes on from there. The head's one-layer cache is indexed by the
target's pages, like a draft model's (`draft_model.py`). Positions the target never ran for a request (a
prefix-cache hit) have no features here: the head trusts the K/V an earlier request with the same
tokens left in those shared pages, which only the acceptance rate depends on.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from tessera.engine.batch import Row, build_rows
from tessera.engine.model_runner import ModelRunner
from tessera.engine.sequence import Sequence
from tessera.engine.speculative import DeviceDrafts
from tessera.engine.speculative.chain import greedy, launch, request_major
from tessera.layers.host_copy import to_device


@dataclass(eq=False)
class _Observed:
    """One `observe` forward's outputs at each request's last row, left on the device: the request's
    first draft token and the feature of the draft step after it."""

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

    @torch.no_grad()
    def observe(self, work: list[tuple[Sequence, int]], starts: list[int], target: ModelRunner) -> None:
        hidden, forward = target.last_hidden, target.last_batch
        assert hidden is not None and forward is not None
        rows: list[Row] = []
        firsts: list[int] = []  # the target's row of each head row's first position
        seqs: list[Sequence] = []
        for (seq, n), start, last in zip(work, starts, forward.last_rows.tolist(), strict=True):
            if seq.finished:
                self._next.pop(seq, None)
                continue
            if seq.num_cached <= start:  # nothing kept (a verify's rejected drafts are past num_cached)
                continue
            # positions start .. num_cached - 1, each with the token after it
            rows.append((seq.tokens(start + 1, seq.num_cached + 1), start, seq.pages))
            firsts.append(last - n + 1)
            seqs.append(seq)
        if not rows:
            return
        observed = self._step(rows, hidden, firsts)  # NOTE: not waited for: `propose` chains on from it
        for j, seq in enumerate(seqs):
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

    def _step(self, rows: list[Row], hidden: torch.Tensor, firsts: list[int]) -> _Observed:
        """One head forward of `rows`, row j's features the target's `hidden` from row `firsts[j]` on ->
        each row's next token and the head's output at its last position (the feature of its next
        step), in `rows`' order."""
        batch = build_rows(rows, self.runner.page_size, self.runner.device)
        # the features laid out as `build_rows` laid out the tokens (short rows first): one gather
        n = np.fromiter((len(tokens) for tokens, _, _ in rows), dtype=np.int64, count=len(rows))
        offset = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        source = np.empty(n.sum(), dtype=np.int64)
        source[np.repeat(batch.last_rows - n + 1, n) + offset] = np.repeat(np.array(firsts), n) + offset
        batch.features = hidden[to_device(source, hidden.device)]
        logits = self.runner.forward(batch)
        out = self.runner.last_logits_hidden  # (a copy: graph memory moves on)
        assert out is not None
        return _Observed(greedy(self.runner, logits), out)
