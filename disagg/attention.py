"""The attention backend of a step: the per-step metadata every layer's attention reads, prepared in one place.

A step carries new tokens of two kinds, packed into one token dimension for ONE model forward:

- decode rows first: one token per sequence that is generating (its context is all in the pool);
- then prompt chunks: tokens [start, end) of a prompt whose tokens [0, start) are already in the pool (computed by
  earlier chunks, or pages reused from the prefix cache).

:meth:`StepBatch.build` turns (sequence key, positions) into tensors once per step: each token's position and pool
slot, and for each kind its block table and lengths, kept on the host as well. Every layer then calls
:meth:`StepBatch.attend`, which stores the layer's new K/V into the pool and attends with the phase's own kernel:
``kernels.paged_decode_attention`` for the decode rows (the decode-specialized kernel, split-KV and all) and
``kernels.paged_prefill_attention`` for the chunks (each chunk's queries against its sequence's pages, causal,
bottom-right aligned). A step holding both kinds (the colocated deployment's mixed step) launches both kernels per
layer on disjoint row ranges of one output, so a decode row is computed exactly as in a decode-only step and the two
deployments agree token for token.

The kernels run through plans (:mod:`kernels._plan`, after FlashInfer's plan/run): the first layer of a step makes
the step's :class:`StepPlans` from the host-side lengths (checks, split count, grid, workspace from the pool's
:class:`kernels.Workspace`); every layer then only launches. No layer reads a device value on the host, so the
host reads of a step do not grow with the number of layers.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

import kernels
from disagg.kv_pool import KVPool


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` (a fresh CPU tensor) on ``device``: through pinned memory without waiting on CUDA (the caching host
    allocator keeps the pinned block until the copy is done), as is on CPU."""
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


