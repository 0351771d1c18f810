"""disagg.kv_pool: the free-list allocator, block tables and slots, and K/V in and out of pages."""

import pytest
import torch

from disagg.errors import PoolFullError
from disagg.kv_pool import KVPool
from tests.util import DEVICE, randn


def make(num_pages=6, page_size=8, dtype=torch.float32, layers=2):
    return KVPool(
        num_layers=layers,
        num_kv_heads=2,
        head_dim=64,
        num_pages=num_pages,
        page_size=page_size,
        dtype=dtype,
        device=DEVICE,
    )


def test_allocate_free_returns_to_fully_free():
    pool = make()
    assert pool.is_fully_free() and pool.capacity == 48
    pool.allocate("a", 9)  # 2 pages
    pool.allocate("b", 8)  # 1 page
    assert pool.num_free_pages == 3 and len(set(pool.pages("a") + pool.pages("b"))) == 3
    pool.free("a")
    pool.allocate("c", 40)  # 5 pages: reuses a's
    assert pool.num_free_pages == 0
    pool.free("b")
    pool.free("c")
    pool.free("c")  # freeing twice is harmless
    assert pool.is_fully_free()


def test_allocation_is_all_or_nothing():
    pool = make(num_pages=4)
    pool.allocate("a", 17)  # 3 pages
    with pytest.raises(PoolFullError, match="2 pages needed, 1 of 4 free"):
        pool.allocate("b", 9)
    assert pool.num_free_pages == 1 and not pool.can_allocate(9) and pool.can_allocate(8)
    with pytest.raises(ValueError, match="already holds pages"):
        pool.allocate("a", 1)
    pool.free("a")
    assert pool.is_fully_free()


@pytest.mark.parametrize("bad", [0, 12, 512])
def test_rejects_bad_page_size(bad):
    with pytest.raises(ValueError, match="page_size"):
        make(page_size=bad)


def test_slots_and_block_table_follow_the_pages():
    pool = make(num_pages=6, page_size=8)
    pool.allocate("x", 8)
    pool.allocate("a", 20)
    pool.free("x")  # a's pages are not the first ones, and the next allocation is not contiguous with them
    pool.allocate("b", 3)
    pa, pb = pool.pages("a"), pool.pages("b")
    slots = pool.slots("a", 6, 18)
    expected = [pa[t // 8] * 8 + t % 8 for t in range(6, 18)]
    assert slots.tolist() == expected
    table = pool.block_table(["a", "b"])
    assert table.dtype == torch.int32 and table.shape == (2, 3)
    assert table[0].tolist() == pa and table[1, :1].tolist() == pb
    with pytest.raises(ValueError, match="exceed"):
        pool.slots("b", 0, 9)


def test_write_then_read_tokens_in_logical_order(gen):
    pool = make(num_pages=8, page_size=8)
    pool.allocate("pad", 8)
    pool.allocate("a", 19)
    slots = pool.slots("a", 0, 19).to(DEVICE)
    k, v = randn(19, 2, 64, dtype=torch.float32, generator=gen), randn(19, 2, 64, dtype=torch.float32, generator=gen)
    pool.write(1, k, v, slots)
    kv = pool.gather_tokens(slots)  # every layer at once: (layers, 2, tokens, kv_heads, head_dim)
    assert kv.shape == (2, 2, 19, 2, 64)
    assert torch.equal(kv[1, 0], k) and torch.equal(kv[1, 1], v)
    assert kv[0].abs().sum() == 0 and pool.k[0].abs().sum() == 0  # other layers untouched
    # load_all_tokens (imports) stores bit for bit at other slots, from the host
    pool.allocate("b", 19)
    slots_b = pool.slots("b", 0, 19).to(DEVICE)
    pool.load_all_tokens(slots_b, kv.cpu())
    assert torch.equal(pool.gather_tokens(slots_b), kv)
