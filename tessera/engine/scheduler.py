"""Continuous batching: which tokens of which sequences run in the next forward, and what a forward's
sampled tokens change afterwards.

Every running sequence needs its uncached tail computed: a prompt (in chunks), a decode (the one token
sampled last), or a recompute after preemption (prompt and outputs so far) are the same case. Running
sequences go first, then waiting ones are admitted, sharing cached prefixes, while the token budget,
the prefill budget, the running limit and the KV pages allow. When pages run out, cached prefixes are
evicted first, then the newest running sequence is preempted: its pages are freed and it waits to be
recomputed later — nothing is lost.

The scheduler owns its sequences' state: `schedule()` reserves their pages, `postprocess()` advances
them after the forward (cached length, outputs, stops, finishing and freeing), `rollback()` takes back
tokens. Nothing else writes to a sequence.

Speculative decoding (`lookahead` > 0): a decode may verify up to `lookahead` draft tokens, so the
scheduler reserves pages and token budget for them (`ScheduledBatch.draft_room`); a proposer drafts,
`attach_drafts` turns the decodes into verifies, and `postprocess_verified` takes each verify's accepted
tokens (stopping exactly where decoding one token at a time would have) and gives back the pages that
held only rejected ones.
"""

from __future__ import annotations

import logging
from collections import deque

from tessera.engine.batch import ScheduledBatch
from tessera.engine.config import SchedulerConfig
from tessera.engine.kv_manager import KVManager
from tessera.engine.sampling import TopLogprobs, Verified
from tessera.engine.sequence import Sequence
from tessera.engine.speculative import DRAFT_PLACEHOLDER, DeviceDrafts
from tessera.engine.stopping import StopChecker

logger = logging.getLogger("tessera")


