"""STANDALONE drafting: a draft model decodes greedily ahead of the target, K steps a verify.

The draft's KV cache is indexed by the target's pages: a token's draft K/V lives in the same slot as
its target K/V, in the draft's own tensors, so the scheduler's page reservation covers both and nothing
is allocated here. A draft that is the target's own first layers (self-speculation) shares those
layers' cache tensors outright: the target's forwards already wrote every committed token's K/V there.

A separate draft model follows the target (`observe`): after each target forward it runs the positions
the target kept that it has not run itself — a prefill chunk, a plain decode's token, or the last draft
of a verify that accepted them all — so its catch-up is never larger than the target's step (the
scheduler's token budget) and a proposal starts from the request's last token alone. Which tokens it
has run is kept per request and per page list: a preempted request's pages are new, and what the draft
ran into the old ones counts no more.
"""

from __future__ import annotations

import weakref

import torch

from tessera.engine.batch import Row, ScheduledBatch, build_rows
from tessera.engine.model_runner import ModelRunner
from tessera.engine.sequence import Sequence
from tessera.engine.speculative import DeviceDrafts, chain


class DraftModelProposer:
    def __init__(self, runner: ModelRunner, shares_target_cache: bool) -> None:
        self.runner, self.shares_target_cache = runner, shares_target_cache
        # leading tokens of each request whose draft K/V is in the draft's cache, and the page list
        # they were written to (a strong reference: `is` stays exact while the record lives)
        self._ran: weakref.WeakKeyDictionary[Sequence, tuple[int, list[int]]] = weakref.WeakKeyDictionary()

    def ran(self, seq: Sequence, default: int) -> int:
        """Leading tokens of `seq` whose draft K/V is valid: never past the target's cached tokens (past
        them are rejected drafts), and `default` where its pages changed since (a preemption)."""
        if self.shares_target_cache:
            return seq.num_cached
        record = self._ran.get(seq)
        ran = record[0] if record is not None and record[1] is seq.pages else default
        return min(ran, seq.num_cached)

    @torch.no_grad()
    def follow(self, batch: ScheduledBatch, target: ModelRunner, choices: torch.Tensor) -> None:
        pass

    def observe(self, work: list[tuple[Sequence, int]], starts: list[int], target: ModelRunner) -> None:
        if self.shares_target_cache:
            return
        rows: list[Row] = []
        for (seq, _), start in zip(work, starts, strict=True):
            if seq.finished:
                self._ran.pop(seq, None)
                continue
            # NOTE: positions before this step's start that it never ran came from the prefix cache,
            # whose pages hold the draft K/V of the request that wrote them
            ran = self.ran(seq, start)
            if ran < seq.num_cached:
                rows.append((seq.tokens(ran, seq.num_cached), ran, seq.pages))
                self._ran[seq] = (seq.num_cached, seq.pages)
        if rows:
            self.runner.forward(build_rows(rows, self.runner.page_size, self.runner.device))

    @torch.no_grad()
    def propose(self, seqs: list[Sequence], rooms: list[int]) -> DeviceDrafts:
        rows: list[Row] = []
        for seq in seqs:
            ran = self.ran(seq, seq.num_cached)
            rows.append((seq.tokens(ran, seq.num_tokens), ran, seq.pages))
        drafts = chain.launch(self.runner, rows, rooms).device_drafts(len(rows))
        if not self.shares_target_cache:
            for seq, n in zip(seqs, drafts.counts, strict=True):
                # all but the last draft went through it
                self._ran[seq] = (seq.num_tokens + n - 1, seq.pages)
        return drafts
