"""Paged KV caches for tests: random caches, shuffled non-contiguous block tables, slot mappings."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tests.util import DEVICE, randn

UNUSED_PAGE = 10**6
"""Filler for block-table entries past a sequence's last page: not a page of any test cache, so a kernel that read
one would fail loudly (and the launcher's page-id check must ignore them)."""


@dataclass
class PagedKV:
    k_cache: torch.Tensor  # (num_pages, page_size, num_kv_heads, head_dim)
    v_cache: torch.Tensor
    block_table: torch.Tensor  # int32 (batch, max_pages)
    seq_lens: torch.Tensor  # int32 (batch,)

    @property
    def args(self) -> tuple[torch.Tensor, ...]:
        return self.k_cache, self.v_cache, self.block_table, self.seq_lens


def pages_needed(lens: list[int], page_size: int) -> list[int]:
    return [-(-n // page_size) for n in lens]


def shuffled_block_table(
    lens: list[int], page_size: int, num_pages: int, gen: torch.Generator, extra_cols: int = 1
) -> torch.Tensor:
    """Each sequence gets distinct pages drawn in random order from the whole cache (never contiguous, never
    sorted), with ``extra_cols`` unused columns filled with UNUSED_PAGE."""
    need = pages_needed(lens, page_size)
    assert sum(need) <= num_pages
    perm = torch.randperm(num_pages, generator=gen)
    table = torch.full((len(lens), max(need, default=0) + extra_cols), UNUSED_PAGE, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = perm[used : used + n].int()
        used += n
    return table.to(DEVICE)


def slot_mapping(block_table: torch.Tensor, lens: list[int], page_size: int) -> torch.Tensor:
    """int64 slots of every token of every sequence, packed token-major (sequence 0's tokens first)."""
    table = block_table.cpu().long()
    slots = []
    for b, n in enumerate(lens):
        t = torch.arange(n)
        slots.append(table[b, t // page_size] * page_size + t % page_size)
    return torch.cat(slots).to(DEVICE) if slots else torch.empty(0, dtype=torch.int64, device=DEVICE)


def random_paged_kv(
    gen: torch.Generator,
    lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    spare_pages: int = 3,
) -> PagedKV:
    """Caches full of random values (every page, so that reading a wrong page or a token past seq_len changes the
    result), with a shuffled block table for ``lens``."""
    num_pages = sum(pages_needed(lens, page_size)) + spare_pages
    k_cache = randn(num_pages, page_size, num_kv_heads, head_dim, dtype=dtype, generator=gen)
    v_cache = randn(num_pages, page_size, num_kv_heads, head_dim, dtype=dtype, generator=gen)
    table = shuffled_block_table(lens, page_size, num_pages, gen)
    return PagedKV(k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32, device=DEVICE))


def random_fp8(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Random finite float8_e4m3fn values (a sentinel filling for fp8 caches)."""
    return (torch.randn(*shape, generator=gen) * 4).to(torch.float8_e4m3fn).to(DEVICE)
