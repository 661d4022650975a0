"""Prefix cache: a radix tree over full KV pages, shared between requests.

Each node holds one page and the `page_size` tokens it caches; a path from the root spells a token
prefix. Requests reference the nodes they use; nodes no request references are evicted least recently
used first, leaves before their parents, when the page pool runs dry.

Eviction pops a min-heap of evictable leaves keyed by last use. Entries are pushed whenever a node
becomes (or, used again, stays) an evictable leaf and are checked when popped, so an entry made stale
by a later use, a new child or a new reference is skipped: an eviction costs O(log n), where a scan of
the whole tree (tens of thousands of pages on a full GPU) cost milliseconds on every step that needed
pages.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tessera.engine.kv_manager import PagePool

_clock = itertools.count()


@dataclass(eq=False)
class _Node:
    page: int
    tokens: tuple[int, ...]
    parent: _Node | None
    children: dict[tuple[int, ...], _Node] = field(default_factory=dict)
    refs: int = 0
    last_used: int = 0


class PrefixCache:
    def __init__(self, pool: PagePool, page_size: int) -> None:
        self.pool, self.page_size = pool, page_size
        self.root = _Node(page=-1, tokens=(), parent=None)
        self.num_pages = 0  # pages held by the tree
        # of them, pages no request references: evictable, so free for a metric's purposes. (A node's
        # parent is referenced whenever it is, since prefixes are matched from the root.)
        self.num_unreferenced = 0
        self.hits = 0  # tokens served from the cache
        self.queries = 0  # tokens looked up
        self._heap: list[tuple[int, int, _Node]] = []  # (last_used, tie-break, node), some stale
        self._tie = itertools.count()

    def match(self, tokens: list[int]) -> list[_Node]:
        """Nodes caching the longest page-aligned prefix of `tokens`, referenced for the caller.
        The last token is never matched: its logits must be computed."""
        nodes, node = [], self.root
        usable = (len(tokens) - 1) // self.page_size
        for i in range(usable):
            child = node.children.get(tuple(tokens[i * self.page_size : (i + 1) * self.page_size]))
            if child is None:
                break
            nodes.append(child)
            node = child
        now = next(_clock)
        for n in nodes:
            self.num_unreferenced -= n.refs == 0
            n.refs += 1
            n.last_used = now
        return nodes

    def record(self, queried: int, hit: int) -> None:
        """Count a request's lookup in the hit rate: once, when it is admitted (an admission that fails
        for want of pages matches again on every step and must not count each time)."""
        self.queries += queried
        self.hits += hit

    def release(self, nodes: list[_Node]) -> None:
        for n in nodes:
            assert n.refs > 0, "released a prefix node twice"
            n.refs -= 1
            self.num_unreferenced += n.refs == 0
            self._offer(n)

    def insert(self, tokens: list[int], pages: list[int]) -> list[int]:
        """Hand the full pages of a finished sequence to the tree. Returns the pages the tree did not
        take (the sequence's partial last page, and pages duplicating cached ones): free those."""
        full = min(len(tokens) // self.page_size, len(pages))
        node, leftover, now = self.root, [], next(_clock)
        for i in range(full):
            key = tuple(tokens[i * self.page_size : (i + 1) * self.page_size])
            child = node.children.get(key)
            if child is None:
                child = _Node(page=pages[i], tokens=key, parent=node)
                node.children[key] = child
                self.num_pages += 1
                self.num_unreferenced += 1
            elif child.page != pages[i]:
                leftover.append(pages[i])
            child.last_used = now
            node = child
        self._offer(node)  # the path's end; every node above it has a child
        return leftover + pages[full:]

    def evict(self, pages_wanted: int) -> int:
        """Free up to `pages_wanted` pages of unreferenced leaves, least recently used first."""
        freed = 0
        while freed < pages_wanted and self._heap:
            last_used, _, leaf = heapq.heappop(self._heap)
            if not self._evictable(leaf) or leaf.last_used != last_used:
                continue  # stale: used, extended or referenced since it was pushed
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.tokens]
            leaf.parent = None
            self.pool.free([leaf.page])
            self.num_pages -= 1
            self.num_unreferenced -= 1
            freed += 1
            self._offer(parent)  # it may have become a leaf
        return freed

    def _evictable(self, node: _Node) -> bool:
        return node.parent is not None and not node.children and node.refs == 0

    def _offer(self, node: _Node) -> None:
        if not self._evictable(node):
            return
        heapq.heappush(self._heap, (node.last_used, next(self._tie), node))
        if len(self._heap) > 4 * self.num_pages + 64:  # mostly stale entries: rebuild (amortized O(1))
            self._heap = [e for e in self._heap if self._evictable(e[2]) and e[2].last_used == e[0]]
            heapq.heapify(self._heap)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