@dataclass
class StepBatch:
    """The attention metadata of one step (see the module docstring); tensors on the pool's device.

    positions: int64 (tokens,) position of every new token; slots: int64 (tokens,) its pool slot.
    num_decode: the first ``num_decode`` tokens are decode rows; decode_block_table int32 (num_decode, pages),
    decode_seq_lens int32 (num_decode,) context lengths including the new token; num_splits: the decode kernel's
    split-KV factor (None: the plan picks it from the host lengths, as the kernel would).
    chunk_block_table int32 (chunks, pages), cu_seqlens_q int32 (chunks + 1,) offsets of the chunks among the
    tokens after the decode rows, chunk_seq_lens int32 (chunks,) tokens in the pool once the chunk is written,
    max_seqlen_q: the longest chunk.
    decode_lens, query_lens, chunk_lens: the same lengths on the host (what the plans are made from; decode_lens
    holds the bound instead when :meth:`build` was given ``decode_bound``).
    input_ids: int64 (tokens,) the new tokens' ids, when :meth:`build` was given them.
    """

    pool: KVPool
    positions: torch.Tensor
    slots: torch.Tensor
    num_decode: int
    decode_block_table: torch.Tensor | None
    decode_seq_lens: torch.Tensor | None
    num_splits: int | None
    chunk_block_table: torch.Tensor | None
    cu_seqlens_q: torch.Tensor | None
    chunk_seq_lens: torch.Tensor | None
    max_seqlen_q: int
    decode_lens: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    chunk_lens: list[int] = field(default_factory=list)
    input_ids: torch.Tensor | None = None
    _plans: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        pool: KVPool,
        decode: Sequence[tuple[Hashable, int]] = (),
        chunks: Sequence[tuple[Hashable, int, int]] = (),
        *,
        num_splits: int | None = None,
        input_ids: Sequence[int] | None = None,
        padding: int = 0,
        decode_bound: int | None = None,
    ) -> StepBatch:
        """decode: (sequence, position of its new token); chunks: (sequence, start, end) prompt token ranges. The
        sequences' pages must already cover every position. ``input_ids`` (one per new token), when given, travel
        with the rest as :attr:`input_ids`. Host work is O(tokens); the block tables are gathered on the device
        from the pool's persistent one (:attr:`KVPool.blocks`), and everything else goes host→device in ONE copy
        (from pinned memory on CUDA, not waiting for it).

        ``padding`` adds that many harmless decode rows after the real ones (a CUDA graph's fixed batch, see
        :mod:`disagg.cuda_graph`): input id 0 at position 0, slot -1 (the KV write skips it), context length 0
        (attention reads no page and writes zeros); their outputs mean nothing. ``decode_bound`` plans the decode
        kernel for contexts of that many tokens in every row instead of the step's own lengths (the split count
        then stays valid for any later lengths up to the bound: a captured plan replays with new lengths)."""
        pad = [0] * padding
        spans = [(s, p, p + 1) for s, p in decode] + list(chunks)
        dec, chk = spans[: len(decode)], spans[len(decode) :]
        decode_lens, query_lens, chunk_lens = [b for _, _, b in dec], [b - a for _, a, b in chk], [b for _, _, b in chk]
        tokens = len(dec) + sum(query_lens)
        if input_ids is not None and len(input_ids) != tokens:
            raise ValueError(f"input_ids must have one id per new token ({tokens}), got {len(input_ids)}")
        num_decode = len(dec) + padding
        plan_lens = decode_lens + pad if decode_bound is None else [decode_bound] * num_decode
        ids = [] if input_ids is None else [*input_ids[: len(dec)], *pad, *input_ids[len(dec) :]]

        # every field in one host buffer: the int64 ones, then the int32 ones (cast on the device)
        def longs(values) -> torch.Tensor:
            return torch.tensor(list(values), dtype=torch.int64)

        wide = {
            "positions": [longs([p for _, p in decode] + pad), *(torch.arange(a, b) for _, a, b in chk)],
            "slots": [longs([pool.slot(s, p) for s, p in decode] + [-1] * padding)]
            + [pool.slots(s, a, b) for s, a, b in chk],
            "input_ids": [longs(ids)],
            "decode_rows": [longs(pool.blocks.rows([s for s, _ in decode]) + pad)],
            "chunk_rows": [longs(pool.blocks.rows([s for s, _, _ in chk]))],
        }
        narrow = {
            "decode_seq_lens": decode_lens + pad,
            "cu_seqlens_q": [0, *itertools.accumulate(query_lens)] if chk else [],
            "chunk_seq_lens": chunk_lens,
        }
        parts = [torch.cat(v) for v in wide.values()] + [longs(v) for v in narrow.values()]
        sizes = [len(t) for t in parts]
        flat = to_device(torch.cat(parts), pool.device)
        n_wide = sum(sizes[: len(wide)])
        dev = dict(zip(wide, flat[:n_wide].split(sizes[: len(wide)]), strict=True))
        dev |= zip(narrow, flat[n_wide:].to(torch.int32).split(sizes[len(wide) :]), strict=True)
        return cls(
            pool=pool,
            positions=dev["positions"],
            slots=dev["slots"],
            num_decode=num_decode,
            decode_block_table=pool.blocks.gather(dev["decode_rows"]) if num_decode else None,
            decode_seq_lens=dev["decode_seq_lens"] if num_decode else None,
            num_splits=num_splits,
            chunk_block_table=pool.blocks.gather(dev["chunk_rows"]) if chk else None,
            cu_seqlens_q=dev["cu_seqlens_q"] if chk else None,
            chunk_seq_lens=dev["chunk_seq_lens"] if chk else None,
            max_seqlen_q=max(query_lens, default=0),
            decode_lens=plan_lens,
            query_lens=query_lens,
            chunk_lens=chunk_lens,
            input_ids=dev["input_ids"] if input_ids is not None else None,
        )

    def plans(self, num_q_heads: int, q_dtype: torch.dtype, window: int | None) -> StepPlans:
        """The step's kernel plans for layers of this query geometry and window, made on the first layer that asks
        (host work once per step and distinct window, never per layer)."""
        key = (num_q_heads, q_dtype, window)
        if key not in self._plans:
            self._plans[key] = StepPlans.make(self, num_q_heads, q_dtype, window)
        return self._plans[key]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None):
        """q (tokens, Hq, D), k/v (tokens, Hkv, D) of this step's new tokens -> (tokens, Hq, D)."""
        pool, n = self.pool, self.num_decode
        plans = self.plans(q.shape[1], q.dtype, window)
        caches = (pool.k[layer], pool.v[layer])
        plans.write.run(k, v, *caches, self.slots)
        if plans.chunk is None:
            return plans.decode.run(q, *caches, self.decode_block_table, self.decode_seq_lens)
        if plans.decode is None:
            return plans.chunk.run(q, *caches, self.chunk_block_table, self.cu_seqlens_q, self.chunk_seq_lens)
        out = torch.empty_like(q)  # both kernels write their rows of it: no concatenation
        plans.decode.run(q[:n], *caches, self.decode_block_table, self.decode_seq_lens, out=out[:n])
        plans.chunk.run(q[n:], *caches, self.chunk_block_table, self.cu_seqlens_q, self.chunk_seq_lens, out=out[n:])
        return out


@dataclass
class StepPlans:
    """One step's kernel plans (see :mod:`kernels._plan`) for one query geometry and window: the pool write of
    every new token, the decode rows' attention and the chunks' attention (None when the step has none)."""

    write: kernels.WriteKVPlan
    decode: kernels.PagedDecodePlan | None
    chunk: kernels.PagedPrefillPlan | None

    @classmethod
    def make(cls, batch: StepBatch, num_q_heads: int, q_dtype: torch.dtype, window: int | None) -> StepPlans:
        pool = batch.pool
        cache = (pool.k[0], pool.v[0])  # every layer's caches share this layout
        k_scale, v_scale = pool.scales
        common = dict(
            num_q_heads=num_q_heads, q_dtype=q_dtype, window=window, k_scale=k_scale, v_scale=v_scale,
            workspace=pool.workspace,
        )  # fmt: skip
        decode = chunk = None
        if batch.decode_block_table is not None:
            decode = kernels.PagedDecodePlan(
                *cache,
                batch.decode_lens,
                block_table_width=batch.decode_block_table.shape[1],
                num_splits=batch.num_splits,
                **common,
            )
        if batch.chunk_block_table is not None:
            chunk = kernels.PagedPrefillPlan(
                *cache,
                batch.query_lens,
                batch.chunk_lens,
                block_table_width=batch.chunk_block_table.shape[1],
                causal=True,
                **common,
            )
        write = kernels.WriteKVPlan(
            *cache, batch.slots.shape[0], kv_dtype=q_dtype, slot_dtype=batch.slots.dtype, k_scale=k_scale,
            v_scale=v_scale,
        )  # fmt: skip
        return cls(write, decode, chunk)
