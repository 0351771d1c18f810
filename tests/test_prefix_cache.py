"""The prefix cache in the KV pool's allocator (no kernels): page names chain over the tokens before them and the
salt, shared pages are reference-counted and never handed out twice, unreferenced cached pages count as free and
are evicted least recently used first, and every path returns the pool to fully free (cached pages aside)."""

import pytest
import torch

from disagg.errors import PoolFullError
from disagg.kv_pool import KVPool
from disagg.prefix_cache import chain_hashes
from tests.util import DEVICE


def make(num_pages=6, page_size=8, prefix_cache=True, salt=b"model"):
    return KVPool(
        num_layers=1,
        num_kv_heads=1,
        head_dim=32,
        num_pages=num_pages,
        page_size=page_size,
        dtype=torch.float32,
        device=DEVICE,
        prefix_cache=prefix_cache,
        cache_salt=salt,
    )


def cache(pool, seq, tokens):
    """Allocate ``tokens`` for ``seq`` reusing what is cached, name its full pages (as if written), return (names,
    pages shared)."""
    names = pool.page_hashes(tokens)
    shared = pool.allocate(seq, len(tokens), names)
    for i, name in enumerate(names):
        pool.publish(seq, i, name)
    return names, shared


def test_names_chain_over_every_token_before_and_the_salt():
    a = chain_hashes(b"s", list(range(20)), 8, [])
    assert len(a) == 2  # the partial third page has no name
    assert chain_hashes(b"s", list(range(16)) + [99] * 4, 8, []) == a  # same full pages
    assert chain_hashes(b"s", [7, *range(1, 20)], 8, [])[1] != a[1]  # page 1 depends on page 0's tokens
    assert chain_hashes(b"t", list(range(20)), 8, []) != a  # another model / dtype
    assert chain_hashes(b"s", list(range(40)), 8, a[:1]) == chain_hashes(b"s", list(range(40)), 8, [])  # extends
    # the pool's salt includes its dtype and page size
    assert make().page_hashes(list(range(16))) != make(salt=b"other").page_hashes(list(range(16)))


def test_shared_pages_are_reference_counted_and_cached_pages_count_as_free():
    pool = make(num_pages=6)
    tokens = list(range(20))
    names, shared = cache(pool, "a", tokens)
    assert shared == 0 and pool.num_cached_pages == 2
    # b starts with the same 16 tokens: shares a's two pages, gets one fresh page
    _, shared = cache(pool, "b", [*tokens[:16], 5, 5, 5])
    assert shared == 2 and pool.pages("b")[:2] == pool.pages("a")[:2]
    assert pool.pages("b")[2] != pool.pages("a")[2]
    assert pool.num_free_pages == 2
    pool.free("a")  # its unnamed third page is free; the shared ones are still b's
    assert pool.num_free_pages == 3 and pool.num_idle_cached_pages == 0
    pool.free("b")
    assert pool.num_free_pages == 6 and pool.num_idle_cached_pages == 2 and pool.is_fully_free()
    # a third request reuses them after both left
    assert pool.allocate("c", 17, names) == 2
    pool.free("c")
    pool.clear_prefix_cache()
    assert pool.num_cached_pages == 0 and pool.num_free_pages == 6 and pool.is_fully_free()


def test_eviction_takes_the_least_recently_used_unreferenced_page():
    pool = make(num_pages=3)
    first, _ = cache(pool, "a", [1] * 8)
    pool.free("a")
    second, _ = cache(pool, "b", [2] * 8)
    pool.free("b")
    assert pool.num_idle_cached_pages == 2 and pool.num_free_pages == 3
    assert pool.allocate("c", 8, first) == 1  # touching `first` makes `second` the least recently used
    pool.free("c")
    pool.allocate("d", 16)  # one free page, then an eviction: `second` goes
    assert pool.cached_prefix(second) == [] and len(pool.cached_prefix(first)) == 1
    with pytest.raises(PoolFullError):
        pool.allocate("e", 9)  # a referenced page is never evicted (only `first`'s idle page is left)
    pool.free("d")
    assert pool.is_fully_free()


def test_allocation_with_a_cached_prefix_is_all_or_nothing():
    pool = make(num_pages=4)
    names, _ = cache(pool, "a", list(range(16)))
    pool.free("a")
    pool.allocate("x", 8)  # one free page left, and a's two cached ones
    with pytest.raises(PoolFullError, match="2 pages needed, 1 of 4 free"):
        pool.allocate("b", 32, names)  # 2 shared + 2 fresh: 1 page short
    assert pool.num_idle_cached_pages == 2 and pool.num_free_pages == 3  # nothing taken, nothing evicted
    assert pool.allocate("b", 24, names) == 2 and pool.num_free_pages == 0
    pool.free("b")
    pool.free("x")
    assert pool.is_fully_free()


def test_adopt_swaps_an_unwritten_page_for_a_cached_one_and_publish_never_renames():
    pool = make(num_pages=6)
    names, _ = cache(pool, "a", list(range(16)))
    pool.allocate("b", 16)  # allocated before a's pages were cached: fresh pages
    assert pool.adopt("b", 0, names[0]) and pool.pages("b")[0] == pool.pages("a")[0]
    assert not pool.adopt("b", 1, b"unknown name")
    pool.publish("b", 1, names[1])  # a's page already has this name: b's page stays private
    assert pool.cached_prefix(names) == pool.pages("a")
    pool.free("a")
    pool.free("b")
    assert pool.is_fully_free() and pool.num_cached_pages == 2


def test_without_a_prefix_cache_nothing_is_named_or_kept():
    pool = make(prefix_cache=False)
    names = pool.page_hashes(list(range(16)))
    assert pool.allocate("a", 16, names) == 0
    pool.publish("a", 0, names[0])
    pool.free("a")
    assert pool.num_cached_pages == 0 and pool.allocate("b", 16, names) == 0


@pytest.mark.parametrize("tokens, error", [(-20, ValueError), (2.5, TypeError), ("8", TypeError), (True, TypeError)])
def test_allocate_refuses_bad_token_counts(tokens, error):
    pool = make()
    with pytest.raises(error, match="num_tokens"):
        pool.allocate("a", tokens)
    assert pool.is_fully_free()


@pytest.mark.parametrize("num_pages, error", [(2.5, TypeError), (0, ValueError), (None, TypeError)])
def test_pool_refuses_bad_num_pages(num_pages, error):
    with pytest.raises(error, match="num_pages"):
        make(num_pages=num_pages)


@pytest.mark.parametrize("dtype", [torch.int8, torch.float64])
def test_pool_refuses_dtypes_the_kernels_do_not_take(dtype):
    with pytest.raises(ValueError, match="dtype"):
        KVPool(num_layers=1, num_kv_heads=1, head_dim=32, num_pages=2, page_size=8, dtype=dtype, device=DEVICE)
