"""Prefix cache: a radix tree over full KV pages, shared between requests.

Each node holds one page and the `page_size` tokens it caches; a path from the root spells a token
prefix. Requests reference the nodes they use; nodes no request references are evicted least recently
used first, leaves before their parents, when the page pool runs dry.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from tessera.engine.kv_cache import PagePool

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
        self.hits = 0  # tokens served from the cache
        self.queries = 0  # tokens looked up

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
            n.refs += 1
            n.last_used = now
        self.queries += len(tokens)
        self.hits += len(nodes) * self.page_size
        return nodes

    def release(self, nodes: list[_Node]) -> None:
        for n in nodes:
            assert n.refs > 0, "released a prefix node twice"
            n.refs -= 1

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
            elif child.page != pages[i]:
                leftover.append(pages[i])
            child.last_used = now
            node = child
        return leftover + pages[full:]

    def evict(self, pages_wanted: int) -> int:
        """Free up to `pages_wanted` pages of unreferenced leaves, least recently used first."""
        freed = 0
        while freed < pages_wanted:
            leaves = [n for n in self._nodes() if not n.children and n.refs == 0]
            if not leaves:
                break
            for leaf in sorted(leaves, key=lambda n: n.last_used)[: pages_wanted - freed]:
                assert leaf.parent is not None
                del leaf.parent.children[leaf.tokens]
                self.pool.free([leaf.page])
                self.num_pages -= 1
                freed += 1
        return freed

    def _nodes(self) -> list[_Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(n.children.values())
        return out

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0