class Scheduler:
    def __init__(
        self, config: SchedulerConfig, kv: KVManager, stops: StopChecker | None = None, lookahead: int = 0
    ) -> None:
        """`stops`: when a sampled token ends its request (None: only `max_tokens` does, for tests that
        drive the scheduler without a model). `lookahead`: draft tokens a decode may verify a step."""
        self.config, self.kv, self.stops, self.lookahead = config, kv, stops, lookahead
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self._preempted: set[Sequence] = set()  # this schedule() call's (a set: `in running` was O(n))
        # verifies by how many draft tokens their request took: [0, 1, ..., lookahead]
        self.spec_accepted = [0] * (lookahead + 1)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        need = self.kv.pages_for(len(seq.prompt_token_ids) + seq.params.max_tokens)
        if need > self.kv.num_usable:
            page = self.kv.page_size
            raise ValueError(
                f"a request needs {need * page} KV tokens (prompt + max_tokens); "
                f"the cache holds {self.kv.num_usable * page}"
            )
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> bool:
        """Drop a request wherever it is; its pages are freed. False if it was not here."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.running:
            self.running.remove(seq)
        else:
            return False
        seq.finish_reason = seq.finish_reason or "abort"
        self.kv.release(seq, keep_prefix=False)
        return True

    def rollback(self, seq: Sequence, k: int) -> None:
        """Take back a running sequence's last `k` tokens (outputs and KV; see KVManager.rollback)."""
        self.kv.rollback(seq, k)

    def postprocess(
        self,
        batch: ScheduledBatch,
        tokens: list[int],
        logprobs: list[float],
        top_logprobs: list[TopLogprobs] | None = None,
    ) -> list[Sequence]:
        """After the forward of `batch`: every scheduled token is cached now; each sampling sequence
        takes its token (with its log-probability, and its alternatives' where asked), and one that stops
        is finished and its pages released (full pages of it to the prefix cache). Returns the sequences
        that got a token."""
        for seq, n in batch.work:
            seq.num_cached += n
        advanced = batch.samplers
        tops = top_logprobs or [()] * len(advanced)
        for seq, token, logprob, top in zip(advanced, tokens, logprobs, tops, strict=True):
            if self._take(seq, token, logprob, top):
                self._finish(seq)
        self._trim_draft_room(batch)
        return advanced

    def attach_drafts(self, batch: ScheduledBatch, drafts: list[list[int]] | DeviceDrafts) -> None:
        """Give the decodes of `batch` that have draft room (in `batch.draft_room`'s order) their draft
        tokens, at most their room each: those decodes become verifies. Drafts on the device leave
        placeholders in the sequences until the verify brings them to the host (`DeviceDrafts`)."""
        device, host = (drafts, None) if isinstance(drafts, DeviceDrafts) else (None, drafts)
        counts = device.counts if device is not None else [len(tokens) for tokens in drafts]
        for k, ((i, room), count) in enumerate(zip(batch.draft_room.items(), counts, strict=True)):
            seq, n = batch.work[i]
            if count > room:
                raise ValueError(f"{count} drafts for sequence {seq.id}, room for {room}")
            if count:
                seq.draft_token_ids = list(host[k]) if host is not None else [DRAFT_PLACEHOLDER] * count
                batch.work[i] = (seq, n + count)
                batch.verifies = True
        if device is not None and batch.verifies:
            device.seqs = batch.proposal_seqs
            batch.device_drafts = device

    def postprocess_verified(self, batch: ScheduledBatch, verified: list[Verified]) -> list[Sequence]:
        """`postprocess` for a batch with verifies: each sampling sequence takes its tokens in order (the
        accepted drafts, then the target's own), up to the first that stops it. A verify's K/V stays for
        the positions whose token it kept — its last token and the accepted drafts — and the pages past
        them go back to the pool."""
        for seq, n in batch.work:
            if not seq.draft_token_ids:
                seq.num_cached += n
        advanced = batch.samplers
        for seq, v in zip(advanced, verified, strict=True):
            drafted, start = len(seq.draft_token_ids), seq.num_cached
            taken = 0
            for token, logprob, top in zip(v.tokens, v.logprobs, v.tops, strict=True):
                taken += 1
                if self._take(seq, token, logprob, top):
                    break
            if drafted:
                # what the request took of the drafts: a stop inside the chain cuts them too
                accepted = min(taken, len(v.tokens) - 1)
                seq.spec_verifies += 1
                seq.spec_accepted += accepted
                self.spec_accepted[accepted] += 1
                seq.draft_token_ids = []
                # the K/V of its last token and the accepted drafts, of the tokens it kept
                seq.num_cached = min(start + len(v.tokens), seq.num_tokens)
            if seq.finished:
                self._finish(seq)
        self._trim_draft_room(batch)
        return advanced

    def _trim_draft_room(self, batch: ScheduledBatch) -> None:
        """Give back the pages a decode's draft room held past what it kept (rejected drafts, or room
        its proposer did not fill)."""
        for i in batch.draft_room:
            seq = batch.work[i][0]
            if not seq.finished:
                self.kv.trim(seq)

    def _take(self, seq: Sequence, token: int, logprob: float, top: TopLogprobs) -> bool:
        """Append a token to `seq`; True if it stops there (its finish reason set)."""
        seq.append(token, logprob, top)
        seq.finish_reason = self._stop_reason(seq)
        return seq.finish_reason is not None

    def _finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.release(seq, keep_prefix=True)

    def _stop_reason(self, seq: Sequence) -> str | None:
        if self.stops is not None:
            return self.stops.check(seq)
        return "length" if len(seq.output_token_ids) >= seq.params.max_tokens else None

    def schedule(self) -> ScheduledBatch:
        budget, prefill = self.config.token_budget, self.config.chunked_prefill_size
        work: list[tuple[Sequence, int]] = []
        decodes: list[int] = []  # work rows of decodes that may verify drafts
        self._preempted = set()
        for seq in list(self.running):
            if seq in self._preempted:  # preempted to make room for an older one
                continue
            n = self._tokens(seq, budget, prefill)
            if n and self._reserve(seq, n, preempt_newer_than=seq):
                if self.lookahead and n == 1 and seq.uncached == 1:
                    decodes.append(len(work))
                work.append((seq, n))
                budget -= n
                prefill -= n if n > 1 else 0
        room = self._draft_rooms(work, decodes, budget) if decodes else {}
        budget -= sum(room.values())
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running_requests:
            seq = self.waiting[0]
            self.kv.match_prefix(seq)
            n = self._tokens(seq, budget, prefill)
            if not n or not self._reserve(seq, n, preempt_newer_than=None):
                self.kv.release(seq, keep_prefix=False)
                break
            self.waiting.popleft()
            self.kv.admitted(seq)
            self.running.append(seq)
            work.append((seq, n))
            budget -= n
            prefill -= n if n > 1 else 0
        return ScheduledBatch.of(work, room)

    def _draft_rooms(
        self, work: list[tuple[Sequence, int]], decodes: list[int], budget: int
    ) -> dict[int, int]:
        """Draft room of each decode (by work row), after every running request got its own tokens:
        oldest first while the token budget lasts, on pages the pool (or the prefix cache's unused pages)
        can spare. Room never preempts a request: a decode without pages for it verifies nothing."""
        room: dict[int, int] = {}
        for i in decodes:
            seq = work[i][0]
            k = min(self._draft_room(seq), budget)
            if k and self.kv.reserve(seq, 1 + k):
                room[i] = k
                budget -= k
        return room

    def _draft_room(self, seq: Sequence) -> int:
        """Draft tokens a decode of `seq` may verify: `lookahead`, but none it could never keep (past
        `max_tokens`, or past the model's context)."""
        if not self.lookahead:
            return 0
        left = seq.params.max_tokens - len(seq.output_token_ids) - 1
        if self.stops is not None:
            left = min(left, self.stops.max_model_len - seq.num_tokens)
        return max(0, min(self.lookahead, left))

    def _tokens(self, seq: Sequence, budget: int, prefill: int) -> int:
        tail = seq.uncached
        return min(tail, budget) if tail == 1 else min(tail, budget, max(prefill, 0))

    def _reserve(self, seq: Sequence, n: int, preempt_newer_than: Sequence | None) -> bool:
        """Pages for `seq`'s next `n` tokens: from the pool, then by evicting cached prefixes, then (for
        a running sequence) by preempting running sequences admitted after it — which are not in this
        step's batch yet, as the running list is scheduled oldest first. Admission never preempts."""
        while not self.kv.reserve(seq, n):
            if preempt_newer_than is None:
                return False
            newer = self.running[self.running.index(preempt_newer_than) + 1 :]
            if not newer:
                return False
            self._preempt(newer[-1])
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._preempted.add(seq)
        self.kv.release(seq, keep_prefix=False)
        self.waiting.appendleft(seq)
        self.preemptions += 1
        logger.info("preempted request %d (KV cache full); it will be recomputed", seq.id)
