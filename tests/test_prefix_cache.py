from __future__ import annotations

from tessera.engine.kv_manager import PagePool
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
    assert cache.hits == 0  # a match alone is no hit: the request may not be admitted
    cache.record(11, 8)
    assert cache.hits == 8 and cache.hit_rate == 8 / 11


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


def test_a_prefix_used_again_is_evicted_after_older_ones() -> None:
    """Least recently *used*, not inserted: a prefix matched after the others outlives them (its older
    heap entries are stale and skipped), and a path's pages go leaf first."""
    cache = _cache(pages=16)
    pages = {}
    for i, name in enumerate("abc", start=1):
        pages[name] = cache.pool.allocate(2)
        cache.insert([i] * 8, pages[name])

    def use(name: str) -> list[int]:  # match and release: what a finished request does
        nodes = cache.match([" abc".index(name)] * 9)
        cache.release(nodes)
        return [n.page for n in nodes]

    use("a")  # a: used last
    assert cache.evict(1) == 1 and use("b") == pages["b"][:1]  # b's leaf went; b's first page now newest
    assert cache.evict(2) == 2 and use("c") == []  # c, leaf then the parent that became a leaf
    assert cache.evict(1) == 1 and use("a") == pages["a"][:1]  # a's leaf goes before b's newer page
    assert cache.evict(8) == 2 and cache.num_pages == 0


def test_eviction_keeps_its_heap_bounded() -> None:
    cache = _cache(pages=64)
    tokens, pages = [7] * 8, cache.pool.allocate(2)
    cache.insert(tokens, pages)
    for _ in range(500):  # every use pushes a fresh entry; stale ones must not pile up forever
        cache.release(cache.match([*tokens, 0]))
    assert len(cache._heap) <= 4 * cache.num_pages + 64


def test_unreferenced_pages_are_counted_as_requests_come_and_go() -> None:
    cache = _cache(pages=8)
    cache.insert(list(range(12)), cache.pool.allocate(3))
    assert cache.num_unreferenced == 3  # no request holds them: evictable
    first = cache.match([*range(8), 50])  # two pages
    second = cache.match([*range(4), 60])  # the first of them again
    assert cache.num_unreferenced == 1
    cache.release(first)
    assert cache.num_unreferenced == 2  # page 0 still held by the second request
    cache.release(second)
    assert cache.num_unreferenced == cache.num_pages == 3
    assert cache.evict(3) == 3 and cache.num_unreferenced == cache.num_pages == 0
