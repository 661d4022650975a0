from __future__ import annotations

from tessera.engine.kv_cache import PagePool
from tessera.engine.prefix_cache import PrefixCache

PAGE = 4


def _cache(pages: int = 16) -> PrefixCache:
    return PrefixCache(PagePool(pages), PAGE)


def test_a_finished_prefix_is_shared_by_the_next_request() -> None:
    cache = _cache()
    tokens = list(range(10))  # two full pages and a partial one
    pages = cache.pool.allocate(3)
    leftover = cache.insert(tokens, pages)
    assert leftover == pages[2:] and cache.num_pages == 2
    nodes = cache.match([*range(9), 99, 100])
    assert [n.page for n in nodes] == pages[:2]
    assert cache.hits == 8 and 0 < cache.hit_rate < 1


def test_match_never_covers_the_last_token() -> None:
    cache = _cache()
    cache.insert(list(range(8)), cache.pool.allocate(2))
    assert len(cache.match(list(range(8)))) == 1  # the 8th token's logits must be computed
    assert len(cache.match(list(range(9)))) == 2


def test_duplicate_pages_come_back_to_the_caller() -> None:
    cache = _cache()
    first, second = cache.pool.allocate(2), cache.pool.allocate(2)
    cache.insert(list(range(8)), first)
    assert cache.insert(list(range(8)), second) == second  # already cached: free these
    assert cache.num_pages == 2


def test_eviction_takes_unreferenced_leaves_least_recently_used_first() -> None:
    cache = _cache(pages=8)
    a, b = cache.pool.allocate(2), cache.pool.allocate(2)
    cache.insert([1] * 8, a)  # a[0] -> a[1]
    cache.insert([2] * 8, b)
    held = cache.match([2] * 9)  # b is in use
    free_before = cache.pool.num_free
    assert cache.evict(4) == 2  # only a's two pages: its leaf, then the parent that became a leaf
    assert cache.pool.num_free == free_before + 2
    assert cache.match([1] * 9) == []
    cache.release(held)
    assert cache.evict(4) == 2 and cache.num_pages == 0
