"""The paged KV pool of one stage: per-layer K and V page tensors, a free list of pages, and the block table of
every sequence that holds pages.

Layout (the one ``kernels.write_kv_cache`` and ``kernels.paged_decode_attention`` read and write): for each layer
one K and one V tensor of shape (num_pages, page_size, num_kv_heads, head_dim). Token ``t`` of a sequence lives in
page ``table[t // page_size]`` at offset ``t % page_size``, i.e. at slot ``page * page_size + offset`` of the
flattened (num_pages * page_size, num_kv_heads, head_dim) view. Pages of a sequence need not be contiguous.

Allocation is all-or-nothing: a request gets every page it asks for or none (:class:`PoolFullError`), so a failed
allocation never leaves pages behind. This module is the only one that knows the layout; the export format and the
stages see K/V as token-major (tokens, num_kv_heads, head_dim) tensors.

With ``prefix_cache=True`` the allocator also keeps a :class:`~disagg.prefix_cache.PrefixCache`: pages are
reference-counted, a sequence may start with pages another one computed (:meth:`KVPool.allocate` with the names
of its prompt's pages, or :meth:`KVPool.adopt` later), full pages are named once written (:meth:`KVPool.publish`),
and a named page whose last reference goes away stays cached, counted as free, until the pool needs it (least
recently used first) or :meth:`KVPool.clear_prefix_cache`. Allocation, freeing and eviction cost O(pages of the
sequence), never O(pages of the pool).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

import kernels
from disagg.block_table import BlockTable
from disagg.errors import PoolFullError
from disagg.prefix_cache import PrefixCache, chain_hashes

PAGE_SIZES = kernels.PAGE_SIZES  # what the paged kernels accept: powers of two from 1 to 256
FP8 = torch.float8_e4m3fn
CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, FP8)  # what the kernels read and write


def check_count(name: str, value: object, minimum: int) -> int:
    """``value`` as an int >= ``minimum``; TypeError / ValueError naming ``name`` otherwise (bools refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class KVPool:
    """Paged K/V storage of one stage (see the module docstring for the layout).

    Args:
        num_layers, num_kv_heads, head_dim: the model's KV shape.
        num_pages: pages per layer; capacity is num_pages * page_size tokens.
        page_size: tokens per page, a power of two from 1 to 256.
        dtype: cache dtype: the model's dtype, or ``torch.float8_e4m3fn`` (values stored as x / scale).
        device: where the pages live (the kernels' device).
        kv_scale: the per-tensor fp8 scale of every layer's K and V (ignored for other dtypes).
        max_seq_tokens: the longest sequence it holds (default: the whole pool); the width of its device block
            table (:attr:`blocks`, see :mod:`disagg.block_table`).
        prefix_cache: keep written full pages for reuse (see the module docstring).
        cache_salt: what else the K/V depend on (the model's fingerprint), mixed into every page name.
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
        max_seq_tokens: int | None = None,
        prefix_cache: bool = False,
        cache_salt: bytes = b"",
    ):
        check_count("num_pages", num_pages, 1)
        if page_size not in PAGE_SIZES or isinstance(page_size, bool):
            raise ValueError(f"page_size must be one of {PAGE_SIZES}, got {page_size!r}")
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"dtype must be one of {[str(d) for d in CACHE_DTYPES]}, got {dtype!r}")
        shape = (num_pages, page_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_pages, self.page_size, self.dtype, self.device = num_pages, page_size, dtype, torch.device(device)
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.kv_scale = float(kv_scale) if dtype == FP8 else None
        self._scale = torch.tensor([kv_scale], dtype=torch.float32, device=device) if dtype == FP8 else None
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: pop() hands out low page ids first
        self._tables: dict[Hashable, list[int]] = {}
        self._refs = [0] * num_pages  # sequences holding each page
        self.prefix_cache = PrefixCache() if prefix_cache else None
        self._salt = repr((cache_salt, str(dtype), self.kv_scale, page_size)).encode()
        longest = num_pages * page_size if max_seq_tokens is None else check_count("max_seq_tokens", max_seq_tokens, 1)
        self.max_seq_tokens = min(longest, num_pages * page_size)
        self.blocks = BlockTable(self.pages_for(self.max_seq_tokens), device)  # kept in step with _tables
        self.workspace = kernels.Workspace(device)  # split-KV scratch shared by the kernel plans of every step

    # --- allocation ---------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Tokens the whole pool can hold."""
        return self.num_pages * self.page_size

    @property
    def num_free_pages(self) -> int:
        """Pages an allocation can get now: free ones and cached ones no sequence references."""
        return len(self._free) + self.num_idle_cached_pages

    @property
    def num_cached_pages(self) -> int:
        """Pages named in the prefix cache (referenced or not)."""
        return len(self.prefix_cache) if self.prefix_cache is not None else 0

    @property
    def num_idle_cached_pages(self) -> int:
        return self.prefix_cache.num_idle if self.prefix_cache is not None else 0

    def is_fully_free(self) -> bool:
        """True when no sequence holds a page and every page is free or cached unreferenced, exactly once (O(pages):
        for tests and end-of-run checks)."""
        idle = self.prefix_cache.idle_pages() if self.prefix_cache is not None else []
        return not self._tables and not any(self._refs) and sorted(self._free + idle) == list(range(self.num_pages))

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def page_hashes(self, tokens: Sequence[int], hashes: list[bytes] | None = None) -> list[bytes]:
        """Names of the full pages of ``tokens`` in this pool (extending ``hashes``, the names of its first pages
        computed before); see :mod:`disagg.prefix_cache`."""
        return chain_hashes(self._salt, tokens, self.page_size, [] if hashes is None else hashes)

    def cached_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached pages of the longest chain of leading ``hashes``."""
        pages = []
        if self.prefix_cache is not None:
            for name in hashes:
                page = self.prefix_cache.lookup(name)
                if page is None:
                    break
                pages.append(page)
        return pages

    def can_allocate(self, num_tokens: int, prefix: Sequence[bytes] = ()) -> bool:
        need, available = self._need(num_tokens, prefix)
        return need <= available

    def _need(self, num_tokens: int, prefix: Sequence[bytes]) -> tuple[int, int]:
        """(fresh pages an allocation needs, pages it can get besides the cached ones it shares)."""
        shared = self.cached_prefix(prefix[: self.pages_for(num_tokens)])
        idle_shared = sum(1 for p in shared if self._refs[p] == 0)
        return self.pages_for(num_tokens) - len(shared), self.num_free_pages - idle_shared

    def allocate(self, seq: Hashable, num_tokens: int, prefix: Sequence[bytes] = ()) -> int:
        """Give ``seq`` the pages for ``num_tokens`` tokens, all or none: first the cached pages of the longest chain
        of leading page names ``prefix`` (shared, never to be written by ``seq``), then fresh ones. Returns how many
        pages were shared. Raises PoolFullError when the pages are not free now, ValueError when ``seq`` already
        holds pages or ``num_tokens`` < 0."""
        check_count("num_tokens", num_tokens, 0)
        if seq in self._tables:
            raise ValueError(f"sequence {seq!r} already holds pages")
        if num_tokens > self.max_seq_tokens:
            raise ValueError(
                f"num_tokens {num_tokens} is more than the pool's longest sequence ({self.max_seq_tokens})"
            )
        fresh, available = self._need(num_tokens, prefix)
        if fresh > available:
            raise PoolFullError(f"{fresh} pages needed, {available} of {self.num_pages} free")
        shared = self.cached_prefix(prefix[: self.pages_for(num_tokens)])
        for page in shared:
            self._ref(page)
        table = shared + [self._fresh() for _ in range(fresh)]
        for page in table[len(shared) :]:
            self._refs[page] = 1
        self._tables[seq] = table
        self.blocks.add(seq, table)
        return len(shared)

    def _ref(self, page: int) -> None:
        if self._refs[page] == 0 and self.prefix_cache is not None:
            self.prefix_cache.take(page)
        self._refs[page] += 1

    def _fresh(self) -> int:
        return self._free.pop() if self._free else self.prefix_cache.evict()

    def _unref(self, page: int) -> None:
        self._refs[page] -= 1
        if self._refs[page] == 0:
            if self.prefix_cache is not None and self.prefix_cache.is_named(page):
                self.prefix_cache.park(page)
            else:
                self._free.append(page)

    def free(self, seq: Hashable) -> None:
        """Release ``seq``'s pages (nothing happens if it holds none): unnamed ones go back to the free list, named
        ones stay cached until evicted."""
        for page in reversed(self._tables.pop(seq, [])):
            self._unref(page)
        self.blocks.remove(seq)

    def adopt(self, seq: Hashable, index: int, name: bytes) -> bool:
        """If page ``name`` is cached, make it ``seq``'s page ``index`` in place of the fresh page there (which
        ``seq`` has not written yet: the caller's promise) and return True."""
        page = self.prefix_cache.lookup(name) if self.prefix_cache is not None else None
        table = self._tables[seq]
        if page is None or table[index] == page:
            return page is not None
        self._ref(page)
        self._unref(table[index])
        table[index] = page
        self.blocks.set(seq, index, page)
        return True

    def publish(self, seq: Hashable, index: int, name: bytes) -> None:
        """Name ``seq``'s page ``index``, now completely written, for reuse (no-op without a prefix cache)."""
        if self.prefix_cache is not None:
            self.prefix_cache.insert(name, self._tables[seq][index])

    def clear_prefix_cache(self) -> None:
        """Forget every cached page: idle ones become free, referenced ones are freed with their sequences."""
        if self.prefix_cache is not None:
            self._free.extend(self.prefix_cache.clear())

    def pages(self, seq: Hashable) -> list[int]:
        return list(self._tables[seq])

    # --- per-step metadata ------------------------------------------------------------------------------------
    def block_table(self, seqs: Sequence[Hashable]) -> torch.Tensor:
        """int32 (len(seqs), most pages of these sequences) on the pool's device, gathered from :attr:`blocks`;
        entries past a sequence's pages are unspecified (the kernels stop at each sequence's length)."""
        width = max((len(self._tables[s]) for s in seqs), default=1)
        rows = torch.tensor(self.blocks.rows(seqs), dtype=torch.int64).to(self.device)
        return self.blocks.gather(rows)[:, :width]

    def slot(self, seq: Hashable, position: int) -> int:
        """The slot of token ``position`` of ``seq`` (host int; a decode row's, without a tensor op)."""
        return self._tables[seq][position // self.page_size] * self.page_size + position % self.page_size

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

    def gather_tokens(self, slots: torch.Tensor) -> torch.Tensor:
        """The stored K and V of ``slots`` in every layer as one tensor (num_layers, 2, tokens, num_kv_heads,
        head_dim) in the cache dtype on the pool's device (k of layer i at [i, 0], v at [i, 1]), so a caller
        copies all of it to the host at once."""
        idx = slots.to(self.device)
        rows = [self._slots_view(c)[idx] for layer in range(self.num_layers) for c in (self.k[layer], self.v[layer])]
        return self._as_cache(torch.stack(rows).unflatten(0, (self.num_layers, 2)))

    def load_all_tokens(self, slots: torch.Tensor, kv: torch.Tensor) -> None:
        """Store ``kv`` (num_layers, 2, tokens, num_kv_heads, head_dim), every layer's K and V already in the cache
        dtype (an imported export), at ``slots``, bit for bit; a host ``kv`` is copied to the device at once."""
        idx, kv = slots.to(self.device), kv.to(self.device)
        for layer in range(self.num_layers):
            self._slots_view(self.k[layer])[idx] = self._slots_view(kv[layer, 0])
            self._slots_view(self.v[layer])[idx] = self._slots_view(kv[layer, 1])

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
