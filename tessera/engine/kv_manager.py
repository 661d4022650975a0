"""Who holds which KV pages: the free pool, the prefix cache, and every sequence's pages. The scheduler
owns one `KVManager` and is the only code that allocates or frees pages; the model runner only holds the
cache tensors the pages index into.

A sequence's pages cover its first `num_cached` tokens (their K/V is written) and, once the scheduler
reserved them, the tokens of its next forward. Its leading pages may be shared prefix-cache pages
(`prefix_nodes`): full pages of committed tokens, read-only. Pages reach the prefix cache only when a
sequence is released with `keep_prefix`, and only its first `num_cached` tokens' worth: the cache never
holds a token that was not committed.
"""

from __future__ import annotations

from tessera.engine.prefix_cache import PrefixCache
from tessera.engine.sequence import Sequence


class PagePool:
    """Free list of pages. Page 0 holds the dummy slot and is never handed out."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError("need at least 2 KV pages (one is reserved)")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"KV cache full: {n} pages wanted, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: list[int]) -> None:
        self._free.extend(reversed(pages))


class KVManager:
    def __init__(self, num_pages: int, page_size: int, prefix_cache: bool = True) -> None:
        self.page_size = page_size
        self.pool = PagePool(num_pages)
        self.cache = PrefixCache(self.pool, page_size) if prefix_cache else None

    @property
    def num_usable(self) -> int:
        """Pages a sequence can ever hold (all but the dummy slot's)."""
        return self.pool.num_pages - 1

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    @property
    def num_cached(self) -> int:
        """Pages held by the prefix cache (evictable once no running sequence shares them)."""
        return self.cache.num_pages if self.cache is not None else 0

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def match_prefix(self, seq: Sequence) -> None:
        """Give a sequence that holds no pages the cached pages of its longest cached prefix."""
        if self.cache is None or seq.pages:
            return
        nodes = self.cache.match(seq.token_ids)
        seq.prefix_nodes = nodes
        seq.pages = [n.page for n in nodes]
        seq.num_cached = len(nodes) * self.page_size

    def admitted(self, seq: Sequence) -> None:
        """`seq` runs from now on with the prefix it matched: count that in the hit rate, and report it
        with the request (a resumed preemption keeps its first count)."""
        if seq.cached_prompt_tokens is None:
            seq.cached_prompt_tokens = seq.num_cached
        if self.cache is not None:
            self.cache.record(seq.num_tokens, seq.num_cached)

    def reserve(self, seq: Sequence, n: int) -> bool:
        """Pages for `seq`'s next `n` tokens, evicting unshared cached prefixes if the pool runs dry.
        False (nothing allocated) if there are not enough."""
        need = self.pages_for(seq.num_cached + n) - len(seq.pages)
        if need <= 0:
            return True
        if need > self.pool.num_free and self.cache is not None:
            self.cache.evict(need - self.pool.num_free)
        if need > self.pool.num_free:
            return False
        seq.pages += self.pool.allocate(need)
        return True

    def release(self, seq: Sequence, keep_prefix: bool) -> None:
        """Take all of `seq`'s pages back; with `keep_prefix`, its full pages of committed tokens go to
        the prefix cache for later requests."""
        shared = len(seq.prefix_nodes)
        own = seq.pages[shared:]
        if self.cache is not None:
            if keep_prefix:
                own = self.cache.insert(seq.token_ids[: seq.num_cached], seq.pages)
            self.cache.release(seq.prefix_nodes)
        self.pool.free(own)
        seq.pages, seq.prefix_nodes, seq.num_cached = [], [], 0

    def rollback(self, seq: Sequence, k: int) -> None:
        """Forget `seq`'s last `k` output tokens (e.g. rejected speculative tokens) and their K/V.

        The sequence is left as after any sampling step: its new last token is the one the next forward
        runs (its K/V is computed again: a verify step that appends the target's next token after a
        rollback runs two tokens for it). Pages left holding none of its cached tokens return to the
        pool; the shared prefix pages are never rolled back into (ValueError), and since the prefix
        cache only takes committed tokens on release, nothing there needs undoing."""
        if seq.finished:
            raise ValueError(f"sequence {seq.id} has finished: its pages are released already")
        if not 0 <= k <= len(seq.output_token_ids):
            raise ValueError(f"cannot roll back {k} tokens of {len(seq.output_token_ids)} outputs")
        keep = seq.num_tokens - k
        if keep - 1 < len(seq.prefix_nodes) * self.page_size:
            raise ValueError(f"rolling back {k} tokens reaches into the shared prefix cache pages")
        seq.truncate(keep)
        seq.num_cached = min(seq.num_cached, keep - 1)
        used = self.pages_for(seq.num_cached)
        self.pool.free(seq.pages[used:])
        del seq.pages[used:]

    def trim(self, seq: Sequence) -> None:
        """Return the pages past `seq`'s cached tokens to the pool: after a verify, those that held only
        rejected draft tokens (never shared prefix pages: those hold committed tokens)."""
        used = max(self.pages_for(seq.num_cached), len(seq.prefix_nodes))
        self.pool.free(seq.pages[used:])
        del seq.pages[used:]

    def usage(self) -> dict[str, int | float]:
        """Page counts for metrics and leak checks: `pages_cached` are the prefix cache's, of which
        `pages_evictable` no request uses (once every request is done, all of them)."""
        return {
            "pages_usable": self.num_usable,
            "pages_free": self.num_free,
            "pages_cached": self.num_cached,
            "pages_evictable": self.cache.num_unreferenced if self.cache is not None else 0,
            "prefix_hit_rate": self.cache.hit_rate if self.cache is not None else 0.0,
        }
