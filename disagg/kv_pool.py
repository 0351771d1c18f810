"""The paged KV pool of one stage: per-layer K and V page tensors, a free list of pages, and the block table of
every sequence that holds pages.

Layout (the one ``kernels.write_kv_cache`` and ``kernels.paged_decode_attention`` read and write): for each layer
one K and one V tensor of shape (num_pages, page_size, num_kv_heads, head_dim). Token ``t`` of a sequence lives in
page ``table[t // page_size]`` at offset ``t % page_size``, i.e. at slot ``page * page_size + offset`` of the
flattened (num_pages * page_size, num_kv_heads, head_dim) view. Pages of a sequence need not be contiguous.

Allocation is all-or-nothing: a request gets every page it asks for or none (:class:`PoolFullError`), so a failed
allocation never leaves pages behind. This module is the only one that knows the layout; the export format and the
stages see K/V as token-major (tokens, num_kv_heads, head_dim) tensors.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

import kernels
from disagg.errors import PoolFullError

PAGE_SIZES = (8, 16, 32, 64, 128, 256)  # what the paged kernels accept
FP8 = torch.float8_e4m3fn


class KVPool:
    """Paged K/V storage of one stage (see the module docstring for the layout).

    Args:
        num_layers, num_kv_heads, head_dim: the model's KV shape.
        num_pages: pages per layer; capacity is num_pages * page_size tokens.
        page_size: tokens per page, a power of two from 8 to 256.
        dtype: cache dtype: the model's dtype, or ``torch.float8_e4m3fn`` (values stored as x / scale).
        device: where the pages live (the kernels' device).
        kv_scale: the per-tensor fp8 scale of every layer's K and V (ignored for other dtypes).
    """

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        kv_scale: float = 1.0,
    ):
        if page_size not in PAGE_SIZES:
            raise ValueError(f"page_size must be one of {PAGE_SIZES}, got {page_size}")
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_pages, self.page_size, self.dtype, self.device = num_pages, page_size, dtype, torch.device(device)
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.kv_scale = float(kv_scale) if dtype == FP8 else None
        self._scale = torch.tensor([kv_scale], dtype=torch.float32, device=device) if dtype == FP8 else None
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: pop() hands out low page ids first
        self._tables: dict[Hashable, list[int]] = {}

    # --- allocation ---------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Tokens the whole pool can hold."""
        return self.num_pages * self.page_size

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def is_fully_free(self) -> bool:
        """True when no sequence holds a page and every page is on the free list exactly once."""
        return not self._tables and sorted(self._free) == list(range(self.num_pages))

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.pages_for(num_tokens) <= len(self._free)

    def allocate(self, seq: Hashable, num_tokens: int) -> None:
        """Give ``seq`` the pages for ``num_tokens`` tokens, all or none. Raises PoolFullError when they are not
        free now, ValueError when ``seq`` already holds pages."""
        if seq in self._tables:
            raise ValueError(f"sequence {seq!r} already holds pages")
        need = self.pages_for(num_tokens)
        if need > len(self._free):
            raise PoolFullError(f"{need} pages needed, {len(self._free)} of {self.num_pages} free")
        self._tables[seq] = [self._free.pop() for _ in range(need)]

    def free(self, seq: Hashable) -> None:
        """Return ``seq``'s pages to the free list (nothing happens if it holds none)."""
        self._free.extend(reversed(self._tables.pop(seq, [])))

    def pages(self, seq: Hashable) -> list[int]:
        return list(self._tables[seq])

    # --- per-step metadata ------------------------------------------------------------------------------------
    def block_table(self, seqs: Sequence[Hashable]) -> torch.Tensor:
        """int32 (len(seqs), max pages) on the pool's device; rows are padded with page 0, which the kernels
        never read (they stop at each sequence's length)."""
        width = max((len(self._tables[s]) for s in seqs), default=1)
        rows = [self._tables[s] + [0] * (width - len(self._tables[s])) for s in seqs]
        return torch.tensor(rows, dtype=torch.int32).to(self.device)

    def slots(self, seq: Hashable, start: int, end: int) -> torch.Tensor:
        """int64 (end - start,) slots of token positions [start, end) of ``seq`` (host tensor)."""
        table = self._tables[seq]
        if end > len(table) * self.page_size:
            raise ValueError(f"positions up to {end} exceed the {len(table)} pages of sequence {seq!r}")
        # Only the pages covering [start, end): a decode step asks for one slot of a possibly very long sequence.
        first = start // self.page_size
        pages = torch.tensor(table[first : -(-end // self.page_size)], dtype=torch.int64)
        pos = torch.arange(start, end, dtype=torch.int64)
        return pages[pos // self.page_size - first] * self.page_size + pos % self.page_size

    # --- data ------------------------------------------------------------------------------------------------
    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store freshly computed k, v (tokens, num_kv_heads, head_dim) at ``slots`` (quantized for fp8)."""
        kernels.write_kv_cache(k, v, self.k[layer], self.v[layer], slots, k_scale=self._scale, v_scale=self._scale)

    def read_tokens(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored K, V of ``slots`` as token-major (tokens, num_kv_heads, head_dim) tensors in the cache dtype."""
        idx = slots.to(self.device)
        return self._as_cache(self._slots_view(self.k[layer])[idx]), self._as_cache(
            self._slots_view(self.v[layer])[idx]
        )

    def load_tokens(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K, V already in the cache dtype (an imported export) at ``slots``, bit for bit."""
        idx = slots.to(self.device)
        self._slots_view(self.k[layer])[idx] = self._slots_view(k.to(self.device))
        self._slots_view(self.v[layer])[idx] = self._slots_view(v.to(self.device))

    def _slots_view(self, t: torch.Tensor) -> torch.Tensor:
        """(slots, num_kv_heads, head_dim) view of a cache or of token-major K/V; fp8 is viewed as its bytes, since
        indexing kernels for float8 dtypes are not available on every device."""
        t = t.view(torch.uint8) if t.dtype == FP8 else t
        return t.view(-1, self.num_kv_heads, self.head_dim)

    def _as_cache(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(FP8) if self.dtype == FP8 else t

    @property
    def scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(k_scale, v_scale) for the decode kernel: float32 (1,) tensors for fp8 caches, else None."""
        return self._scale, self._scale

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.k[0].element_size()
