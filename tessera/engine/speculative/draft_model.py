"""STANDALONE drafting: a draft model decodes greedily ahead of the target, K steps a verify.

The draft's KV cache is indexed by the target's pages: a token's draft K/V lives in the same slot as
its target K/V, in the draft's own tensors, so the scheduler's page reservation covers both and nothing
is allocated here. A draft that is the target's own first layers (self-speculation) shares those
layers' cache tensors outright: the target's forwards already wrote every committed token's K/V there,
so its first step runs only the request's last token.

A separate draft model catches up first: its cache lags the target's by the tokens it has not run
(the prompt, when a request first drafts; after a verify, the target's own token and, when every draft
was accepted, the last draft). Which tokens it has run is kept per request; a verify's rejected drafts
drop out by themselves, as the target's cached length (which counts only kept tokens) caps it.
"""

from __future__ import annotations

import weakref

import torch

from tessera.engine.batch import Row, build_rows
from tessera.engine.model_runner import ModelRunner
from tessera.engine.sequence import Sequence


class DraftModelProposer:
    def __init__(self, runner: ModelRunner, shares_target_cache: bool) -> None:
        self.runner, self.shares_target_cache = runner, shares_target_cache
        # leading tokens of each request whose draft K/V is in the draft's cache
        self._ran: weakref.WeakKeyDictionary[Sequence, int] = weakref.WeakKeyDictionary()

    @torch.no_grad()
    def propose(self, seqs: list[Sequence], rooms: list[int]) -> list[list[int]]:
        rows: list[Row] = []
        for seq in seqs:
            # NOTE: never past the target's cached tokens: past them are rejected drafts, or (after a
            # preemption) pages that no longer hold this request's tokens
            ran = seq.num_cached if self.shares_target_cache else min(self._ran.get(seq, 0), seq.num_cached)
            rows.append((seq.tokens(ran, seq.num_tokens), ran, seq.pages))
        drafts: list[list[int]] = [[] for _ in seqs]
        active = list(range(len(seqs)))
        while rows:
            batch = build_rows(rows, self.runner.page_size, self.runner.device)
            tokens = self.runner.forward(batch).argmax(dim=-1).tolist()
            step_rows: list[Row] = []
            step_active: list[int] = []
            for i, token, (ran_tokens, start, pages) in zip(active, tokens, rows, strict=True):
                drafts[i].append(token)
                if len(drafts[i]) < rooms[i]:
                    step_rows.append(([token], start + len(ran_tokens), pages))
                    step_active.append(i)
            rows, active = step_rows, step_active
        for seq, draft in zip(seqs, drafts, strict=True):
            self._ran[seq] = seq.num_tokens + len(draft) - 1  # all but the last draft went through it
        return drafts
