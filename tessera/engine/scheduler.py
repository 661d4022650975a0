"""Continuous batching: which tokens of which sequences run in the next forward.

Every running sequence needs its uncached tail computed: a prompt (in chunks), a decode (the one token
sampled last), or a recompute after preemption (prompt and outputs so far) are the same case. Running
sequences go first, then waiting ones are admitted, sharing cached prefixes, while the token budget,
the prefill budget, the running limit and the KV pages allow. When pages run out, cached prefixes are
evicted first, then the newest running sequence is preempted: its pages are freed and it waits to be
recomputed later — nothing is lost.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from tessera.engine.kv_cache import PagePool
from tessera.engine.prefix_cache import PrefixCache
from tessera.engine.sequence import Sequence

logger = logging.getLogger("tessera")
Work = list[tuple[Sequence, int]]


@dataclass(frozen=True)
class SchedulerConfig:
    # All tokens of one forward, decodes included; None: chunked_prefill_size, so a mixed batch never
    # outgrows the piecewise graphs' range (whose default top is the chunked-prefill size).
    max_num_batched_tokens: int | None = None
    chunked_prefill_size: int = 2048  # prefill tokens of one forward
    max_running_requests: int = 256
    disable_radix_cache: bool = False

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens is None:
            object.__setattr__(self, "max_num_batched_tokens", self.chunked_prefill_size)
        if min(self.max_num_batched_tokens, self.chunked_prefill_size, self.max_running_requests) < 1:
            raise ValueError("scheduler budgets must be >= 1")


class Scheduler:
    def __init__(self, pool: PagePool, page_size: int, config: SchedulerConfig | None = None) -> None:
        self.pool, self.page_size = pool, page_size
        self.config = config or SchedulerConfig()
        self.cache = None if self.config.disable_radix_cache else PrefixCache(pool, page_size)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self._preempted: set[Sequence] = set()  # this schedule() call's (a set: `in running` was O(n))

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        need = self._pages_for(len(seq.prompt_token_ids) + seq.params.max_tokens)
        if need > self.pool.num_pages - 1:
            raise ValueError(
                f"a request needs {need * self.page_size} KV tokens (prompt + max_tokens); "
                f"the cache holds {(self.pool.num_pages - 1) * self.page_size}"
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
        self._release(seq, keep_prefix=False)
        return True

    def finish(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq, keep_prefix=True)

    def schedule(self) -> Work:
        budget, prefill = self.config.max_num_batched_tokens, self.config.chunked_prefill_size
        work: Work = []
        self._preempted = set()
        for seq in list(self.running):
            if seq in self._preempted:  # preempted to make room for an older one
                continue
            n = self._tokens(seq, budget, prefill)
            if n and self._reserve(seq, n, preempt_newer_than=seq):
                work.append((seq, n))
                budget -= n
                prefill -= n if n > 1 else 0
        while self.waiting and budget > 0 and len(self.running) < self.config.max_running_requests:
            seq = self.waiting[0]
            self._attach_prefix(seq)
            n = self._tokens(seq, budget, prefill)
            if not n or not self._reserve(seq, n, preempt_newer_than=None):
                self._release(seq, keep_prefix=False)
                break
            self.waiting.popleft()
            self.running.append(seq)
            work.append((seq, n))
            budget -= n
            prefill -= n if n > 1 else 0
        return work

    def _tokens(self, seq: Sequence, budget: int, prefill: int) -> int:
        tail = seq.uncached
        return min(tail, budget) if tail == 1 else min(tail, budget, max(prefill, 0))

    def _attach_prefix(self, seq: Sequence) -> None:
        if self.cache is None or seq.pages:
            return
        nodes = self.cache.match(seq.token_ids)
        seq.prefix_nodes = nodes
        seq.pages = [n.page for n in nodes]
        seq.num_cached = len(nodes) * self.page_size
        if seq.cached_prompt_tokens is None:  # reported per request; a resumed preemption keeps the first
            seq.cached_prompt_tokens = seq.num_cached

    def _reserve(self, seq: Sequence, n: int, preempt_newer_than: Sequence | None) -> bool:
        """Pages for `seq`'s next `n` tokens: from the pool, then by evicting cached prefixes, then (for
        a running sequence) by preempting running sequences admitted after it — which are not in this
        step's batch yet, as the running list is scheduled oldest first. Admission never preempts."""
        need = self._pages_for(seq.num_cached + n) - len(seq.pages)
        while need > self.pool.num_free:
            if self.cache is not None and self.cache.evict(need - self.pool.num_free):
                continue
            if preempt_newer_than is None:
                return False
            newer = self.running[self.running.index(preempt_newer_than) + 1 :]
            if not newer:
                return False
            self._preempt(newer[-1])
        if need > 0:
            seq.pages += self.pool.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._preempted.add(seq)
        self._release(seq, keep_prefix=False)
        self.waiting.appendleft(seq)
        self.preemptions += 1
        logger.info("preempted request %d (KV cache full); it will be recomputed", seq.id)

    def _release(self, seq: Sequence, keep_prefix: bool) -> None:
        shared = len(seq.prefix_nodes)
        own = seq.pages[shared:]
        if self.cache is not None:
            if keep_prefix:
                cached_tokens = seq.token_ids[: seq.num_cached]
                own = self.cache.insert(cached_tokens, seq.pages)
            self.cache.release(seq.prefix_nodes)
        self.pool.free(own)
        seq.pages, seq.prefix_nodes, seq.num_cached = [], [], 0

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)
